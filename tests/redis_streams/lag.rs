//! `Transport::group_lag` on Redis Streams: what a group has not been
//! handed yet, from `XINFO GROUPS` (Redis 7 and later report it).

use switchboard::{RawMessage, Topology};

#[tokio::test]
async fn the_group_lag_counts_what_the_group_was_not_handed() {
    let transport = super::transport().await;
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
    assert_eq!(
        transport.group_lag(&topic, "game").await.expect("lag"),
        Some(3)
    );
    // A group the stream does not have says nothing.
    assert_eq!(
        transport.group_lag(&topic, "nobody").await.expect("lag"),
        None
    );
}
