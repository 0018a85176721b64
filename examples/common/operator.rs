//! The operator's dead-letter commands (strategy §6.3, "manual retry"): list,
//! inspect, redrive one, redrive all — on whichever transport holds the
//! queue. `examples/dlq.rs` is the command line around it; the tests call it
//! directly against Redis and RabbitMQ.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use switchboard::middleware::dead_letter::DeadLetterAdmin;
use switchboard::transport::amqp::{AmqpConfig, AmqpTransport};
use switchboard::{
    DeadLettered, Error, ErrorKind, MemoryTransport, RedisStreamsTransport, Topology, Transport,
};

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    List,
    /// One letter, all its facts; `first` = the oldest.
    Inspect(String),
    /// Send one back to its group; `first` = the oldest.
    Redrive(String),
    RedriveAll,
}

impl Command {
    /// From the words after the flags.
    pub fn parse(words: &[&str]) -> Option<Self> {
        Some(match words {
            [] | ["list"] => Command::List,
            ["inspect", id] => Command::Inspect((*id).to_owned()),
            ["redrive", id] => Command::Redrive((*id).to_owned()),
            ["redrive-all"] => Command::RedriveAll,
            _ => return None,
        })
    }
}

/// Which dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Memory,
    Redis,
    Amqp,
}

impl Kind {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "memory" => Some(Kind::Memory),
            "redis" => Some(Kind::Redis),
            "amqp" => Some(Kind::Amqp),
            _ => None,
        }
    }

    /// The broker a local install answers on.
    pub fn default_url(self) -> &'static str {
        match self {
            Kind::Memory => "",
            Kind::Redis => "redis://127.0.0.1:6379",
            Kind::Amqp => "amqp://guest:guest@127.0.0.1:5672",
        }
    }
}

/// Connects to the dead-letter queue of `group` on `topic`. The group is
/// declared (idempotent) because RabbitMQ keeps one dead-letter queue per
/// group and the transport looks them up from the declared topology.
pub async fn connect(
    kind: Kind,
    url: &str,
    topic: &str,
    group: &str,
) -> Result<Arc<dyn Transport>, Error> {
    let transport: Arc<dyn Transport> = match kind {
        Kind::Memory => Arc::new(MemoryTransport::new()),
        Kind::Redis => Arc::new(within(url, RedisStreamsTransport::connect(url)).await?),
        Kind::Amqp => Arc::new(within(url, AmqpTransport::connect(AmqpConfig::new(url))).await?),
    };
    transport
        .declare(&Topology::new().with_groups(topic, [group]))
        .await?;
    Ok(transport)
}

async fn within<T>(url: &str, connect: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
    let url = super::brokers::redact(url);
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(connected)) => Ok(connected),
        Ok(Err(error)) => Err(Error::new(
            ErrorKind::Connection,
            format!("cannot reach {url}: {error}; check --url"),
        )),
        Err(_) => Err(Error::new(
            ErrorKind::Connection,
            format!("no answer from {url} in 5 s; check --url"),
        )),
    }
}

/// Runs `command` on `topic`'s dead letters and returns what to print and
/// how many letters were redriven.
pub async fn execute(
    admin: &DeadLetterAdmin,
    topic: &str,
    command: &Command,
) -> Result<(String, usize), Error> {
    let mut out = String::new();
    let redriven = match command {
        Command::List => {
            let letters = admin.list(topic, 100).await?;
            if letters.is_empty() {
                writeln!(out, "no dead letters on {topic}").ok();
            }
            for letter in letters {
                writeln!(
                    out,
                    "{}  {}  group={}  attempts={}  {}",
                    letter.id,
                    letter.dead_lettered_at,
                    letter.group,
                    letter.attempts,
                    letter.reason
                )
                .ok();
            }
            0
        }
        Command::Inspect(id) => {
            let id = resolve(admin, topic, id).await?;
            describe(&mut out, &admin.inspect(topic, &id).await?);
            0
        }
        Command::Redrive(id) => {
            let id = resolve(admin, topic, id).await?;
            admin.redrive(topic, &id).await?;
            writeln!(out, "redriven {id}").ok();
            1
        }
        Command::RedriveAll => {
            let count = admin.redrive_all(topic).await?;
            writeln!(out, "redriven {count}").ok();
            count
        }
    };
    Ok((out, redriven))
}

/// `first` stands for the oldest letter, since ids change with every run.
async fn resolve(admin: &DeadLetterAdmin, topic: &str, id: &str) -> Result<String, Error> {
    if id != "first" {
        return Ok(id.to_owned());
    }
    let oldest = admin.list(topic, 1).await?.into_iter().next();
    oldest
        .map(|letter| letter.id)
        .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no dead letters on {topic}")))
}

fn describe(out: &mut String, letter: &DeadLettered) {
    let _ = writeln!(out, "id:          {}", letter.id);
    let _ = writeln!(out, "topic:       {}", letter.topic);
    let _ = writeln!(out, "group:       {}", letter.group);
    let _ = writeln!(out, "reason:      {}", letter.reason);
    let _ = writeln!(out, "attempts:    {}", letter.attempts);
    let _ = writeln!(
        out,
        "last error:  {}",
        letter.last_error.as_deref().unwrap_or("-")
    );
    let _ = writeln!(out, "at:          {}", letter.dead_lettered_at);
    let _ = writeln!(
        out,
        "body:        {}",
        String::from_utf8_lossy(&letter.message.body)
    );
}
