//! Redis over TLS (`rediss://`): a private `redis-server` with a TLS port
//! only, a certificate from a CA generated here, and an ACL user whose
//! password comes from the URL. Streams, Pub/Sub and the dedupe store
//! connect and work; a client that does not trust the CA, or a wrong
//! password, fails at once with an error that says not to retry.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use switchboard::middleware::dedupe::{DedupeStore, Mark, RedisDedupeStore};
use switchboard::transport::redis_pubsub::{RedisPubSubOptions, RedisPubSubTransport};
use switchboard::transport::redis_streams::{RedisStreamsConfig, RedisStreamsTransport};

use super::*;

const USER: &str = "sb-tls-user";
const PASSWORD: &str = "tls-pass-7f3a";

/// A `redis-server` on a TLS port only; killed (by its pid) when dropped.
struct TlsRedis {
    port: u16,
    dir: PathBuf,
    child: Child,
    pki: Pki,
}

impl TlsRedis {
    async fn start() -> Self {
        let pki = Pki::generate_for(&["localhost", "127.0.0.1"]);
        let dir = std::env::temp_dir().join(format!("sb-redis-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), &pki.ca_pem).unwrap();
        std::fs::write(dir.join("cert.pem"), &pki.cert_pem).unwrap();
        std::fs::write(dir.join("key.pem"), &pki.key_pem).unwrap();
        let (listener, port) = listener().await;
        drop(listener);
        let child = Command::new("redis-server")
            .args(["--port", "0", "--bind", "127.0.0.1"])
            .args(["--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(dir.join("cert.pem"))
            .arg("--tls-key-file")
            .arg(dir.join("key.pem"))
            .arg("--tls-ca-cert-file")
            .arg(dir.join("ca.pem"))
            .args(["--tls-auth-clients", "no"])
            .args([
                "--user",
                USER,
                "on",
                &format!(">{PASSWORD}"),
                "~*",
                "&*",
                "+@all",
            ])
            .args(["--user", "default", "off"])
            .args(["--appendonly", "no", "--save", ""])
            .arg("--dir")
            .arg(&dir)
            .args(["--logfile", "redis.log"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (built with TLS)");
        let server = Self {
            port,
            dir,
            child,
            pki,
        };
        // Up once the port takes a connection (the TLS handshake follows).
        let deadline = Instant::now() + PATIENCE;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }

    fn url(&self) -> String {
        format!("rediss://{USER}:{PASSWORD}@localhost:{}/0", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn quick() -> RedisStreamsConfig {
    RedisStreamsConfig::default().with_connect_timeout(Duration::from_secs(5))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pubsub_and_dedupe_work_over_tls_with_an_acl_user() {
    let redis = TlsRedis::start().await;
    let ca = redis.pki.ca_pem.clone();

    let streams = RedisStreamsTransport::connect_with(&redis.url(), quick().with_tls_ca_pem(&ca))
        .await
        .expect("streams over TLS");
    publish_and_receive(&streams).await;

    let pubsub = RedisPubSubTransport::connect_with(
        &redis.url(),
        RedisPubSubOptions::default().with_tls_ca_pem(&ca),
    )
    .await
    .expect("pub/sub over TLS");
    publish_and_receive(&pubsub).await;

    let dedupe = RedisDedupeStore::connect_with_tls_ca(&redis.url(), Some(ca.as_bytes()), "tls")
        .await
        .expect("dedupe over TLS");
    let key = unique("key");
    let ttl = Duration::from_secs(30);
    assert_eq!(
        dedupe.try_begin(&key, "a", ttl).await.unwrap(),
        Mark::Acquired
    );
    assert_eq!(
        dedupe.try_begin(&key, "b", ttl).await.unwrap(),
        Mark::InProgress
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_or_a_wrong_password_is_refused_at_once_not_retried() {
    let redis = TlsRedis::start().await;
    let stranger = Pki::generate_for(&["localhost"]).ca_pem;
    let started = Instant::now();
    let untrusted =
        RedisStreamsTransport::connect_with(&redis.url(), quick().with_tls_ca_pem(&stranger))
            .await
            .unwrap_err();
    assert_eq!(untrusted.kind(), ErrorKind::Rejected, "{untrusted:?}");
    assert!(!untrusted.is_retryable());
    let untrusted = RedisPubSubTransport::connect_with(
        &redis.url(),
        RedisPubSubOptions::default().with_tls_ca_pem(&stranger),
    )
    .await
    .unwrap_err();
    assert_eq!(untrusted.kind(), ErrorKind::Rejected, "{untrusted:?}");
    let untrusted =
        RedisDedupeStore::connect_with_tls_ca(&redis.url(), Some(stranger.as_bytes()), "tls")
            .await
            .unwrap_err();
    assert_eq!(untrusted.kind(), ErrorKind::Rejected, "{untrusted:?}");

    let wrong = format!("rediss://{USER}:wrong@localhost:{}/0", redis.port);
    let refused =
        RedisStreamsTransport::connect_with(&wrong, quick().with_tls_ca_pem(&redis.pki.ca_pem))
            .await
            .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Unauthorized, "{refused:?}");
    // All four refused before one 5 s connect timeout ran out: no retries.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
