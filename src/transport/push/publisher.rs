//! The sending side of a push transport: fan a message out to the topic's
//! endpoints and try each again while the receiver says "not now".
//!
//! This loop is the one retry owner of a push: the receiver retries
//! nothing itself (a nack or a give-back is answered to the publisher, which
//! sends again), and the error `publish` returns once the loop gives up
//! carries how many attempts it made ([`Error::attempts`]) — an error that
//! says so has been retried by its owner and is not to be retried on top.
//!
//! Nothing is queued here: each `publish` call waits for its own answers, so
//! what is in flight is bounded by the callers.

use crate::transport::redact::redact_url;
use std::time::Duration;

use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::future::join_all;

use super::{PushConfig, PushEndpoint};
use crate::error::{Error, ErrorKind};
use crate::transport::{RawMessage, validate_name};

/// One attempt to deliver a message to one endpoint.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PushRequest<'a> {
    pub(crate) topic: &'a str,
    pub(crate) group: Option<&'a str>,
    pub(crate) message: &'a RawMessage,
    pub(crate) attempt: u32,
}

/// Why one send did not succeed.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The receiver's queue was full and it did not take the message (gRPC
    /// RESOURCE_EXHAUSTED with a pushback, HTTP 503 with
    /// `switchboard-refused: queue-full`): sent again after the hint within
    /// the same attempt.
    Refused(Error),
    /// Anything else: the error's kind says whether to try again.
    Failed(Error),
}

impl From<Error> for SendError {
    fn from(error: Error) -> Self {
        Self::Failed(error)
    }
}

/// Sends one [`PushRequest`] over the wire and maps the answer into an
/// [`Error`] whose kind says whether to retry (and `retry_after` how long
/// to wait, when the receiver said), telling a full receiver's refusal apart.
#[async_trait]
pub(crate) trait PushSender: Send + Sync {
    async fn send(&self, url: &str, request: PushRequest<'_>) -> Result<(), SendError>;
}

/// Publishes `message` to every endpoint of `topic` at once and returns once
/// all answered OK, or with the first endpoint's final error.
pub(crate) async fn publish<S: PushSender>(
    sender: &S,
    config: &PushConfig,
    topic: &str,
    message: &RawMessage,
) -> Result<(), Error> {
    validate_name("topic", topic)?;
    if message.body.len() > config.max_body_bytes {
        return Err(Error::new(
            ErrorKind::Encode,
            format!(
                "message body of {} bytes is over the push limit of {} bytes",
                message.body.len(),
                config.max_body_bytes
            ),
        ));
    }
    let endpoints = config.routes.endpoints(topic);
    if endpoints.is_empty() {
        return Err(Error::new(
            ErrorKind::Config,
            format!("no push endpoint is configured for topic {topic:?}"),
        ));
    }
    let results = join_all(
        endpoints
            .iter()
            .map(|endpoint| deliver_with_retry(sender, config, endpoint, topic, message)),
    )
    .await;
    results.into_iter().collect()
}

async fn deliver_with_retry<S: PushSender>(
    sender: &S,
    config: &PushConfig,
    endpoint: &PushEndpoint,
    topic: &str,
    message: &RawMessage,
) -> Result<(), Error> {
    let retry = &config.retry;
    let mut delays = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(retry.backoff_ms))
        .with_max_delay(Duration::from_millis(retry.max_backoff_ms))
        .with_factor(retry.backoff_multiplier as f32)
        .with_max_times(retry.max_attempts.saturating_sub(1) as usize)
        .build();
    let mut attempt = 1;
    loop {
        let request = PushRequest {
            topic,
            group: endpoint.group.as_deref(),
            message,
            attempt,
        };
        let error = match send_until_taken(sender, config, &endpoint.url, request).await {
            Ok(()) => return Ok(()),
            Err(error) if error.is_retryable() => error,
            // A receiver's refusal for good (its handler rejected the
            // message) is not sent again.
            Err(error) => return Err(error.with_attempts(attempt)),
        };
        let Some(backoff) = delays.next() else {
            // This loop is the push path's one retry owner: the attempts it
            // made travel with the error, so a caller's retry (the bus's
            // publish retry) does not multiply them.
            return Err(error.with_attempts(attempt));
        };
        // A nack's delay is the least we wait, the backoff may ask for more,
        // and `max_backoff_ms` bounds what a receiver can ask for.
        let asked = error.retry_after().unwrap_or_default();
        let wait = backoff.max(asked.min(Duration::from_millis(retry.max_backoff_ms)));
        tracing::debug!(%error, attempt, ?wait, url = %redact_url(&endpoint.url), "push not accepted; trying again");
        tokio::time::sleep(wait).await;
        attempt += 1;
    }
}

/// One attempt: sends the request and, while the receiver refuses it because
/// its queue is full, sends it again after the receiver's hint, until the
/// attempt's timeout. The handlers never saw a refused message, so the
/// attempt number stays. A refusal that the timeout leaves no room to wait
/// out is returned (retryable) for the next attempt.
async fn send_until_taken<S: PushSender>(
    sender: &S,
    config: &PushConfig,
    url: &str,
    request: PushRequest<'_>,
) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + config.timeout();
    loop {
        let refusal = match tokio::time::timeout_at(deadline, sender.send(url, request)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(SendError::Failed(error))) => return Err(error),
            Ok(Err(SendError::Refused(error))) => error,
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "push to {} got no answer within {:?}",
                        redact_url(url),
                        config.timeout()
                    ),
                ));
            }
        };
        let wait = refusal
            .retry_after()
            .unwrap_or(Duration::from_millis(config.retry.backoff_ms))
            .min(Duration::from_millis(config.retry.max_backoff_ms))
            .max(Duration::from_millis(1));
        if tokio::time::Instant::now() + wait >= deadline {
            return Err(refusal);
        }
        tracing::debug!(error = %refusal, attempt = request.attempt, ?wait, url = %redact_url(url), "push refused by a full receiver; sending again");
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::config::RetryConfig;
    use crate::transport::push::PushRoutes;

    /// Answers with the scripted results in turn and records each attempt.
    struct Scripted {
        answers: Mutex<Vec<Result<(), SendError>>>,
        seen: Mutex<Vec<(String, Option<String>, u32)>>,
    }

    #[async_trait]
    impl PushSender for Scripted {
        async fn send(&self, url: &str, request: PushRequest<'_>) -> Result<(), SendError> {
            self.seen.lock().unwrap().push((
                url.to_owned(),
                request.group.map(str::to_owned),
                request.attempt,
            ));
            self.answers.lock().unwrap().remove(0)
        }
    }

    fn scripted(answers: Vec<Result<(), Error>>) -> Scripted {
        let answers = answers
            .into_iter()
            .map(|answer| answer.map_err(SendError::Failed))
            .collect();
        Scripted {
            answers: Mutex::new(answers),
            seen: Mutex::default(),
        }
    }

    fn config() -> PushConfig {
        PushConfig::new(PushRoutes::new().route("t", PushEndpoint::new("http://a").for_group("g")))
            .with_retry(RetryConfig {
                max_attempts: 3,
                backoff_ms: 10,
                backoff_multiplier: 2.0,
                max_backoff_ms: 100,
                ..RetryConfig::default()
            })
    }

    #[tokio::test(start_paused = true)]
    async fn retries_what_is_retryable_with_rising_attempts_and_waits_out_a_nack() {
        let sender = scripted(vec![
            Err(Error::transient("nacked").with_retry_after(Duration::from_millis(50))),
            Err(Error::new(ErrorKind::Connection, "refused")),
            Ok(()),
        ]);
        let started = tokio::time::Instant::now();
        publish(&sender, &config(), "t", &RawMessage::new("x"))
            .await
            .expect("third attempt succeeds");
        let attempts: Vec<_> = sender.seen.lock().unwrap().iter().map(|s| s.2).collect();
        assert_eq!(attempts, [1, 2, 3]);
        assert_eq!(sender.seen.lock().unwrap()[0].1.as_deref(), Some("g"));
        // 50 ms for the nack (more than the 10 ms backoff) + 20 ms backoff.
        assert_eq!(started.elapsed(), Duration::from_millis(70));
    }

    #[tokio::test(start_paused = true)]
    async fn a_receiver_asking_for_a_day_is_waited_for_at_most_max_backoff() {
        let sender = scripted(vec![
            Err(Error::transient("nacked").with_retry_after(Duration::from_secs(86_400))),
            Ok(()),
        ]);
        let started = tokio::time::Instant::now();
        publish(&sender, &config(), "t", &RawMessage::new("x"))
            .await
            .expect("second attempt succeeds");
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(100),
            "max_backoff_ms"
        );

        // A full receiver's hint is capped the same way within an attempt.
        let sender = scripted(Vec::new());
        *sender.answers.lock().unwrap() = vec![
            Err(SendError::Refused(
                Error::transient("queue full").with_retry_after(Duration::from_secs(86_400)),
            )),
            Ok(()),
        ];
        let started = tokio::time::Instant::now();
        publish(&sender, &config(), "t", &RawMessage::new("x"))
            .await
            .expect("taken on the second send");
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_attempts_and_never_retries_a_refusal() {
        let sender = scripted((0..3).map(|_| Err(Error::transient("down"))).collect());
        let error = publish(&sender, &config(), "t", &RawMessage::new("x"))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Unavailable);
        assert_eq!(sender.seen.lock().unwrap().len(), 3);
        assert_eq!(
            error.attempts(),
            Some(3),
            "the attempts travel with the error"
        );

        let sender = scripted(vec![Err(Error::permanent("bad"))]);
        let error = publish(&sender, &config(), "t", &RawMessage::new("x"))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Rejected);
        assert_eq!(sender.seen.lock().unwrap().len(), 1);
        assert_eq!(error.attempts(), Some(1));
    }

    fn refused() -> Result<(), SendError> {
        Err(SendError::Refused(
            Error::transient("queue full").with_retry_after(Duration::from_millis(100)),
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_receiver_is_asked_again_after_its_hint_within_the_same_attempt() {
        let sender = scripted(Vec::new());
        *sender.answers.lock().unwrap() = vec![refused(), refused(), Ok(())];
        let started = tokio::time::Instant::now();
        publish(&sender, &config(), "t", &RawMessage::new("x"))
            .await
            .expect("taken on the third send");
        let attempts: Vec<_> = sender.seen.lock().unwrap().iter().map(|s| s.2).collect();
        assert_eq!(
            attempts,
            [1, 1, 1],
            "a refusal does not count as an attempt"
        );
        assert_eq!(started.elapsed(), Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_past_the_attempt_timeout_move_on_to_the_next_attempt() {
        // 250 ms per attempt: sends at 0, 100 and 200 ms are refused, and
        // the third hint would end past the timeout.
        let config = config().with_timeout(Duration::from_millis(250));
        let sender = scripted(Vec::new());
        *sender.answers.lock().unwrap() = vec![refused(), refused(), refused(), Ok(())];
        publish(&sender, &config, "t", &RawMessage::new("x"))
            .await
            .expect("taken on the second attempt");
        let attempts: Vec<_> = sender.seen.lock().unwrap().iter().map(|s| s.2).collect();
        assert_eq!(attempts, [1, 1, 1, 2]);

        let sender = scripted(Vec::new());
        *sender.answers.lock().unwrap() = (0..9).map(|_| refused()).collect();
        let error = publish(&sender, &config, "t", &RawMessage::new("x"))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
        assert!(error.message().contains("queue full"), "{error}");
        assert_eq!(
            sender.seen.lock().unwrap().len(),
            9,
            "three attempts of three sends"
        );
    }

    #[tokio::test]
    async fn refuses_bad_names_oversize_bodies_and_unrouted_topics_without_sending() {
        let sender = scripted(Vec::new());
        let config = config().with_max_body_bytes(4);
        let error = publish(&sender, &config, "bad topic", &RawMessage::new("x"))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Rejected);
        let error = publish(&sender, &config, "t", &RawMessage::new("12345"))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Encode);
        assert!(error.message().contains("5 bytes"), "{error}");
        let error = publish(&sender, &config, "other", &RawMessage::new("x"))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config);
        assert!(sender.seen.lock().unwrap().is_empty());
    }
}
