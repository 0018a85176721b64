//! Closing the RabbitMQ transport logs no error: both connections close
//! with `connection.close(200)` after the consumers' channels.

use std::sync::Arc;

use switchboard::transport::amqp::AmqpTransport;

#[path = "../common/clean_exit.rs"]
mod harness;

#[test]
fn a_closed_transport_exits_without_an_error_in_any_log() {
    harness::assert_clean_exit(
        "clean_exit::a_closed_transport_exits_without_an_error_in_any_log",
        || async {
            let transport = AmqpTransport::connect(super::config(super::QueueType::Classic))
                .await
                .expect("RabbitMQ on 127.0.0.1:5672 (guest/guest)");
            harness::publish_consume_close(Arc::new(transport), 20).await;
        },
    );
}

#[tokio::test]
async fn purging_a_namespace_deletes_the_queues_this_transport_declared_under_it() {
    use switchboard::{EventBus, Topology, Transport};

    let transport: Arc<dyn Transport> = Arc::new(
        AmqpTransport::connect(super::config(super::QueueType::Classic))
            .await
            .expect("RabbitMQ on 127.0.0.1:5672 (guest/guest)"),
    );
    let run = format!("run-{}", uuid::Uuid::new_v4().simple());
    let bus = EventBus::new(transport.clone(), "tests").with_namespace(run.clone());
    bus.declare(&Topology::new().with_groups("a", ["g", "h"]))
        .await
        .unwrap();
    let other = EventBus::new(transport.clone(), "tests").with_namespace(format!("{run}x"));
    other
        .declare(&Topology::new().with_groups("a", ["g"]))
        .await
        .unwrap();

    // Two groups: two queues and their two dead-letter queues.
    assert_eq!(bus.purge_namespace().await.unwrap(), 4);
    assert_eq!(bus.purge_namespace().await.unwrap(), 0, "nothing is left");
    assert_eq!(
        other.purge_namespace().await.unwrap(),
        2,
        "the other namespace stayed"
    );
    // Declaring again after a purge works: the queues are gone, not half-there.
    bus.declare(&Topology::new().with_groups("a", ["g"]))
        .await
        .unwrap();
    assert_eq!(bus.purge_namespace().await.unwrap(), 2);
    transport.close().await.unwrap();
}
