//! Publishing: one `XADD` per message, a pipeline per batch.

use async_trait::async_trait;
use redis::{Cmd, Value};

use super::RedisStreamsTransport;
use super::fields::append_message_fields;
use crate::error::Error;
use crate::transport::redis_support::redis_error;
use crate::transport::{Publisher, RawMessage, validate_name};

impl RedisStreamsTransport {
    /// `XADD` to `topic`'s stream, with `MAXLEN ~` when its trim policy
    /// (or the older [`max_len`](super::RedisStreamsConfig::max_len)) says so.
    pub(super) fn xadd(&self, topic: &str, message: &RawMessage) -> Cmd {
        let mut cmd = redis::cmd("XADD");
        if self.inner.config.key_prefix.is_empty() && !self.inner.hash_tag {
            // The key is the topic itself: no string to build per publish.
            cmd.arg(topic);
        } else {
            cmd.arg(self.stream_key(topic));
        }
        if let Some(max_len) = self.inner.config.xadd_max_len(topic) {
            cmd.arg("MAXLEN").arg("~").arg(max_len);
        }
        cmd.arg("*");
        append_message_fields(&mut cmd, message);
        cmd
    }
}

#[async_trait]
impl Publisher for RedisStreamsTransport {
    async fn publish(&self, topic: &str, message: RawMessage) -> Result<(), Error> {
        self.inner.lifecycle.check()?;
        validate_name("topic", topic)?;
        self.ensure_trimmer(topic);
        let cmd = self.xadd(topic, &message);
        let _: Value = self
            .conn()
            .query(&cmd)
            .await
            .map_err(|error| redis_error("XADD", error))?;
        Ok(())
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<RawMessage>) -> Result<(), Error> {
        self.inner.lifecycle.check()?;
        validate_name("topic", topic)?;
        if messages.is_empty() {
            return Ok(());
        }
        self.ensure_trimmer(topic);
        let mut pipe = redis::pipe();
        for message in &messages {
            pipe.add_command(self.xadd(topic, message)).ignore();
        }
        let _: Value = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(|error| redis_error("pipelined XADD", error))?;
        Ok(())
    }

    /// Into the topic's sorted set of scheduled messages; this or any
    /// other transport's mover `XADD`s it when due (see
    /// [scheduled messages](super#scheduled-messages)).
    async fn publish_at(
        &self,
        topic: &str,
        message: RawMessage,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), Error> {
        self.inner.lifecycle.check()?;
        validate_name("topic", topic)?;
        self.ensure_trimmer(topic);
        self.schedule(topic, &message, at).await
    }
}
