//! Tests of the push receivers' inbox.

use futures_util::FutureExt;

use super::*;

#[tokio::test]
async fn a_request_waiting_when_the_last_member_leaves_is_answered_unavailable() {
    let inbox = Inbox::new("test");
    let subscription = inbox.subscribe("t", SubscribeOptions::new("g")).unwrap();
    let waiting = {
        let inbox = inbox.clone();
        tokio::spawn(async move { inbox.deliver("t", None, RawMessage::new("x"), 1).await })
    };
    // Let the request reach the queue, then leave without pulling it.
    tokio::task::yield_now().await;
    drop(subscription);
    let error = waiting.await.unwrap().unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    assert!(error.message().contains("without settling"), "{error}");
    // The group is gone: the next request is refused at once.
    let error = inbox
        .deliver("t", Some("g"), RawMessage::new("x"), 1)
        .await
        .unwrap_err();
    assert!(error.message().contains("does not subscribe"), "{error}");
}

#[tokio::test]
async fn a_named_group_gets_the_message_and_the_others_do_not() {
    let inbox = Inbox::new("test");
    let mut a = inbox.subscribe("t", SubscribeOptions::new("a")).unwrap();
    let mut b = inbox.subscribe("t", SubscribeOptions::new("b")).unwrap();
    let delivering = {
        let inbox = inbox.clone();
        tokio::spawn(async move { inbox.deliver("t", Some("a"), RawMessage::new("x"), 3).await })
    };
    let delivery = a.recv().await.unwrap();
    assert_eq!(delivery.attempt(), 3);
    delivery.ack().await.unwrap();
    delivering.await.unwrap().unwrap();
    assert!(b.recv().now_or_never().is_none(), "group b was not asked");
}

#[tokio::test]
async fn every_group_must_ack_and_the_longest_nack_delay_wins() {
    let inbox = Inbox::new("test");
    let mut a = inbox.subscribe("t", SubscribeOptions::new("a")).unwrap();
    let mut b = inbox.subscribe("t", SubscribeOptions::new("b")).unwrap();
    let delivering = {
        let inbox = inbox.clone();
        tokio::spawn(async move { inbox.deliver("t", None, RawMessage::new("x"), 1).await })
    };
    let from_a = a.recv().await.unwrap();
    let from_b = b.recv().await.unwrap();
    from_a.ack().await.unwrap();
    from_b.nack(Duration::from_millis(40)).await.unwrap();
    let error = delivering.await.unwrap().unwrap_err();
    assert_eq!(error.requeue_after(), Some(Duration::from_millis(40)));
}

#[tokio::test]
async fn a_full_group_refuses_a_push_to_every_group_and_no_group_gets_it() {
    let inbox = Inbox::with_capacity("test", 1).unwrap();
    let mut a = inbox.subscribe("t", SubscribeOptions::new("a")).unwrap();
    let mut b = inbox.subscribe("t", SubscribeOptions::new("b")).unwrap();
    // Fills group a's queue; nothing takes it yet.
    let waiting = inbox.deliver("t", Some("a"), RawMessage::new("first"), 1);
    tokio::pin!(waiting);
    assert!(futures_util::poll!(waiting.as_mut()).is_pending());

    let error = inbox
        .deliver("t", None, RawMessage::new("second"), 1)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    assert_eq!(error.requeue_after(), Some(QUEUE_FULL_RETRY_AFTER));
    let full = QueueFull::of(&error).expect("a queue-full refusal");
    assert_eq!((full.topic(), full.group(), full.capacity()), ("t", "a", 1));
    assert!(b.recv().now_or_never().is_none(), "group b did not get it");

    // Group a still has the first one, and room again once it is taken.
    let first = a.recv().await.unwrap();
    assert_eq!(first.body().as_ref(), b"first");
    first.ack().await.unwrap();
    waiting.await.unwrap();
}

#[tokio::test]
async fn dead_letter_is_unsupported_and_leaves_the_delivery_to_settle() {
    let inbox = Inbox::new("test");
    let mut a = inbox.subscribe("t", SubscribeOptions::new("a")).unwrap();
    let delivering = {
        let inbox = inbox.clone();
        tokio::spawn(async move { inbox.deliver("t", None, RawMessage::new("x"), 1).await })
    };
    let delivery = a.recv().await.unwrap();
    let (error, delivery) = delivery
        .dead_letter("poison")
        .await
        .unwrap_err()
        .into_parts();
    assert_eq!(error.kind(), ErrorKind::Unsupported);
    delivery.ack().await.unwrap();
    delivering.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_rejection_is_answered_not_retryable_with_its_reason_and_wins_over_an_ack() {
    let inbox = Inbox::new("test");
    let mut a = inbox.subscribe("t", SubscribeOptions::new("a")).unwrap();
    let mut b = inbox.subscribe("t", SubscribeOptions::new("b")).unwrap();
    let delivering = {
        let inbox = inbox.clone();
        tokio::spawn(async move { inbox.deliver("t", None, RawMessage::new("x"), 1).await })
    };
    a.recv().await.unwrap().ack().await.unwrap();
    let letter = DeadLetter::new("gave up after 3 attempt(s)").with_last_error("db down");
    let settled = b
        .recv()
        .await
        .unwrap()
        .settle(crate::Outcome::Reject(letter))
        .await
        .unwrap();
    assert_eq!(
        settled,
        crate::Settled::Refused,
        "reported to the publisher"
    );
    let error = delivering.await.unwrap().unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    assert!(!error.is_retryable());
    for part in ["\"b\"", "gave up after 3 attempt(s)", "db down"] {
        assert!(error.message().contains(part), "{part}: {error}");
    }
}

#[tokio::test]
async fn a_give_back_is_answered_retryable_naming_why() {
    let inbox = Inbox::new("test");
    let mut a = inbox.subscribe("t", SubscribeOptions::new("a")).unwrap();
    let delivering = {
        let inbox = inbox.clone();
        tokio::spawn(async move { inbox.deliver("t", None, RawMessage::new("x"), 1).await })
    };
    let reason = "this consumer reads version 1.0 of t, not 2.0".to_owned();
    let settled = a
        .recv()
        .await
        .unwrap()
        .settle(crate::Outcome::GiveBack { reason })
        .await
        .unwrap();
    assert_eq!(settled, crate::Settled::GivenBack);
    let error = delivering.await.unwrap().unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    assert!(error.message().contains("not 2.0"), "{error}");
}
