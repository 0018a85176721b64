//! SPEC §3's paths, each set up twice on loopback: once through switchboard
//! (the typed `EventBus`, `JsonService`, `grpc::unary` behind the resilience
//! client stack) and once with the raw client the way a careful service
//! would write it without switchboard (reqwest/axum, tonic, redis-rs, lapin,
//! serde_json). `benches/paths.rs` (criterion) and `benches/p99_paths.rs`
//! (HDR histograms) measure the same closures, so both compare like with
//! like.
//!
//! A call takes a sequence number, unique per call, that travels in the
//! payload (`order_id`) so a one-way path (publish → handler) can tell its
//! own event from the others in flight: the caller registers a waiter under
//! the number before publishing, the handler fires it. A call ends when the
//! publisher has its answer (XADD reply, publisher confirm) AND the handler
//! has seen the event.
//!
//! Needs Redis at 127.0.0.1:6379 and RabbitMQ at 127.0.0.1:5672
//! (guest/guest), or `SWITCHBOARD_REDIS_URL` / `SWITCHBOARD_AMQP_URL`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::header::CONTENT_TYPE;
use axum::routing::post;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, ExchangeKind};
use serde::{Deserialize, Serialize};
use switchboard::middleware::Resilience;
use switchboard::transport::amqp::{AmqpConfig, AmqpTransport};
use switchboard::transport::grpc::{proto, unary};
use switchboard::transport::http::{JsonBody, JsonService};
use switchboard::transport::redis_streams::{RedisStreamsConfig, RedisStreamsTransport};
use switchboard::{
    Event, EventBus, Message, RedisPubSubTransport, SubscribeOptions, Topology, handler_fn,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tower::ServiceExt;

/// A boxed future, so every path's calls have one type.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
/// One call of a path: give it a fresh sequence number, await it.
pub type Call = Arc<dyn Fn(u64) -> BoxFuture + Send + Sync>;

/// Which client a call goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The raw client library.
    Raw,
    /// Through switchboard.
    Switchboard,
}

/// One path, both ways.
pub struct Path {
    /// Short name, e.g. `trading_to_game`.
    pub name: &'static str,
    /// What it is, for the report.
    pub label: &'static str,
    /// SPEC §3's P99 target.
    pub target: Duration,
    /// The raw client's call.
    pub raw: Call,
    /// switchboard's call.
    pub switchboard: Call,
    /// Background publishing of 10 events at once (one batch), for a load
    /// generator; only the event paths have one.
    pub load: Option<(Call, Call)>,
    /// Consumers, servers and connections kept alive with the path.
    _keep: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

impl Path {
    /// The call for `side`.
    pub fn call(&self, side: Side) -> &Call {
        match side {
            Side::Raw => &self.raw,
            Side::Switchboard => &self.switchboard,
        }
    }

    /// The load batch for `side`, if this path has one.
    pub fn load(&self, side: Side) -> Option<&Call> {
        self.load.as_ref().map(|(raw, switchboard)| match side {
            Side::Raw => raw,
            Side::Switchboard => switchboard,
        })
    }
}

pub fn redis_url() -> String {
    std::env::var("SWITCHBOARD_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

pub fn amqp_url() -> String {
    std::env::var("SWITCHBOARD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

pub fn unique(what: &str) -> String {
    format!("sb-bench-{what}-{}", uuid::Uuid::new_v4().simple())
}

/// Sequence numbers at or above this are load, which no caller waits for.
pub const LOAD: u64 = 1 << 62;

/// SPEC §5.1's payload; `order_id` carries the sequence number.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TradeExecuted {
    order_id: String,
    user_id: String,
    symbol: String,
    quantity: u64,
    price: f64,
}

impl Event for TradeExecuted {
    const TYPE: &'static str = "trade.executed";
    const VERSION: &'static str = "1.0";
}

impl TradeExecuted {
    pub fn numbered(n: u64) -> Self {
        Self {
            order_id: n.to_string(),
            user_id: "456".into(),
            symbol: "AAPL".into(),
            quantity: 100,
            price: 150.0,
        }
    }

    fn number(&self) -> u64 {
        self.order_id.parse().expect("a numbered trade")
    }
}

/// The same document as a plain serde struct: what a service writes
/// without switchboard.
#[derive(Serialize, Deserialize)]
pub struct RawEnvelope<T> {
    event_id: uuid::Uuid,
    event_type: String,
    timestamp: chrono::DateTime<chrono::Utc>,
    source: String,
    version: String,
    payload: T,
}

pub fn raw_encode(n: u64) -> Vec<u8> {
    serde_json::to_vec(&RawEnvelope {
        event_id: uuid::Uuid::new_v4(),
        event_type: "trade.executed".into(),
        timestamp: chrono::Utc::now(),
        source: "trading-service".into(),
        version: "1.0".into(),
        payload: TradeExecuted::numbered(n),
    })
    .expect("JSON")
}

pub fn raw_decode(bytes: &[u8]) -> u64 {
    serde_json::from_slice::<RawEnvelope<TradeExecuted>>(bytes)
        .expect("a raw envelope")
        .payload
        .number()
}

/// Callers waiting for their event to reach a handler, by sequence number.
#[derive(Clone, Default)]
struct Waiters(Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>);

impl Waiters {
    fn register(&self, n: u64) -> oneshot::Receiver<()> {
        let (sender, receiver) = oneshot::channel();
        self.0.lock().expect("waiters").insert(n, sender);
        receiver
    }

    fn fire(&self, n: u64) {
        if n < LOAD
            && let Some(sender) = self.0.lock().expect("waiters").remove(&n)
        {
            let _ = sender.send(());
        }
    }
}

/// A handler for the typed bus that tells the waiter.
fn bus_handler(
    waiters: Waiters,
) -> impl tower::Service<
    Message<TradeExecuted>,
    Response = (),
    Error = switchboard::Error,
    Future = impl Send + 'static,
> + Send
+ 'static {
    handler_fn(move |message: Message<TradeExecuted>| {
        waiters.fire(message.payload().number());
        async { Ok::<_, switchboard::Error>(()) }
    })
}

/// Handler concurrency and prefetch for both sides of the event paths.
fn subscribe_options() -> SubscribeOptions {
    SubscribeOptions::new("game")
        .with_concurrency(16)
        .with_prefetch(64)
}

/// Publish → handler through the bus: the call ends when the publish
/// returned and the handler ran.
fn bus_call(bus: EventBus, waiters: Waiters) -> Call {
    Arc::new(move |n| {
        let (bus, received) = (bus.clone(), waiters.register(n));
        Box::pin(async move {
            let (published, received) =
                tokio::join!(bus.publish(TradeExecuted::numbered(n)), received);
            published.expect("publish");
            received.expect("handled");
        })
    })
}

fn bus_load(bus: EventBus) -> Call {
    Arc::new(move |n| {
        let bus = bus.clone();
        Box::pin(async move {
            bus.publish_batch((0..10).map(|i| TradeExecuted::numbered(LOAD + n * 10 + i)))
                .await
                .expect("publish_batch");
        })
    })
}

/// Every path, set up on the current runtime.
pub async fn all() -> Vec<Path> {
    vec![
        http("gateway_to_service", "Gateway → Service (HTTP)").await,
        grpc().await,
        redis_streams().await,
        http("game_to_market", "Game → Market (HTTP)").await,
        amqp().await,
        redis_pubsub().await,
    ]
}

// ---- HTTP ---------------------------------------------------------------

/// A query: what the gateway and the game ask their services.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Query {
    user_id: String,
    symbol: String,
    n: u64,
}

/// The answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    symbol: String,
    price: f64,
    currency: String,
    as_of: chrono::DateTime<chrono::Utc>,
    n: u64,
}

fn answer(query: Query) -> Vec<u8> {
    serde_json::to_vec(&Answer {
        symbol: query.symbol,
        price: 150.0,
        currency: "USD".into(),
        as_of: chrono::Utc::now(),
        n: query.n,
    })
    .expect("JSON")
}

fn query(n: u64) -> Query {
    Query {
        user_id: "456".into(),
        symbol: "AAPL".into(),
        n,
    }
}

async fn http(name: &'static str, label: &'static str) -> Path {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let app = axum::Router::new()
        // Without switchboard: the bytes, serde_json, the answer.
        .route(
            "/raw",
            post(|body: bytes::Bytes| async move {
                let query: Query = serde_json::from_slice(&body).expect("a query");
                ([(CONTENT_TYPE, "application/json")], answer(query))
            }),
        )
        // With switchboard's extractor (size limit, typed 400s).
        .route(
            "/switchboard",
            post(|JsonBody(query): JsonBody<Query>| async move {
                ([(CONTENT_TYPE, "application/json")], answer(query))
            }),
        );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let raw_client = reqwest::Client::new();
    let raw_url = format!("{base}/raw");
    let raw: Call = Arc::new(move |n| {
        let request = raw_client
            .post(&raw_url)
            .header(CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(&query(n)).expect("JSON"));
        Box::pin(async move {
            let response = request.send().await.expect("send");
            assert!(response.status().is_success());
            let body = response.bytes().await.expect("body");
            let answer: Answer = serde_json::from_slice(&body).expect("an answer");
            assert_eq!(answer.n, n);
        })
    });

    // The breaker's default 5 s timeout, not SPEC's budget: a slow call on a busy
    // machine must be measured, not cut off (the layer costs the same).
    let resilience = Resilience::new(Default::default());
    let service = resilience.client(
        name,
        JsonService::<Query, Answer>::post(reqwest::Client::new(), format!("{base}/switchboard")),
    );
    // The stack is Send but not Sync; each call clones it (as a tower user
    // does), from behind an uncontended lock (tens of nanoseconds).
    let service = Mutex::new(service);
    let switchboard: Call = Arc::new(move |n| {
        let service = service.lock().expect("service").clone();
        Box::pin(async move {
            let answer = service.oneshot(query(n)).await.expect("call");
            assert_eq!(answer.n, n);
        })
    });
    Path {
        name,
        label,
        target: Duration::from_millis(50),
        raw,
        switchboard,
        load: None,
        _keep: vec![Box::new(AbortOnDrop(server.abort_handle()))],
    }
}

/// Stops a server task with the path.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---- gRPC ---------------------------------------------------------------

/// Answers every call at once, echoing the body (the market's quote).
struct Market;

#[tonic::async_trait]
impl proto::push_server::Push for Market {
    async fn deliver(
        &self,
        request: tonic::Request<proto::DeliverRequest>,
    ) -> Result<tonic::Response<proto::DeliverReply>, tonic::Status> {
        let request = request.into_inner();
        let query: Query = serde_json::from_slice(&request.body)
            .map_err(|error| tonic::Status::invalid_argument(error.to_string()))?;
        if query.symbol.is_empty() {
            return Err(tonic::Status::invalid_argument("no symbol"));
        }
        Ok(tonic::Response::new(proto::DeliverReply {}))
    }
}

fn grpc_request(n: u64) -> proto::DeliverRequest {
    proto::DeliverRequest {
        topic: "market.quote".into(),
        body: serde_json::to_vec(&query(n)).expect("JSON").into(),
        ..Default::default()
    }
}

async fn grpc() -> Path {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(proto::push_server::PushServer::new(Market))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let channel = |url: &str| {
        tonic::transport::Endpoint::from_shared(url.to_owned())
            .expect("url")
            .connect_lazy()
    };

    let raw_client = proto::push_client::PushClient::new(channel(&url));
    let raw: Call = Arc::new(move |n| {
        let mut client = raw_client.clone();
        Box::pin(async move {
            client.deliver(grpc_request(n)).await.expect("deliver");
        })
    });

    let resilience = Resilience::new(Default::default());
    let service =
        resilience.client(
            "market",
            unary(
                proto::push_client::PushClient::new(channel(&url)),
                |mut client, request: proto::DeliverRequest| async move {
                    client.deliver(request).await
                },
            ),
        );
    // The stack is Send but not Sync; each call clones it (as a tower user
    // does), from behind an uncontended lock (tens of nanoseconds).
    let service = Mutex::new(service);
    let switchboard: Call = Arc::new(move |n| {
        let service = service.lock().expect("service").clone();
        Box::pin(async move {
            service.oneshot(grpc_request(n)).await.expect("call");
        })
    });
    Path {
        name: "trading_to_market",
        label: "Trading → Market (gRPC)",
        target: Duration::from_millis(20),
        raw,
        switchboard,
        load: None,
        _keep: vec![Box::new(AbortOnDrop(server.abort_handle()))],
    }
}

// ---- Redis Streams ------------------------------------------------------

/// A raw redis-rs consumer of group `game` on stream `key` (created here):
/// a blocking `XREADGROUP COUNT <count>` on a connection of its own, each
/// entry's `envelope` field handed to `handle`, then one `XACK` of the
/// read's ids. Returns a connection for publishing and the consumer's task.
pub async fn raw_stream_consumer(
    key: &str,
    count: usize,
    handle: impl Fn(&[u8]) + Send + 'static,
) -> (
    redis::aio::MultiplexedConnection,
    tokio::task::JoinHandle<()>,
) {
    let client = redis::Client::open(redis_url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection");
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg("game")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .expect("XGROUP CREATE");
    let mut reader = client
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(None),
        )
        .await
        .expect("raw blocking connection");
    let (key, mut acker) = (key.to_owned(), conn.clone());
    let consumer = tokio::spawn(async move {
        loop {
            let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("game")
                .arg("c1")
                .arg("COUNT")
                .arg(count)
                .arg("BLOCK")
                .arg(0)
                .arg("STREAMS")
                .arg(&key)
                .arg(">")
                .query_async(&mut reader)
                .await
                .expect("XREADGROUP");
            let mut ids = Vec::new();
            for entry in reply.keys.into_iter().flat_map(|key| key.ids) {
                let Some(redis::Value::BulkString(body)) = entry.map.get("envelope") else {
                    panic!("no envelope field");
                };
                handle(body);
                ids.push(entry.id);
            }
            let _: () = redis::cmd("XACK")
                .arg(&key)
                .arg("game")
                .arg(&ids)
                .query_async(&mut acker)
                .await
                .expect("XACK");
        }
    });
    (conn, consumer)
}

async fn redis_streams() -> Path {
    let prefix = format!("{}:", unique("streams"));
    let config = RedisStreamsConfig::default().with_key_prefix(prefix.clone());
    let transport = RedisStreamsTransport::connect_with(&redis_url(), config)
        .await
        .expect("Redis");
    let bus = EventBus::new(Arc::new(transport.clone()), "trading-service");
    let waiters = Waiters::default();
    let consumer = bus
        .subscribe::<TradeExecuted, _>(subscribe_options(), bus_handler(waiters.clone()))
        .await
        .expect("subscribe");

    // Raw: XADD with the same three fields; a consumer reading with a
    // blocking XREADGROUP, decoding, handling, then one XACK for the batch.
    let key = format!("{prefix}raw");
    let raw_waiters = Waiters::default();
    let (conn, raw_consumer) = {
        let waiters = raw_waiters.clone();
        raw_stream_consumer(&key, 64, move |body| waiters.fire(raw_decode(body))).await
    };
    let xadd = |key: &str, n: u64| {
        let mut add = redis::cmd("XADD");
        add.arg(key)
            .arg("*")
            .arg("envelope")
            .arg(raw_encode(n))
            .arg("event_type")
            .arg("trade.executed")
            .arg("event_id")
            .arg(uuid::Uuid::new_v4().to_string());
        add
    };
    let raw: Call = {
        let (conn, key) = (conn.clone(), key.clone());
        Arc::new(move |n| {
            let (mut conn, received) = (conn.clone(), raw_waiters.register(n));
            let add = xadd(&key, n);
            Box::pin(async move {
                let (added, received) =
                    tokio::join!(add.query_async::<String>(&mut conn), received);
                added.expect("XADD");
                received.expect("handled");
            })
        })
    };
    let raw_load: Call = {
        let (conn, key) = (conn.clone(), key.clone());
        Arc::new(move |n| {
            let mut conn = conn.clone();
            let mut pipe = redis::pipe();
            for i in 0..10 {
                pipe.add_command(xadd(&key, LOAD + n * 10 + i)).ignore();
            }
            Box::pin(async move {
                let _: () = pipe.query_async(&mut conn).await.expect("XADD");
            })
        })
    };
    Path {
        name: "trading_to_game",
        label: "Trading → Game (Redis Streams)",
        target: Duration::from_millis(10),
        raw,
        switchboard: bus_call(bus.clone(), waiters),
        load: Some((raw_load, bus_load(bus))),
        _keep: vec![
            Box::new(consumer),
            Box::new(AbortOnDrop(raw_consumer.abort_handle())),
            Box::new(StreamKeys {
                conn,
                keys: vec![key, transport.stream_key(TradeExecuted::TYPE)],
            }),
        ],
    }
}

/// Deletes the bench's stream keys when the path is dropped.
struct StreamKeys {
    conn: redis::aio::MultiplexedConnection,
    keys: Vec<String>,
}

impl Drop for StreamKeys {
    fn drop(&mut self) {
        let (mut conn, keys) = (self.conn.clone(), std::mem::take(&mut self.keys));
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
            });
        }
    }
}

// ---- Redis Pub/Sub ------------------------------------------------------

async fn redis_pubsub() -> Path {
    let transport = RedisPubSubTransport::connect(&redis_url())
        .await
        .expect("Redis");
    let namespace = unique("pubsub");
    let bus =
        EventBus::new(Arc::new(transport), "market-service").with_namespace(namespace.clone());
    let waiters = Waiters::default();
    let consumer = bus
        .subscribe::<TradeExecuted, _>(subscribe_options(), bus_handler(waiters.clone()))
        .await
        .expect("subscribe");

    // Raw: one connection publishes, another is subscribed (RESP3 pushes).
    let channel = format!("{namespace}.raw");
    let client = redis::Client::open(format!("{}?protocol=resp3", redis_url())).expect("url");
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("raw publishing connection");
    let (sender, mut pushes) = tokio::sync::mpsc::unbounded_channel();
    let mut subscriber = client
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_push_sender(sender),
        )
        .await
        .expect("raw subscribing connection");
    subscriber.subscribe(&channel).await.expect("SUBSCRIBE");
    let raw_waiters = Waiters::default();
    let raw_consumer = {
        let waiters = raw_waiters.clone();
        tokio::spawn(async move {
            while let Some(push) = pushes.recv().await {
                if push.kind != redis::PushKind::Message {
                    continue;
                }
                if let Some(redis::Value::BulkString(body)) = push.data.get(1) {
                    waiters.fire(raw_decode(body));
                }
            }
        })
    };
    let raw: Call = Arc::new(move |n| {
        let (mut conn, received) = (conn.clone(), raw_waiters.register(n));
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(&channel).arg(raw_encode(n));
        Box::pin(async move {
            let (published, received) =
                tokio::join!(publish.query_async::<i64>(&mut conn), received);
            published.expect("PUBLISH");
            received.expect("handled");
        })
    });
    Path {
        name: "pubsub_broadcast",
        label: "Broadcast (Redis Pub/Sub)",
        // SPEC §3 names no Pub/Sub path; it is Redis, like Trading → Game.
        target: Duration::from_millis(10),
        raw,
        switchboard: bus_call(bus, waiters),
        load: None,
        _keep: vec![
            Box::new(consumer),
            Box::new(subscriber),
            Box::new(AbortOnDrop(raw_consumer.abort_handle())),
        ],
    }
}

// ---- RabbitMQ -----------------------------------------------------------

/// A durable queue that expires a minute after its last use, as a raw
/// lapin service declares its own.
pub async fn declare_raw_queue(channel: &lapin::Channel, queue: &str) {
    let mut arguments = FieldTable::default();
    arguments.insert(
        ShortString::from("x-expires"),
        AMQPValue::LongLongInt(60_000),
    );
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .expect("queue_declare");
}

/// A lapin consumer of `queue` on a channel of its own with `prefetch`
/// unacked deliveries at most, as a raw lapin service reads; the channel
/// is returned to be kept open as long as the consumer.
pub async fn raw_queue_consumer(
    connection: &lapin::Connection,
    queue: &str,
    prefetch: u16,
) -> (lapin::Channel, lapin::Consumer) {
    let consuming = connection.create_channel().await.expect("channel");
    consuming
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .expect("basic_qos");
    let deliveries = consuming
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("basic_consume");
    (consuming, deliveries)
}

async fn amqp() -> Path {
    let exchange = unique("amqp");
    let config = AmqpConfig::new(amqp_url())
        .with_exchange(exchange.clone())
        .with_exchange_auto_delete(true)
        .with_queue_expires(Duration::from_secs(60));
    let transport = AmqpTransport::connect(config).await.expect("RabbitMQ");
    let bus = EventBus::new(Arc::new(transport), "trading-service");
    bus.declare(&Topology::new().with_event::<TradeExecuted, _>(["game"]))
        .await
        .expect("declare");
    let waiters = Waiters::default();
    let consumer = bus
        .subscribe::<TradeExecuted, _>(subscribe_options(), bus_handler(waiters.clone()))
        .await
        .expect("subscribe");

    // Raw: the same shape by hand — a topic exchange, a durable queue,
    // persistent mandatory messages, a confirm per publish, manual acks.
    let connection = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .expect("raw connection");
    let publisher = connection.create_channel().await.expect("channel");
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");
    let raw_exchange = format!("{exchange}.raw");
    publisher
        .exchange_declare(
            raw_exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange_declare");
    let queue = format!("{raw_exchange}.game");
    declare_raw_queue(&publisher, &queue).await;
    publisher
        .queue_bind(
            queue.as_str().into(),
            raw_exchange.as_str().into(),
            "trade.executed".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("queue_bind");
    let (consuming, mut deliveries) = raw_queue_consumer(&connection, &queue, 64).await;
    let raw_waiters = Waiters::default();
    let raw_consumer = {
        let waiters = raw_waiters.clone();
        tokio::spawn(async move {
            while let Some(delivery) = deliveries.next().await {
                let delivery = delivery.expect("a delivery");
                waiters.fire(raw_decode(&delivery.data));
                delivery.ack(BasicAckOptions::default()).await.expect("ack");
            }
        })
    };
    let raw: Call = Arc::new(move |n| {
        let (publisher, received) = (publisher.clone(), raw_waiters.register(n));
        let exchange = raw_exchange.clone();
        Box::pin(async move {
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(uuid::Uuid::new_v4().to_string().into())
                .with_type("trade.executed".into())
                .with_timestamp(chrono::Utc::now().timestamp() as u64);
            let body = raw_encode(n);
            let publish = async {
                let confirm = publisher
                    .basic_publish(
                        exchange.as_str().into(),
                        "trade.executed".into(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        &body,
                        properties,
                    )
                    .await
                    .expect("publish");
                match confirm.await.expect("confirm") {
                    Confirmation::Ack(None) => {}
                    other => panic!("not confirmed: {other:?}"),
                }
            };
            let ((), received) = tokio::join!(publish, received);
            received.expect("handled");
        })
    });
    Path {
        name: "rabbitmq_task",
        label: "Task queue (RabbitMQ, persistent, confirmed)",
        // SPEC §3 names no RabbitMQ path; the async budget of 10 ms applies.
        target: Duration::from_millis(10),
        raw,
        switchboard: bus_call(bus, waiters),
        load: None,
        _keep: vec![
            Box::new(consumer),
            Box::new(consuming),
            Box::new(connection),
            Box::new(AbortOnDrop(raw_consumer.abort_handle())),
        ],
    }
}
