//! The password `SECRETpw42` in every transport's URL, and in a token.

use std::error::Error as _;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use switchboard::auth::{Claims, TokenVerifier};
use switchboard::config::RetryConfig;
use switchboard::middleware::dedupe::RedisDedupeStore;
use switchboard::transport::amqp::{AmqpConfig, AmqpTransport};
use switchboard::transport::grpc::GrpcTransport;
use switchboard::transport::http::HttpTransport;
use switchboard::transport::push::{PushConfig, PushEndpoint, PushRoutes};
use switchboard::transport::redis_pubsub::{RedisPubSubOptions, RedisPubSubTransport};
use switchboard::transport::redis_streams::{RedisStreamsConfig, RedisStreamsTransport};
use switchboard::{Error, EventBus, Transport};

#[path = "../common/clean_exit.rs"]
mod harness;

const SECRET: &str = "SECRETpw42";
const ED_PUBLIC: &[u8] = include_bytes!("../fixtures/auth/ed25519_public.pem");

/// What one attempt leaves to be searched: `{:?}` and `{}` of the error and
/// of every error in its `source()` chain.
fn texts_of(what: &str, error: &Error, into: &mut Vec<String>) {
    into.push(format!("{what}: {error} / {error:?}"));
    let mut source = error.source();
    while let Some(cause) = source {
        into.push(format!("{what} source: {cause} / {cause:?}"));
        source = cause.source();
    }
}

fn debug_of(what: &str, value: &impl Debug, into: &mut Vec<String>) {
    into.push(format!("{what}: {value:?} / {value:#?}"));
}

fn failed<T: Debug>(what: &str, result: Result<T, Error>, into: &mut Vec<String>) {
    match result {
        Ok(value) => {
            // A connection that works (the shared Redis takes any password
            // when it has none set) is searched too.
            debug_of(what, &value, into);
        }
        Err(error) => texts_of(what, &error, into),
    }
}

async fn redis_attempts(into: &mut Vec<String>) {
    let quick = || RedisStreamsConfig::default().with_connect_timeout(Duration::from_millis(300));
    for url in [
        format!("redis://:{SECRET}@h:x"),
        format!("redis://u:{SECRET}@[::1"),
        format!("redis://u:{SECRET}@127.0.0.1:1/0"),
        format!("redis://nobody:{SECRET}@127.0.0.1:6379/0"),
        format!("rediss://u:{SECRET}@127.0.0.1:1/0"),
    ]
    .iter()
    .enumerate()
    {
        // The labels name the attempt by number: the URL holds the password.
        let (n, url) = url;
        failed(
            &format!("streams #{n}"),
            RedisStreamsTransport::connect_with(url, quick()).await,
            into,
        );
        failed(
            &format!("pubsub #{n}"),
            RedisPubSubTransport::connect_with(
                url,
                RedisPubSubOptions::default().with_connection_timeout(Duration::from_millis(300)),
            )
            .await,
            into,
        );
        failed(
            &format!("dedupe #{n}"),
            RedisDedupeStore::connect(url, "secrets").await,
            into,
        );
    }
    failed(
        "streams cluster",
        RedisStreamsTransport::connect_cluster(
            [format!("redis://u:{SECRET}@127.0.0.1:1")],
            quick(),
        )
        .await,
        into,
    );
    debug_of("streams config", &quick(), into);
    debug_of(
        "pubsub options",
        &RedisPubSubOptions::default().with_tls_ca_pem("-----BEGIN CERTIFICATE-----"),
        into,
    );
}

async fn amqp_attempts(into: &mut Vec<String>) {
    for url in [
        format!("amqp://u:{SECRET}@[::1"),
        format!("amqp://u:{SECRET}@h:x/%2f"),
        format!("amqp://u:{SECRET}@127.0.0.1:1/%2f"),
        format!("amqp://guest:{SECRET}@127.0.0.1:5672/%2f"),
    ]
    .into_iter()
    .enumerate()
    {
        let (n, url) = url;
        let config = AmqpConfig::new(url.clone())
            .with_nodes([url.clone()])
            .with_connect_timeout(Duration::from_millis(500));
        debug_of("amqp config", &config, into);
        failed(
            &format!("amqp #{n}"),
            AmqpTransport::connect(config).await,
            into,
        );
    }
}

async fn push_attempts(into: &mut Vec<String>) {
    for url in [
        format!("http://u:{SECRET}@127.0.0.1:1"),
        format!("http://u:{SECRET}@[::1"),
    ]
    .into_iter()
    .enumerate()
    {
        let (n, url) = url;
        let config = PushConfig::new(PushRoutes::new().default_route(PushEndpoint::new(&url)))
            .with_retry(RetryConfig::default().with_max_attempts(1))
            .with_timeout(Duration::from_millis(500));
        debug_of("push config", &config, into);
        type Made = Result<Arc<dyn Transport>, Error>;
        let transports: Vec<(&str, Made)> = vec![
            (
                "grpc",
                GrpcTransport::new(config.clone()).map(|t| Arc::new(t) as Arc<dyn Transport>),
            ),
            (
                "http",
                HttpTransport::new(config.clone()).map(|t| Arc::new(t) as Arc<dyn Transport>),
            ),
        ];
        for (name, transport) in transports {
            match transport {
                Err(error) => texts_of(&format!("{name} new #{n}"), &error, into),
                Ok(transport) => {
                    let bus = EventBus::new(transport, "secrets");
                    let result = bus.publish(harness::Tick { n: 1 }).await;
                    failed(&format!("{name} publish #{n}"), result, into);
                }
            }
        }
    }
}

/// The file-transfer client with a password in its URL: its builder, the
/// client, and a download that cannot connect.
async fn transfer_attempts(into: &mut Vec<String>) {
    let url = format!("http://u:{SECRET}@127.0.0.1:1");
    let builder = switchboard::transfer::TransferClient::builder(&url)
        .connect_timeout(std::time::Duration::from_millis(300));
    debug_of("transfer builder", &builder, into);
    match builder.build() {
        Ok(client) => {
            debug_of("transfer client", &client, into);
            failed(
                "transfer download",
                client.download("a.bin").await.map(drop),
                into,
            );
        }
        Err(error) => texts_of("transfer build", &error, into),
    }
}

fn webhook_key(into: &mut Vec<String>) {
    let signing =
        switchboard::transport::http::WebhookSigning::new(format!("{SECRET}-{SECRET}")).unwrap();
    debug_of("webhook signing", &signing, into);
    let transport = HttpTransport::new(PushConfig::default())
        .unwrap()
        .with_signing(signing)
        .unwrap();
    debug_of("signed transport", &transport, into);
}

fn token_attempts(into: &mut Vec<String>) {
    let verifier = TokenVerifier::ed25519_pem(ED_PUBLIC, "auth-service")
        .unwrap()
        .with_any_audience();
    debug_of("verifier", &verifier, into);
    for token in [
        format!("{SECRET}.{SECRET}.{SECRET}"),
        format!("eyJhbGciOiJFZERTQSJ9.{SECRET}.sig"),
        SECRET.to_owned(),
    ] {
        match verifier.verify::<Claims>(&token) {
            Ok(claims) => debug_of("claims", &claims, into),
            Err(error) => {
                into.push(format!("token: {error} / {error:?}"));
                let mut source = error.source();
                while let Some(cause) = source {
                    into.push(format!("token source: {cause} / {cause:?}"));
                    source = cause.source();
                }
            }
        }
    }
}

#[test]
fn no_password_or_token_in_any_log_error_or_debug() {
    harness::assert_logs(
        "logs::no_password_or_token_in_any_log_error_or_debug",
        || async {
            let mut texts = Vec::new();
            redis_attempts(&mut texts).await;
            amqp_attempts(&mut texts).await;
            push_attempts(&mut texts).await;
            transfer_attempts(&mut texts).await;
            token_attempts(&mut texts);
            webhook_key(&mut texts);
            let leaks: Vec<&String> = texts.iter().filter(|t| t.contains(SECRET)).collect();
            assert!(leaks.is_empty(), "the password in: {leaks:#?}");
            // The attempts failed for the reasons given, so the search
            // looked at real errors, not at nothing.
            assert!(texts.len() > 30, "{texts:#?}");
            assert!(
                texts.iter().any(|t| t.contains("u:***@")),
                "a URL is quoted, redacted: {texts:#?}"
            );
            // A wrong password is the caller's to fix, not to retry.
            assert!(
                texts
                    .iter()
                    .any(|t| t.starts_with("pubsub #3") && t.contains("kind: Unauthorized")),
                "{texts:#?}"
            );
        },
        |events| {
            let leaks: Vec<String> = events
                .iter()
                .filter(|event| event.text.contains(SECRET))
                .map(ToString::to_string)
                .collect();
            assert!(leaks.is_empty(), "the password logged: {leaks:#?}");
            assert!(
                events.iter().any(|event| event.target.starts_with("lapin")),
                "lapin was heard"
            );
        },
    );
}
