//! Scheduled messages on Redis Streams: the sorted set holds the whole
//! message, several movers move each member once, and a transport dropped
//! after scheduling loses nothing.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use switchboard::testing::delayed::scheduled_messages_survive_a_restart;
use switchboard::transport::redis_streams::{
    RedisStreamsConfig, RedisStreamsTransport, SCHEDULED_INDEX,
};
use switchboard::{Publisher, RawMessage, Transport};

fn config(prefix: &str) -> RedisStreamsConfig {
    RedisStreamsConfig::default()
        .with_key_prefix(prefix)
        .with_claim_idle(Duration::from_millis(500))
        .with_block(Duration::from_secs(1))
}

fn fresh_prefix() -> String {
    format!("sb-test-{}:", uuid::Uuid::new_v4().simple())
}

async fn connect(prefix: &str) -> RedisStreamsTransport {
    RedisStreamsTransport::connect_with(&super::redis_url(), config(prefix))
        .await
        .expect("connect to Redis")
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(super::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Dropping the transport (its mover with it) after scheduling, then
/// connecting a new one to the same keys: everything arrives, on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_messages_survive_a_restart_of_the_transport() {
    let prefix = fresh_prefix();
    let first: Arc<dyn Transport> = Arc::new(connect(&prefix).await);
    scheduled_messages_survive_a_restart(first, || async move {
        Arc::new(connect(&prefix).await) as Arc<dyn Transport>
    })
    .await;
}

/// The sorted set holds the whole message (body and headers, behind an id)
/// scored by its due time, and the index names the topic.
#[tokio::test]
async fn the_sorted_set_holds_the_whole_message_scored_by_its_due_time() {
    let prefix = fresh_prefix();
    let transport = connect(&prefix).await;
    let at = chrono::Utc::now() + chrono::Duration::hours(1);
    transport
        .publish_at(
            "billing.due",
            RawMessage::new(r#"{"invoice":"INV-7"}"#).with_header("tenant", "acme"),
            at,
        )
        .await
        .unwrap();
    let mut redis = redis().await;
    let members: Vec<(Vec<u8>, f64)> = redis
        .zrange_withscores(transport.scheduled_key("billing.due"), 0, -1)
        .await
        .unwrap();
    assert_eq!(members.len(), 1);
    let (member, score) = &members[0];
    let text = String::from_utf8_lossy(member);
    assert!(text.contains(r#"{"invoice":"INV-7"}"#), "{text}");
    assert!(text.contains("h:tenant") && text.contains("acme"), "{text}");
    assert!(
        (*score as i64 - at.timestamp_millis()).abs() <= 1,
        "{score}"
    );
    let topics: Vec<String> = redis
        .smembers(format!("{prefix}{SCHEDULED_INDEX}"))
        .await
        .unwrap();
    assert_eq!(topics, vec!["billing.due".to_owned()]);
    transport.delete_namespace("billing").await.unwrap();
    let _: () = redis
        .del(format!("{prefix}{SCHEDULED_INDEX}"))
        .await
        .unwrap();
}

/// Three transports (three movers) on the same keys, batches of 7 a call:
/// each of 300 due messages lands in the stream exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_movers_move_each_message_exactly_once() {
    let prefix = fresh_prefix();
    let mut movers = Vec::new();
    for _ in 0..3 {
        let transport = RedisStreamsTransport::connect_with(
            &super::redis_url(),
            config(&prefix)
                .with_schedule_batch(7)
                .with_schedule_tick(Duration::from_millis(20)),
        )
        .await
        .unwrap();
        movers.push(transport);
    }
    let topic = "many.due";
    let at = chrono::Utc::now() + chrono::Duration::milliseconds(300);
    for n in 0..300 {
        movers[n % 3]
            .publish_at(topic, RawMessage::new(format!("{n}")), at)
            .await
            .unwrap();
    }
    let mut redis = redis().await;
    let zset = movers[0].scheduled_key(topic);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left: usize = redis.zcard(&zset).await.unwrap();
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} scheduled messages still waiting"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The set is empty, so no mover can add anything more.
    let moved: usize = redis.xlen(movers[0].stream_key(topic)).await.unwrap();
    assert_eq!(moved, 300, "each member is moved exactly once");
    let index: bool = redis
        .sismember(format!("{prefix}{SCHEDULED_INDEX}"), topic)
        .await
        .unwrap();
    assert!(!index, "an emptied topic leaves the movers' index");
    let _: () = redis.del(movers[0].stream_key(topic)).await.unwrap();
}
