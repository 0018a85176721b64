//! The Redis sides: Streams and Pub/Sub, raw and through the bus.

#![allow(clippy::wildcard_imports)]

use super::*;

pub(super) async fn redis_connection() -> MultiplexedConnection {
    redis::Client::open(redis_url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis")
}

pub(super) async fn streams_bus(name: &str) -> EventBus {
    let config = RedisStreamsConfig::default().with_batch(BATCH);
    let transport = RedisStreamsTransport::connect_with(&redis_url(), config)
        .await
        .expect("Redis");
    EventBus::new(Arc::new(transport), SOURCE).with_namespace(name)
}

pub(super) async fn pubsub_bus(name: &str, options: RedisPubSubOptions) -> EventBus {
    let transport = RedisPubSubTransport::connect_with(&redis_url(), options)
        .await
        .expect("Redis");
    EventBus::new(Arc::new(transport), SOURCE).with_namespace(name)
}

/// The `XADD` a service writes by hand: the envelope, and its type and id
/// beside it for `XRANGE` readers (as switchboard writes them).
pub(super) fn xadd(key: &str, n: u64) -> redis::Cmd {
    let (body, event_id) = raw_encode(n);
    let mut add = redis::cmd("XADD");
    add.arg(key)
        .arg("*")
        .arg("envelope")
        .arg(body)
        .arg("event_type")
        .arg(TradeExecuted::TYPE)
        .arg("event_id")
        .arg(event_id.to_string());
    add
}

/// `XREADGROUP COUNT 128`, each entry decoded and handled, the batch's ids
/// acked with one `XACK` sent together with the next read.
pub(super) async fn streams_consume_raw(conn: MultiplexedConnection, key: &str, n: u64) {
    let mut reader = redis::Client::open(redis_url())
        .expect("url")
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(None),
        )
        .await
        .expect("Redis");
    let mut seen = 0;
    let mut to_ack: Vec<String> = Vec::new();
    while seen < n {
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(GROUP)
            .arg("c1")
            .arg("COUNT")
            .arg(BATCH)
            .arg("BLOCK")
            .arg(5000)
            .arg("STREAMS")
            .arg(key)
            .arg(">");
        let read = read.query_async::<redis::streams::StreamReadReply>(&mut reader);
        let ack = xack(conn.clone(), key, std::mem::take(&mut to_ack));
        let (reply, ()) = tokio::join!(read, ack);
        for entry in reply
            .expect("XREADGROUP")
            .keys
            .into_iter()
            .flat_map(|key| key.ids)
        {
            let Some(redis::Value::BulkString(body)) = entry.map.get("envelope") else {
                panic!("no envelope field");
            };
            std::hint::black_box(raw_decode(body).payload.quantity);
            to_ack.push(entry.id);
            seen += 1;
        }
    }
    xack(conn, key, to_ack).await;
}

pub(super) async fn xack(mut conn: MultiplexedConnection, key: &str, ids: Vec<String>) {
    if ids.is_empty() {
        return;
    }
    let _: i64 = redis::cmd("XACK")
        .arg(key)
        .arg(GROUP)
        .arg(&ids)
        .query_async(&mut conn)
        .await
        .expect("XACK");
}

/// A RESP3 connection subscribed to the channel; each push decoded.
pub(super) async fn pubsub_consume_raw(path: Path, side: Side, n: u64, name: &str) {
    let client = redis::Client::open(format!("{}?protocol=resp3", redis_url())).expect("url");
    let (sender, mut pushes) = tokio::sync::mpsc::unbounded_channel();
    let mut subscriber = client
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_push_sender(sender),
        )
        .await
        .expect("Redis");
    subscriber
        .subscribe(format!("{name}.raw"))
        .await
        .expect("SUBSCRIBE");
    let feeder = run_feeder(path, side, n, name);
    let mut seen = 0;
    while seen < n {
        let push = pushes.recv().await.expect("a push");
        if push.kind != redis::PushKind::Message {
            continue;
        }
        let Some(redis::Value::BulkString(body)) = push.data.get(1) else {
            panic!("a message without a body");
        };
        std::hint::black_box(raw_decode(body).payload.quantity);
        seen += 1;
    }
    feeder.wait();
}

/// `INFO commandstats` of the (private) Redis, per command.
pub(super) struct CommandStats(MultiplexedConnection);

impl CommandStats {
    pub(super) async fn connect() -> Self {
        Self(redis_connection().await)
    }

    pub(super) async fn read(&mut self) -> HashMap<String, u64> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.0)
            .await
            .expect("INFO");
        info.lines()
            .filter_map(|line| {
                let (command, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = stats
                    .split(',')
                    .find_map(|stat| stat.strip_prefix("calls="))?
                    .parse()
                    .ok()?;
                Some((command.to_owned(), calls))
            })
            .collect()
    }
}

/// Creates the group `feed(StreamsConsume, side, ..)` fills.
pub async fn streams_group(side: Side, name: &str) {
    match side {
        Side::Switchboard => {
            streams_bus(name)
                .await
                .declare(&Topology::new().with_event::<TradeExecuted, _>([GROUP]))
                .await
                .expect("declare");
        }
        Side::Raw => {
            let _: () = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(format!("{name}.raw"))
                .arg(GROUP)
                .arg("$")
                .arg("MKSTREAM")
                .query_async(&mut redis_connection().await)
                .await
                .expect("XGROUP CREATE");
        }
    }
}

/// Consumes `n` filled entries: through the bus with every setting at its
/// default (transport and subscription), or by hand.
pub async fn streams_consume_default(side: Side, name: &str, n: u64) {
    match side {
        Side::Switchboard => {
            let transport = RedisStreamsTransport::connect(&redis_url())
                .await
                .expect("Redis");
            let bus = EventBus::new(Arc::new(transport), SOURCE).with_namespace(name);
            let (handler, done) = counting_handler(n);
            let consumer = bus
                .subscribe::<TradeExecuted, _>(SubscribeOptions::new(GROUP), handler)
                .await
                .expect("subscribe");
            done.notified().await;
            consumer.shutdown().await.expect("shutdown");
        }
        Side::Raw => {
            let conn = redis_connection().await;
            streams_consume_raw(conn, &format!("{name}.raw"), n).await;
        }
    }
}

/// Deletes what a run left in Redis under `name`.
pub async fn forget(name: &str) {
    let mut conn = redis_connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{name}*"))
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .expect("DEL");
    }
}
