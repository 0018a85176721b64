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
        let (conn, scope) = match lease
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
        let scope = scope.clone();
        let held = match &scope {
            Scope::All => 0,
            Scope::Partitions { held, .. } => held.len() as u64,
        };
        relay.stats.partitions.store(held, Ordering::Relaxed);
        if matches!(&scope, Scope::Partitions { held, .. } if held.is_empty()) {
            // Every partition is another relay's: stand by.
            return Ok(Round::Partial);
        }
        let result = self.send(conn, &scope).await;
        if result.is_err() {
            // The error may have been the session's: start a fresh one (its
            // leases go with the old one).
            lease.lost();
        }
        result
    }

    async fn send(&mut self, conn: &mut DB::Connection, scope: &Scope) -> Result<Round, Error> {
        let relay = self.relay;
        let tables = &relay.outbox.shared.tables;
        let config = &relay.config;
        if Instant::now() >= self.next_stats {
            self.next_stats = Instant::now() + config.stats_interval;
            let (pending, lag) = DB::pending(conn, tables).await?;
            metrics::outbox_pending(relay.metric_label(), pending, lag.unwrap_or(0.0));
        }
        let hold = config.on_refused == OnRefused::HoldKey;
        let rows = DB::fetch(conn, tables, scope, config.batch_size as i64, hold).await?;
        let full = rows.len() >= config.batch_size;
        let mut accepted: Vec<(i64, usize)> = Vec::with_capacity(rows.len());
        let mut held_keys: HashSet<String> = HashSet::new();
        let outcome = self
            .publish_runs(conn, &rows, &mut accepted, &mut held_keys)
            .await;
        // Whatever was accepted goes, even when a later run failed: those
        // rows are not to be sent again.
        if !accepted.is_empty() {
            let ids: Vec<i64> = accepted.iter().map(|(id, _)| *id).collect();
            DB::delete(conn, tables, &ids).await?;
            relay
                .stats
                .sent
                .fetch_add(ids.len() as u64, Ordering::Relaxed);
            let mut counted: Vec<(&str, u64)> = Vec::new();
            for (_, index) in &accepted {
                let topic = rows[*index].topic.as_str();
                match counted.iter_mut().find(|(seen, _)| *seen == topic) {
                    Some((_, count)) => *count += 1,
                    None => counted.push((topic, 1)),
                }
            }
            for (topic, count) in counted {
                metrics::outbox_sent(relay.metric_label(), topic, count);
            }
        }
        outcome?;
        Ok(if full { Round::Full } else { Round::Partial })
    }

    /// Publishes `rows` in order, one `publish_batch` per run of rows with
    /// the same topic; records accepted rows (id, index in `rows`).
    async fn publish_runs(
        &mut self,
        conn: &mut DB::Connection,
        rows: &[StoredRow],
        accepted: &mut Vec<(i64, usize)>,
        held_keys: &mut HashSet<String>,
    ) -> Result<(), Error> {
        let mut start = 0;
        while start < rows.len() {
            let topic = &rows[start].topic;
            let end = rows[start..]
                .iter()
                .position(|row| &row.topic != topic)
                .map_or(rows.len(), |offset| start + offset);
            let mut run = Vec::with_capacity(end - start);
            for (index, row) in rows.iter().enumerate().take(end).skip(start) {
                if held_keys.contains(&row.key) {
                    continue;
                }
                match to_message(row) {
                    Ok(message) => run.push((index, message)),
                    Err(error) => self.park(conn, row, &error, held_keys).await?,
                }
            }
            start = end;
            if run.is_empty() {
                continue;
            }
            let messages = run.iter().map(|(_, message)| message.clone()).collect();
            match self.publish(topic, messages).await {
                Ok(()) => accepted.extend(run.iter().map(|(index, _)| (rows[*index].id, *index))),
                Err(error) if refuses_row(&error) => {
                    // Which one? Send them one by one (a prefix may have been
                    // taken already: those go twice, as at-least-once allows).
                    for (index, message) in run {
                        let row = &rows[index];
                        if held_keys.contains(&row.key) {
                            continue;
                        }
                        match self.publish(topic, vec![message]).await {
                            Ok(()) => accepted.push((row.id, index)),
                            Err(error) if refuses_row(&error) => {
                                self.park(conn, row, &error, held_keys).await?;
                            }
                            Err(error) => return Err(error),
                        }
                    }
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
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
        held_keys: &mut HashSet<String>,
    ) -> Result<(), Error> {
        let relay = self.relay;
        let reason = error.to_string();
        DB::park(conn, &relay.outbox.shared.tables, row.id, &reason).await?;
        let holds_key = relay.config.on_refused == OnRefused::HoldKey;
        if holds_key {
            held_keys.insert(row.key.clone());
        }
        relay.stats.parked.fetch_add(1, Ordering::Relaxed);
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
