//! `Transport::group_lag` on RabbitMQ: the ready messages in the group's
//! queue (a passive declare).

use switchboard::transport::amqp::QueueType;
use switchboard::{RawMessage, Topology};

#[tokio::test]
async fn the_group_lag_is_the_ready_messages_of_its_queue() {
    let transport = super::transport(QueueType::Classic).await;
    let topic = format!("lag-{}", uuid::Uuid::new_v4().simple());
    transport
        .declare(&Topology::new().with_groups(topic.as_str(), ["game"]))
        .await
        .expect("declare");
    assert_eq!(
        transport.group_lag(&topic, "game").await.expect("lag"),
        Some(0)
    );
    for n in 0..3 {
        transport
            .publish(&topic, RawMessage::new(format!("{n}")))
            .await
            .expect("publish");
    }
    // Publisher confirms are in: the queue holds them.
    assert_eq!(
        transport.group_lag(&topic, "game").await.expect("lag"),
        Some(3)
    );
    // A group with no queue is an error the console shows as unknown.
    assert!(transport.group_lag(&topic, "nobody").await.is_err());
}
