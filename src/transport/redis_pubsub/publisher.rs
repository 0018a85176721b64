//! Publishing: one PUBLISH per message, a pipeline per batch.

use async_trait::async_trait;

use super::RedisPubSubTransport;
use super::frame::encode_payload_with;
use crate::error::Error;
use crate::transport::redis_support::redis_error;
use crate::transport::{Publisher, RawMessage, validate_name};

#[async_trait]
impl Publisher for RedisPubSubTransport {
    /// Returns once Redis accepted the PUBLISH — whether or not anyone was
    /// subscribed.
    async fn publish(&self, topic: &str, message: RawMessage) -> Result<(), Error> {
        self.inner.lifecycle.check()?;
        validate_name("topic", topic)?;
        let payload = encode_payload_with(&message, self.inner.options.frame_version)?;
        let mut connection = self.inner.publisher.clone();
        let published = redis::cmd("PUBLISH")
            .arg(topic)
            .arg(payload.as_ref())
            .query_async(&mut connection)
            .await;
        self.inner.seen.record(&published);
        let receivers: i64 = published.map_err(|error| redis_error("PUBLISH", error))?;
        tracing::trace!(topic, receivers, "published");
        Ok(())
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<RawMessage>) -> Result<(), Error> {
        self.inner.lifecycle.check()?;
        validate_name("topic", topic)?;
        if messages.is_empty() {
            return Ok(());
        }
        let mut pipeline = redis::pipe();
        for message in &messages {
            let payload = encode_payload_with(message, self.inner.options.frame_version)?;
            pipeline
                .cmd("PUBLISH")
                .arg(topic)
                .arg(payload.as_ref())
                .ignore();
        }
        let mut connection = self.inner.publisher.clone();
        let published = pipeline.query_async::<()>(&mut connection).await;
        self.inner.seen.record(&published);
        published.map_err(|error| redis_error("PUBLISH (pipelined)", error))
    }
}
