//! The cases a transport runs by what its capabilities claim: nack, groups,
//! order, resubscription, shutdown in flight, declared topology, dead
//! letters. Each checks that an unclaimed operation fails as `Unsupported`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use uuid::Uuid;

use super::conformance::{
    ack_into, expect_all, publish_all, publish_in_background, range, recv_one, seq_of, subscribe,
    test_message, unique,
};
use super::patience;
use crate::error::ErrorKind;
use crate::topology::Topology;
use crate::transport::{DeliveryMode, Redrive, SubscribeOptions, Transport, header};

/// `nack` redelivers with a raised attempt count and loses nothing; a
/// transport that does not claim `nack` says `Unsupported`.
pub async fn nack_redelivers(transport: Arc<dyn Transport>) {
    let topic = unique("nack");
    let options = SubscribeOptions::new(unique("g")).with_prefetch(64);
    let mut subscription = subscribe(&*transport, &topic, options).await;
    if !transport.capabilities().nack {
        let publishing = publish_in_background(&transport, &topic, [0]);
        let delivery = recv_one(&mut subscription, "nack unsupported").await;
        let (error, delivery) = delivery
            .nack(Duration::ZERO)
            .await
            .expect_err("nack is not claimed, so it must fail")
            .into_parts();
        assert_eq!(error.kind(), ErrorKind::Unsupported, "{error}");
        let _ = delivery.ack().await;
        publishing.await.expect("publisher task");
        return;
    }
    let count = 50;
    let publishing = publish_in_background(&transport, &topic, 0..count);
    let mut redelivered = BTreeSet::new();
    while redelivered.len() < count as usize {
        let delivery = recv_one(&mut subscription, "nack then redelivery").await;
        let seq = seq_of(delivery.message());
        if redelivered.contains(&seq) {
            delivery.ack().await.expect("ack");
        } else if delivery.attempt() == 1 {
            delivery
                .nack(Duration::from_millis(10))
                .await
                .expect("nack");
        } else {
            redelivered.insert(seq);
            delivery.ack().await.expect("ack");
        }
    }
    assert_eq!(
        redelivered,
        range(count),
        "every nacked message came back with attempt > 1"
    );
    publishing.await.expect("publisher task");
    subscription.shutdown().await.expect("shutdown");
}

/// Competing: two groups each get every message, and inside a group each
/// message is handled once. Broadcast: two subscribers each get every one.
pub async fn groups_each_get_every_message_once(transport: Arc<dyn Transport>) {
    let topic = unique("groups");
    let competing = transport.capabilities().delivery == DeliveryMode::Competing;
    let mut inboxes = Vec::new();
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let group = unique("g");
        let (seen, inbox) = mpsc::unbounded_channel();
        let members = if competing { 2 } else { 1 };
        for _ in 0..members {
            let subscription =
                subscribe(&*transport, &topic, SubscribeOptions::new(group.clone())).await;
            consumers.push(ack_into(subscription, seen.clone()));
        }
        inboxes.push(inbox);
    }
    let count = 200;
    publish_all(&*transport, &topic, 0..count).await;
    for mut inbox in inboxes {
        let counts = expect_all(&mut inbox, &range(count), "each group gets every message").await;
        if competing {
            let twice: Vec<_> = counts
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(seq, _)| seq)
                .collect();
            assert!(
                twice.is_empty(),
                "messages handled more than once in one group: {twice:?}"
            );
        }
    }
    for consumer in consumers {
        consumer.abort();
    }
}

/// With concurrency 1, messages arrive in publish order (transports that
/// claim `ordered`).
pub async fn order_is_kept_with_concurrency_one(transport: Arc<dyn Transport>) {
    if !transport.capabilities().ordered {
        return;
    }
    let topic = unique("order");
    let mut subscription = subscribe(&*transport, &topic, SubscribeOptions::new(unique("g"))).await;
    let count = 500;
    publish_all(&*transport, &topic, 0..count).await;
    for expected in 0..count {
        let delivery = recv_one(&mut subscription, "ordered delivery").await;
        assert_eq!(seq_of(delivery.message()), expected, "out of order");
        delivery.ack().await.expect("ack");
    }
    subscription.shutdown().await.expect("shutdown");
}

/// A group's subscriber that goes away and comes back receives what was
/// published meanwhile (transports that claim `redelivers_unacked`).
pub async fn resubscriber_receives_what_was_published_meanwhile(transport: Arc<dyn Transport>) {
    if !transport.capabilities().redelivers_unacked {
        return;
    }
    let topic = unique("resubscribe");
    let options = SubscribeOptions::new(unique("g"));
    let (seen, mut inbox) = mpsc::unbounded_channel();
    let subscription = subscribe(&*transport, &topic, options.clone()).await;
    let consumer = ack_into(subscription, seen.clone());
    publish_all(&*transport, &topic, 0..10).await;
    expect_all(&mut inbox, &range(10), "before going away").await;
    consumer.abort();
    let _ = consumer.await;

    publish_all(&*transport, &topic, 10..30).await;
    let subscription = subscribe(&*transport, &topic, options).await;
    let consumer = ack_into(subscription, seen);
    let expected: BTreeSet<u64> = (10..30).collect();
    expect_all(&mut inbox, &expected, "published while away").await;
    consumer.abort();
}

/// A subscriber shut down with deliveries in flight (some acked, some
/// dropped unsettled) leaves nothing behind: a new subscriber receives every
/// message not acked (duplicates allowed).
pub async fn shutdown_in_flight_then_new_subscriber_receives_everything(
    transport: Arc<dyn Transport>,
) {
    if !transport.capabilities().redelivers_unacked {
        return;
    }
    let topic = unique("shutdown");
    let options = SubscribeOptions::new(unique("g")).with_prefetch(20);
    let mut subscription = subscribe(&*transport, &topic, options.clone()).await;
    let count = 50;
    publish_all(&*transport, &topic, 0..count).await;
    let mut acked = BTreeSet::new();
    let mut held = Vec::new();
    for _ in 0..10 {
        let delivery = recv_one(&mut subscription, "first deliveries").await;
        if held.len() < 5 {
            held.push(delivery);
        } else {
            acked.insert(seq_of(delivery.message()));
            delivery.ack().await.expect("ack");
        }
    }
    let shutdown = tokio::spawn(subscription.shutdown());
    drop(held);
    tokio::time::timeout(patience(), shutdown)
        .await
        .expect("shutdown finishes once the held deliveries are dropped")
        .expect("shutdown task")
        .expect("shutdown");

    let (seen, mut inbox) = mpsc::unbounded_channel();
    let consumer = ack_into(subscribe(&*transport, &topic, options).await, seen);
    let expected: BTreeSet<u64> = range(count).difference(&acked).copied().collect();
    expect_all(
        &mut inbox,
        &expected,
        "after shutdown with messages in flight",
    )
    .await;
    consumer.abort();
}

/// After [`Transport::declare`], messages published before any subscriber
/// starts are delivered to every declared group.
pub async fn declared_topology_keeps_messages_published_before_subscribe(
    transport: Arc<dyn Transport>,
) {
    if !transport.capabilities().redelivers_unacked {
        return;
    }
    let topic = unique("declared");
    let groups = [unique("g"), unique("g")];
    let topology = Topology::new().with_groups(topic.clone(), groups.clone());
    transport.declare(&topology).await.expect("declare");
    transport
        .declare(&topology)
        .await
        .expect("declaring twice is not an error");
    publish_all(&*transport, &topic, 0..20).await;
    for group in groups {
        let (seen, mut inbox) = mpsc::unbounded_channel();
        let consumer = ack_into(
            subscribe(&*transport, &topic, SubscribeOptions::new(group)).await,
            seen,
        );
        expect_all(
            &mut inbox,
            &range(20),
            "published before the first subscribe",
        )
        .await;
        consumer.abort();
    }
}

/// A dead-lettered message is listed with its reason and attempts, can be
/// inspected by id, and is delivered again to its group after a redrive; a
/// transport that does not claim `dead_letter` says `Unsupported`.
pub async fn dead_letters_can_be_listed_inspected_and_redriven(transport: Arc<dyn Transport>) {
    let topic = unique("dlq");
    let mut subscription = subscribe(&*transport, &topic, SubscribeOptions::new(unique("g"))).await;
    let event_id = Uuid::new_v4().to_string();
    let poison = test_message(1).with_header(header::EVENT_ID, event_id.clone());
    let publishing = {
        let (transport, topic, poison) = (transport.clone(), topic.clone(), poison.clone());
        tokio::spawn(async move { transport.publish(&topic, poison).await })
    };
    let delivery = recv_one(&mut subscription, "message to dead-letter").await;
    let attempt = delivery.attempt();
    let letter = crate::DeadLetter::new("conformance: poison").with_last_error("boom");

    if !transport.capabilities().dead_letter {
        let (error, delivery) = delivery
            .dead_letter(letter)
            .await
            .expect_err("dead_letter is not claimed, so it must fail")
            .into_parts();
        assert_eq!(error.kind(), ErrorKind::Unsupported, "{error}");
        let _ = delivery.ack().await;
        publishing.await.expect("publisher task").expect("publish");
        let error = transport
            .dead_letters()
            .err()
            .expect("no dead-letter queue is claimed");
        assert_eq!(error.kind(), ErrorKind::Unsupported, "{error}");
        return;
    }
    delivery.dead_letter(letter).await.expect("dead_letter");
    publishing.await.expect("publisher task").expect("publish");
    let queue = transport.dead_letters().expect("dead_letter is claimed");

    let listed = queue.list(&topic, 10).await.expect("list");
    assert_eq!(listed.len(), 1, "one dead letter listed: {listed:?}");
    let dead = &listed[0];
    assert_eq!(dead.id, event_id, "dead letters are addressed by event id");
    assert_eq!(dead.reason, "conformance: poison");
    assert_eq!(dead.attempts, attempt);
    assert_eq!(dead.last_error.as_deref(), Some("boom"));
    assert_eq!(dead.topic, topic);
    assert_eq!(dead.group, subscription.group());
    assert_eq!(dead.message.body, poison.body, "dead letter body intact");
    assert_eq!(
        queue.inspect(&topic, &event_id).await.expect("inspect"),
        *dead
    );
    let missing = queue
        .inspect(&topic, "no-such-id")
        .await
        .expect_err("unknown id");
    assert_eq!(missing.kind(), ErrorKind::NotFound);

    assert_eq!(
        queue
            .redrive(&topic, Redrive::One(event_id.clone()))
            .await
            .expect("redrive"),
        1
    );
    let again = recv_one(&mut subscription, "redriven message").await;
    assert_eq!(again.message().body, poison.body, "redriven body intact");
    again.ack().await.expect("ack");
    assert!(
        queue.list(&topic, 10).await.expect("list").is_empty(),
        "redrive empties the queue"
    );
    assert_eq!(
        queue
            .redrive(&topic, Redrive::All)
            .await
            .expect("redrive all"),
        0
    );
    subscription.shutdown().await.expect("shutdown");
}
