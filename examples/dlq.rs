//! An operator's dead-letter CLI over [`DeadLetterAdmin`] — list, inspect,
//! redrive one, redrive all — shown on the in-memory transport:
//!
//! ```text
//! cargo run --example dlq                    # list
//! cargo run --example dlq -- inspect first   # one letter, all its facts
//! cargo run --example dlq -- redrive first   # send one back
//! cargo run --example dlq -- redrive-all     # send every one back
//! ```
//!
//! The memory transport lives in this process, so the example first runs a
//! Game consumer (the handler stack of `Resilience::handler`) whose ledger is
//! down: three trades are retried three times each and dead-lettered, with an
//! alert each. Then it runs the command, with the ledger back up, so a
//! redriven trade is handled. Against Redis or RabbitMQ the same calls work
//! on `Arc<dyn Transport>` built from configuration.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchboard::middleware::Resilience;
use switchboard::middleware::dead_letter::{DeadLetterAdmin, DeadLetterAlert, DeadLetterFacts};
use switchboard::{
    DeadLettered, Error, ErrorKind, Event, EventBus, MemoryTransport, Message, SubscribeOptions,
    Topology, handler_fn,
};
use tokio::sync::mpsc;

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

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let transport = Arc::new(MemoryTransport::new());
    let bus = EventBus::new(transport.clone(), "trading-service");
    bus.declare(&Topology::new().with_event::<TradeExecuted, _>(["game"]))
        .await?;

    let ledger_up = Arc::new(AtomicBool::new(false));
    let (alerts, mut alerted) = mpsc::unbounded_channel();
    let (handled, mut handled_rx) = mpsc::unbounded_channel();
    let resilience = Resilience::default()
        .with_timeout(Duration::from_millis(50))
        .with_alert(Arc::new(Pager(alerts)));
    let handler = resilience.handler(handler_fn({
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
    }));
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
    let admin = DeadLetterAdmin::new(transport);
    let topic = TradeExecuted::TYPE;
    // The loop dead-letters right after the alert.
    while admin.list(topic, 100).await?.len() < 3 {
        tokio::task::yield_now().await;
    }
    ledger_up.store(true, Ordering::SeqCst);

    let command: Vec<&str> = args.iter().map(String::as_str).collect();
    let redriven = match command.as_slice() {
        [] | ["list"] => {
            list(&admin, topic).await?;
            0
        }
        ["inspect", id] => {
            let id = resolve(&admin, topic, id).await?;
            print_letter(&admin.inspect(topic, &id).await?);
            0
        }
        ["redrive", id] => {
            let id = resolve(&admin, topic, id).await?;
            admin.redrive(topic, &id).await?;
            println!("redriven {id}");
            1
        }
        ["redrive-all"] => {
            let count = admin.redrive_all(topic).await?;
            println!("redriven {count}");
            count
        }
        _ => {
            eprintln!("usage: dlq [list | inspect <id|first> | redrive <id|first> | redrive-all]");
            std::process::exit(2);
        }
    };
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

async fn list(admin: &DeadLetterAdmin, topic: &str) -> Result<(), Error> {
    for letter in admin.list(topic, 100).await? {
        println!(
            "{}  {}  attempts={}  {}",
            letter.id, letter.dead_lettered_at, letter.attempts, letter.reason
        );
    }
    Ok(())
}

/// `first` stands for the oldest letter, since ids change with every run.
async fn resolve(admin: &DeadLetterAdmin, topic: &str, id: &str) -> Result<String, Error> {
    if id != "first" {
        return Ok(id.to_owned());
    }
    let oldest = admin.list(topic, 1).await?.into_iter().next();
    oldest
        .map(|letter| letter.id)
        .ok_or_else(|| Error::new(ErrorKind::NotFound, "the dead-letter queue is empty"))
}

fn print_letter(letter: &DeadLettered) {
    println!("id:          {}", letter.id);
    println!("topic:       {}", letter.topic);
    println!("group:       {}", letter.group);
    println!("reason:      {}", letter.reason);
    println!("attempts:    {}", letter.attempts);
    println!(
        "last error:  {}",
        letter.last_error.as_deref().unwrap_or("-")
    );
    println!("at:          {}", letter.dead_lettered_at);
    println!(
        "body:        {}",
        String::from_utf8_lossy(&letter.message.body)
    );
}
