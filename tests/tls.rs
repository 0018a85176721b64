//! TLS on the gRPC and HTTP transports, with a CA and a `localhost`
//! certificate generated for each test run (rcgen): event push over both,
//! a JSON call over HTTPS, and a client that does not trust the CA refused
//! with an error that says not to retry.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};
use switchboard::config::RetryConfig;
use switchboard::transport::grpc::GrpcTransport;
use switchboard::transport::http::{self, HttpTransport, JsonBody, JsonService};
use switchboard::transport::push::{PushConfig, PushEndpoint, PushRoutes};
use switchboard::{ErrorKind, Publisher, RawMessage, SubscribeOptions, Subscriber, Transport, tls};
use tokio::net::TcpListener;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tower::ServiceExt;

const PATIENCE: Duration = Duration::from_secs(20);

/// A private CA and a server certificate it signed for `localhost`.
struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

impl Pki {
    fn generate() -> Self {
        Self::generate_for(&["localhost"])
    }

    /// A CA and a server certificate for `names` (DNS names or IPs).
    fn generate_for(names: &[&str]) -> Self {
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A name of its own, so a stranger's CA is an unknown issuer.
        ca.distinguished_name.push(
            DnType::CommonName,
            format!("test CA {}", uuid::Uuid::new_v4().simple()),
        );
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("CA key"))
            .expect("a self-signed CA");
        let key = KeyPair::generate().expect("server key");
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let cert = CertificateParams::new(names)
            .expect("server params")
            .signed_by(&key, &ca)
            .expect("a server certificate signed by the CA");
        Self {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn http_server_config(&self) -> Arc<rustls::ServerConfig> {
        http::tls_server_config(
            tls::certificates_from_pem(self.cert_pem.as_bytes()).expect("certificate"),
            tls::private_key_from_pem(self.key_pem.as_bytes()).expect("key"),
        )
        .expect("a server config")
    }

    fn http_client(&self) -> reqwest::Client {
        http::tls_client(tls::root_store_from_pem(self.ca_pem.as_bytes()).expect("CA"))
            .expect("an HTTPS client")
    }

    fn grpc_server_tls(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }

    fn grpc_client_tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("localhost")
    }
}

async fn listener() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free local port");
    let port = listener.local_addr().expect("local address").port();
    (listener, port)
}

fn push_config(url: String) -> PushConfig {
    PushConfig::new(PushRoutes::new().default_route(PushEndpoint::new(url))).with_retry(
        RetryConfig::default()
            .with_max_attempts(3)
            .with_backoff_ms(5)
            .with_backoff_multiplier(2.0)
            .with_max_backoff_ms(50),
    )
}

fn unique(prefix: &str) -> String {
    format!("{prefix}.{}", uuid::Uuid::new_v4().simple())
}

/// Subscribes, publishes one message and checks the handler received it
/// before `publish` returned.
async fn publish_and_receive<T: Publisher + Subscriber>(transport: &T) {
    let topic = unique("tls");
    let mut subscription = transport
        .subscribe(&topic, SubscribeOptions::new("game"))
        .await
        .expect("subscribe");
    let handler = tokio::spawn(async move {
        let delivery = subscription.recv().await.expect("a delivery");
        let body = delivery.body().clone();
        delivery.ack().await?;
        Ok::<_, switchboard::Error>(body)
    });
    tokio::time::timeout(
        PATIENCE,
        transport.publish(&topic, RawMessage::new("AAPL 150.00")),
    )
    .await
    .expect("publish in time")
    .expect("publish over TLS");
    let body = tokio::time::timeout(PATIENCE, handler)
        .await
        .expect("the handler in time")
        .expect("the handler did not panic")
        .expect("ack");
    assert_eq!(body.as_ref(), b"AAPL 150.00");
}

#[tokio::test]
async fn grpc_push_over_tls_delivers_and_acks() {
    let pki = Pki::generate();
    let (listener, port) = listener().await;
    let (configured, mut endpoint_configured) = tokio::sync::mpsc::unbounded_channel();
    let transport = GrpcTransport::new(push_config(format!("https://localhost:{port}")))
        .expect("a gRPC transport")
        .with_endpoint_config(move |endpoint| {
            let _ = configured.send(());
            Ok(endpoint.tcp_nodelay(true))
        })
        .with_client_tls(pki.grpc_client_tls());
    let server = tokio::spawn(transport.serve_tls(listener, pki.grpc_server_tls()));
    publish_and_receive(&transport).await;
    assert!(
        endpoint_configured.try_recv().is_ok(),
        "the earlier endpoint adjustment still applies under TLS"
    );
    stops_on_close(&transport, server).await;
}

#[tokio::test]
async fn http_webhook_push_over_tls_delivers_and_acks() {
    let pki = Pki::generate();
    let (listener, port) = listener().await;
    let transport = HttpTransport::with_client(
        push_config(format!("https://localhost:{port}")),
        pki.http_client(),
    )
    .expect("an HTTP transport");
    let server = tokio::spawn(transport.serve_tls(listener, pki.http_server_config()));
    publish_and_receive(&transport).await;
    stops_on_close(&transport, server).await;
}

/// `close()` ends `serve_tls` by itself (the publisher's pooled connection
/// to it included), with `Ok`.
async fn stops_on_close(
    transport: &dyn Transport,
    server: tokio::task::JoinHandle<Result<(), switchboard::Error>>,
) {
    transport.close().await.expect("close");
    // A guard against a hang; the grace for busy connections is 10 s.
    tokio::time::timeout(std::time::Duration::from_secs(30), server)
        .await
        .expect("serve_tls returns once the transport is closed")
        .expect("the server task")
        .expect("a graceful stop");
}

#[derive(Debug, Serialize, Deserialize)]
struct Quote {
    symbol: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Price {
    symbol: String,
    cents: u64,
}

async fn quote_server(pki: &Pki) -> (tokio::task::JoinHandle<Result<(), switchboard::Error>>, u16) {
    let router = axum::Router::new().route(
        "/quote",
        axum::routing::post(|JsonBody(quote): JsonBody<Quote>| async move {
            let price = Price {
                symbol: quote.symbol,
                cents: 15_000,
            };
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                serde_json::to_string(&price).expect("JSON"),
            )
        }),
    );
    let (listener, port) = listener().await;
    let server = tokio::spawn(http::serve_tls(listener, router, pki.http_server_config()));
    (server, port)
}

#[tokio::test]
async fn a_json_call_over_https_gets_its_answer() {
    let pki = Pki::generate();
    let (server, port) = quote_server(&pki).await;
    let quote = JsonService::<Quote, Price>::post(
        pki.http_client(),
        format!("https://localhost:{port}/quote"),
    );
    let price = tokio::time::timeout(
        PATIENCE,
        quote.oneshot(Quote {
            symbol: "AAPL".into(),
        }),
    )
    .await
    .expect("an answer in time")
    .expect("the call over HTTPS");
    assert_eq!(
        price,
        Price {
            symbol: "AAPL".into(),
            cents: 15_000
        }
    );
    server.abort();
}

#[tokio::test]
async fn an_https_client_that_does_not_trust_the_ca_is_refused_and_told_not_to_retry() {
    let pki = Pki::generate();
    let stranger = Pki::generate();
    let (server, port) = quote_server(&pki).await;
    let quote = JsonService::<Quote, Price>::post(
        stranger.http_client(),
        format!("https://localhost:{port}/quote"),
    );
    let error = tokio::time::timeout(
        PATIENCE,
        quote.oneshot(Quote {
            symbol: "AAPL".into(),
        }),
    )
    .await
    .expect("an answer in time")
    .expect_err("an untrusted server is refused");
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    assert!(!error.is_retryable());
    assert!(error.message().contains("TLS"), "{error}");
    assert!(error.message().contains("UnknownIssuer"), "{error}");

    // The server is still up for clients that do trust it.
    let quote = JsonService::<Quote, Price>::post(
        pki.http_client(),
        format!("https://localhost:{port}/quote"),
    );
    quote
        .oneshot(Quote {
            symbol: "MSFT".into(),
        })
        .await
        .expect("a trusting client still gets its answer");
    server.abort();
}

#[tokio::test]
async fn a_grpc_publisher_that_does_not_trust_the_ca_is_refused_and_told_not_to_retry() {
    let pki = Pki::generate();
    let stranger = Pki::generate();
    let (listener, port) = listener().await;
    let receiver = GrpcTransport::new(PushConfig::default()).expect("a gRPC transport");
    let server = tokio::spawn(receiver.serve_tls(listener, pki.grpc_server_tls()));
    let publisher = GrpcTransport::new(push_config(format!("https://localhost:{port}")))
        .expect("a gRPC transport")
        .with_client_tls(stranger.grpc_client_tls());
    let error = tokio::time::timeout(
        PATIENCE,
        publisher.publish(&unique("tls"), RawMessage::new("{}")),
    )
    .await
    .expect("an answer in time")
    .expect_err("an untrusted server is refused");
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    assert!(!error.is_retryable());
    assert!(error.message().contains("TLS"), "{error}");
    assert!(error.message().contains("UnknownIssuer"), "{error}");
    server.abort();
}

#[tokio::test]
async fn a_webhook_publisher_that_does_not_trust_the_ca_is_refused_and_told_not_to_retry() {
    let pki = Pki::generate();
    let stranger = Pki::generate();
    let (listener, port) = listener().await;
    let receiver = HttpTransport::new(PushConfig::default()).expect("an HTTP transport");
    let server = tokio::spawn(receiver.serve_tls(listener, pki.http_server_config()));
    let publisher = HttpTransport::with_client(
        push_config(format!("https://localhost:{port}")),
        stranger.http_client(),
    )
    .expect("an HTTP transport");
    let error = tokio::time::timeout(
        PATIENCE,
        publisher.publish(&unique("tls"), RawMessage::new("{}")),
    )
    .await
    .expect("an answer in time")
    .expect_err("an untrusted server is refused");
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    assert!(!error.is_retryable());
    server.abort();
}

#[cfg(all(
    feature = "redis-tls",
    feature = "redis-streams",
    feature = "redis-pubsub"
))]
#[path = "tls/redis.rs"]
mod redis;
