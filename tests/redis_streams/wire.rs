//! The Redis Streams fixtures of `tests/fixtures/wire/v1`: an entry's fields
//! and a dead-letter entry's, written raw with `XADD` and read by the
//! transport; and today's writers must still write the same fields.

use std::time::Duration;

use redis::Value;
use redis::aio::MultiplexedConnection;
use serde_json::Value as Json;
use switchboard::transport::redis_streams::{RedisStreamsConfig, RedisStreamsTransport};
use switchboard::{DeadLetter, Publisher, Topology, Transport};

#[path = "../common/wire.rs"]
mod fixture;
use fixture::{GROUP, TOPIC, fixture_message};

const ENTRY: &str = include_str!("../fixtures/wire/v1/redis_streams_entry.json");
const DEAD_LETTER: &str = include_str!("../fixtures/wire/v1/redis_streams_dead_letter.json");

/// The `[field, value]` pairs of a fixture, in order.
fn fixture_fields(fixture: &Json) -> Vec<(String, String)> {
    fixture["fields"]
        .as_array()
        .expect("fields")
        .iter()
        .map(|pair| {
            (
                pair[0].as_str().expect("a name").to_owned(),
                pair[1].as_str().expect("a value").to_owned(),
            )
        })
        .collect()
}

async fn transport() -> RedisStreamsTransport {
    let config = RedisStreamsConfig::default()
        .with_key_prefix(format!("sb-wire-{}:", uuid::Uuid::new_v4().simple()))
        .with_block(Duration::from_secs(1));
    RedisStreamsTransport::connect_with(&super::redis_url(), config)
        .await
        .expect("connect to Redis")
}

async fn raw_connection() -> MultiplexedConnection {
    redis::Client::open(super::redis_url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

async fn xadd(conn: &mut MultiplexedConnection, key: &str, fields: &[(String, String)]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg("*");
    for (name, value) in fields {
        cmd.arg(name).arg(value);
    }
    cmd.query_async(conn).await.expect("XADD")
}

/// Every entry of `key`: its id and its fields in the order they were written.
async fn xrange(
    conn: &mut MultiplexedConnection,
    key: &str,
) -> Vec<(String, Vec<(String, String)>)> {
    let reply: Value = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("XRANGE");
    let text = |value: &Value| match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).expect("UTF-8"),
        other => panic!("not a bulk string: {other:?}"),
    };
    let Value::Array(entries) = reply else {
        panic!("XRANGE reply {reply:?}")
    };
    entries
        .iter()
        .map(|entry| {
            let Value::Array(parts) = entry else {
                panic!("entry {entry:?}")
            };
            let Value::Array(flat) = &parts[1] else {
                panic!("fields {:?}", parts[1])
            };
            let fields = flat
                .chunks(2)
                .map(|pair| (text(&pair[0]), text(&pair[1])))
                .collect();
            (text(&parts[0]), fields)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v1_entry_is_read_and_still_written_field_for_field() {
    let fixture: Json = serde_json::from_str(ENTRY).expect("JSON");
    let fields = fixture_fields(&fixture);
    let transport = transport().await;
    transport
        .declare(&Topology::new().with_groups(TOPIC, [GROUP]))
        .await
        .expect("declare");
    let key = transport.stream_key(TOPIC);
    let mut conn = raw_connection().await;

    // Read: the fixture's fields, written by a plain client.
    xadd(&mut conn, &key, &fields).await;
    fixture::reads_the_fixture_message(&transport).await;

    // Write: today's publisher writes the same fields in the same order.
    transport
        .publish(TOPIC, fixture_message())
        .await
        .expect("publish");
    let entries = xrange(&mut conn, &key).await;
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[1].1, fields, "today's writer changed the v1 entry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v1_dead_letter_is_read_and_still_written_field_for_field() {
    let fixture: Json = serde_json::from_str(DEAD_LETTER).expect("JSON");
    let fields = fixture_fields(&fixture);
    let expected = &fixture["expected"];
    let transport = transport().await;
    transport
        .declare(&Topology::new().with_groups(TOPIC, [GROUP]))
        .await
        .expect("declare");
    let dlq_key = transport.dead_letter_key(TOPIC);
    let mut conn = raw_connection().await;

    // Read: the fixture's dead-letter entry, written by a plain client.
    xadd(&mut conn, &dlq_key, &fields).await;
    let letters = transport
        .dead_letters()
        .expect("a dead-letter queue")
        .list(TOPIC, 10)
        .await
        .expect("list");
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.id, expected["id"]);
    assert_eq!(letter.topic, expected["topic"]);
    assert_eq!(letter.group, expected["group"]);
    assert_eq!(letter.reason, expected["reason"]);
    assert_eq!(u64::from(letter.attempts), expected["attempts"]);
    assert_eq!(
        letter.last_error.as_deref(),
        expected["last_error"].as_str()
    );
    assert_eq!(
        letter
            .dead_lettered_at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        expected["dead_lettered_at"]
    );
    assert_eq!(letter.message, fixture_message());
    redis::cmd("DEL")
        .arg(&dlq_key)
        .query_async::<()>(&mut conn)
        .await
        .expect("DEL");

    // Write: today's dead-lettering writes the same fields; only the time
    // and the original entry's id differ per write.
    transport
        .publish(TOPIC, fixture_message())
        .await
        .expect("publish");
    let source_id = xrange(&mut conn, &transport.stream_key(TOPIC)).await[0]
        .0
        .clone();
    let (delivery, subscription) = fixture::first_delivery(&transport).await;
    delivery
        .dead_letter(
            DeadLetter::new("payment declined")
                .with_attempts(3)
                .with_last_error("card expired"),
        )
        .await
        .expect("dead-letter");
    subscription.shutdown().await.expect("shutdown");
    let written = xrange(&mut conn, &dlq_key).await;
    assert_eq!(written.len(), 1);
    let mut written = written[0].1.clone();
    let mut wanted = fields.clone();
    for (name, value) in &mut written {
        match name.as_str() {
            "dead_lettered_at" => {
                let at = chrono::DateTime::parse_from_rfc3339(value).expect("RFC 3339");
                assert_eq!(
                    *value,
                    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    "milliseconds, UTC"
                );
                value.clear();
            }
            "source_id" => {
                assert_eq!(*value, source_id);
                value.clear();
            }
            _ => {}
        }
    }
    for (name, value) in &mut wanted {
        if name == "dead_lettered_at" || name == "source_id" {
            value.clear();
        }
    }
    assert_eq!(written, wanted, "today's writer changed the v1 dead letter");
}
