//! The Redis dedupe store against the machine's Redis (127.0.0.1:6379): every
//! state of a mark, seen from two store instances standing in for two
//! replicas of one service. Each test uses its own random key prefix.
#![cfg(any(feature = "redis-streams", feature = "redis-pubsub"))]

use std::time::Duration;

use switchboard::middleware::dedupe::{DedupeStore, Mark, RedisDedupeStore};
use tokio::time::Instant;
use uuid::Uuid;

const URL: &str = "redis://127.0.0.1:6379";
const IN_PROGRESS_TTL: Duration = Duration::from_secs(10);
const DONE_TTL: Duration = Duration::from_secs(120);

/// Two replicas sharing one prefix, plus a raw connection to look at the keys.
async fn replicas() -> (
    RedisDedupeStore,
    RedisDedupeStore,
    redis::aio::MultiplexedConnection,
) {
    let prefix = format!("test:dedupe:{}", Uuid::new_v4().simple());
    let one = RedisDedupeStore::connect(URL, prefix.clone())
        .await
        .expect("Redis on 127.0.0.1:6379");
    let two = RedisDedupeStore::connect(URL, prefix)
        .await
        .expect("Redis on 127.0.0.1:6379");
    let raw = redis::Client::open(URL)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection");
    (one, two, raw)
}

fn token() -> String {
    Uuid::new_v4().to_string()
}

async fn get(raw: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query_async(raw)
        .await
        .expect("GET")
}

async fn pttl(raw: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(raw)
        .await
        .expect("PTTL")
}

/// Polls until Redis no longer has `key`, failing after a deadline.
async fn wait_until_gone(raw: &mut redis::aio::MultiplexedConnection, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let exists: i64 = redis::cmd("EXISTS")
            .arg(key)
            .query_async(raw)
            .await
            .expect("EXISTS");
        if exists == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{key} did not expire in time");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn acquire_sets_an_in_progress_mark_with_the_token_and_ttl() {
    let (one, _two, mut raw) = replicas().await;
    let holder = token();
    assert_eq!(
        one.try_begin("evt", &holder, IN_PROGRESS_TTL)
            .await
            .unwrap(),
        Mark::Acquired
    );
    let key = one.redis_key("evt");
    assert!(key.starts_with(one.prefix()), "namespaced: {key}");
    assert_eq!(
        get(&mut raw, &key).await,
        Some(format!("progress:{holder}"))
    );
    let left = pttl(&mut raw, &key).await;
    assert!(
        left > 0 && left <= IN_PROGRESS_TTL.as_millis() as i64,
        "PTTL {left}"
    );
    assert_eq!(
        one.try_begin("evt", &holder, IN_PROGRESS_TTL)
            .await
            .unwrap(),
        Mark::InProgress,
        "even the holder sees its own mark as in progress"
    );
}

#[tokio::test]
async fn a_second_replica_sees_the_mark_in_progress() {
    let (one, two, _raw) = replicas().await;
    assert_eq!(
        one.try_begin("evt", &token(), IN_PROGRESS_TTL)
            .await
            .unwrap(),
        Mark::Acquired
    );
    assert_eq!(
        two.try_begin("evt", &token(), IN_PROGRESS_TTL)
            .await
            .unwrap(),
        Mark::InProgress
    );
    assert_eq!(
        two.try_begin("another-evt", &token(), IN_PROGRESS_TTL)
            .await
            .unwrap(),
        Mark::Acquired,
        "marks are per key"
    );
}

#[tokio::test]
async fn complete_turns_the_mark_done_with_its_own_ttl_for_every_replica() {
    let (one, two, mut raw) = replicas().await;
    let holder = token();
    one.try_begin("evt", &holder, IN_PROGRESS_TTL)
        .await
        .unwrap();
    assert!(one.complete("evt", &holder, DONE_TTL).await.unwrap());

    let key = one.redis_key("evt");
    assert_eq!(get(&mut raw, &key).await.as_deref(), Some("done"));
    let left = pttl(&mut raw, &key).await;
    assert!(
        left > IN_PROGRESS_TTL.as_millis() as i64 && left <= DONE_TTL.as_millis() as i64,
        "the done mark has the done TTL, PTTL {left}"
    );
    assert_eq!(
        two.try_begin("evt", &token(), IN_PROGRESS_TTL)
            .await
            .unwrap(),
        Mark::Done
    );
    assert!(
        !one.complete("evt", &holder, DONE_TTL).await.unwrap(),
        "a done mark has no holder left to complete it"
    );
    assert!(
        !one.release("evt", &holder).await.unwrap(),
        "nor to release it"
    );
    assert_eq!(get(&mut raw, &key).await.as_deref(), Some("done"));
}

#[tokio::test]
async fn release_lets_another_replica_acquire() {
    let (one, two, mut raw) = replicas().await;
    let holder = token();
    one.try_begin("evt", &holder, IN_PROGRESS_TTL)
        .await
        .unwrap();
    assert!(one.release("evt", &holder).await.unwrap());
    assert_eq!(get(&mut raw, &one.redis_key("evt")).await, None);
    assert_eq!(
        two.try_begin("evt", &token(), IN_PROGRESS_TTL)
            .await
            .unwrap(),
        Mark::Acquired
    );
}

#[tokio::test]
async fn a_stale_token_can_neither_extend_complete_nor_release_the_new_holders_mark() {
    let (one, two, mut raw) = replicas().await;
    let (stale, fresh) = (token(), token());
    one.try_begin("evt", &stale, IN_PROGRESS_TTL).await.unwrap();
    let key = one.redis_key("evt");
    // The first holder's mark runs out (as if it were too slow).
    let _: i64 = redis::cmd("PEXPIRE")
        .arg(&key)
        .arg(1)
        .query_async(&mut raw)
        .await
        .expect("PEXPIRE");
    wait_until_gone(&mut raw, &key).await;
    assert_eq!(
        two.try_begin("evt", &fresh, IN_PROGRESS_TTL).await.unwrap(),
        Mark::Acquired
    );

    assert!(!one.extend("evt", &stale, DONE_TTL).await.unwrap());
    assert!(!one.complete("evt", &stale, DONE_TTL).await.unwrap());
    assert!(!one.release("evt", &stale).await.unwrap());
    assert_eq!(
        get(&mut raw, &key).await,
        Some(format!("progress:{fresh}")),
        "the new holder's mark is untouched"
    );
    assert!(two.complete("evt", &fresh, DONE_TTL).await.unwrap());
    assert_eq!(
        one.try_begin("evt", &stale, IN_PROGRESS_TTL).await.unwrap(),
        Mark::Done
    );
}

#[tokio::test]
async fn only_the_holder_extends_its_mark_and_the_pttl_grows() {
    let (one, two, mut raw) = replicas().await;
    let (holder, other) = (token(), token());
    let short = Duration::from_secs(2);
    assert_eq!(
        one.try_begin("evt", &holder, short).await.unwrap(),
        Mark::Acquired
    );
    let key = one.redis_key("evt");
    let before = pttl(&mut raw, &key).await;
    assert!(
        before > 0 && before <= short.as_millis() as i64,
        "PTTL {before}"
    );

    assert!(
        !two.extend("evt", &other, DONE_TTL).await.unwrap(),
        "another token extended the mark"
    );
    let after_other = pttl(&mut raw, &key).await;
    assert!(
        after_other <= before,
        "another token moved the expiry: PTTL {before} then {after_other}"
    );

    assert!(one.extend("evt", &holder, DONE_TTL).await.unwrap());
    let extended = pttl(&mut raw, &key).await;
    assert!(
        extended > short.as_millis() as i64 && extended <= DONE_TTL.as_millis() as i64,
        "PTTL {before} then {extended}"
    );
    assert_eq!(
        get(&mut raw, &key).await,
        Some(format!("progress:{holder}")),
        "extending leaves the value alone"
    );
    assert_eq!(
        two.try_begin("evt", &other, IN_PROGRESS_TTL).await.unwrap(),
        Mark::InProgress
    );

    assert!(one.complete("evt", &holder, DONE_TTL).await.unwrap());
    assert!(
        !one.extend("evt", &holder, DONE_TTL).await.unwrap(),
        "a done mark has no holder left to extend it"
    );
    assert!(
        !one.extend("never-seen", &holder, DONE_TTL).await.unwrap(),
        "nor does a missing one"
    );
    assert_eq!(get(&mut raw, &one.redis_key("never-seen")).await, None);
}

#[tokio::test]
async fn a_mark_whose_holder_died_expires_and_can_be_taken_again() {
    let (one, two, mut raw) = replicas().await;
    let short = Duration::from_millis(200);
    assert_eq!(
        one.try_begin("evt", &token(), short).await.unwrap(),
        Mark::Acquired
    );
    // The holder dies: it never completes nor releases.
    drop(one);
    assert_eq!(
        two.try_begin("evt", &token(), IN_PROGRESS_TTL)
            .await
            .unwrap(),
        Mark::InProgress,
        "until the TTL runs out the mark holds"
    );
    wait_until_gone(&mut raw, &two.redis_key("evt")).await;
    let taker = token();
    assert_eq!(
        two.try_begin("evt", &taker, IN_PROGRESS_TTL).await.unwrap(),
        Mark::Acquired
    );
    assert!(two.complete("evt", &taker, DONE_TTL).await.unwrap());
}

#[tokio::test]
async fn stores_with_other_prefixes_do_not_see_each_others_marks() {
    let (one, _two, _raw) = replicas().await;
    let other = RedisDedupeStore::connect(URL, format!("test:dedupe:{}", Uuid::new_v4().simple()))
        .await
        .expect("Redis");
    one.try_begin("evt", &token(), IN_PROGRESS_TTL)
        .await
        .unwrap();
    assert_eq!(
        other
            .try_begin("evt", &token(), IN_PROGRESS_TTL)
            .await
            .unwrap(),
        Mark::Acquired
    );
}
