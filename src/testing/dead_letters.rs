//! The typed dead-letter view on a namespaced bus, and when the alert fires.
//! [`conformance_tests!`](crate::conformance_tests) runs it with the rest.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;
use tower::ServiceBuilder;
use uuid::Uuid;

use super::conformance::{ConformanceEvent, unique};
use super::patience;
use crate::bus::{EventBus, Message, handler_fn};
use crate::envelope::{Event, EventEnvelope};
use crate::error::Error;
use crate::middleware::dead_letter::{DeadLetterAlert, DeadLetterFacts, DeadLetteringLayer};
use crate::topology::Topology;
use crate::transport::{Redrive, Transport};

/// An alert that, inside the hook and before it returns, lists the dead
/// letters once and reports whether the one it is told about is there: it
/// must be, as the hook runs only after the transport accepted the letter.
/// The look is synchronous so that an alert raised before the letter is
/// stored is caught however fast the transport stores it; the hooks of one
/// consumer run one at a time on its task, so no two looks overlap (a
/// RabbitMQ browse hides what it holds from another running at once).
#[derive(Debug)]
struct ListsWhenAlerted {
    bus: EventBus,
    found: mpsc::UnboundedSender<(Uuid, bool)>,
}

impl DeadLetterAlert for ListsWhenAlerted {
    fn alert(&self, facts: &DeadLetterFacts) {
        let letters = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                self.bus
                    .dead_letters::<ConformanceEvent>()
                    .expect("a dead-letter queue is claimed")
                    .list(50)
                    .await
                    .expect("list dead letters from the alert")
            })
        });
        let id = facts.event_id.to_string();
        let there = letters.iter().any(|letter| letter.id() == id);
        self.found.send((facts.event_id, there)).ok();
    }
}

/// On a namespaced bus, a message its handler gives up on raises the alert
/// only once the letter can be listed; the typed view lists it under the
/// namespace with its payload and facts, a redrive by a header value and
/// one by event id each send one back, and the healed handler handles
/// both. Runs where [`Capabilities::dead_letter`](crate::Capabilities) is
/// claimed.
pub async fn typed_dead_letters_are_alerted_once_stored_and_redriven_by_key_or_id(
    transport: Arc<dyn Transport>,
) {
    if !transport.capabilities().dead_letter {
        return;
    }
    let bus = EventBus::new(transport.clone(), "conformance").with_namespace(unique("ns"));
    let group = unique("g");
    bus.declare(&Topology::new().with_event::<ConformanceEvent, _>([group.clone()]))
        .await
        .expect("declare");
    let (found, mut alerted) = mpsc::unbounded_channel();
    let alert = Arc::new(ListsWhenAlerted {
        bus: bus.clone(),
        found,
    });
    let healed = Arc::new(AtomicBool::new(false));
    let (seen, mut handled) = mpsc::unbounded_channel();
    let handler = {
        let healed = healed.clone();
        ServiceBuilder::new()
            .layer(DeadLetteringLayer::new(alert))
            .service(handler_fn(move |message: Message<ConformanceEvent>| {
                let (healed, seen) = (healed.load(Ordering::SeqCst), seen.clone());
                async move {
                    if !healed {
                        return Err(Error::permanent("the ledger says not today"));
                    }
                    seen.send(message.payload().seq).ok();
                    Ok(())
                }
            }))
    };
    let consumer = bus
        .subscribe::<ConformanceEvent, _>(crate::SubscribeOptions::new(group.clone()), handler)
        .await
        .expect("subscribe");

    let (key_a, key_b) = (unique("order"), unique("order"));
    let mut ids = Vec::new();
    for (seq, key) in [(1, &key_a), (2, &key_b)] {
        let envelope = EventEnvelope::new("conformance", ConformanceEvent { seq })
            .with_header("order-id", key);
        bus.publish_envelope(&envelope).await.expect("publish");
        ids.push(envelope.event_id());
    }
    let mut alerts = BTreeSet::new();
    while alerts.len() < 2 {
        let (id, there) = tokio::time::timeout(patience(), alerted.recv())
            .await
            .unwrap_or_else(|_| panic!("two alerts within {:?}", patience()))
            .expect("the alert hook lives");
        assert!(
            there,
            "the alert for {id} fired before the dead letter could be listed"
        );
        alerts.insert(id);
    }
    assert_eq!(alerts, ids.iter().copied().collect());

    let letters = bus
        .dead_letters::<ConformanceEvent>()
        .expect("a dead-letter queue is claimed");
    assert_eq!(letters.topic(), bus.topic_of::<ConformanceEvent>());
    assert_ne!(
        letters.topic(),
        ConformanceEvent::TYPE,
        "the namespace applies"
    );
    let listed = letters.list(10).await.expect("list");
    assert_eq!(listed.len(), 2, "{listed:?}");
    let mut seqs = BTreeSet::new();
    for letter in &listed {
        seqs.insert(letter.payload().expect("the payload decodes").seq);
        assert_eq!(letter.group(), group);
        assert_eq!(letter.topic(), letters.topic());
        assert!(letter.attempts() >= 1);
        assert!(
            letter.reason().contains("retrying cannot fix"),
            "{}",
            letter.reason()
        );
        let last = letter.last_error().unwrap_or_default();
        assert!(last.contains("not today"), "last error: {last:?}");
        assert!(letter.header("order-id").is_some());
    }
    assert_eq!(seqs, BTreeSet::from([1, 2]));
    let second = letters.inspect(ids[1]).await.expect("inspect by event id");
    assert_eq!(second.envelope().expect("decodes").event_id(), ids[1]);
    assert_eq!(second.header("order-id").as_deref(), Some(&*key_b));

    healed.store(true, Ordering::SeqCst);
    assert_eq!(
        letters
            .redrive_where("order-id", &key_a)
            .await
            .expect("redrive by key"),
        1
    );
    assert_eq!(
        next_seq(&mut handled, "the letter redriven by its key").await,
        1
    );
    assert_eq!(
        letters
            .redrive(Redrive::One(ids[1].to_string()))
            .await
            .expect("redrive by id"),
        1
    );
    assert_eq!(
        next_seq(&mut handled, "the letter redriven by its id").await,
        2
    );
    assert!(letters.list(10).await.expect("list").is_empty());
    assert_eq!(
        letters
            .redrive_where("order-id", &key_a)
            .await
            .expect("redrive of nothing"),
        0
    );
    consumer.shutdown().await.expect("shutdown");
}

/// The next seq the handler handled, within the suite's patience.
async fn next_seq(handled: &mut mpsc::UnboundedReceiver<u64>, what: &str) -> u64 {
    tokio::time::timeout(patience(), handled.recv())
        .await
        .unwrap_or_else(|_| panic!("{what} handled within {:?}", patience()))
        .expect("the handler lives")
}
