//! Closing the transport and deleting a namespace's streams (for tests).

use redis::{AsyncCommands, RedisResult};

use super::connection::Link;
use super::{NAME, RedisStreamsTransport};
use crate::error::Error;
use crate::transport::redis_support::redis_error;
use crate::transport::validate_name;

/// How many keys one `SCAN` step asks for, and one `DEL` deletes.
const SCAN_BATCH: usize = 500;

impl RedisStreamsTransport {
    /// Ends the subscriptions (waiting for them), then stops the scheduled
    /// trims and the mover of scheduled messages. The connections go with the last clone of the transport.
    pub(super) async fn close_all(&self) -> Result<(), Error> {
        let inner = self.inner.clone();
        self.inner
            .lifecycle
            .close(|_| async move {
                inner.trimmers.forget_prefix("");
                inner.mover.stop();
            })
            .await
    }

    /// Deletes every key under the namespace: the streams of the topics
    /// `<namespace>.*` (under the key prefix, hash-tagged or not), their
    /// `.dlq` dead-letter streams and their given-back counters; returns
    /// how many keys went. **For tests and development**: unread entries
    /// and dead letters go too. On a cluster it is refused with
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) (`SCAN`
    /// walks one node).
    ///
    /// ```
    /// # async fn run() -> Result<(), switchboard::Error> {
    /// use switchboard::transport::redis_streams::RedisStreamsTransport;
    /// use switchboard::{Publisher, RawMessage};
    ///
    /// let transport = RedisStreamsTransport::connect("redis://127.0.0.1:6379").await?;
    /// transport.publish("test-run-7.order.placed", RawMessage::new("{}")).await?;
    /// assert_eq!(transport.delete_namespace("test-run-7").await?, 1);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn delete_namespace(&self, namespace: &str) -> Result<usize, Error> {
        validate_name("namespace", namespace)?;
        self.inner.lifecycle.check()?;
        let Link::Single(manager) = self.conn().link else {
            return Err(Error::unsupported(NAME, "delete a namespace on a cluster"));
        };
        let pattern = format!("{}*", glob_escape(&self.stream_key_start(namespace)));
        let mut scanning = manager.clone();
        let mut keys: Vec<String> = Vec::new();
        {
            let mut iter: redis::AsyncIter<'_, String> = scanning
                .scan_options(
                    redis::ScanOptions::default()
                        .with_pattern(pattern)
                        .with_count(SCAN_BATCH),
                )
                .await
                .map_err(|error| redis_error("SCAN", error))?;
            while let Some(key) = iter.next_item().await {
                keys.push(key.map_err(|error| redis_error("SCAN", error))?);
            }
        }
        let mut deleting = manager;
        let mut deleted = 0;
        for chunk in keys.chunks(SCAN_BATCH) {
            let gone: RedisResult<usize> = deleting.del(chunk).await;
            deleted += gone.map_err(|error| redis_error("DEL", error))?;
        }
        self.inner.trimmers.forget_prefix(&format!("{namespace}."));
        Ok(deleted)
    }

    /// How the stream keys of the topics `<namespace>.*` begin.
    fn stream_key_start(&self, namespace: &str) -> String {
        let prefix = &self.inner.config.key_prefix;
        if self.inner.hash_tag {
            format!("{{{prefix}{namespace}.")
        } else {
            format!("{prefix}{namespace}.")
        }
    }
}

/// `text` matched literally by a Redis glob pattern.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_specials_are_escaped() {
        assert_eq!(glob_escape("{a*b?[c]\\"), "{a\\*b\\?\\[c\\]\\\\");
    }
}
