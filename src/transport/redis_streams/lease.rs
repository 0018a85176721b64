//! Ownership-checked commands and the per-subscription keeper task.
//!
//! `XCLAIM` and `XACK` take any pending id, whoever holds it: a consumer that
//! stalled past `claim_idle` (a long GC pause, a frozen VM, a cut network)
//! and lost an entry to another member would otherwise renew it back, or
//! acknowledge it from under the member now running it. So every command
//! that touches an entry this consumer believes it holds is a script that
//! first looks the id up with `XPENDING <stream> <group> <id> <id> 1 <me>`
//! and only then claims, acknowledges or dead-letters it — in one step,
//! since a script runs atomically.
//!
//! The keeper is one task per subscription. It batches acks (handlers that
//! finish together share one script call), renews the lease on every entry
//! the subscription holds every `lease_every`, and samples the group's lag.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex, Weak};

use redis::streams::{StreamClaimReply, StreamId};
use redis::{RedisResult, Script, Value};
use tokio::sync::{mpsc, oneshot};

use super::acker::Group;
use super::{lock, xinfo};
use crate::error::{Error, ErrorKind};
use crate::observe::metrics;
use crate::transport::redis_support::redis_error;

/// `KEYS[1]` stream; `ARGV` group, consumer, mode, idle ms, ids…
///
/// Claims those of `ids` still pending for `consumer`. Modes:
/// * `renew` — `XCLAIM … JUSTID`: resets their idle time, returns the ids;
/// * `reread` — `XCLAIM … JUSTID` then `XRANGE` each: the entries again
///   without raising their delivery counters (after a nack's delay);
/// * `recover` — plain `XCLAIM`: the entries, counters raised (what an
///   earlier run under this name left unsettled).
const CLAIM_OWNED: &str = r"
local owned = {}
for i = 5, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #p > 0 then owned[#owned + 1] = ARGV[i] end
end
if #owned == 0 then return {} end
local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for _, id in ipairs(owned) do args[#args + 1] = id end
local mode = ARGV[3]
if mode ~= 'recover' then args[#args + 1] = 'JUSTID' end
local claimed = redis.call(unpack(args))
if mode ~= 'reread' then return claimed end
local entries = {}
for _, id in ipairs(claimed) do
  local found = redis.call('XRANGE', KEYS[1], id, id)
  if #found > 0 then entries[#entries + 1] = found[1] end
end
return entries
";

/// `KEYS[1]` stream; `ARGV` group, consumer, idle ms, then pairs of id and
/// retry count (empty: keep) — hands back those of the ids still pending for
/// `consumer`: `XCLAIM … IDLE <ms> [RETRYCOUNT n] JUSTID`, so any member's
/// next `XAUTOCLAIM` takes them. An entry whose delivery ended with an
/// outcome or never reached a handler gets its delivery counter set back by
/// one, since that `XAUTOCLAIM` raises it again; returns how many were
/// handed back.
const GIVE_BACK_OWNED: &str = r"
local given = 0
for i = 4, #ARGV, 2 do
  local id, retry = ARGV[i], ARGV[i + 1]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2])
  if #p > 0 then
    if retry == '' then
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3], 'JUSTID')
    else
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3],
        'RETRYCOUNT', retry, 'JUSTID')
    end
    given = given + 1
  end
end
return given
";

/// `KEYS[1]` stream, `KEYS[2]` the group's given-back hash; `ARGV` group,
/// consumer, idle ms, id, retry count, hash field, hash value, hash TTL in
/// seconds — gives `id` back to the group if it is still pending for
/// `consumer`: `XCLAIM … IDLE <ms> RETRYCOUNT <n> JUSTID`, so any member's
/// next `XAUTOCLAIM` takes it (the retry count set back by one, since that
/// claim raises it again: a give-back is not a delivery without an
/// outcome), and records how often and since when it was given back in the
/// hash (whose TTL each give-back renews). Returns 1 if so, 0 if not.
const GIVE_BACK_TO_GROUP: &str = r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[4], ARGV[4], 1, ARGV[2])
if #p == 0 then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[4], 'IDLE', ARGV[3],
  'RETRYCOUNT', ARGV[5], 'JUSTID')
redis.call('HSET', KEYS[2], ARGV[6], ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[8])
return 1
";

/// `KEYS[1]` stream; `ARGV` group, consumer, ids… — acknowledges those of
/// `ids` still pending for `consumer`; returns 1 or 0 per id.
const ACK_OWNED: &str = r"
local result = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #p > 0 then
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    result[#result + 1] = 1
  else
    result[#result + 1] = 0
  end
end
return result
";

/// `KEYS[1]` stream, `KEYS[2]` dead-letter stream; `ARGV` group, consumer,
/// id, the dead-letter stream's bound (0: none), then the dead-letter
/// entry's field/value pairs — adds the entry to the dead-letter stream
/// (trimmed to the bound) and acknowledges the original, only if `id` is
/// still pending for `consumer`; returns 0 if not, 1 if moved, 2 if moved
/// and the bound evicted older dead letters.
const DEAD_LETTER_OWNED: &str = r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #p == 0 then return 0 end
local bound = tonumber(ARGV[4])
local evicted = 0
local args = {'XADD', KEYS[2]}
if bound > 0 then
  if redis.call('XLEN', KEYS[2]) >= bound then evicted = 1 end
  args[#args + 1] = 'MAXLEN'
  args[#args + 1] = '='
  args[#args + 1] = ARGV[4]
end
args[#args + 1] = '*'
for i = 5, #ARGV do args[#args + 1] = ARGV[i] end
redis.call(unpack(args))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return 1 + evicted
";

static CLAIM_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM_OWNED));
static ACK_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ACK_OWNED));
static GIVE_BACK_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(GIVE_BACK_OWNED));
pub(super) static GIVE_BACK_TO_GROUP_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(GIVE_BACK_TO_GROUP));
pub(super) static DEAD_LETTER_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(DEAD_LETTER_OWNED));

/// The most ids one script call carries (Lua's `unpack` has a limit of a
/// few thousand values).
pub(super) const SCRIPT_BATCH: usize = 512;

/// How [`Group::claim_owned`] claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Claim {
    Renew,
    Reread,
    Recover,
}

/// An entry to hand back. `settled_count`: its delivery counter, when the
/// delivery it counts ended with an outcome (a nack) or never reached a
/// handler — the counter is set back so the next claim does not count it as
/// a delivery without an outcome. `None`: dropped unsettled, which counts.
pub(super) struct GiveBack {
    pub(super) id: String,
    pub(super) settled_count: Option<u32>,
}

impl GiveBack {
    /// Never handed to a handler, or its delivery ended with a nack: the
    /// counter stays `count` for the next claim.
    pub(super) fn settled(id: String, count: u32) -> Self {
        Self {
            id,
            settled_count: Some(count),
        }
    }

    /// Handed out and dropped unsettled: the next claim counts one more.
    pub(super) fn abandoned(id: String) -> Self {
        Self {
            id,
            settled_count: None,
        }
    }
}

impl Group {
    fn claim_invocation(&self, mode: Claim, ids: &[String]) -> redis::ScriptInvocation<'static> {
        let (mode, idle) = match mode {
            Claim::Renew => ("renew", 0),
            Claim::Reread => ("reread", 0),
            Claim::Recover => ("recover", 0),
        };
        let mut invocation = CLAIM_SCRIPT.key(&self.stream);
        invocation
            .arg(&*self.group)
            .arg(&self.consumer)
            .arg(mode)
            .arg(idle)
            .arg(ids);
        invocation
    }

    /// Hands back those of `entries` still pending for this consumer, idle
    /// for `idle_ms` (see `GIVE_BACK_OWNED`).
    pub(super) async fn give_back_owned(
        &self,
        entries: &[GiveBack],
        idle_ms: u64,
    ) -> RedisResult<()> {
        for chunk in entries.chunks(SCRIPT_BATCH / 2) {
            let mut invocation = GIVE_BACK_SCRIPT.key(&self.stream);
            invocation
                .arg(&*self.group)
                .arg(&self.consumer)
                .arg(idle_ms);
            for entry in chunk {
                let retry = entry
                    .settled_count
                    .map_or_else(String::new, |count| count.saturating_sub(1).to_string());
                invocation.arg(&entry.id).arg(retry);
            }
            let _given: i64 = invocation.invoke_async(&mut self.conn()).await?;
        }
        Ok(())
    }

    /// Claims those of `ids` still pending for this consumer; returns the
    /// ids claimed (`Renew`).
    pub(super) async fn claim_ids(&self, mode: Claim, ids: &[String]) -> RedisResult<Vec<String>> {
        let mut claimed = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(SCRIPT_BATCH) {
            let reply: Vec<String> = self
                .claim_invocation(mode, chunk)
                .invoke_async(&mut self.conn())
                .await?;
            claimed.extend(reply);
        }
        Ok(claimed)
    }

    /// Claims those of `ids` still pending for this consumer; returns their
    /// entries (`Reread`, `Recover`).
    pub(super) async fn claim_entries(
        &self,
        mode: Claim,
        ids: &[String],
    ) -> RedisResult<Vec<StreamId>> {
        let mut entries = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(SCRIPT_BATCH) {
            let reply: StreamClaimReply = self
                .claim_invocation(mode, chunk)
                .invoke_async(&mut self.conn())
                .await?;
            entries.extend(reply.ids);
        }
        Ok(entries)
    }

    /// Acknowledges those of `ids` still pending for this consumer; one
    /// flag per id.
    async fn ack_owned(&self, ids: &[&str]) -> RedisResult<Vec<bool>> {
        let flags: Vec<i64> = ACK_SCRIPT
            .key(&self.stream)
            .arg(&*self.group)
            .arg(&self.consumer)
            .arg(ids)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(flags.into_iter().map(|flag| flag == 1).collect())
    }
}

/// The error a settle gets when another member took the entry over.
pub(super) fn lease_lost(id: &str) -> Error {
    Error::new(
        ErrorKind::Rejected,
        format!(
            "redis-streams: entry {id} is no longer pending for this consumer \
             (another member took it over after claim_idle); its outcome there counts"
        ),
    )
}

/// An id to acknowledge, and where to say how it went.
pub(super) type AckRequest = (String, oneshot::Sender<Result<(), Error>>);

/// The ids a subscription holds (read, handed out, or waiting out a
/// nack), whose leases the keeper renews.
pub(super) type Held = Arc<Mutex<HashSet<String>>>;

/// Starts a subscription's keeper (see the module docs); it ends when the
/// subscription and all its deliveries are gone (every ack sender dropped).
///
/// It holds the group weakly: the group owns the ack sender, and the keeper
/// must not keep alive what tells it to stop.
pub(super) fn spawn_keeper(group: Weak<Group>, mut acks: mpsc::Receiver<AckRequest>) {
    let Some(config) = group
        .upgrade()
        .map(|group| group.transport.inner.config.clone())
    else {
        return;
    };
    let lease_every = config.lease_interval();
    let lag_every = config.lag_every;
    tokio::spawn(async move {
        let mut lease = tokio::time::interval(lease_every);
        let mut lag = tokio::time::interval(lag_every);
        for timer in [&mut lease, &mut lag] {
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let mut batch = Vec::new();
        loop {
            enum Work {
                Acks,
                Renew,
                Lag,
            }
            let work = tokio::select! {
                received = acks.recv_many(&mut batch, SCRIPT_BATCH) => {
                    if received == 0 {
                        return;
                    }
                    Work::Acks
                }
                _ = lease.tick() => Work::Renew,
                _ = lag.tick() => Work::Lag,
            };
            let Some(group) = group.upgrade() else {
                for (id, reply) in batch.drain(..) {
                    let _ = reply.send(Err(lease_lost(&id)));
                }
                return;
            };
            match work {
                Work::Acks => settle_acks(&group, &mut batch).await,
                Work::Renew => renew(&group).await,
                Work::Lag => sample_lag(&group).await,
            }
        }
    });
}

async fn settle_acks(group: &Group, batch: &mut Vec<AckRequest>) {
    let ids: Vec<&str> = batch.iter().map(|(id, _)| id.as_str()).collect();
    match group.ack_owned(&ids).await {
        Ok(flags) => {
            {
                let mut held = lock(&group.held);
                for (id, _) in batch.iter() {
                    held.remove(id);
                }
            }
            for ((id, reply), acked) in batch.drain(..).zip(flags) {
                let _ = reply.send(if acked { Ok(()) } else { Err(lease_lost(&id)) });
            }
        }
        Err(error) => {
            let error = redis_error("XACK", error);
            for (_, reply) in batch.drain(..) {
                let _ = reply.send(Err(Error::new(error.kind(), error.message().to_owned())));
            }
        }
    }
}

/// Renews the idle time of every entry the subscription holds; forgets
/// those another member took over meanwhile.
async fn renew(group: &Group) {
    let ids: Vec<String> = lock(&group.held).iter().cloned().collect();
    if ids.is_empty() {
        return;
    }
    match group.claim_ids(Claim::Renew, &ids).await {
        Ok(renewed) => {
            if renewed.len() == ids.len() {
                return;
            }
            let renewed: HashSet<String> = renewed.into_iter().collect();
            let lost: Vec<&String> = ids.iter().filter(|id| !renewed.contains(*id)).collect();
            // Settled meanwhile, or taken over: either way no longer ours.
            let mut held = lock(&group.held);
            let mut taken = 0;
            for id in lost {
                taken += usize::from(held.remove(id));
            }
            if taken > 0 {
                tracing::warn!(
                    stream = %group.stream,
                    group = %group.group,
                    taken,
                    "entries this consumer held were taken over by another member \
                     (it stalled past claim_idle); their outcome there counts",
                );
            }
        }
        Err(error) => tracing::warn!(
            stream = %group.stream,
            group = %group.group,
            %error,
            "cannot renew leases; trying again next tick",
        ),
    }
}

/// Sets the lag gauge from `XINFO GROUPS` (Redis 7 reports `lag`; older
/// servers leave it out and nothing is recorded).
async fn sample_lag(group: &Group) {
    let reply: RedisResult<Vec<Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&group.stream)
        .query_async(&mut group.conn())
        .await;
    let Ok(groups) = reply else {
        return;
    };
    if let Some(lag) = groups.iter().find_map(|info| lag_of(info, &group.group)) {
        metrics::consumer_lag(super::NAME, group.topic.clone(), group.group.clone(), lag);
    }
}

/// The `lag` of `group` on `stream`, asked once (`XINFO GROUPS`).
pub(super) async fn group_lag(
    mut conn: super::connection::Conn,
    stream: &str,
    group: &str,
) -> Result<Option<u64>, crate::Error> {
    let groups: Vec<Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(&mut conn)
        .await
        .map_err(|error| crate::transport::redis_support::redis_error("XINFO GROUPS", error))?;
    Ok(groups.iter().find_map(|info| lag_of(info, group)))
}

/// The `lag` of the group named `name` in one `XINFO GROUPS` entry (a map
/// in RESP3, a flat list of pairs in RESP2).
fn lag_of(info: &Value, name: &str) -> Option<u64> {
    let pairs = xinfo::pairs(info);
    let field = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| *v);
    if xinfo::text(field("name")?)? != name {
        return None;
    }
    xinfo::int(field("lag")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn lag_is_read_from_resp2_and_resp3_replies() {
        let resp2 = Value::Array(vec![bulk("name"), bulk("game"), bulk("lag"), Value::Int(7)]);
        assert_eq!(lag_of(&resp2, "game"), Some(7));
        assert_eq!(lag_of(&resp2, "market"), None);
        let resp3 = Value::Map(vec![
            (bulk("name"), bulk("game")),
            (bulk("lag"), Value::Int(3)),
        ]);
        assert_eq!(lag_of(&resp3, "game"), Some(3));
        let unknown = Value::Map(vec![
            (bulk("name"), bulk("game")),
            (bulk("lag"), Value::Nil),
        ]);
        assert_eq!(
            lag_of(&unknown, "game"),
            None,
            "a lag Redis cannot tell is not recorded"
        );
    }
}
