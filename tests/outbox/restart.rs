//! A private PostgreSQL crashed (immediate stop) and restarted while the
//! relay runs: the relay waits it out and resumes; nothing is lost.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use switchboard::outbox::{Outbox, Relay, RelayConfig};
use switchboard::{
    EventBus, MemoryTransport, Message, SubscribeOptions, Topology, Transport, handler_fn,
};

use super::support::{Step, WITHIN, eventually, step};

const BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL server of this test's own, in a temporary directory owned
/// by the `postgres` user; killed by its own pid when dropped.
struct PrivatePostgres {
    dir: PathBuf,
    port: u16,
}

fn as_postgres(command: &str) -> bool {
    Command::new("su")
        .args(["postgres", "-c", command])
        .output()
        .map(|output| output.status.success())
        .unwrap_or(false)
}

impl PrivatePostgres {
    fn start() -> Option<Self> {
        if !Path::new(BIN).join("initdb").exists() {
            return None;
        }
        let dir = std::env::temp_dir().join(format!("sb-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).ok()?;
        Command::new("chown")
            .args(["postgres:postgres", dir.to_str()?])
            .status()
            .ok()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let server = Self { dir, port };
        let initdb = format!(
            "{BIN}/initdb -D {}/data -A trust -U postgres >/dev/null",
            server.dir.display()
        );
        if !as_postgres(&initdb) || !server.up() {
            return None;
        }
        Some(server)
    }

    /// Starts the server on its data directory (again, after a crash) and
    /// waits until it accepts connections (`pg_ctl -w`).
    fn up(&self) -> bool {
        let d = self.dir.display();
        as_postgres(&format!(
            "{BIN}/pg_ctl -D {d}/data -o '-p {} -k {d} -c listen_addresses=127.0.0.1' \
             -l {d}/log -w start >/dev/null",
            self.port
        ))
    }

    /// A crash: no checkpoint, no goodbye to the clients.
    fn crash(&self) -> bool {
        as_postgres(&format!(
            "{BIN}/pg_ctl -D {}/data -m immediate -w stop >/dev/null",
            self.dir.display()
        ))
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // The postmaster's pid is the first line of its pid file.
        let pid_file = self.dir.join("data/postmaster.pid");
        if let Ok(text) = std::fs::read_to_string(pid_file)
            && let Some(pid) = text.lines().next()
        {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn enqueue_all(
    outbox: &Outbox<sqlx::Postgres>,
    pool: &sqlx::PgPool,
    range: std::ops::Range<u64>,
) {
    for n in range {
        let mut tx = pool.begin().await.unwrap();
        outbox.enqueue_event(&mut tx, step("k", n)).await.unwrap();
        tx.commit().await.unwrap();
    }
}

#[tokio::test]
async fn a_postgres_crash_and_restart_under_the_relay_loses_nothing() {
    crash_and_restart(false).await;
}

#[tokio::test]
async fn with_synchronous_deletes_a_crash_repeats_at_most_the_two_batches_in_flight() {
    crash_and_restart(true).await;
}

async fn crash_and_restart(synchronous_deletes: bool) {
    let Some(server) = PrivatePostgres::start() else {
        eprintln!("skipped: no PostgreSQL 15 binaries to start a private server with");
        return;
    };
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&server.url())
        .await
        .unwrap();
    let outbox = Outbox::new("r_", "test").unwrap();
    outbox.migrate(&pool).await.unwrap();

    let memory: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let bus = EventBus::new(memory.clone(), "test");
    bus.declare(&Topology::new().with_event::<Step, _>(["seen"]))
        .await
        .unwrap();
    let received = Arc::new(Mutex::new(Vec::<u64>::new()));
    let log = received.clone();
    let consumer = bus
        .subscribe(
            SubscribeOptions::new("seen").with_concurrency(1),
            handler_fn(move |message: Message<Step>| {
                log.lock().unwrap().push(message.payload().n);
                async { Ok(()) }
            }),
        )
        .await
        .unwrap();

    enqueue_all(&outbox, &pool, 0..200).await;
    let relay = Relay::new(&outbox, pool.clone(), memory)
        .with_config(
            RelayConfig::default()
                .with_batch_size(5)
                .with_poll_interval(Duration::from_millis(10))
                .with_backoff(Duration::from_millis(20), Duration::from_millis(200))
                .with_synchronous_deletes(synchronous_deletes),
        )
        .spawn();
    eventually("the relay is under way", WITHIN, || async {
        !received.lock().unwrap().is_empty()
    })
    .await;
    assert!(server.crash(), "immediate stop");
    eventually("the relay meets the outage", WITHIN, || async {
        relay.stats().failures() > 0
    })
    .await;
    assert!(server.up(), "restart on the same data");
    enqueue_all(&outbox, &pool, 200..250).await;

    eventually("every row arrives", WITHIN, || async {
        received
            .lock()
            .unwrap()
            .iter()
            .collect::<HashSet<_>>()
            .len()
            == 250
    })
    .await;
    eventually("the outbox drains", WITHIN, || async {
        outbox
            .pending(&pool)
            .await
            .map(|(n, _)| n == 0)
            .unwrap_or(false)
    })
    .await;
    relay.close(Duration::from_secs(5)).await.unwrap();
    consumer.shutdown().await.unwrap();

    let received = received.lock().unwrap().clone();
    // In order by first arrival; a repeat only of a row sent when the
    // crash came, before it was deleted.
    let mut seen = HashSet::new();
    let firsts: Vec<u64> = received
        .iter()
        .copied()
        .filter(|n| seen.insert(*n))
        .collect();
    assert_eq!(
        firsts,
        (0..250).collect::<Vec<_>>(),
        "none lost, none out of order"
    );
    // The relay deletes with asynchronous commits: the deletes of the last
    // moments before the crash are undone and those rows sent again. Only
    // rows sent before the crash can repeat.
    let repeats = received.len() - firsts.len();
    let mut counted = HashSet::new();
    for n in &received {
        if !counted.insert(*n) {
            assert!(
                *n < 200,
                "row {n}, written after the restart, was sent twice"
            );
        }
    }
    if synchronous_deletes {
        // The batch being deleted and the one published meanwhile.
        assert!(
            repeats <= 2 * 5,
            "at most the two batches in flight, got {repeats}"
        );
    }
    eprintln!(
        "PostgreSQL crash (synchronous deletes {synchronous_deletes}): 0 lost, {repeats} sent twice"
    );
}
