//! An operator's dead-letter CLI over [`DeadLetterAdmin`] (strategy §6.3's
//! manual retry) — list, inspect, redrive one, redrive all — against the
//! memory, Redis Streams or RabbitMQ dead-letter queues:
//!
//! ```text
//! cargo run --example dlq                                  # memory demo: list
//! cargo run --example dlq -- inspect first                 # one letter, all its facts
//! cargo run --example dlq -- redrive first                 # send one back
//! cargo run --example dlq -- redrive-all                   # send every one back
//! cargo run --example dlq -- --transport redis --topic trade.executed list
//! cargo run --example dlq -- --transport amqp --url amqp://guest:guest@127.0.0.1:5672 \
//!     --topic trade.executed --group game redrive <id>
//! ```
//!
//! The memory transport lives in this process, so with `--transport memory`
//! (the default) the example first runs a Game consumer (the handler stack
//! of `Resilience::consumer`) whose ledger is down: three trades are retried
//! three times each and dead-lettered, with an alert each (three failed
//! messages stay below the breaker's threshold of five). Then it runs the
//! command, with the ledger back up, so a redriven trade is handled. With
//! `redis` or `amqp` it works on the broker's real dead-letter queue of
//! `--topic` (with its namespace, e.g. `demo.trade.executed`) for `--group`.
//! In code, `EventBus::dead_letters::<E>()` is the typed view (the demo
//! lists its letters through it).

#[path = "common/mod.rs"]
mod common;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::operator::{self, Command, Kind};
use serde::{Deserialize, Serialize};
use switchboard::middleware::Resilience;
use switchboard::middleware::dead_letter::{DeadLetterAdmin, DeadLetterAlert, DeadLetterFacts};
use switchboard::{
    Error, Event, EventBus, Message, SubscribeOptions, Topology, Transport, handler_fn,
};
use tokio::sync::mpsc;

const USAGE: &str = "\
usage: dlq [--transport memory|redis|amqp] [--url URL] [--topic TOPIC] [--group GROUP]
           [list | inspect <id|first> | redrive <id|first> | redrive-all]

  --transport   which dead-letter queue (default memory: a demo that fills it first)
  --url         the broker (default redis://127.0.0.1:6379 or amqp://guest:guest@127.0.0.1:5672)
  --topic       the topic, with its namespace if any (default trade.executed)
  --group       the consumer group whose letters (RabbitMQ keeps one queue per group; default game)";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TradeExecuted {
    order_id: String,
    quantity: u64,
}

impl Event for TradeExecuted {
    const TYPE: &'static str = "trade.executed";
    const VERSION: &'static str = "1.0";
}

/// Pages "operations": here, prints and tells `main` a letter is on its way.
#[derive(Debug)]
struct Pager(mpsc::UnboundedSender<()>);

impl DeadLetterAlert for Pager {
    fn alert(&self, facts: &DeadLetterFacts) {
        println!(
            "ALERT dead letter on {} ({}): {} after {} attempts: {}",
            facts.topic, facts.group, facts.event_id, facts.attempts, facts.last_error
        );
        self.0.send(()).ok();
    }
}

struct Options {
    kind: Kind,
    url: Option<String>,
    topic: String,
    group: String,
    command: Command,
}

fn parse(args: &[String]) -> Result<Option<Options>, String> {
    let mut options = Options {
        kind: Kind::Memory,
        url: None,
        topic: TradeExecuted::TYPE.to_owned(),
        group: "game".to_owned(),
        command: Command::List,
    };
    let mut words = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match arg.as_str() {
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "--transport" => {
                let name = value("--transport")?;
                options.kind = Kind::parse(&name)
                    .ok_or_else(|| format!("--transport is memory, redis or amqp, not {name:?}"))?;
            }
            "--url" => options.url = Some(value("--url")?),
            "--topic" => options.topic = value("--topic")?,
            "--group" => options.group = value("--group")?,
            flag if flag.starts_with("--") => return Err(format!("unknown flag {flag:?}")),
            word => words.push(word),
        }
    }
    options.command =
        Command::parse(&words).ok_or_else(|| format!("unknown command {:?}", words.join(" ")))?;
    Ok(Some(options))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse(&args) {
        Ok(Some(options)) => options,
        Ok(None) => return ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("dlq: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(options).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dlq: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: Options) -> Result<(), Error> {
    let url = options
        .url
        .clone()
        .unwrap_or_else(|| options.kind.default_url().to_owned());
    let transport = operator::connect(options.kind, &url, &options.topic, &options.group).await?;
    let admin = DeadLetterAdmin::new(transport.clone());
    if options.kind != Kind::Memory {
        let (out, _) = operator::execute(&admin, &options.topic, &options.command).await?;
        print!("{out}");
        return Ok(());
    }
    demo(transport, &admin, &options.command).await
}

/// The memory demo: fill the queue, then run the command with the cause
/// fixed, and show a redriven trade being handled.
async fn demo(
    transport: Arc<dyn Transport>,
    admin: &DeadLetterAdmin,
    command: &Command,
) -> Result<(), Error> {
    let bus = EventBus::new(transport, "trading-service");
    bus.declare(&Topology::new().with_event::<TradeExecuted, _>(["game"]))
        .await?;

    let ledger_up = Arc::new(AtomicBool::new(false));
    let (alerts, mut alerted) = mpsc::unbounded_channel();
    let (handled, mut handled_rx) = mpsc::unbounded_channel();
    let resilience = Resilience::default()
        .with_timeout(Duration::from_millis(50))
        .with_alert(Arc::new(Pager(alerts)));
    let handler = resilience.consumer(
        "ledger",
        handler_fn({
            let ledger_up = ledger_up.clone();
            move |message: Message<TradeExecuted>| {
                let up = ledger_up.load(Ordering::SeqCst);
                let order = message.payload().order_id.clone();
                let handled = handled.clone();
                async move {
                    if up {
                        println!("game: credited holdings for order {order}");
                        handled.send(()).ok();
                        Ok(())
                    } else {
                        Err(Error::transient("ledger database unavailable"))
                    }
                }
            }
        }),
    );
    let consumer = bus
        .subscribe(SubscribeOptions::new("game"), handler)
        .await?;

    for (order_id, quantity) in [("A-1", 100), ("A-2", 5), ("A-3", 42)] {
        let order_id = order_id.to_owned();
        bus.publish(TradeExecuted { order_id, quantity }).await?;
    }
    for _ in 0..3 {
        alerted.recv().await;
    }
    let topic = TradeExecuted::TYPE;
    // Each alert comes once its letter is stored, so all three are listed
    // now: the typed view reads each trade back.
    let letters = bus.dead_letters::<TradeExecuted>()?;
    assert_eq!(
        letters.list(100).await?.len(),
        3,
        "alerted letters are stored"
    );
    for letter in letters.list(100).await? {
        let trade = letter.payload()?;
        println!(
            "dead letter {}: order {} x{} after {} attempts",
            letter.id(),
            trade.order_id,
            trade.quantity,
            letter.attempts()
        );
    }
    ledger_up.store(true, Ordering::SeqCst);

    let (out, redriven) = operator::execute(admin, topic, command).await?;
    print!("{out}");
    // Whatever was redriven is handled before the consumer stops.
    for _ in 0..redriven {
        handled_rx.recv().await;
    }
    consumer.shutdown().await?;
    println!(
        "left in the dead-letter queue: {}",
        admin.list(topic, 100).await?.len()
    );
    Ok(())
}
