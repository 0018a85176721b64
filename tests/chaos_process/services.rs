//! `service_crash::`: the example services as separate processes (Auth,
//! Market and Game from `examples/{auth,market,game}.rs`, Trading's
//! session from `examples/trading.rs`) on the shared Redis, RabbitMQ and
//! PostgreSQL, one of them SIGKILLed mid-session and started again. At the
//! end the database decides: every order Trading committed is applied in
//! Game's holdings exactly once (one trade line and one inbox mark each,
//! holdings the sum of the orders) and settled.

use super::ledger::{self, Ledger};
use super::*;

/// One of Auth, Market, Game, started with the run's namespace and the
/// database, printing "listening on http://ADDR".
fn service(name: &'static str, namespace: &str, port: u16, extra: &[String]) -> Guarded {
    let mut command = Command::new(example(name));
    command
        .args(["--port", &port.to_string(), "--redis", SHARED_REDIS])
        .args(["--namespace", namespace])
        .args(["--database", &ledger::database_url()])
        .args(extra);
    Guarded::spawn(name, command)
}

/// The address in the service's "listening on http://ADDR" line.
async fn listening(service: &mut Guarded) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = service
            .output
            .lock()
            .expect("output lock")
            .iter()
            .find_map(|line| {
                let (_, after) = line.split_once("listening on http://")?;
                after.split_whitespace().next().map(str::to_owned)
            });
        if let Some(address) = found {
            return address;
        }
        if let Some(status) = service.exited() {
            panic!(
                "{} exited ({status}) before listening:\n{}",
                service.name,
                service.output()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} not listening within 60 s:\n{}",
            service.name,
            service.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Auth, Market and Game running as processes of their own.
struct Cluster {
    namespace: String,
    /// Auth's key directory; Game and Trading pin its key-signing key.
    keys: std::path::PathBuf,
    auth: (Guarded, String),
    market: (Guarded, String),
    game: (Guarded, String),
}

impl Cluster {
    async fn start(namespace: &str) -> Self {
        let keys = std::env::temp_dir().join(format!("switchboard-auth-keys-{namespace}"));
        let mut auth = service(
            "auth",
            namespace,
            0,
            &["--keys".to_owned(), keys.display().to_string()],
        );
        let mut market = service("market", namespace, 0, &[]);
        let (auth_at, market_at) = (listening(&mut auth).await, listening(&mut market).await);
        let mut cluster = Self {
            namespace: namespace.to_owned(),
            keys,
            auth: (auth, auth_at),
            market: (market, market_at),
            game: (Guarded::idle("game"), String::new()),
        };
        cluster.start_game(0).await;
        cluster
    }

    /// Game under a consumer name kept across its restarts, so a restarted
    /// Game takes up the entries its killed run held at once.
    async fn start_game(&mut self, port: u16) {
        let extra = [
            "--auth".to_owned(),
            self.auth.1.clone(),
            "--market".to_owned(),
            self.market.1.clone(),
            "--consumer".to_owned(),
            format!("game-{}", self.namespace),
            "--trust-anchor".to_owned(),
            self.trust_anchor(),
        ];
        let mut game = service("game", &self.namespace, port, &extra);
        let at = listening(&mut game).await;
        self.game = (game, at);
    }

    /// The file of Auth's key-signing key (public PEM).
    fn trust_anchor(&self) -> String {
        self.keys
            .join("key-signing-key.pub.pem")
            .display()
            .to_string()
    }

    fn session(&self, orders: u64) -> Guarded {
        let mut command = Command::new(example("trading"));
        command
            .args(["--redis", SHARED_REDIS, "--amqp", SHARED_AMQP])
            .args(["--namespace", &self.namespace])
            .args(["--orders", &orders.to_string()])
            .args(["--database", &ledger::database_url()])
            .args(["--auth", &self.auth.1, "--market", &self.market.1])
            .args(["--game", &self.game.1])
            .args(["--trust-anchor", &self.trust_anchor()]);
        Guarded::spawn("trading", command)
    }
}

/// Polls `count` until it reaches `at_least`, failing if `session` ends
/// first.
async fn until_count<F, Fut>(session: &mut Guarded, what: &str, at_least: u64, mut count: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = u64>,
{
    let deadline = Instant::now() + Duration::from_secs(180);
    while count().await < at_least {
        if let Some(status) = session.exited() {
            panic!(
                "the session ended ({status}) before {at_least} {what}:\n{}",
                session.output()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{at_least} {what} not reached in 180 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn stream_length(redis: &mut MultiplexedConnection, stream: &str) -> u64 {
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(redis)
        .await
        .unwrap_or(0)
}

/// Removes the run's streams and tables.
pub async fn clean_up(redis: &mut MultiplexedConnection, pool: &sqlx::PgPool, namespace: &str) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{namespace}.*"))
        .query_async(redis)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(&keys).query_async(redis).await;
    }
    ledger::drop_tables(pool, namespace).await;
}

/// Waits for `session` to end (at most `patience`).
async fn ends(session: &mut Guarded, patience: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(status) = session.exited() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the session did not end within {patience:?}:\n{}",
            session.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What went to `stream`'s dead-letter stream, for a failure's message.
async fn dead_letters(redis: &mut MultiplexedConnection, stream: &str) -> String {
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(format!("{stream}.dlq"))
        .arg("-")
        .arg("+")
        .query_async(redis)
        .await
        .unwrap_or_default();
    let mut text = format!("{} dead letters on {stream}.dlq", entries.len());
    for (id, fields) in entries.iter().take(5) {
        text.push_str(&format!(
            "\n  {id}: {:?}",
            fields.iter().filter(|f| f.len() < 300).collect::<Vec<_>>()
        ));
    }
    text
}

mod service_crash {
    use super::super::broker_restart::completes;
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a fault proof: scripts/smoke-services and scripts/chaos run it"]
    async fn trading_killed_mid_session_loses_no_committed_order_and_duplicates_none() {
        let orders = env_number("SWITCHBOARD_CHAOS_ORDERS", 600);
        let namespace = ledger::namespace();
        let pool = ledger::connect().await;
        let mut redis = connection(SHARED_REDIS).await;
        let cluster = Cluster::start(&namespace).await;
        let started = Instant::now();
        let mut first = cluster.session(orders);
        let kill_at = (orders / 3).max(1);
        until_count(&mut first, "orders committed", kill_at, || {
            ledger::orders(&pool, &namespace)
        })
        .await;
        first.kill();
        let killed_after = started.elapsed();
        let committed_at_kill = ledger::orders_settled(&pool, &namespace).await;
        let relayed_at_kill =
            stream_length(&mut redis, &format!("{namespace}.trade.executed")).await;

        // Started again: a new session (a new user) against the same
        // services and tables; its relays send what the killed run left.
        let more = (orders / 3).max(1);
        let mut second = cluster.session(more);
        completes(&mut second, Duration::from_secs(300)).await;
        let (ledger, caught_up) = Ledger::settle(&pool, &namespace, Duration::from_secs(60)).await;
        ledger.assert_exactly_once("Trading SIGKILLed and restarted");
        assert_eq!(ledger.orders, committed_at_kill + more);
        let sent = stream_length(&mut redis, &format!("{namespace}.trade.executed")).await;
        println!(
            "trading kill: SIGKILL after {committed_at_kill} orders committed ({:.1} s in; \
             {relayed_at_kill} of their trades relayed by then), restarted for {more} more; \
             {}; {sent} trade.executed on the stream ({} sent twice, absorbed by the inbox); \
             all applied and settled {:.1} s after the restarted session ended",
            killed_after.as_secs_f64(),
            ledger.figures(),
            sent.saturating_sub(ledger.orders),
            caught_up.as_secs_f64()
        );
        clean_up(&mut redis, &pool, &namespace).await;
    }

    /// Sends `signal` (`STOP`, `CONT`) to `process`.
    fn signal(process: &Guarded, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(process.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {}", process.name);
    }

    /// Of the entries `group` held unacknowledged on `stream`, how many
    /// Game had already applied (committed, not yet acked): the crash
    /// window, which the restarted Game receives again.
    async fn pending_and_applied(
        redis: &mut MultiplexedConnection,
        pool: &sqlx::PgPool,
        namespace: &str,
        stream: &str,
        group: &str,
    ) -> (u64, u64) {
        let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg("-")
            .arg("+")
            .arg(10_000)
            .query_async(redis)
            .await
            .unwrap_or_default();
        let mut applied = 0;
        for (id, ..) in &pending {
            let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
                .arg(stream)
                .arg(id)
                .arg(id)
                .query_async(redis)
                .await
                .expect("XRANGE");
            let Some((_, fields)) = entries.first() else {
                continue;
            };
            let event_id = fields
                .chunks(2)
                .find(|pair| pair[0] == "event_id")
                .map(|pair| pair[1].clone())
                .expect("an event_id field");
            let sql = format!("SELECT count(*) FROM {namespace}_game_trades WHERE event_id = $1");
            let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(event_id)
                .fetch_one(pool)
                .await
                .expect("count the trade");
            applied += count as u64;
        }
        (pending.len() as u64, applied)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a fault proof: scripts/smoke-services and scripts/chaos run it"]
    async fn game_killed_mid_batch_applies_each_trade_once() {
        let orders = env_number("SWITCHBOARD_CHAOS_ORDERS", 600);
        let namespace = ledger::namespace();
        let pool = ledger::connect().await;
        let mut redis = connection(SHARED_REDIS).await;
        let mut cluster = Cluster::start(&namespace).await;
        let started = Instant::now();
        let mut session = cluster.session(orders);
        // A backlog for Game: frozen (SIGSTOP) from a third of the orders
        // to two thirds, so it comes back to a batch of trades to work
        // through, and is killed in the middle of it.
        until_count(
            &mut session,
            "orders committed",
            (orders / 3).max(1),
            || ledger::orders(&pool, &namespace),
        )
        .await;
        signal(&cluster.game.0, "STOP");
        until_count(
            &mut session,
            "orders committed",
            (orders * 2 / 3).max(1),
            || ledger::orders(&pool, &namespace),
        )
        .await;
        let before = ledger::applied(&pool, &namespace).await;
        let backlog = ledger::orders(&pool, &namespace).await - before;
        signal(&cluster.game.0, "CONT");
        until_count(
            &mut session,
            "trades applied",
            before + (backlog / 2).max(1),
            || ledger::applied(&pool, &namespace),
        )
        .await;
        let game_port: u16 = cluster
            .game
            .1
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("Game's port");
        cluster.game.0.kill();
        let killed_after = started.elapsed();
        let stream = format!("{namespace}.trade.executed");
        let applied_at_kill = ledger::applied(&pool, &namespace).await;
        let (in_flight, window) =
            pending_and_applied(&mut redis, &pool, &namespace, &stream, "game").await;
        cluster.start_game(game_port).await;
        let back_after = started.elapsed() - killed_after;

        let ended = ends(&mut session, Duration::from_secs(300)).await;
        let (ledger, caught_up) = Ledger::settle(&pool, &namespace, Duration::from_secs(60)).await;
        if !ended.success() || !ledger.complete() {
            panic!(
                "Game SIGKILLed and restarted: {}\n{}\nsession:\n{}\nrestarted Game:\n{}",
                ledger.figures(),
                dead_letters(&mut redis, &stream).await,
                session.output(),
                cluster.game.0.output()
            );
        }
        ledger.assert_exactly_once("Game SIGKILLed and restarted");
        assert_eq!(ledger.orders, orders);
        assert!(
            applied_at_kill < before + backlog,
            "the kill came after the backlog was worked off: not mid-batch"
        );
        println!(
            "game kill: {orders} orders, a backlog of {backlog} trades, SIGKILL after {} of it applied \
             ({:.1} s in); {in_flight} delivered and unacknowledged at the kill, {window} of them \
             already applied (the crash window: delivered again, skipped by the inbox); back {:.1} s \
             later under its consumer name; {}; all applied {:.1} s after the session ended",
            applied_at_kill - before,
            killed_after.as_secs_f64(),
            back_after.as_secs_f64(),
            ledger.figures(),
            caught_up.as_secs_f64()
        );
        clean_up(&mut redis, &pool, &namespace).await;
    }
}
