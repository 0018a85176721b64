//! The in-memory transport passes the whole conformance suite.

use std::sync::Arc;

use switchboard::{MemoryTransport, Transport};

switchboard::conformance_tests!(|| async {
    Arc::new(MemoryTransport::new()) as Arc<dyn Transport>
});

/// A topic with no group keeps what is published for the first group it
/// gets, up to a limit past which a publish is refused, not dropped.
#[tokio::test]
async fn a_topic_without_groups_keeps_messages_for_the_first_group_up_to_a_limit() {
    use switchboard::{ErrorKind, Publisher, RawMessage, SubscribeOptions, Subscriber};

    let transport = MemoryTransport::new();
    let kept: Vec<RawMessage> = (0..MemoryTransport::UNROUTED_LIMIT)
        .map(|n| RawMessage::new(n.to_string()))
        .collect();
    transport
        .publish_batch("orphan.topic", kept)
        .await
        .expect("kept for a later group");
    let error = transport
        .publish("orphan.topic", RawMessage::new("one too many"))
        .await
        .expect_err("past the limit");
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    assert!(!error.is_retryable());
    assert!(error.message().contains("orphan.topic"), "{error}");

    let mut late = transport
        .subscribe("orphan.topic", SubscribeOptions::new("late"))
        .await
        .expect("subscribe");
    assert_eq!(
        transport.depth("orphan.topic", "late"),
        MemoryTransport::UNROUTED_LIMIT,
        "the first group took every kept message"
    );
    let first = late.recv().await.expect("the first kept message");
    assert_eq!(first.body().as_ref(), b"0");
    first.ack().await.expect("ack");
    transport
        .publish("orphan.topic", RawMessage::new("routed now"))
        .await
        .expect("a group exists now");
}

/// A group's queue holds at most `QUEUE_LIMIT` messages: past it a publish
/// is refused as retryable (the consumers are behind), and taking one
/// message makes room again.
#[tokio::test]
async fn a_full_group_queue_refuses_a_publish_until_there_is_room() {
    use switchboard::{ErrorKind, Publisher, RawMessage, SubscribeOptions, Subscriber, Topology};

    let transport = MemoryTransport::new();
    transport
        .declare(&Topology::new().with_groups("busy.topic", ["slow"]))
        .await
        .unwrap();
    let batch: Vec<RawMessage> = (0..MemoryTransport::QUEUE_LIMIT)
        .map(|n| RawMessage::new(n.to_string()))
        .collect();
    transport.publish_batch("busy.topic", batch).await.unwrap();
    let error = transport
        .publish("busy.topic", RawMessage::new("one too many"))
        .await
        .expect_err("the queue is full");
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    assert!(error.is_retryable());
    let mut slow = transport
        .subscribe("busy.topic", SubscribeOptions::new("slow").with_prefetch(1))
        .await
        .unwrap();
    let first = slow.recv().await.unwrap();
    first.ack().await.unwrap();
    transport
        .publish("busy.topic", RawMessage::new("room again"))
        .await
        .expect("one message taken makes room");
}

#[path = "common/redrive.rs"]
mod redrive;

#[tokio::test]
async fn a_redrive_of_all_moves_only_what_the_queue_held() {
    redrive::redrive_all_moves_only_what_was_there(Arc::new(MemoryTransport::new())).await;
}

/// Scheduled messages are bounded: past `SCHEDULED_LIMIT` waiting, a
/// `publish_at` is refused as retryable, and closing refuses it for good.
#[tokio::test]
async fn scheduled_messages_are_bounded_and_refused_once_closed() {
    use switchboard::{ErrorKind, Publisher, RawMessage};

    let transport = MemoryTransport::new();
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    for n in 0..MemoryTransport::SCHEDULED_LIMIT {
        transport
            .publish_at("reminder.due", RawMessage::new(n.to_string()), later)
            .await
            .expect("room for it");
    }
    let error = transport
        .publish_at("reminder.due", RawMessage::new("one too many"), later)
        .await
        .expect_err("past the limit");
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    assert!(error.is_retryable());
    transport.close().await.unwrap();
    let error = transport
        .publish_after(
            "reminder.due",
            RawMessage::new("after close"),
            std::time::Duration::from_millis(1),
        )
        .await
        .expect_err("closed");
    assert_eq!(error.kind(), ErrorKind::Closed, "{error}");
}
