//! Tests of the delivery contract's types.

use super::*;

/// Settles nothing, records the give-back it was asked for.
struct Recording(Arc<std::sync::Mutex<Vec<RawMessage>>>);

#[async_trait]
impl Acker for Recording {
    async fn ack(&mut self, _: &RawMessage) -> Result<(), Error> {
        Ok(())
    }
    async fn nack(&mut self, _: &RawMessage, _: Duration) -> Result<(), Error> {
        Ok(())
    }
    async fn dead_letter(&mut self, _: &RawMessage, _: &DeadLetter) -> Result<(), Error> {
        Ok(())
    }
    async fn give_back(&mut self, message: &RawMessage, _: &str) -> Result<(), Error> {
        self.0.lock().unwrap().push(message.clone());
        Ok(())
    }
}

fn delivery(message: RawMessage, acker: impl Acker + 'static) -> Delivery {
    Delivery::new(message, "t".into(), "g".into(), 1, Box::new(acker))
}

#[tokio::test]
async fn a_give_back_counts_and_keeps_the_first_time() {
    let given = Arc::new(std::sync::Mutex::new(Vec::new()));
    let first = delivery(RawMessage::new("x"), Recording(given.clone()));
    assert_eq!(first.given_back(), 0);
    assert_eq!(first.given_back_since(), None);
    first.give_back("unknown version").await.unwrap();
    let once = given.lock().unwrap()[0].clone();
    assert_eq!(once.headers[header::GIVEN_BACK], "1");
    let since = once.headers[header::GIVEN_BACK_AT].clone();

    let second = delivery(once, Recording(given.clone()));
    assert_eq!(second.given_back(), 1);
    assert!(second.given_back_since().is_some());
    second.give_back("unknown version").await.unwrap();
    let twice = &given.lock().unwrap()[1];
    assert_eq!(twice.headers[header::GIVEN_BACK], "2");
    assert_eq!(
        twice.headers[header::GIVEN_BACK_AT],
        since,
        "the first time stays"
    );
}

#[tokio::test]
async fn a_transport_that_cannot_give_back_keeps_the_headers_and_settle_rejects() {
    struct Plain;
    #[async_trait]
    impl Acker for Plain {
        async fn ack(&mut self, _: &RawMessage) -> Result<(), Error> {
            Ok(())
        }
        async fn nack(&mut self, _: &RawMessage, _: Duration) -> Result<(), Error> {
            Err(Error::unsupported("plain", "nack"))
        }
        async fn dead_letter(&mut self, _: &RawMessage, _: &DeadLetter) -> Result<(), Error> {
            Err(Error::unsupported("plain", "keep dead letters"))
        }
    }
    let (error, back) = delivery(RawMessage::new("x"), Plain)
        .give_back("unknown version")
        .await
        .unwrap_err()
        .into_parts();
    assert_eq!(error.kind(), ErrorKind::Unsupported);
    assert!(
        back.headers().get(header::GIVEN_BACK).is_none(),
        "unchanged"
    );
    // Nobody to give it back to, no dead letters, nobody to tell: dropped.
    let reason = "unknown version".to_owned();
    let settled = back.settle(Outcome::GiveBack { reason }).await.unwrap();
    assert_eq!(settled, Settled::Dropped);
    let settled = delivery(RawMessage::new("x"), Plain)
        .settle(Outcome::Retry {
            after: Duration::from_secs(1),
        })
        .await
        .unwrap();
    assert_eq!(
        settled,
        Settled::Dropped,
        "a retry it cannot do is a rejection"
    );
}

#[test]
fn the_give_back_limit_counts_times_and_age_from_the_first_give_back() {
    let given = |times: u32, ago: Duration| {
        let at = (Utc::now() - chrono::Duration::from_std(ago).unwrap())
            .to_rfc3339_opts(SecondsFormat::Millis, true);
        let message = RawMessage::new("x")
            .with_header(header::GIVEN_BACK, times.to_string())
            .with_header(header::GIVEN_BACK_AT, at);
        delivery(message, Recording(Arc::default()))
    };
    let fresh = delivery(RawMessage::new("x"), Recording(Arc::default()));
    let limit = GiveBackLimit::default();
    assert_eq!(limit.exceeded(&fresh), None);
    assert_eq!(
        limit.exceeded(&given(1000, Duration::from_secs(60))),
        None,
        "no count by default"
    );
    let old = limit
        .exceeded(&given(3, Duration::from_secs(601)))
        .expect("too old");
    assert_eq!(old, "given back 3 times over 601 s");
    let counted = GiveBackLimit::default().with_max_times(3);
    assert_eq!(counted.exceeded(&given(2, Duration::ZERO)), None);
    let why = counted
        .exceeded(&given(3, Duration::ZERO))
        .expect("three times");
    assert!(why.starts_with("given back 3 times over "), "{why}");
    assert!(
        GiveBackLimit::default()
            .with_max_times(0)
            .exceeded(&fresh)
            .is_some()
    );
}
