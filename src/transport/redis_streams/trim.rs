//! Trimming streams: by length on every `XADD`, or on a schedule by age or
//! below the oldest entry any consumer group still needs.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::{Cmd, FromRedisValue, Value};

use super::xinfo::{int, pairs, text};
use super::{Conn, RedisStreamsTransport, lock};
use crate::error::{Error, ErrorKind};
use crate::observe::metrics;
use crate::transport::redis_support::redis_error;
use crate::transport::validate_name;

/// How a topic's stream is kept from growing for ever. Set for every topic
/// with [`RedisStreamsConfig::with_trim`](super::RedisStreamsConfig::with_trim)
/// or for one with
/// [`with_topic_trim`](super::RedisStreamsConfig::with_topic_trim).
///
/// | policy | for | what it can lose |
/// |---|---|---|
/// | [`None`](Self::None) | anything | nothing; the stream grows until deleted |
/// | [`MaxLen`](Self::MaxLen) | streams read without a group | entries no group has read or acknowledged, when readers fall more than `n` behind |
/// | [`MaxAge`](Self::MaxAge) | streams read without a group | entries older than the age, read or not |
/// | [`KeepNeeded`](Self::KeepNeeded) | streams read by consumer groups | nothing a live group needs; entries only a *stale* group still needed |
///
/// ```
/// use std::time::Duration;
/// use switchboard::transport::redis_streams::{KeepNeeded, RedisStreamsConfig, TrimPolicy};
///
/// let config = RedisStreamsConfig::default()
///     .with_trim(TrimPolicy::KeepNeeded(
///         KeepNeeded::every(Duration::from_secs(60))
///             .with_stale_group_after(Duration::from_secs(24 * 3600)),
///     ))
///     // Every replica follows announcements without a group: keep an hour.
///     .with_topic_trim("announcements", TrimPolicy::max_age(Duration::from_secs(3600)));
/// assert!(matches!(config.trim_policy("trade.executed"), TrimPolicy::KeepNeeded(_)));
/// assert!(matches!(config.trim_policy("announcements"), TrimPolicy::MaxAge { .. }));
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TrimPolicy {
    /// No trimming (the default): every entry stays until deleted.
    #[default]
    None,
    /// `MAXLEN ~ n` on every `XADD`: Redis keeps about the newest `n`
    /// entries (a few more, never fewer), whether groups have read them or
    /// not.
    MaxLen(usize),
    /// Every `every`, `XTRIM MINID` removes the entries older than
    /// `max_age` (by their id's time), whether groups have read them or not.
    MaxAge {
        /// How old an entry may get.
        max_age: Duration,
        /// How often the trim runs.
        every: Duration,
    },
    /// Every `every`, `XTRIM MINID` removes only entries below the oldest
    /// one any group still needs; see [`KeepNeeded`].
    KeepNeeded(KeepNeeded),
}

impl TrimPolicy {
    /// [`MaxAge`](Self::MaxAge) trimming every tenth of `max_age` (at least
    /// every second, at most every minute).
    ///
    /// ```
    /// use std::time::Duration;
    /// use switchboard::transport::redis_streams::TrimPolicy;
    ///
    /// let policy = TrimPolicy::max_age(Duration::from_secs(3600));
    /// assert_eq!(
    ///     policy,
    ///     TrimPolicy::MaxAge { max_age: Duration::from_secs(3600), every: Duration::from_secs(60) },
    /// );
    /// ```
    pub fn max_age(max_age: Duration) -> Self {
        let every = (max_age / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        Self::MaxAge { max_age, every }
    }

    /// How often a scheduled policy runs; `None` for the others.
    pub(super) fn schedule(&self) -> Option<Duration> {
        match self {
            Self::MaxAge { every, .. } => Some(*every),
            Self::KeepNeeded(keep) => Some(keep.every),
            Self::None | Self::MaxLen(_) => None,
        }
    }

    pub(super) fn validate(&self) -> Result<(), Error> {
        let invalid = |what: &str| Err(Error::new(ErrorKind::Config, what.to_owned()));
        match self {
            Self::MaxLen(0) => invalid("redis-streams: a `MaxLen` trim must keep at least 1 entry"),
            Self::MaxAge { max_age, every } if max_age.is_zero() || every.is_zero() => {
                invalid("redis-streams: a `MaxAge` trim needs an age and an interval above zero")
            }
            Self::KeepNeeded(keep) if keep.every.is_zero() => {
                invalid("redis-streams: a `KeepNeeded` trim needs an interval above zero")
            }
            Self::KeepNeeded(keep) if keep.destroy_stale && keep.stale_group_after.is_none() => {
                invalid("redis-streams: `destroy_stale` needs `stale_group_after`")
            }
            _ => Ok(()),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::MaxLen(_) => "max_len",
            Self::MaxAge { .. } => "max_age",
            Self::KeepNeeded(_) => "keep_needed",
        }
    }
}

/// Settings of [`TrimPolicy::KeepNeeded`]: trim below the oldest entry any
/// consumer group still needs.
///
/// A group needs its oldest pending entry (read but not acknowledged —
/// which covers nacked entries waiting out their delay and entries given
/// back, as both stay pending) and everything after its last-delivered id
/// (not read yet; a redriven dead letter is re-added at the end, so it is
/// there too). Every `every`, the trim reads `XINFO GROUPS` and each
/// group's `XPENDING` summary and runs `XTRIM <stream> MINID <id>` with the
/// least of those ids (exact, so an acknowledged entry goes on the next
/// run). A stream without groups is left alone: a group about to be
/// created at the beginning may still want its history.
///
/// A group that has work (entries pending or not read yet) while none of
/// its consumers has been handed or claimed an entry (`idle` in
/// `XINFO CONSUMERS`) for [`stale_group_after`](Self::stale_group_after) —
/// or that has had no consumer that long — is *stale*: it is reported (a warning and the
/// `switchboard_stream_stale_groups` gauge), no longer pins the trim, and
/// with [`destroy_stale`](Self::destroy_stale) is destroyed
/// (`XGROUP DESTROY`). A stale group that comes back finds the entries it
/// had not acknowledged gone. While every group is stale, nothing past the
/// newest entry any of them was handed is trimmed.
///
/// ```
/// use std::time::Duration;
/// use switchboard::transport::redis_streams::KeepNeeded;
///
/// let keep = KeepNeeded::every(Duration::from_secs(30))
///     .with_stale_group_after(Duration::from_secs(3600))
///     .with_destroy_stale(true);
/// assert_eq!(keep.every, Duration::from_secs(30));
/// assert_eq!(keep.stale_group_after, Some(Duration::from_secs(3600)));
/// assert!(keep.destroy_stale);
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeepNeeded {
    /// How often the trim runs.
    pub every: Duration,
    /// How long every consumer of a group must have been idle for the
    /// group to count as abandoned (default `None`: every group pins the
    /// trim for ever). Make it far longer than any outage a subscriber may
    /// come back from.
    pub stale_group_after: Option<Duration>,
    /// Destroy a stale group (default `false`: only report it).
    pub destroy_stale: bool,
}

impl KeepNeeded {
    /// Trims every `every`; no group is ever stale.
    pub fn every(every: Duration) -> Self {
        Self {
            every,
            stale_group_after: None,
            destroy_stale: false,
        }
    }

    /// Sets [`stale_group_after`](Self::stale_group_after).
    pub fn with_stale_group_after(mut self, after: Duration) -> Self {
        self.stale_group_after = Some(after);
        self
    }

    /// Sets [`destroy_stale`](Self::destroy_stale).
    pub fn with_destroy_stale(mut self, yes: bool) -> Self {
        self.destroy_stale = yes;
        self
    }
}

/// What one trim of a stream did; see [`RedisStreamsTransport::trim`].
#[non_exhaustive]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrimReport {
    /// Entries removed.
    pub trimmed: u64,
    /// The `MINID` given to `XTRIM`, if it ran with one.
    pub min_id: Option<String>,
    /// Groups found stale (they did not pin the trim).
    pub stale_groups: Vec<String>,
    /// Stale groups destroyed.
    pub destroyed_groups: Vec<String>,
}

/// A stream entry id: `<ms>-<seq>`, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct EntryId(pub(super) u64, pub(super) u64);

impl EntryId {
    pub(super) fn parse(text: &str) -> Option<Self> {
        let (ms, seq) = text.split_once('-').unwrap_or((text, "0"));
        Some(Self(ms.parse().ok()?, seq.parse().ok()?))
    }

    /// The least id above this one.
    fn next(self) -> Self {
        match self.1.checked_add(1) {
            Some(seq) => Self(self.0, seq),
            None => Self(self.0.saturating_add(1), 0),
        }
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// What the trim knows about one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct GroupView {
    pub(super) last_delivered: EntryId,
    pub(super) oldest_pending: Option<EntryId>,
    pub(super) stale: bool,
}

impl GroupView {
    /// The oldest entry this group still needs.
    fn needs_from(&self) -> EntryId {
        let unread = self.last_delivered.next();
        self.oldest_pending
            .map_or(unread, |pending| pending.min(unread))
    }
}

/// The `MINID` for `XTRIM`: the least id any live group still needs. Stale
/// groups do not pin it, but while every group is stale nothing past what
/// any of them was handed goes (entries no group has read stay). `None`
/// with no groups: nothing is known to be unneeded.
pub(super) fn min_needed(groups: &[GroupView]) -> Option<EntryId> {
    let live = groups.iter().filter(|group| !group.stale);
    match live.map(GroupView::needs_from).min() {
        Some(id) => Some(id),
        None => groups.iter().map(|group| group.last_delivered.next()).max(),
    }
}

/// Trims one topic's stream; shared by its scheduled task and
/// [`RedisStreamsTransport::trim`].
pub(super) struct Trimmer {
    conn: Conn,
    topic: Arc<str>,
    stream: String,
    policy: TrimPolicy,
    deadline: Duration,
    /// Groups seen without consumers, and since when: such a group's age is
    /// not in Redis, so its idle time is counted from when this trimmer
    /// first saw it empty (a restart starts the clock again: the safe side).
    empty_since: Mutex<HashMap<String, Instant>>,
}

/// A topic's trimmer and its scheduled task, if it has one.
type Running = (Arc<Trimmer>, Option<tokio::task::AbortHandle>);

/// The running trimmers of a transport, aborted when it is dropped.
#[derive(Default)]
pub(super) struct Trimmers {
    running: Mutex<HashMap<String, Running>>,
}

impl Trimmers {
    /// Stops and forgets the trims of the topics starting with `prefix`
    /// (their streams were deleted; `""` when the transport closes).
    pub(super) fn forget_prefix(&self, prefix: &str) {
        lock(&self.running).retain(|topic, (_, task)| {
            let keep = !topic.starts_with(prefix);
            if let (false, Some(task)) = (keep, task) {
                task.abort();
            }
            keep
        });
    }
}

impl Drop for Trimmers {
    fn drop(&mut self) {
        self.forget_prefix("");
    }
}

impl RedisStreamsTransport {
    /// Trims `topic`'s stream now, by its [`TrimPolicy`] (for
    /// [`TrimPolicy::MaxLen`], `XTRIM MAXLEN ~`; nothing for
    /// [`TrimPolicy::None`]). A scheduled policy also runs by itself, from
    /// the first time this transport declares, publishes to or subscribes
    /// to the topic; this is for an operator, or a test, that wants it now.
    ///
    /// ```
    /// # async fn run() -> Result<(), switchboard::Error> {
    /// use std::time::Duration;
    /// use switchboard::transport::redis_streams::{
    ///     KeepNeeded, RedisStreamsConfig, RedisStreamsTransport, TrimPolicy,
    /// };
    /// let config = RedisStreamsConfig::default()
    ///     .with_trim(TrimPolicy::KeepNeeded(KeepNeeded::every(Duration::from_secs(60))));
    /// let transport = RedisStreamsTransport::connect_with("redis://127.0.0.1:6379", config).await?;
    /// let report = transport.trim("trade.executed").await?;
    /// println!("trimmed {} entries below {:?}", report.trimmed, report.min_id);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn trim(&self, topic: &str) -> Result<TrimReport, Error> {
        validate_name("topic", topic)?;
        self.trimmer(topic).run().await
    }

    /// The topic's trimmer, started on first use if its policy is
    /// scheduled.
    pub(super) fn trimmer(&self, topic: &str) -> Arc<Trimmer> {
        let mut running = lock(&self.inner.trimmers.running);
        if let Some((trimmer, _)) = running.get(topic) {
            return trimmer.clone();
        }
        let policy = self.inner.config.trim_policy(topic).clone();
        let trimmer = Arc::new(Trimmer {
            conn: self.conn(),
            topic: topic.into(),
            stream: self.stream_key(topic),
            deadline: self.inner.config.response_timeout,
            policy,
            empty_since: Mutex::default(),
        });
        let task = trimmer.policy.schedule().and_then(|every| {
            let runtime = tokio::runtime::Handle::try_current().ok()?;
            // The task holds the trimmer, not the transport, so dropping the
            // transport drops `Trimmers`, which aborts it.
            let scheduled = trimmer.clone();
            Some(
                runtime
                    .spawn(async move {
                        let mut timer = tokio::time::interval(every);
                        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        loop {
                            timer.tick().await;
                            if let Err(error) = scheduled.run().await {
                                tracing::warn!(
                                    stream = %scheduled.stream,
                                    %error,
                                    "cannot trim the stream; trying again next time",
                                );
                            }
                        }
                    })
                    .abort_handle(),
            )
        });
        running.insert(topic.to_owned(), (trimmer.clone(), task));
        trimmer
    }

    /// Starts the topic's scheduled trim if it has one and it is not
    /// running yet: cheap when there is nothing to start.
    pub(super) fn ensure_trimmer(&self, topic: &str) {
        // One map lookup for a topic without a scheduled trim: no lock.
        if self.inner.config.trim_policy(topic).schedule().is_some() {
            self.trimmer(topic);
        }
    }
}

impl Trimmer {
    async fn query<T: FromRedisValue>(&self, what: &str, cmd: &Cmd) -> Result<T, Error> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.deadline, cmd.query_async(&mut conn)).await {
            Ok(reply) => reply.map_err(|error| redis_error(what, error)),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("redis-streams: {what} took longer than {:?}", self.deadline),
            )),
        }
    }

    pub(super) async fn run(&self) -> Result<TrimReport, Error> {
        let mut report = TrimReport::default();
        let min_id = match &self.policy {
            TrimPolicy::None => return Ok(report),
            TrimPolicy::MaxLen(n) => {
                let mut cmd = redis::cmd("XTRIM");
                cmd.arg(&self.stream).arg("MAXLEN").arg("~").arg(*n);
                report.trimmed = self.query("XTRIM MAXLEN", &cmd).await?;
                self.record(&report);
                return Ok(report);
            }
            TrimPolicy::MaxAge { max_age, .. } => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                let cut = now.saturating_sub(*max_age).as_millis();
                Some(EntryId(u64::try_from(cut).unwrap_or(u64::MAX), 0))
            }
            TrimPolicy::KeepNeeded(keep) => {
                let groups = self.groups(keep, &mut report).await?;
                min_needed(&groups)
            }
        };
        if let Some(min_id) = min_id {
            // Exact (`=`): `~` would only drop whole radix-tree nodes, so a
            // small stream would never shrink. Never below `min_id` either way.
            let mut cmd = redis::cmd("XTRIM");
            cmd.arg(&self.stream)
                .arg("MINID")
                .arg("=")
                .arg(min_id.to_string());
            report.trimmed = self.query("XTRIM MINID", &cmd).await?;
            report.min_id = Some(min_id.to_string());
        }
        self.record(&report);
        Ok(report)
    }

    fn record(&self, report: &TrimReport) {
        metrics::stream_trimmed(
            super::NAME,
            self.topic.clone(),
            self.policy.label(),
            report.trimmed,
        );
    }

    /// Every group of the stream, with stale ones reported and, if so
    /// configured, destroyed (a destroyed group is left out).
    async fn groups(
        &self,
        keep: &KeepNeeded,
        report: &mut TrimReport,
    ) -> Result<Vec<GroupView>, Error> {
        let mut info = redis::cmd("XINFO");
        info.arg("GROUPS").arg(&self.stream);
        let infos: Vec<Value> = match self.query("XINFO GROUPS", &info).await {
            Ok(infos) => infos,
            // No stream yet: nothing to trim.
            Err(error) if error.to_string().contains("no such key") => return Ok(Vec::new()),
            Err(error) => return Err(error),
        };
        let mut groups = Vec::new();
        // The stream's newest entry, read once and only to tell stale groups.
        let mut newest: Option<Option<EntryId>> = None;
        for info in &infos {
            let fields = pairs(info);
            let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
            let Some(name) = field("name").and_then(text) else {
                continue;
            };
            let last_delivered = field("last-delivered-id")
                .and_then(text)
                .and_then(|id| EntryId::parse(&id))
                .unwrap_or(EntryId(0, 0));
            let pending = field("pending").and_then(int).unwrap_or(0);
            let oldest_pending = if pending > 0 {
                let mut summary = redis::cmd("XPENDING");
                summary.arg(&self.stream).arg(&name);
                let summary: Vec<Value> = self.query("XPENDING", &summary).await?;
                summary
                    .get(1)
                    .and_then(text)
                    .and_then(|id| EntryId::parse(&id))
            } else {
                None
            };
            let consumers = field("consumers").and_then(int).unwrap_or(0);
            let stale = match keep.stale_group_after {
                Some(after) => {
                    if newest.is_none() {
                        newest = Some(self.newest().await?);
                    }
                    let has_work = pending > 0 || newest.flatten() > Some(last_delivered);
                    self.is_stale(&name, has_work, consumers, after).await?
                }
                None => false,
            };
            if stale {
                tracing::warn!(
                    stream = %self.stream,
                    group = %name,
                    idle_for = ?keep.stale_group_after,
                    destroy = keep.destroy_stale,
                    "consumer group has not read for longer than stale_group_after; \
                     it no longer holds back trimming",
                );
                report.stale_groups.push(name.clone());
                if keep.destroy_stale {
                    let mut destroy = redis::cmd("XGROUP");
                    destroy.arg("DESTROY").arg(&self.stream).arg(&name);
                    let _: i64 = self.query("XGROUP DESTROY", &destroy).await?;
                    lock(&self.empty_since).remove(&name);
                    report.destroyed_groups.push(name);
                    continue;
                }
            }
            groups.push(GroupView {
                last_delivered,
                oldest_pending,
                stale,
            });
        }
        metrics::stale_groups(
            super::NAME,
            self.topic.clone(),
            report.stale_groups.len() - report.destroyed_groups.len(),
            report.destroyed_groups.len(),
        );
        Ok(groups)
    }

    /// The id of the stream's newest entry, if it has any.
    async fn newest(&self) -> Result<Option<EntryId>, Error> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(&self.stream).arg("+").arg("-").arg("COUNT").arg(1);
        let reply: redis::streams::StreamRangeReply = self.query("XREVRANGE", &cmd).await?;
        Ok(reply
            .ids
            .first()
            .and_then(|entry| EntryId::parse(&entry.id)))
    }

    /// Stale: the group has work (entries pending or not read yet) and no
    /// consumer of it has been handed or claimed an entry for `after` (or
    /// it has had no consumer that long). Work is required because before
    /// Redis 7.2 `idle` counts only reads that returned entries, so a live
    /// subscriber of a quiet stream looks idle — but it holds nothing back.
    async fn is_stale(
        &self,
        group: &str,
        has_work: bool,
        consumers: u64,
        after: Duration,
    ) -> Result<bool, Error> {
        if !has_work {
            lock(&self.empty_since).remove(group);
            return Ok(false);
        }
        if consumers == 0 {
            let mut empty = lock(&self.empty_since);
            let since = *empty.entry(group.to_owned()).or_insert_with(Instant::now);
            return Ok(since.elapsed() >= after);
        }
        lock(&self.empty_since).remove(group);
        let mut cmd = redis::cmd("XINFO");
        cmd.arg("CONSUMERS").arg(&self.stream).arg(group);
        let consumers: Vec<Value> = self.query("XINFO CONSUMERS", &cmd).await?;
        let after_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        Ok(consumers.iter().all(|consumer| {
            let fields = pairs(consumer);
            fields
                .iter()
                .find(|(k, _)| k == "idle")
                .and_then(|(_, v)| int(v))
                // A consumer whose idle time is unknown counts as live.
                .is_some_and(|idle| idle >= after_ms)
        }))
    }
}

#[cfg(test)]
#[path = "trim_tests.rs"]
mod tests;
