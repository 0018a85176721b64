//! Where events travel: the in-memory bus by default, Redis and RabbitMQ
//! when their URLs are given.
//!
//! strategy §1.2 gives each kind of asynchronous message its own broker: event
//! notification on Redis Streams, the task queue on RabbitMQ, broadcast on
//! Redis Pub/Sub. The services only ever see an `EventBus` for each kind,
//! so the same code runs on three `MemoryTransport`s in one process (no
//! broker needed) or on the real brokers across processes.

use std::sync::Arc;
use std::time::Duration;

use switchboard::transport::amqp::{AmqpConfig, AmqpTransport};
use switchboard::transport::redis_streams::RedisStreamsConfig;
use switchboard::{
    Error, ErrorKind, EventBus, MemoryTransport, RedisPubSubTransport, RedisStreamsTransport,
    Transport,
};

/// How long a broker may take to answer at start-up before we give up with
/// a message saying what to check.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a publish keeps trying through a broker outage before the
/// request that made it fails: a broker restart (a RabbitMQ node takes about
/// 10 s to come back) costs an order latency, not the order.
pub const PUBLISH_DEADLINE: Duration = Duration::from_secs(30);

/// One RabbitMQ publish attempt's deadline: a third of the publish
/// deadline, so an attempt stuck on a connection that died leaves room for
/// two more on the next one.
const AMQP_PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// The three transports of strategy §1.2 and the namespace all topics live in.
#[derive(Clone)]
pub struct Brokers {
    /// Event notification (Redis Streams, or memory).
    pub events: Arc<dyn Transport>,
    /// Broadcast (Redis Pub/Sub, or memory).
    pub broadcast: Arc<dyn Transport>,
    /// The task queue (RabbitMQ, or memory).
    pub tasks: Arc<dyn Transport>,
    /// Prefix of every topic, so runs sharing a broker never meet.
    pub namespace: Option<String>,
    /// For the banner: which broker carries what.
    pub description: String,
    /// Whether events reach other processes (a real broker carries them).
    pub shared: bool,
}

impl std::fmt::Debug for Brokers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Brokers")
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

impl Brokers {
    /// Everything in this process, on the in-memory transport.
    pub fn memory() -> Self {
        Self {
            events: Arc::new(MemoryTransport::new()),
            broadcast: Arc::new(MemoryTransport::new()),
            tasks: Arc::new(MemoryTransport::new()),
            namespace: None,
            description: "events, ticks and tasks on the in-memory bus (no broker)".into(),
            shared: false,
        }
    }

    /// Redis for events and broadcast when `redis` is given, RabbitMQ for
    /// tasks when `amqp` is given, memory for whatever is not.
    pub async fn connect(
        redis: Option<&str>,
        amqp: Option<&str>,
        namespace: Option<String>,
    ) -> Result<Self, Error> {
        Self::connect_as(redis, amqp, namespace, None).await
    }

    /// [`connect`](Self::connect), reading Redis Streams as `consumer` (a
    /// name kept across restarts: a restarted service takes up the entries
    /// its previous run was handling at once, instead of after they idle for
    /// `claim_idle`); a new name per process when `None`.
    pub async fn connect_as(
        redis: Option<&str>,
        amqp: Option<&str>,
        namespace: Option<String>,
        consumer: Option<&str>,
    ) -> Result<Self, Error> {
        let mut brokers = Self::memory();
        let mut parts = Vec::new();
        if let Some(url) = redis {
            let mut config = RedisStreamsConfig::default();
            if let Some(consumer) = consumer {
                config = config.with_consumer_name(consumer);
            }
            let streams = within(
                url,
                "Redis",
                RedisStreamsTransport::connect_with(url, config),
            )
            .await?;
            let pubsub = within(url, "Redis", RedisPubSubTransport::connect(url)).await?;
            brokers.events = Arc::new(streams);
            brokers.broadcast = Arc::new(pubsub);
            brokers.shared = true;
            parts.push(format!(
                "events on Redis Streams and ticks on Redis Pub/Sub at {}",
                redact(url)
            ));
        } else {
            parts.push("events and ticks in memory".into());
        }
        if let Some(url) = amqp {
            let config = AmqpConfig::new(url).with_publish_timeout(AMQP_PUBLISH_TIMEOUT);
            let rabbit = within(url, "RabbitMQ", AmqpTransport::connect(config)).await?;
            brokers.tasks = Arc::new(rabbit);
            parts.push(format!("settlement jobs on RabbitMQ at {}", redact(url)));
        } else {
            parts.push("settlement jobs in memory".into());
        }
        brokers.description = parts.join("; ");
        brokers.namespace = namespace;
        Ok(brokers)
    }

    fn bus(&self, transport: &Arc<dyn Transport>, source: &str) -> EventBus {
        let bus = EventBus::new(transport.clone(), source).with_publish_deadline(PUBLISH_DEADLINE);
        match &self.namespace {
            Some(namespace) => bus.with_namespace(namespace.clone()),
            None => bus,
        }
    }

    /// `source`'s bus for catalogue events.
    pub fn events(&self, source: &str) -> EventBus {
        self.bus(&self.events, source)
    }

    /// `source`'s bus for broadcast ticks.
    pub fn broadcast(&self, source: &str) -> EventBus {
        self.bus(&self.broadcast, source)
    }

    /// `source`'s bus for task-queue jobs.
    pub fn tasks(&self, source: &str) -> EventBus {
        self.bus(&self.tasks, source)
    }
}

async fn within<T>(
    url: &str,
    broker: &str,
    connect: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    let advice = |why: String| {
        Error::new(
            ErrorKind::Connection,
            format!(
                "cannot reach {broker} at {} ({why}); start it, or leave out its URL to run on the in-memory bus",
                redact(url)
            ),
        )
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(connected)) => Ok(connected),
        Ok(Err(error)) => Err(advice(error.to_string())),
        Err(_) => Err(advice(format!("no answer in {CONNECT_TIMEOUT:?}"))),
    }
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// The answer of a service's `GET /health`: each transport it uses, by
/// [`EventBus::health`]; `503` unless every one is up or degraded.
pub fn health_response(
    buses: &[&EventBus],
) -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    let healths: Vec<switchboard::TransportHealth> = buses.iter().map(|bus| bus.health()).collect();
    let serving = healths.iter().all(|health| health.is_serving());
    let transports: Vec<serde_json::Value> = healths
        .iter()
        .map(|health| {
            serde_json::json!({
                "transport": health.transport,
                "serving": health.is_serving(),
                "state": health.to_string(),
            })
        })
        .collect();
    let status = if serving {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({ "status": if serving { "ok" } else { "unavailable" }, "transports": transports });
    (status, axum::Json(body))
}

impl Brokers {
    /// Closes the three transports (each at most once, they may be the
    /// same): consumers still running on them finish and stop. Call it
    /// last, once every service of the process has shut down.
    pub async fn close(&self) -> Result<(), Error> {
        let mut result = Ok(());
        for transport in [&self.events, &self.broadcast, &self.tasks] {
            if let Err(error) = transport.close().await {
                result = Err(error);
            }
        }
        result
    }
}
