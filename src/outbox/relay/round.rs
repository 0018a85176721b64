//! One round of the relay: lease, read, publish, delete, park.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::lease::Lease;
use super::{OnRefused, ParkedEvent, Relay};
use crate::error::{Error, ErrorKind};
use crate::observe::metrics;
use crate::outbox::OutboxDatabase;
use crate::outbox::backend::{Scope, StoredRow};
use crate::outbox::error::from_sqlx;
use crate::transport::RawMessage;

/// How a round went.
pub(super) enum Round {
    /// A full batch: there may be more right away.
    Full,
    /// Fewer rows than a batch: wait for more.
    Partial,
}

pub(super) struct Worker<'r, DB: OutboxDatabase> {
    pub(super) relay: &'r Relay<DB>,
    pub(super) delays: backon::ExponentialBackoff,
    pub(super) next_stats: Instant,
}

/// Whether the transport refused this row for good (park it) rather than
/// failed to take it now (wait and send again). A transport that is closed,
/// refuses credentials or has an open breaker says nothing about the row.
fn refuses_row(error: &Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Rejected | ErrorKind::Encode | ErrorKind::Decode | ErrorKind::NotFound
    )
}

/// Batches one round sends at most before it ends, so that shutdown,
/// rebalancing and the pending gauge are looked at while a backlog drains.
const BATCHES_PER_ROUND: usize = 16;

/// What one publish of a batch did, by index in the batch.
#[derive(Default)]
struct Published {
    /// Rows the transport accepted.
    accepted: Vec<usize>,
    /// Rows it refused for good, with its answer: to be parked.
    refused: Vec<(usize, Error)>,
    /// The failure that stopped the batch (the rest stays for later).
    error: Option<Error>,
}

/// The relay's read of its scope.
#[derive(Clone, Copy)]
struct Read<'s> {
    scope: &'s Scope,
    limit: i64,
    hold: bool,
}

impl Read<'_> {
    /// The batch after id `after`; none when there is no `after`.
    async fn after<DB: OutboxDatabase>(
        self,
        conn: &mut DB::Connection,
        relay: &Relay<DB>,
        after: Option<i64>,
    ) -> Result<Vec<StoredRow>, Error> {
        match after {
            Some(after) => {
                let tables = &relay.outbox.shared.tables;
                DB::fetch(conn, tables, self.scope, self.limit, self.hold, after).await
            }
            None => Ok(Vec::new()),
        }
    }
}

/// Rows accepted by the transport and not deleted yet, with the count per
/// topic for the `sent` counter.
#[derive(Default)]
struct Accepted {
    ids: Vec<i64>,
    per_topic: Vec<(String, u64)>,
}

impl Accepted {
    fn of(rows: &[StoredRow], indexes: &[usize]) -> Self {
        let mut accepted = Self {
            ids: Vec::with_capacity(indexes.len()),
            per_topic: Vec::new(),
        };
        for &index in indexes {
            let row = &rows[index];
            accepted.ids.push(row.id);
            match accepted
                .per_topic
                .iter_mut()
                .find(|(topic, _)| *topic == row.topic)
            {
                Some((_, count)) => *count += 1,
                None => accepted.per_topic.push((row.topic.clone(), 1)),
            }
        }
        accepted
    }

    /// Deletes the rows and counts them as sent.
    async fn delete<DB: OutboxDatabase>(
        self,
        conn: &mut DB::Connection,
        relay: &Relay<DB>,
    ) -> Result<(), Error> {
        if self.ids.is_empty() {
            return Ok(());
        }
        DB::delete(conn, &relay.outbox.shared.tables, &self.ids).await?;
        relay.stats.add(&relay.stats.sent, self.ids.len() as u64);
        for (topic, count) in &self.per_topic {
            metrics::outbox_sent(relay.metric_label(), topic, *count);
        }
        Ok(())
    }
}

fn to_message(row: &StoredRow) -> Result<RawMessage, Error> {
    let headers: crate::envelope::Headers =
        serde_json::from_str(&row.headers).map_err(|error| {
            Error::new(
                ErrorKind::Decode,
                "outbox row headers are not a JSON object",
            )
            .with_source(error)
        })?;
    let mut message = RawMessage::new(row.body.clone());
    message.headers = headers;
    Ok(message)
}

impl<DB: OutboxDatabase> Worker<'_, DB> {
    pub(super) async fn round(&mut self, lease: &mut Lease<DB>) -> Result<Round, Error> {
        let relay = self.relay;
        let tables = &relay.outbox.shared.tables;
        let config = &relay.config;
        let session = match lease
            .session(
                tables,
                config.partitions,
                config.rebalance_interval,
                config.synchronous_deletes,
            )
            .await
        {
            Ok(session) => session,
            Err(error) => {
                lease.lost();
                return Err(error);
            }
        };
        let scope = session.scope.clone();
        let held = match &scope {
            Scope::All => 0,
            Scope::Partitions { held, .. } => held.len() as u64,
        };
        relay.stats.partitions.store(held, Ordering::Relaxed);
        if matches!(&scope, Scope::Partitions { held, .. } if held.is_empty()) {
            // Every partition is another relay's: stand by.
            return Ok(Round::Partial);
        }
        let result = self.send(session.conn, session.deleter, &scope).await;
        if result.is_err() {
            // The error may have been the session's: start a fresh one (its
            // leases go with the old one).
            lease.lost();
        }
        result
    }

    /// Drains the scope: publishes one batch while the database deletes
    /// the batch before it and reads the batch after it, so a backlog moves
    /// at the pace of the slower side rather than of both added up. A batch
    /// is published only once the one before it was accepted (order per
    /// key); what was accepted is deleted before the round ends, also when
    /// it ends in an error.
    async fn send(
        &mut self,
        conn: &mut DB::Connection,
        mut deleter: Option<&mut DB::Connection>,
        scope: &Scope,
    ) -> Result<Round, Error> {
        let relay = self.relay;
        let config = &relay.config;
        if Instant::now() >= self.next_stats {
            self.next_stats = Instant::now() + config.stats_interval;
            self.report_pending().await?;
        }
        let hold = config.on_refused == OnRefused::HoldKey;
        let limit = config.batch_size;
        let read = Read {
            scope,
            limit: limit as i64,
            hold,
        };
        let mut rows = read.after::<DB>(conn, relay, Some(0)).await?;
        let mut held_keys: HashSet<String> = HashSet::new();
        let mut accepted = Accepted::default();
        for _ in 0..BATCHES_PER_ROUND {
            let full = rows.len() >= limit;
            // Rows of one key are sent in id order, so a key's next row
            // comes after this batch's last; a row of another key that
            // commits below it is read at the next round.
            let after = rows.last().map_or(0, |row| row.id);
            let deleting = std::mem::take(&mut accepted);
            // The next batch only after a full one: a partial one was all.
            let next = full.then_some(after);
            let database = async {
                match deleter.as_deref_mut() {
                    Some(deleter) => {
                        let (deleted, read) = tokio::join!(
                            deleting.delete::<DB>(deleter, relay),
                            read.after::<DB>(&mut *conn, relay, next)
                        );
                        deleted.and(read)
                    }
                    None => {
                        deleting.delete::<DB>(&mut *conn, relay).await?;
                        read.after::<DB>(&mut *conn, relay, next).await
                    }
                }
            };
            let (published, read) =
                tokio::join!(self.publish_runs(&rows, &mut held_keys), database);
            accepted = Accepted::of(&rows, &published.accepted);
            let settled = self.settle(conn, &rows, published, read).await;
            let next = match settled {
                Ok(next) => next,
                Err(error) => {
                    // Accepted rows are not to be sent again; the session
                    // may be gone, in which case they are (at least once).
                    let _ = accepted
                        .delete::<DB>(deleter.as_deref_mut().unwrap_or(conn), relay)
                        .await;
                    return Err(error);
                }
            };
            if !full {
                accepted
                    .delete::<DB>(deleter.as_deref_mut().unwrap_or(conn), relay)
                    .await?;
                return Ok(Round::Partial);
            }
            rows = next
                .into_iter()
                .filter(|row| !held_keys.contains(&row.key))
                .collect();
        }
        accepted
            .delete::<DB>(deleter.unwrap_or(conn), relay)
            .await?;
        Ok(Round::Full)
    }

    /// Parks what the transport refused, then returns the batch read
    /// meanwhile, or the first error of the publish or the database.
    async fn settle(
        &mut self,
        conn: &mut DB::Connection,
        rows: &[StoredRow],
        published: Published,
        read: Result<Vec<StoredRow>, Error>,
    ) -> Result<Vec<StoredRow>, Error> {
        let next = read?;
        for (index, error) in &published.refused {
            self.park(conn, &rows[*index], error).await?;
        }
        match published.error {
            Some(error) => Err(error),
            None => Ok(next),
        }
    }

    /// Sets the pending and lag gauges. Read through the pool: the count
    /// scans the table, which the relay's own session plans by index.
    async fn report_pending(&self) -> Result<(), Error> {
        let relay = self.relay;
        let mut conn = relay
            .pool
            .acquire()
            .await
            .map_err(|e| from_sqlx("outbox pending", e))?;
        let (pending, lag) = DB::pending(&mut conn, &relay.outbox.shared.tables).await?;
        metrics::outbox_pending(relay.metric_label(), pending, lag.unwrap_or(0.0));
        Ok(())
    }

    /// Publishes `rows` in order, one `publish_batch` per run of rows with
    /// the same topic, skipping keys in `held_keys` (and adding the key of
    /// a refused row when refusals hold their key). Stops at the first
    /// error the transport may get over.
    async fn publish_runs(&self, rows: &[StoredRow], held_keys: &mut HashSet<String>) -> Published {
        let holds = self.relay.config.on_refused == OnRefused::HoldKey;
        let mut published = Published::default();
        let refuse = |published: &mut Published,
                      held_keys: &mut HashSet<String>,
                      index: usize,
                      error: Error| {
            if holds {
                held_keys.insert(rows[index].key.clone());
            }
            published.refused.push((index, error));
        };
        let mut start = 0;
        while start < rows.len() {
            let topic = &rows[start].topic;
            let end = rows[start..]
                .iter()
                .position(|row| &row.topic != topic)
                .map_or(rows.len(), |offset| start + offset);
            // Indexes and messages apart: the messages go to the transport
            // whole, and the rare one-by-one retry below builds its own.
            let mut run = Vec::with_capacity(end - start);
            let mut messages = Vec::with_capacity(end - start);
            for (index, row) in rows.iter().enumerate().take(end).skip(start) {
                if held_keys.contains(&row.key) {
                    continue;
                }
                match to_message(row) {
                    Ok(message) => {
                        run.push(index);
                        messages.push(message);
                    }
                    Err(error) => refuse(&mut published, held_keys, index, error),
                }
            }
            start = end;
            if run.is_empty() {
                continue;
            }
            match self.publish(topic, messages).await {
                Ok(()) => published.accepted.extend(run),
                Err(error) if refuses_row(&error) => {
                    // Which one? Send them one by one (a prefix may have been
                    // taken already: those go twice, as at-least-once allows).
                    for index in run {
                        if held_keys.contains(&rows[index].key) {
                            continue;
                        }
                        let message = match to_message(&rows[index]) {
                            Ok(message) => message,
                            Err(error) => {
                                refuse(&mut published, held_keys, index, error);
                                continue;
                            }
                        };
                        match self.publish(topic, vec![message]).await {
                            Ok(()) => published.accepted.push(index),
                            Err(error) if refuses_row(&error) => {
                                refuse(&mut published, held_keys, index, error);
                            }
                            Err(error) => {
                                published.error = Some(error);
                                return published;
                            }
                        }
                    }
                }
                Err(error) => {
                    published.error = Some(error);
                    return published;
                }
            }
        }
        published
    }

    async fn publish(&self, topic: &str, messages: Vec<RawMessage>) -> Result<(), Error> {
        let relay = self.relay;
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(
            relay.config.publish_timeout,
            relay.transport.publish_batch(topic, messages),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "outbox relay: publish to {topic} took longer than {:?}",
                    relay.config.publish_timeout
                ),
            )),
        };
        metrics::published(
            relay.transport.name(),
            metrics::Label::Owned(topic.to_owned()),
            result.is_ok(),
            started.elapsed(),
        );
        result
    }

    async fn park(
        &mut self,
        conn: &mut DB::Connection,
        row: &StoredRow,
        error: &Error,
    ) -> Result<(), Error> {
        let relay = self.relay;
        let reason = error.to_string();
        DB::park(conn, &relay.outbox.shared.tables, row.id, &reason).await?;
        let holds_key = relay.config.on_refused == OnRefused::HoldKey;
        relay.stats.add(&relay.stats.parked, 1);
        metrics::outbox_parked(relay.metric_label(), &row.topic);
        tracing::error!(
            id = row.id,
            topic = %row.topic,
            key = %row.key,
            %reason,
            holds_key,
            "outbox relay: the transport refused a row for good; parked",
        );
        relay.alert.parked(&ParkedEvent {
            id: row.id,
            topic: row.topic.clone(),
            key: row.key.clone(),
            reason,
            holds_key,
        });
        Ok(())
    }
}
