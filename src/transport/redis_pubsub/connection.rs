//! The connections: one shared publishing connection per transport (which
//! reconnects by itself) and one subscribed connection per subscription,
//! kept alive by its listener, with the status it reports.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use backon::{BackoffBuilder, ExponentialBuilder};
use redis::aio::{ConnectionManagerConfig, MultiplexedConnection};
use redis::{
    AsyncConnectionConfig, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value,
};
use tokio::sync::{Notify, watch};

use super::frame::decode_owned;
use super::inbox::{Inbox, Incoming};
use super::{Channels, Inner, RedisPubSubOptions, RedisPubSubTransport};
use crate::error::{Error, ErrorKind};
use crate::transport::redis_support::{connection_manager, redis_error, validate_connect_timeout};

/// Where a subscription's connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectionState {
    /// Redis confirmed the subscription on the subscription's
    /// `connection`-th connection (1 for the first; it rises by one with
    /// each reconnection).
    Subscribed {
        /// How many connections this subscription has had.
        connection: u64,
    },
    /// The connection was lost; this is the `attempt`-th try to reconnect
    /// and subscribe again.
    Reconnecting {
        /// Attempts so far, 1 for the first.
        attempt: u32,
    },
    /// The subscription was dropped or shut down; nothing more will arrive.
    Closed,
}

/// A live view of one subscription: its connection, for health checks and
/// for waiting until a lost connection is back, and how many messages its
/// full inbox dropped.
#[derive(Debug, Clone)]
pub struct ConnectionStatus {
    pub(super) client_name: Arc<str>,
    pub(super) state: watch::Receiver<ConnectionState>,
    pub(super) dropped: Arc<AtomicU64>,
}

impl ConnectionStatus {
    /// The name the connection gives itself with `CLIENT SETNAME` (the same
    /// on every reconnection), as `CLIENT LIST` shows it.
    pub fn client_name(&self) -> &str {
        &self.client_name
    }

    /// The state right now.
    pub fn current(&self) -> ConnectionState {
        *self.state.borrow()
    }

    /// How many messages the subscription dropped so far because its inbox
    /// was full (see [Back-pressure](super#back-pressure)); it only grows.
    ///
    /// Needs a Redis at 127.0.0.1:6379:
    ///
    /// ```
    /// use switchboard::transport::redis_pubsub::{Channels, RedisPubSubOptions};
    /// use switchboard::{Publisher, RawMessage, RedisPubSubTransport, SubscribeOptions};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// # let topic = format!("doc.tick.{}", uuid::Uuid::new_v4().simple());
    /// # let topic = topic.as_str(); // "tick" in a real service
    /// // An inbox of one message, dropping the oldest (the default policy).
    /// let options = RedisPubSubOptions::default().with_inbox_capacity(1);
    /// let transport = RedisPubSubTransport::connect_with("redis://127.0.0.1:6379", options).await?;
    /// let (mut ticks, status) = transport
    ///     .subscribe_to(Channels::Topic(topic.into()), SubscribeOptions::new("ui"))
    ///     .await?;
    /// for n in 1..=3 {
    ///     transport.publish(topic, RawMessage::new(n.to_string())).await?;
    /// }
    /// // Nobody took a message yet: once all three are read, two were dropped.
    /// # let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    /// while status.dropped() < 2 {
    /// #   assert!(std::time::Instant::now() < deadline, "the messages never arrived");
    ///     tokio::task::yield_now().await;
    /// }
    /// let latest = ticks.recv().await.expect("a message");
    /// assert_eq!(latest.body().as_ref(), b"3");
    /// assert_eq!(status.dropped(), 2);
    /// # Ok::<(), switchboard::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The state as a [`watch`] channel.
    pub fn watch(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }

    /// Waits until the state satisfies `predicate` and returns it; fails
    /// with [`ErrorKind::Closed`] when the subscription ends first.
    pub async fn wait_for(
        &mut self,
        mut predicate: impl FnMut(&ConnectionState) -> bool,
    ) -> Result<ConnectionState, Error> {
        self.state
            .wait_for(|state| predicate(state))
            .await
            .map(|state| *state)
            .map_err(|_| Error::closed("the redis pub/sub subscription"))
    }
}

impl RedisPubSubTransport {
    /// Connects to the Redis at `url` (`redis://host:port/db`) with default
    /// options.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::connect_with(url, RedisPubSubOptions::default()).await
    }

    /// Connects to the Redis at `url` with `options`. Fails when Redis does
    /// not answer; later losses of the connection are recovered from.
    pub async fn connect_with(url: &str, options: RedisPubSubOptions) -> Result<Self, Error> {
        if options.inbox_capacity == 0 {
            return Err(Error::new(
                ErrorKind::Config,
                "redis pub/sub option `inbox_capacity` must be at least 1",
            ));
        }
        validate_connect_timeout(super::NAME, options.connection_timeout)?;
        let info = url.into_connection_info().map_err(|error| {
            let url = crate::transport::redact::redact_url(url);
            Error::new(ErrorKind::Config, format!("redis url {url:?}: {error}")).with_source(error)
        })?;
        // RESP3: subscribed connections receive pushes and still answer
        // commands such as CLIENT SETNAME.
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = crate::transport::redis_support::client_for(
            info.set_redis_settings(settings),
            options.tls_ca_pem.as_deref().map(str::as_bytes),
        )
        .map_err(|error| redis_error("open client", error))?;
        // Few connection retries per command: a publish while Redis is away
        // fails fast with a retryable error instead of hanging for seconds,
        // and the caller's retry policy decides what happens next.
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(options.response_timeout))
            .set_min_delay(options.reconnect_min_delay)
            .set_max_delay(options.reconnect_max_delay)
            .set_number_of_retries(2);
        let publisher =
            connection_manager(super::NAME, &client, config, options.connection_timeout).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                publisher,
                seen: Default::default(),
                options,
                lifecycle: crate::transport::Lifecycle::new(super::NAME),
            }),
        })
    }
}

/// One subscription's connection keeper: connects, subscribes, and does it
/// again whenever the connection is lost, until the subscription is gone.
pub(super) struct Listener {
    pub(super) client: redis::Client,
    pub(super) options: RedisPubSubOptions,
    pub(super) channels: Channels,
    pub(super) client_name: Arc<str>,
    /// The topic of an exact subscription, shared by all its deliveries.
    pub(super) fixed_topic: Option<Arc<str>>,
    pub(super) inbox: Arc<Inbox>,
    /// Closed when the consumer is dropped: the subscription is over.
    pub(super) consumer: watch::Sender<()>,
    pub(super) state: watch::Sender<ConnectionState>,
}

/// A subscribed connection, the signal that it was lost, and whether it
/// heard anything since the last check.
pub(super) struct Live {
    connection: MultiplexedConnection,
    lost: Arc<Notify>,
    heard: Arc<AtomicBool>,
}

impl Listener {
    pub(super) async fn connect(&self) -> Result<Live, redis::RedisError> {
        let lost = Arc::new(Notify::new());
        let heard = Arc::new(AtomicBool::new(false));
        let forward = {
            let (inbox, lost, fixed_topic, heard) = (
                self.inbox.clone(),
                lost.clone(),
                self.fixed_topic.clone(),
                heard.clone(),
            );
            // Runs on the connection's own task, inside its read loop, so
            // the message reaches the subscription without another task hop
            // and without ever holding up the socket.
            move |push: PushInfo| -> Result<(), Infallible> {
                if push.kind == PushKind::Disconnection {
                    // `notify_one` keeps the signal if nobody waits yet.
                    lost.notify_one();
                    return Ok(());
                }
                heard.store(true, Ordering::Relaxed);
                if let Some(incoming) = incoming(push, fixed_topic.as_ref()) {
                    inbox.push(incoming);
                }
                Ok(())
            }
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.options.connection_timeout))
            .set_response_timeout(Some(self.options.response_timeout))
            .set_push_sender(forward);
        let mut connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(&*self.client_name)
            .query_async::<()>(&mut connection)
            .await?;
        match &self.channels {
            Channels::Topic(topic) => connection.subscribe(topic).await?,
            Channels::Pattern(pattern) => connection.psubscribe(pattern).await?,
        }
        Ok(Live {
            connection,
            lost,
            heard,
        })
    }

    pub(super) async fn run(self, mut live: Live) {
        let mut connection = 1;
        loop {
            match self.watch(&mut live).await {
                Watched::Ended => {
                    self.unsubscribe(&mut live).await;
                    break;
                }
                Watched::Lost => tracing::warn!(
                    client = %self.client_name,
                    channels = self.channels.name(),
                    "redis pub/sub connection lost; reconnecting"
                ),
                Watched::Silent(why) => tracing::warn!(
                    client = %self.client_name,
                    channels = self.channels.name(),
                    why,
                    timeout = ?self.options.ping_timeout,
                    "redis pub/sub connection does not answer a ping; reconnecting"
                ),
            }
            drop(live);
            live = match self.reconnect().await {
                Some(live) => live,
                None => break,
            };
            connection += 1;
            tracing::info!(
                client = %self.client_name,
                channels = self.channels.name(),
                connection,
                "redis pub/sub subscription restored"
            );
            self.state
                .send_replace(ConnectionState::Subscribed { connection });
        }
        self.inbox.close(false);
        self.state.send_replace(ConnectionState::Closed);
    }

    /// Waits until the subscription ends or its connection is lost, closed
    /// or silent: a connection that heard nothing for a ping interval is
    /// pinged, and one that does not answer within the ping timeout is as
    /// good as lost (a half-open connection never reports itself).
    async fn watch(&self, live: &mut Live) -> Watched {
        let interval = self.options.ping_interval;
        let mut ticks = (!interval.is_zero()).then(|| {
            let mut ticks =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks
        });
        loop {
            let tick = async {
                match ticks.as_mut() {
                    Some(ticks) => ticks.tick().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.consumer.closed() => return Watched::Ended,
                () = live.lost.notified() => return Watched::Lost,
                _ = tick => {}
            }
            if live.heard.swap(false, Ordering::Relaxed) {
                continue;
            }
            let command = redis::cmd("PING");
            let ping = command.query_async::<Value>(&mut live.connection);
            tokio::select! {
                () = self.consumer.closed() => return Watched::Ended,
                () = live.lost.notified() => return Watched::Lost,
                answer = tokio::time::timeout(self.options.ping_timeout, ping) => match answer {
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => return Watched::Silent("ping failed"),
                    Err(_) => return Watched::Silent("no answer in time"),
                },
            }
        }
    }

    /// Ends the subscription on the server before the connection is
    /// dropped: Redis notices a closed socket only some time later, and until
    /// then counts the subscriber and keeps sending to it.
    async fn unsubscribe(&self, live: &mut Live) {
        let result = match &self.channels {
            Channels::Topic(topic) => live.connection.unsubscribe(topic).await,
            Channels::Pattern(pattern) => live.connection.punsubscribe(pattern).await,
        };
        if let Err(error) = result {
            tracing::debug!(
                client = %self.client_name,
                %error,
                "redis pub/sub unsubscribe failed; closing the connection anyway"
            );
        }
    }

    /// Tries until subscribed again; `None` when the subscription is dropped
    /// meanwhile.
    async fn reconnect(&self) -> Option<Live> {
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(self.options.reconnect_min_delay)
            .with_max_delay(self.options.reconnect_max_delay)
            .with_jitter()
            .without_max_times()
            .build();
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.state
                .send_replace(ConnectionState::Reconnecting { attempt });
            let error = tokio::select! {
                () = self.consumer.closed() => return None,
                result = self.connect() => match result {
                    Ok(live) => return Some(live),
                    Err(error) => error,
                },
            };
            let delay = delays.next().unwrap_or(self.options.reconnect_max_delay);
            tracing::warn!(
                client = %self.client_name,
                attempt,
                ?delay,
                %error,
                "redis pub/sub reconnection failed"
            );
            tokio::select! {
                () = self.consumer.closed() => return None,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// How watching a live connection ended.
enum Watched {
    /// The subscription was dropped or shut down.
    Ended,
    /// The connection reported its loss.
    Lost,
    /// The connection did not answer a ping: why.
    Silent(&'static str),
}

/// The message in a `message` or `pmessage` push; `None` for anything else
/// (subscribe confirmations).
fn incoming(push: PushInfo, fixed_topic: Option<&Arc<str>>) -> Option<Incoming> {
    let mut data = push.data.into_iter();
    let channel = match push.kind {
        PushKind::Message => data.next()?,
        PushKind::PMessage => data.nth(1)?,
        _ => return None,
    };
    let payload = match data.next()? {
        Value::BulkString(bytes) => bytes,
        Value::SimpleString(text) => text.into_bytes(),
        _ => return None,
    };
    let topic = match (fixed_topic, channel) {
        (Some(topic), _) => topic.clone(),
        (None, Value::BulkString(name)) => String::from_utf8_lossy(&name).into(),
        (None, Value::SimpleString(name)) => name.into(),
        (None, _) => return None,
    };
    Some(Incoming {
        topic,
        message: decode_owned(payload),
    })
}
