//! The publishing side: one lazily connected client per receiver URL, and
//! one `Push/Deliver` call per attempt (the retry loop is
//! [`push::publish`](crate::transport::push)'s).

use crate::transport::redact::{redact_in, redact_url};
use std::sync::PoisonError;

use async_trait::async_trait;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use super::proto::DeliverRequest;
use super::proto::push_client::PushClient;
use super::{ENVELOPE_SLACK, GrpcTransport, RETRY_PUSHBACK_MS, error_from_status};
use crate::error::{Error, ErrorKind};
use crate::transport::push::{PushRequest, PushSender, SendError};

impl GrpcTransport {
    fn client(&self, url: &str) -> Result<PushClient<Channel>, Error> {
        let mut clients = self
            .inner
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(client) = clients.get(url) {
            return Ok(client.clone());
        }
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|error| bad_url(url, error))?
            .connect_timeout(self.inner.config.connect_timeout());
        if let Some(configure) = &self.inner.endpoint_config {
            endpoint = configure(endpoint)?;
        }
        let client = PushClient::new(endpoint.connect_lazy()).max_encoding_message_size(
            self.inner
                .config
                .max_body_bytes
                .saturating_add(ENVELOPE_SLACK),
        );
        clients.insert(url.to_owned(), client.clone());
        Ok(client)
    }
}

pub(super) fn bad_url(url: &str, error: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(
        ErrorKind::Config,
        format!(
            "push endpoint {:?} is not a valid URI: {}",
            redact_url(url),
            redact_in(&error.to_string(), url)
        ),
    )
    .with_source(error)
}

#[async_trait]
impl PushSender for GrpcTransport {
    async fn send(&self, url: &str, request: PushRequest<'_>) -> Result<(), SendError> {
        let mut client = self.client(url)?;
        let message = DeliverRequest {
            topic: request.topic.to_owned(),
            group: request.group.map(str::to_owned),
            headers: request.message.headers.clone(),
            body: request.message.body.clone(),
            attempt: request.attempt,
        };
        let status = match client.deliver(message).await {
            Ok(_) => return Ok(()),
            Err(status) => status,
        };
        // A full queue answers RESOURCE_EXHAUSTED with a pushback; an
        // oversize body answers it without one.
        let refused = status.code() == Code::ResourceExhausted
            && status.metadata().contains_key(RETRY_PUSHBACK_MS);
        let error = error_from_status(status);
        Err(if refused {
            SendError::Refused(error)
        } else {
            SendError::Failed(error)
        })
    }
}
