//! Ownership-checked commands and the per-subscription keeper task.
//!
//! `XCLAIM` and `XACK` take any pending id, whoever holds it: a consumer that
//! stalled past `claim_idle` (a long GC pause, a frozen VM, a cut network)
//! and lost an entry to another member would otherwise renew it back, or
//! acknowledge it from under the member now running it. So every command
//! that touches an entry this consumer believes it holds is a script that
//! first looks the id up with `XPENDING <stream> <group> <id> <id> 1 <me>`
//! (an ack batch: one `XPENDING` over the batch's id range) and only then
//! claims, acknowledges or dead-letters it — in one step, since a script
//! runs atomically.
//!
//! The keeper is one task per subscription. It batches acks: every ack asked
//! for while the previous batch was on its way goes out in the next script
//! call, as one `XACK` of all their ids, and an ack with nothing on its way
//! goes out at once (never held for company). It also renews the lease on
//! every entry the subscription holds every `lease_every`, and samples the
//! group's lag.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};

use redis::streams::StreamClaimReply;
use redis::{RedisResult, ServerErrorKind, Value};
use tokio::sync::{mpsc, oneshot};

use super::acker::Group;
use super::ids::{EntryId, HeldIds, id_range};
use super::reply::StreamEntry;
use super::scripts::{ACK_SCRIPT, CLAIM_SCRIPT, GIVE_BACK_SCRIPT};
use super::{lock, xinfo};
use crate::error::{Error, ErrorKind};
use crate::observe::metrics;
use crate::transport::redis_support::redis_error;

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
    ) -> RedisResult<Vec<StreamEntry>> {
        let mut entries = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(SCRIPT_BATCH) {
            let reply: StreamClaimReply = self
                .claim_invocation(mode, chunk)
                .invoke_async(&mut self.conn())
                .await?;
            entries.extend(reply.ids.into_iter().map(StreamEntry::from));
        }
        Ok(entries)
    }

    /// Acknowledges those of `ids` still pending for this consumer; returns
    /// the positions of those that were not. The `EVALSHA` is written out
    /// here rather than through a `ScriptInvocation`, which would copy every
    /// id into an argument of its own first.
    async fn ack_owned(&self, ids: &[EntryId]) -> RedisResult<Vec<usize>> {
        let Some((lowest, highest)) = id_range(ids) else {
            return Ok(Vec::new());
        };
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(ACK_SCRIPT.get_hash())
            .arg(1)
            .arg(&self.stream)
            .arg(&*self.group)
            .arg(&self.consumer);
        for id in [&lowest, &highest].into_iter().chain(ids) {
            id.with_bytes(|bytes| cmd.arg(bytes));
        }
        let lost: Vec<usize> = match cmd.query_async(&mut self.conn()).await {
            Err(error) if error.kind() == redis::ErrorKind::Server(ServerErrorKind::NoScript) => {
                ACK_SCRIPT.load_async(&mut self.conn()).await?;
                cmd.query_async(&mut self.conn()).await?
            }
            reply => reply?,
        };
        Ok(lost
            .into_iter()
            .filter_map(|at| at.checked_sub(1))
            .collect())
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
pub(super) type AckRequest = (EntryId, oneshot::Sender<Result<(), Error>>);

/// The ids a subscription holds, whose leases the keeper renews.
pub(super) type Held = Arc<Mutex<HeldIds>>;

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
                    let _ = reply.send(Err(lease_lost(&id.text())));
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
    let ids: Vec<EntryId> = batch.iter().map(|(id, _)| id.clone()).collect();
    match group.ack_owned(&ids).await {
        Ok(lost) => {
            {
                let mut held = lock(&group.held);
                for id in &ids {
                    held.remove_id(id);
                }
            }
            // The positions come in order: one pass settles the batch.
            let mut lost = lost.into_iter().peekable();
            for (at, (id, reply)) in batch.drain(..).enumerate() {
                let acked = lost.next_if_eq(&at).is_none();
                let _ = reply.send(if acked {
                    Ok(())
                } else {
                    Err(lease_lost(&id.text()))
                });
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
    let ids: Vec<String> = lock(&group.held).texts();
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
