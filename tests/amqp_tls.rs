//! AMQP over TLS (`amqps://`, feature `amqp-tls`) against the machine's
//! RabbitMQ. The shared broker has no TLS listener, so each test puts a
//! TLS-terminating proxy in front of 127.0.0.1:5672: the transport speaks
//! `amqps://` to the proxy, which presents a certificate for `localhost`
//! signed by a CA generated in the test, and relays the plain AMQP bytes.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use switchboard::transport::amqp::{AmqpConfig, AmqpTransport};
use switchboard::{ErrorKind, Publisher, RawMessage, SubscribeOptions, Subscriber, tls};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

const BROKER: &str = "127.0.0.1:5672";
const PATIENCE: Duration = Duration::from_secs(30);

/// A CA's PEM and a server config for `localhost` it signed.
fn pki() -> (String, Arc<rustls::ServerConfig>) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A name of its own, so a stranger's CA is an unknown issuer.
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("test CA {}", uuid::Uuid::new_v4().simple()),
    );
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("CA key")).expect("CA");
    let key = KeyPair::generate().expect("server key");
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("server params")
        .signed_by(&key, &ca)
        .expect("server certificate");
    let config = tls::server_config(
        tls::certificates_from_pem(cert.pem().as_bytes()).expect("certificate"),
        tls::private_key_from_pem(key.serialize_pem().as_bytes()).expect("key"),
        &[],
    )
    .expect("server config");
    (ca.pem(), config)
}

/// Accepts TLS on a free port and relays each connection to the broker;
/// aborted when the returned handle drops out of scope in the test.
async fn tls_proxy(config: Arc<rustls::ServerConfig>) -> (tokio::task::JoinHandle<()>, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
    let port = listener.local_addr().expect("address").port();
    let acceptor = TlsAcceptor::from(config);
    let proxy = tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut client) = acceptor.accept(client).await else {
                    return;
                };
                let Ok(mut broker) = TcpStream::connect(BROKER).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
            });
        }
    });
    (proxy, port)
}

fn config(port: u16) -> AmqpConfig {
    AmqpConfig::new(format!("amqps://guest:guest@localhost:{port}/%2f"))
        .with_exchange(format!("sb-tls-{}", uuid::Uuid::new_v4().simple()))
        .with_exchange_auto_delete(true)
        .with_queue_expires(Duration::from_secs(60))
}

#[tokio::test]
async fn amqps_with_a_private_ca_publishes_and_consumes() {
    let (ca_pem, server_config) = pki();
    let (proxy, port) = tls_proxy(server_config).await;
    let transport = tokio::time::timeout(
        PATIENCE,
        AmqpTransport::connect(config(port).with_tls_ca_pem(ca_pem)),
    )
    .await
    .expect("connected in time")
    .expect("amqps:// through the TLS proxy to RabbitMQ on 127.0.0.1:5672");
    let topic = format!("tls-{}", uuid::Uuid::new_v4().simple());
    let mut subscription = transport
        .subscribe(&topic, SubscribeOptions::new("game"))
        .await
        .expect("subscribe");
    transport
        .publish(&topic, RawMessage::new(r#"{"over":"tls"}"#))
        .await
        .expect("publish over TLS");
    let delivery = tokio::time::timeout(PATIENCE, subscription.recv())
        .await
        .expect("a delivery in time")
        .expect("a delivery");
    assert_eq!(delivery.body().as_ref(), br#"{"over":"tls"}"#);
    delivery.ack().await.expect("ack");
    proxy.abort();
}

#[tokio::test]
async fn amqps_to_a_server_the_client_does_not_trust_fails_to_connect() {
    let (_, server_config) = pki();
    let (stranger_ca, _) = pki();
    let (proxy, port) = tls_proxy(server_config).await;
    let error = tokio::time::timeout(
        PATIENCE,
        AmqpTransport::connect(config(port).with_tls_ca_pem(stranger_ca)),
    )
    .await
    .expect("an answer in time")
    .expect_err("a server signed by an unknown CA is refused");
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    assert!(!error.is_retryable());
    assert!(
        error.message().contains("UnknownIssuer"),
        "the error says why: {error}"
    );
    proxy.abort();
}
