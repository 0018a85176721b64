//! A redrive of all moves at most what the dead-letter queue held when it
//! started, even while a consumer dead-letters every redriven message again
//! at once (which would otherwise keep it busy for ever). Shared by the test
//! binaries of the transports that keep dead letters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard::{DeadLetter, RawMessage, Redrive, SubscribeOptions, Topology, Transport, header};

const LETTERS: usize = 20;

pub async fn redrive_all_moves_only_what_was_there(transport: Arc<dyn Transport>) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (topic, group) = (format!("redrive.{id}"), format!("g-{id}"));
    transport
        .declare(&Topology::new().with_groups(topic.clone(), [group.clone()]))
        .await
        .expect("declare");
    let mut subscription = transport
        .subscribe(&topic, SubscribeOptions::new(group.clone()))
        .await
        .expect("subscribe");
    let messages = (0..LETTERS)
        .map(|n| {
            RawMessage::new(n.to_string())
                .with_header(header::EVENT_ID, uuid::Uuid::new_v4().to_string())
        })
        .collect();
    transport
        .publish_batch(&topic, messages)
        .await
        .expect("publish");
    let queue = transport.dead_letters().expect("a dead-letter queue");

    // From here on the consumer dead-letters everything it gets, at once.
    let rejecting = tokio::spawn(async move {
        while let Some(delivery) = subscription.recv().await {
            let letter = DeadLetter::new("fails again at once");
            if delivery.dead_letter(letter).await.is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while queue.list(&topic, LETTERS + 1).await.expect("list").len() < LETTERS {
        assert!(
            Instant::now() < deadline,
            "the letters never reached the DLQ"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let sent = tokio::time::timeout(Duration::from_secs(60), queue.redrive(&topic, Redrive::All))
        .await
        .expect("a redrive of all ends although its messages come straight back")
        .expect("redrive all");
    assert_eq!(sent, LETTERS, "moved what was there, no more");

    // They come back, once each: none lost, none duplicated by the bound.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = queue.list(&topic, 2 * LETTERS).await.expect("list");
        if listed.len() == LETTERS {
            break;
        }
        assert!(
            listed.len() < LETTERS && Instant::now() < deadline,
            "{} dead letters after the redrive, expected {LETTERS}",
            listed.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rejecting.abort();
}
