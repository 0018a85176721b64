//! A consumer to kill: the process half of the consumer-crash proof in
//! `tests/chaos_process.rs` (run by `scripts/chaos`).
//!
//! It reads `chaos.job` events from Redis Streams under a stable consumer
//! name, behind the Redis dedupe store, and records each handling as an
//! effect anyone can count: `HINCRBY <effects> <event_id> 1`. Each handler
//! works a little before and after its effect, so a SIGKILL lands on every
//! stage of a delivery: before the effect, after the effect but before the
//! *done* mark (the crash window, where a restart handles the event again),
//! and after the done mark but before the `XACK` (a restart skips it).
//!
//! ```text
//! cargo run --example chaos_consumer -- --redis redis://127.0.0.1:6379 \
//!     --namespace chaos-1 --group chaos --consumer chaos-a \
//!     --dedupe chaos-1:dedupe --effects chaos-1:effects
//! ```
//!
//! Prints `ready` once the subscription is live and runs until killed
//! (or stopped with Ctrl-C / SIGTERM).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchboard::middleware::dedupe::{DedupeLayer, RedisDedupeStore};
use switchboard::transport::redis_streams::{RedisStreamsConfig, RedisStreamsTransport};
use switchboard::{Error, ErrorKind, Event, EventBus, Message, SubscribeOptions, handler_fn};
use tower::Layer;

/// One unit of work; `n` is its number in the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChaosJob {
    pub n: u64,
}

impl Event for ChaosJob {
    const TYPE: &'static str = "chaos.job";
    const VERSION: &'static str = "1.0";
}

const USAGE: &str = "\
cargo run --example chaos_consumer -- --redis URL --namespace NS --group G --consumer NAME \\
    --dedupe PREFIX --effects KEY [--concurrency N] [--before-ms MS] [--after-ms MS] [--in-progress-ms MS]

  --redis URL           the Redis of the stream, the dedupe marks and the effects
  --namespace NS        topic prefix: the stream is NS.chaos.job
  --group G             consumer group
  --consumer NAME       consumer name, kept across restarts
  --dedupe PREFIX       key prefix of the dedupe marks
  --effects KEY         hash counting each event's handlings
  --concurrency N       handlers in flight (default 8)
  --before-ms MS        work before the effect (default 5)
  --after-ms MS         work after the effect, before the done mark (default 20)
  --in-progress-ms MS   TTL of an in-progress mark (default 3000)";

#[derive(Debug)]
struct Flags {
    redis: String,
    namespace: String,
    group: String,
    consumer: String,
    dedupe: String,
    effects: String,
    concurrency: usize,
    before: Duration,
    after: Duration,
    in_progress: Duration,
}

fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Flags>, String> {
    let mut values = std::collections::HashMap::new();
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            return Ok(None);
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        values.insert(flag, value);
    }
    let mut take = |name: &str| {
        values
            .remove(name)
            .ok_or_else(|| format!("{name} is required"))
    };
    let redis = take("--redis")?;
    let namespace = take("--namespace")?;
    let group = take("--group")?;
    let consumer = take("--consumer")?;
    let dedupe = take("--dedupe")?;
    let effects = take("--effects")?;
    let mut number = |name: &str, default: u64| -> Result<u64, String> {
        match values.remove(name) {
            None => Ok(default),
            Some(value) => value
                .parse()
                .map_err(|_| format!("{name} wants a number, got {value:?}")),
        }
    };
    let flags = Flags {
        redis,
        namespace,
        group,
        consumer,
        dedupe,
        effects,
        concurrency: number("--concurrency", 8)? as usize,
        before: Duration::from_millis(number("--before-ms", 5)?),
        after: Duration::from_millis(number("--after-ms", 20)?),
        in_progress: Duration::from_millis(number("--in-progress-ms", 3000)?),
    };
    if let Some(unknown) = values.keys().next() {
        return Err(format!("unknown argument {unknown:?}"));
    }
    Ok(Some(flags))
}

#[tokio::main]
async fn main() -> ExitCode {
    let flags = match parse(std::env::args().skip(1)) {
        Ok(Some(flags)) => flags,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("chaos_consumer: {message} (see --help)");
            return ExitCode::from(2);
        }
    };
    match run(flags).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("chaos_consumer: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(flags: Flags) -> Result<(), Error> {
    let config = RedisStreamsConfig::default().with_consumer_name(flags.consumer.clone());
    let transport = RedisStreamsTransport::connect_with(&flags.redis, config).await?;
    let bus = EventBus::new(Arc::new(transport), "chaos-consumer").with_namespace(&flags.namespace);
    let store = RedisDedupeStore::connect(&flags.redis, flags.dedupe.clone()).await?;
    let dedupe = DedupeLayer::new(Arc::new(store))
        .with_in_progress_ttl(flags.in_progress)
        .with_requeue_delay(Duration::from_millis(250));

    let client = redis::Client::open(flags.redis.as_str())
        .map_err(|error| Error::new(ErrorKind::Config, error.to_string()))?;
    // No response timeout on the effect: a reply given up on after the
    // command ran would fail the handler after its effect (a duplicate that
    // is not the kill's).
    let effects = client
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(None),
        )
        .await
        .map_err(|error| Error::new(ErrorKind::Connection, error.to_string()))?;
    let (effects_key, before, after) = (flags.effects.clone(), flags.before, flags.after);
    let handler = dedupe.layer(handler_fn(move |message: Message<ChaosJob>| {
        let mut effects = effects.clone();
        let key = effects_key.clone();
        async move {
            // Work before the effect: a kill here leaves no effect.
            tokio::time::sleep(before).await;
            let _: i64 = redis::cmd("HINCRBY")
                .arg(&key)
                .arg(message.event_id().to_string())
                .arg(1)
                .query_async(&mut effects)
                .await
                .map_err(|error| {
                    eprintln!("effect of {} failed: {error}", message.event_id());
                    Error::new(ErrorKind::Unavailable, error.to_string())
                })?;
            // Work after the effect: a kill here is the crash window.
            tokio::time::sleep(after).await;
            Ok::<_, Error>(())
        }
    }));
    let options = SubscribeOptions::new(flags.group.clone())
        .with_concurrency(flags.concurrency)
        .with_prefetch(flags.concurrency * 4);
    let consumer = bus.subscribe(options, handler).await?;
    println!(
        "ready    consumer {} in group {} on {}",
        flags.consumer,
        flags.group,
        bus.topic_of::<ChaosJob>()
    );
    stopped().await;
    consumer.shutdown().await
}

async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
