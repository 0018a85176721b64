//! Upcasters: a consumer of a newer major version reads what producers of
//! an older one still send, through registered steps, chained.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use switchboard::transport::memory::MemoryTransport;
use switchboard::{
    Codec, DecodeError, ErrorKind, Event, EventBus, EventEnvelope, Message, SubscribeOptions,
    Topology, Upcasters, handler_fn,
};

/// What producers on version 1 send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FillV1 {
    order_id: String,
    price: f64,
}
impl Event for FillV1 {
    const TYPE: &'static str = "fill.made";
    const VERSION: &'static str = "1.0";
}

/// Version 3: the price in cents with its currency, and a venue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FillV3 {
    order_id: String,
    price_cents: u64,
    currency: String,
    venue: String,
}
impl Event for FillV3 {
    const TYPE: &'static str = "fill.made";
    const VERSION: &'static str = "3.0";
}

/// 1 → 2 (cents and currency), then 2 → 3 (a venue).
fn upcasters() -> Upcasters {
    Upcasters::new()
        .with_step("fill.made", 1, "2.0", |mut payload| {
            let price = payload["price"].as_f64().ok_or("price is not a number")?;
            let object = payload.as_object_mut().ok_or("not an object")?;
            object.remove("price");
            object.insert("price_cents".into(), json!((price * 100.0).round() as u64));
            object.insert("currency".into(), json!("USD"));
            Ok(payload)
        })
        .unwrap()
        .with::<FillV3>(2, |mut payload| {
            payload["venue"] = json!("XNAS");
            Ok(payload)
        })
        .unwrap()
}

fn v1_bytes(price: f64) -> (EventEnvelope<FillV1>, Vec<u8>) {
    let envelope = EventEnvelope::new(
        "trading",
        FillV1 {
            order_id: "7".into(),
            price,
        },
    )
    .with_header("correlation-id", "req-1");
    let bytes = Codec::default().encode(&envelope).unwrap().to_vec();
    (envelope, bytes)
}

#[test]
fn a_chain_of_steps_reads_version_1_as_version_3_keeping_the_envelope() {
    let (sent, bytes) = v1_bytes(150.25);
    let codec = Codec::default().with_upcasters(upcasters());
    let read = codec.decode::<FillV3>(&bytes).unwrap();
    assert_eq!(
        read.payload(),
        &FillV3 {
            order_id: "7".into(),
            price_cents: 15025,
            currency: "USD".into(),
            venue: "XNAS".into(),
        }
    );
    assert_eq!(read.version(), "3.0");
    assert_eq!(read.event_id(), sent.event_id());
    assert_eq!(read.timestamp(), sent.timestamp());
    assert_eq!(read.headers(), sent.headers());
    // Its own version decodes as before, without the upcasters' help.
    let current = EventEnvelope::new("trading", read.payload().clone());
    let current_bytes = Codec::default().encode(&current).unwrap();
    assert_eq!(codec.decode::<FillV3>(&current_bytes).unwrap(), current);
}

#[test]
fn without_a_chain_another_major_is_still_unsupported() {
    let (_, bytes) = v1_bytes(1.0);
    let without = Codec::default().decode::<FillV3>(&bytes).unwrap_err();
    assert!(
        matches!(without, DecodeError::UnsupportedVersion { .. }),
        "{without}"
    );
    // A gap in the chain (only 2 → 3) is no chain.
    let gap = Upcasters::new().with::<FillV3>(2, Ok).unwrap();
    let error = Codec::default()
        .with_upcasters(gap)
        .decode::<FillV3>(&bytes)
        .unwrap_err();
    assert!(
        matches!(error, DecodeError::UnsupportedVersion { .. }),
        "{error}"
    );
}

#[test]
fn a_step_that_refuses_the_payload_is_an_upcast_failure_naming_it() {
    let envelope = EventEnvelope::untyped("fill.made", "1.0", "trading", json!({"order_id": "7"}));
    let bytes = Codec::default().encode(&envelope).unwrap();
    let error = Codec::default()
        .with_upcasters(upcasters())
        .decode::<FillV3>(&bytes)
        .unwrap_err();
    assert!(
        matches!(error, DecodeError::UpcastFailed { from_major: 1, .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains("price is not a number"),
        "{error}"
    );
    let error = switchboard::Error::from(error);
    assert_eq!(error.kind(), ErrorKind::Decode);
    assert!(!error.is_retryable(), "dead-lettered, not retried");
}

#[test]
fn bad_steps_are_refused_when_registered() {
    let backwards = Upcasters::new().with_step("fill.made", 2, "1.0", Ok);
    assert_eq!(backwards.unwrap_err().kind(), ErrorKind::Config);
    let same = Upcasters::new().with_step("fill.made", 1, "1.5", Ok);
    assert_eq!(same.unwrap_err().kind(), ErrorKind::Config);
    let not_a_version = Upcasters::new().with_step("fill.made", 1, "two", Ok);
    assert_eq!(not_a_version.unwrap_err().kind(), ErrorKind::Config);
    let twice = upcasters().with_step("fill.made", 1, "3.0", Ok);
    assert_eq!(twice.unwrap_err().kind(), ErrorKind::Config);
}

/// Over a bus: a version-1 producer and a version-3 consumer, no restart
/// of either.
#[tokio::test]
async fn a_bus_consumer_of_version_3_handles_what_a_version_1_producer_sends() {
    let transport = Arc::new(MemoryTransport::new());
    let producer = EventBus::new(transport.clone(), "trading");
    let consumer_bus = EventBus::new(transport, "ledger").with_upcasters(upcasters());
    consumer_bus
        .declare(&Topology::new().with_event::<FillV3, _>(["ledger"]))
        .await
        .unwrap();
    let (seen, mut handled) = tokio::sync::mpsc::channel(1);
    let consumer = consumer_bus
        .subscribe::<FillV3, _>(
            SubscribeOptions::new("ledger"),
            handler_fn(move |message: Message<FillV3>| {
                let seen = seen.clone();
                async move {
                    let _ = seen.send(message.payload().clone()).await;
                    Ok(())
                }
            }),
        )
        .await
        .unwrap();
    producer
        .publish(FillV1 {
            order_id: "9".into(),
            price: 2.5,
        })
        .await
        .unwrap();
    let fill = tokio::time::timeout(Duration::from_secs(10), handled.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fill.price_cents, 250);
    assert_eq!(fill.venue, "XNAS");
    consumer.shutdown().await.unwrap();
}
