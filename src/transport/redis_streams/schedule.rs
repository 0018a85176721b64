//! Scheduled publishing: a sorted set of due entries per topic and a mover
//! that every transport runs.
//!
//! `publish_at` adds the whole message — its stream fields, headers and
//! body — as one member of the topic's sorted set `<stream key>#scheduled`,
//! scored by its due time in Unix milliseconds and prefixed with a fresh id,
//! so two equal messages are two members. The topic's name goes into the
//! set `<key prefix>switchboard:scheduled`, the mover's index.
//!
//! Every transport runs a mover: each [`schedule_tick`] it reads the index
//! and, per topic, runs one script that takes the members due by the
//! server's clock (`ZRANGEBYSCORE … LIMIT 0 <schedule_batch>`) and, for each,
//! `XADD`s it to the stream and `ZREM`s it. The script runs atomically, so
//! with several movers a member is moved by exactly one of them; a crash
//! between two scripts leaves the rest in the set for the next tick of any
//! mover. Nothing lives in the process: a restarted service's mover carries
//! on where the last one stopped.
//!
//! [`schedule_tick`]: super::RedisStreamsConfig::schedule_tick

use std::sync::{LazyLock, Mutex};

use chrono::{DateTime, Utc};
use redis::{Script, Value};
use uuid::Uuid;

use super::config::RedisStreamsConfig;
use super::connection::Conn;
use super::fields::append_message_fields;
use super::{RedisStreamsTransport, lock};
use crate::error::Error;
use crate::transport::redis_support::redis_error;
use crate::transport::{RawMessage, due_millis};

/// Suffix of a topic's sorted set of scheduled messages.
pub const SCHEDULED_SUFFIX: &str = "#scheduled";
/// The index of topics with scheduled messages, under the key prefix.
pub const SCHEDULED_INDEX: &str = "switchboard:scheduled";

/// While a topic's batches come back full, at most this many run per tick.
const BATCHES_PER_TICK: usize = 10;

/// Moves the due members of `KEYS[1]` (the sorted set) into `KEYS[2]` (the
/// stream), at most `ARGV[1]` of them, with `MAXLEN ~ ARGV[2]` unless it is
/// empty. A member is netstrings (`<len>:<bytes>`): an id, then the stream
/// fields and values. Due means a score at or below the server's clock in
/// milliseconds. Returns `{moved, left}`.
const MOVE_DUE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  local fields = {}
  local pos = 1
  local first = true
  while pos <= #member do
    local colon = string.find(member, ':', pos, true)
    local len = tonumber(string.sub(member, pos, colon - 1))
    local item = string.sub(member, colon + 1, colon + len)
    pos = colon + len + 1
    if first then first = false else fields[#fields + 1] = item end
  end
  if ARGV[2] ~= '' then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
  else
    redis.call('XADD', KEYS[2], '*', unpack(fields))
  end
  redis.call('ZREM', KEYS[1], member)
end
return {#due, redis.call('ZCARD', KEYS[1])}
";

static MOVE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(MOVE_DUE));

/// The transport's mover task; aborted on close and when the transport is
/// dropped.
#[derive(Default)]
pub(super) struct Mover {
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Mover {
    pub(super) fn stop(&self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

impl Drop for Mover {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the mover task needs: no handle on the transport, so dropping the
/// transport drops [`Mover`], which stops it.
struct Moving {
    conn: Conn,
    config: RedisStreamsConfig,
    hash_tag: bool,
}

impl RedisStreamsTransport {
    /// The sorted set holding `topic`'s scheduled messages: `<stream
    /// key>#scheduled` (in the stream's slot on a cluster).
    pub fn scheduled_key(&self, topic: &str) -> String {
        format!("{}{SCHEDULED_SUFFIX}", self.stream_key(topic))
    }

    /// Starts the mover (once, at connect, when a tokio runtime runs).
    pub(super) fn start_mover(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let moving = Moving {
            conn: self.conn(),
            config: self.inner.config.clone(),
            hash_tag: self.inner.hash_tag,
        };
        let task = runtime.spawn(async move { moving.run().await });
        *lock(&self.inner.mover.task) = Some(task.abort_handle());
    }

    pub(super) async fn schedule(
        &self,
        topic: &str,
        message: &RawMessage,
        at: DateTime<Utc>,
    ) -> Result<(), Error> {
        let member = member_of(message);
        let score = due_millis(at);
        let zset = self.scheduled_key(topic);
        let index = index_key(&self.inner.config);
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(&zset).arg(score).arg(member);
        let mut sadd = redis::cmd("SADD");
        sadd.arg(&index).arg(topic);
        let mut conn = self.conn();
        if conn.is_cluster() {
            // Two slots: the member first, then the index, so a mover that
            // drops the topic from the index meanwhile sees the member when
            // it looks again (see `Moving::tidy`).
            let _: Value = zadd
                .query_async(&mut conn)
                .await
                .map_err(|error| redis_error("ZADD", error))?;
            let _: Value = sadd
                .query_async(&mut conn)
                .await
                .map_err(|error| redis_error("SADD", error))?;
        } else {
            let _: Value = redis::pipe()
                .atomic()
                .add_command(zadd)
                .ignore()
                .add_command(sadd)
                .ignore()
                .query_async(&mut conn)
                .await
                .map_err(|error| redis_error("MULTI ZADD SADD", error))?;
        }
        Ok(())
    }
}

impl Moving {
    async fn run(self) {
        let mut ticks = tokio::time::interval(self.config.schedule_tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            ticks.tick().await;
            match self.move_due().await {
                Ok(()) => failing = false,
                Err(error) => {
                    // Once per outage, not once per tick.
                    if !failing {
                        tracing::warn!(%error, "redis-streams: cannot move scheduled messages; trying again each tick");
                    }
                    failing = true;
                }
            }
        }
    }

    async fn move_due(&self) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let topics: Vec<String> = redis::cmd("SMEMBERS")
            .arg(index_key(&self.config))
            .query_async(&mut conn)
            .await
            .map_err(|error| redis_error("SMEMBERS", error))?;
        for topic in topics {
            let stream = stream_key(&self.config, self.hash_tag, &topic);
            let zset = format!("{stream}{SCHEDULED_SUFFIX}");
            let max_len = self
                .config
                .xadd_max_len(&topic)
                .map_or_else(String::new, |n| n.to_string());
            for _ in 0..BATCHES_PER_TICK {
                let (moved, left): (usize, usize) = MOVE_SCRIPT
                    .key(&zset)
                    .key(&stream)
                    .arg(self.config.schedule_batch)
                    .arg(&max_len)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|error| redis_error("move scheduled messages", error))?;
                if left == 0 {
                    self.tidy(&topic, &zset).await?;
                    break;
                }
                if moved < self.config.schedule_batch {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Drops an emptied topic from the index, and puts it back if a member
    /// arrived meanwhile (a publisher adds the member before the topic).
    async fn tidy(&self, topic: &str, zset: &str) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let index = index_key(&self.config);
        let _: Value = redis::cmd("SREM")
            .arg(&index)
            .arg(topic)
            .query_async(&mut conn)
            .await
            .map_err(|error| redis_error("SREM", error))?;
        let left: usize = redis::cmd("ZCARD")
            .arg(zset)
            .query_async(&mut conn)
            .await
            .map_err(|error| redis_error("ZCARD", error))?;
        if left > 0 {
            let _: Value = redis::cmd("SADD")
                .arg(&index)
                .arg(topic)
                .query_async(&mut conn)
                .await
                .map_err(|error| redis_error("SADD", error))?;
        }
        Ok(())
    }
}

fn index_key(config: &RedisStreamsConfig) -> String {
    format!("{}{SCHEDULED_INDEX}", config.key_prefix)
}

/// The same key as [`RedisStreamsTransport::stream_key`].
fn stream_key(config: &RedisStreamsConfig, hash_tag: bool, topic: &str) -> String {
    let prefix = &config.key_prefix;
    if hash_tag {
        format!("{{{prefix}{topic}}}")
    } else {
        format!("{prefix}{topic}")
    }
}

/// The sorted-set member of `message`: netstrings of a fresh id, then the
/// stream fields and values an `XADD` of it would carry.
fn member_of(message: &RawMessage) -> Vec<u8> {
    let mut fields = redis::cmd("XADD");
    append_message_fields(&mut fields, message);
    let mut member = Vec::with_capacity(message.body.len() + 128);
    push_netstring(&mut member, Uuid::new_v4().simple().to_string().as_bytes());
    // The first argument is the command's name.
    for arg in fields.args_iter().skip(1) {
        if let redis::Arg::Simple(bytes) = arg {
            push_netstring(&mut member, bytes);
        }
    }
    member
}

fn push_netstring(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(bytes.len().to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_due_time_is_rounded_up_to_the_millisecond() {
        let exact = DateTime::from_timestamp_millis(1_700_000_000_123).unwrap();
        assert_eq!(due_millis(exact), 1_700_000_000_123);
        let later = exact + chrono::Duration::microseconds(1);
        assert_eq!(due_millis(later), 1_700_000_000_124);
    }

    #[test]
    fn a_member_is_an_id_then_the_stream_fields_as_netstrings() {
        let message = RawMessage::new("b:1").with_header("note", "x");
        let member = member_of(&message);
        let text = String::from_utf8(member).unwrap();
        // 32 hex digits of id, then `envelope`, the body, `h:note`, `x`.
        assert!(text.starts_with("32:"), "{text}");
        assert_eq!(&text[35..], "8:envelope3:b:16:h:note1:x", "{text}");
        assert!(text.ends_with("8:envelope3:b:16:h:note1:x"), "{text}");
        assert_ne!(member_of(&message), member_of(&message), "ids differ");
    }
}
