//! What the two push transports (gRPC and HTTP webhooks) share: the
//! receiving [`Inbox`], the topic → endpoints [`PushRoutes`] and the
//! publisher's [`PushConfig`].
//!
//! # Why push works this way
//!
//! A push transport has no broker: the publisher calls the subscriber's
//! receiver directly, and the receiver answers only once the subscriber's
//! handler has settled the message. So `publish` returning `Ok` means *the
//! handler acknowledged it* — the strongest answer any transport here gives —
//! but nothing is kept anywhere: a receiver that is down makes `publish`
//! fail (after the configured retries), and nothing survives a restart.
//!
//! * **Ack** → the receiver answers OK (gRPC) / 204 (HTTP).
//! * **Nack(delay)** → UNAVAILABLE / 503 with the delay as a hint
//!   (`grpc-retry-pushback-ms`, `Retry-After` and
//!   `switchboard-retry-after-ms`); the publisher waits at least that long and
//!   sends the message again with its attempt number raised, up to
//!   [`PushConfig::retry`]'s `max_attempts`.
//! * **Give back** (the subscriber cannot read it: an envelope of a major
//!   version it does not know) → UNAVAILABLE / 503 naming why; the
//!   publisher sends it again like a nack, and a load balancer in front of
//!   the replicas may pick a newer one. When the publisher gives up, its
//!   error says why.
//! * **Dropped unsettled** (a panicking handler, a subscriber shutting
//!   down) → UNAVAILABLE / 503, so the publisher's retry sends it again.
//! * **Reject** (the handler gave up for good: what its retry layer could
//!   not fix, a permanent failure, a panic, bytes that are not an envelope)
//!   → INVALID_ARGUMENT / 400 with the reason and the last error, and
//!   `publish` returns that as a non-retryable
//!   [`ErrorKind::Rejected`](crate::ErrorKind) error at once — never OK for
//!   a failed handler. There is no queue to keep the message in:
//!   [`Delivery::dead_letter`](crate::Delivery::dead_letter) itself says
//!   [`ErrorKind::Unsupported`](crate::ErrorKind), and
//!   [`Delivery::settle`](crate::Delivery::settle) (which the typed bus
//!   uses) reports the rejection to the publisher instead.
//! * **Queue full** → RESOURCE_EXHAUSTED / 503, answered at once: see below.
//!
//! The publisher's retry loop is the one retry owner of a push: the
//! receiver never retries by itself, and the error `publish` returns once
//! the loop gives up carries the attempts it made
//! ([`Error::attempts`](crate::Error::attempts)), so a retry on top
//! (the bus's own publish retry) must not multiply them. A handler's own
//! retry layer retries in-process before the receiver answers: a message
//! it gave up on is rejected, not sent again.
//!
//! # A bounded queue, and pushing back when it is full
//!
//! Pushes wait at the receiver for one of the group's subscriptions to take
//! them, in a queue of at most [`PushConfig::queue_capacity`] per group
//! (default 64); each subscription then holds at most its
//! [`prefetch`](crate::SubscribeOptions::prefetch) of them unsettled. So a
//! receiver holds at most `queue_capacity` plus the group's prefetch of
//! pushes per group, however fast its publishers are.
//!
//! A push that finds the queue full is not queued: the receiver answers at
//! once with RESOURCE_EXHAUSTED and `grpc-retry-pushback-ms`, or 503 with
//! `Retry-After`, `switchboard-retry-after-ms` and `switchboard-refused:
//! queue-full`, asking the publisher to come back after
//! [`QUEUE_FULL_RETRY_AFTER`], and counts it in
//! `switchboard_push_refused_total` ([`PUSH_REFUSED_TOTAL`](crate::observe::metrics::PUSH_REFUSED_TOTAL)).
//! The handlers never saw the message, so the publisher sends it again after
//! the hint with the same attempt number, for as long as the attempt's
//! [`timeout`](PushConfig::timeout) lasts — the time it would have waited in
//! an unbounded queue — and then goes on to its next attempt as after any
//! retryable error. `publish` returns `Ok` only once the handlers acked, so
//! a refusal loses nothing: the message is either delivered or `publish`
//! fails. A push to every group is refused whole when any group's queue is
//! full, so no group gets it before the others have room.
//!
//! # Groups
//!
//! [`PushRoutes`] names, per topic, the endpoints to push to: one per
//! subscribing group (its replicas sit behind that one address, and the
//! receiver of the replica that gets the request hands the message to one of
//! its members). An endpoint with a `group` only reaches that group; one
//! without reaches every group subscribed to the topic at that receiver, each
//! of which must ack before the receiver answers OK — so a nack from one
//! group sends the message again to all of them (consumers deduplicate on
//! `event_id`, as with every at-least-once transport).
//!
//! A receiver with no subscriber for the topic (or group) answers
//! UNAVAILABLE: the subscriber may be starting, so the publisher retries.

use crate::error::Error;

mod config;
mod consumer;
mod publisher;

pub use config::{PushConfig, PushEndpoint, PushRoutes};
pub use consumer::{Inbox, QUEUE_FULL_RETRY_AFTER, QueueFull};
pub(crate) use publisher::{PushRequest, PushSender, SendError, publish};

/// Binds `address` for a receiver to serve on; a taken or forbidden
/// address is a [`Connection`](crate::ErrorKind::Connection) error naming it.
pub(crate) async fn listen(
    address: std::net::SocketAddr,
) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|error| {
            Error::new(
                crate::ErrorKind::Connection,
                format!("cannot listen on {address}: {error}"),
            )
            .with_source(error)
        })
}

/// The `Publisher`, `Subscriber` and `Transport` impls of a push transport:
/// publishing through [`publish`] with its [`PushSender`], subscribing to
/// its [`Inbox`], and the [`Lifecycle`](crate::transport::Lifecycle) of its
/// `inner`. One body serves the gRPC and the HTTP transport, which differ
/// only in how a push is sent and received.
macro_rules! push_transport_impls {
    ($transport:ty) => {
        #[async_trait::async_trait]
        impl $crate::transport::Publisher for $transport {
            async fn publish(
                &self,
                topic: &str,
                message: $crate::transport::RawMessage,
            ) -> Result<(), $crate::Error> {
                self.inner.lifecycle.check()?;
                $crate::transport::push::publish(self, &self.inner.config, topic, &message).await
            }
        }

        #[async_trait::async_trait]
        impl $crate::transport::Subscriber for $transport {
            async fn subscribe(
                &self,
                topic: &str,
                options: $crate::transport::SubscribeOptions,
            ) -> Result<$crate::transport::Subscription, $crate::Error> {
                self.inner.lifecycle.check()?;
                let subscription = self.inner.inbox.subscribe(topic, options)?;
                Ok(self.inner.lifecycle.track(subscription))
            }
        }

        #[async_trait::async_trait]
        impl $crate::transport::Transport for $transport {
            fn name(&self) -> &'static str {
                NAME
            }

            /// Competing groups (by the route table), nack by the publisher's
            /// retry; nothing persistent, no dead letters, no redelivery of
            /// what was never received, no ordering promise across retries.
            fn capabilities(&self) -> $crate::transport::Capabilities {
                $crate::transport::Capabilities::new($crate::transport::DeliveryMode::Competing)
                    .with_nack(true)
            }

            /// Checks the topology's names; a push transport has nothing to
            /// create.
            async fn declare(&self, topology: &$crate::Topology) -> Result<(), $crate::Error> {
                self.inner.lifecycle.check()?;
                topology.validate()
            }

            /// Ends the subscriptions and waits for them, and stops `serve`
            /// and `serve_tls` gracefully (requests in flight finish).
            async fn close(&self) -> Result<(), $crate::Error> {
                self.inner.lifecycle.close(|_| async {}).await
            }

            fn health(&self) -> $crate::transport::TransportHealth {
                self.inner.lifecycle.health()
            }
        }
    };
}
pub(crate) use push_transport_impls;

/// Header carrying how many milliseconds a publisher should wait before it
/// sends a nacked message again (HTTP; gRPC uses `grpc-retry-pushback-ms`).
pub const RETRY_AFTER_MS: &str = "switchboard-retry-after-ms";

/// How many pushes a receiver keeps waiting per group unless configured
/// otherwise ([`PushConfig::queue_capacity`]).
pub const DEFAULT_QUEUE_CAPACITY: usize = 64;
