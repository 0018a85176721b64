//! A private RabbitMQ node for the fault proofs (`tests/amqp_liveness.rs`,
//! `tests/chaos_process.rs`): its own name, ports and data directory, so
//! killing it or raising its memory alarm never touches the machine's
//! shared broker.
//!
//! One node per test binary for the single-node proofs: it takes about 9 s
//! to start; the cluster proof starts three of its own and joins them with
//! [`Node::join`]. A watchdog shell
//! started beside it kills the node (by the pid in its pid file, which a
//! restart rewrites) and removes its directory once this process is gone,
//! however it ends — a panic, or a SIGKILL of the test binary.

// Each binary that includes this file uses a part of it.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a start may take before the test gives up.
const START_PATIENCE: Duration = Duration::from_secs(90);

pub struct Node {
    dir: PathBuf,
    name: String,
    port: u16,
    dist_port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

fn run(command: &mut Command, what: &str) -> String {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("{what}: {error}"));
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl Node {
    /// Starts a node on free ports in a new directory and waits until it
    /// answers.
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("sb-rabbit-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(dir.join("mnesia")).expect("node dir");
        std::fs::create_dir_all(dir.join("log")).expect("node log dir");
        let port = free_port();
        let node = Self {
            name: format!("sbtest-{}@localhost", uuid::Uuid::new_v4().simple()),
            dist_port: free_port(),
            port,
            dir,
        };
        std::fs::write(
            node.dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .expect("rabbitmq.conf");
        std::fs::write(node.dir.join("enabled_plugins"), "[].\n").expect("enabled_plugins");
        // rabbitmq-server drops to the rabbitmq user, which must own it all.
        run(
            Command::new("chown")
                .arg("-R")
                .arg("rabbitmq:rabbitmq")
                .arg(&node.dir),
            "chown the node directory",
        );
        node.watchdog();
        node.launch();
        node
    }

    // Never waited for: it must outlive this process to clean up after it.
    #[allow(clippy::zombie_processes)]
    fn watchdog(&self) {
        let script = format!(
            "while kill -0 {me} 2>/dev/null; do sleep 1; done; \
             pid=$(cat {dir}/pid 2>/dev/null); kill -9 $pid 2>/dev/null; \
             while kill -0 $pid 2>/dev/null; do sleep 0.1; done; rm -rf {dir}",
            me = std::process::id(),
            dir = self.dir.display(),
        );
        // In a session of its own: whoever ends this process's group (a CI
        // runner, a terminal) must not take the watchdog with it.
        Command::new("setsid")
            .arg("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the node's watchdog");
    }

    /// Starts the node on its directory (again, after a kill: with its
    /// data) and waits until it accepts connections.
    pub fn launch(&self) {
        let dir = &self.dir;
        let _ = std::fs::remove_file(dir.join("pid"));
        run(
            Command::new("rabbitmq-server")
                .arg("-detached")
                .env("RABBITMQ_NODENAME", &self.name)
                .env("RABBITMQ_NODE_PORT", self.port.to_string())
                .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
                .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
                .env("RABBITMQ_LOG_BASE", dir.join("log"))
                .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
                .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
                .env("RABBITMQ_PID_FILE", dir.join("pid")),
            "rabbitmq-server -detached",
        );
        let deadline = Instant::now() + START_PATIENCE;
        while !self.answers() || self.pid().is_none() {
            assert!(
                Instant::now() < deadline,
                "the private node did not answer on {} within {START_PATIENCE:?}; logs in {}",
                self.port,
                dir.join("log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn answers(&self) -> bool {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    }

    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// SIGKILLs the node (a crash: nothing flushed, nothing closed) and
    /// waits until its port is closed.
    pub fn kill(&self) {
        let pid = self.pid().expect("the node's pid");
        run(
            Command::new("kill").arg("-9").arg(pid.to_string()),
            "kill -9 the private node",
        );
        let deadline = Instant::now() + START_PATIENCE;
        while self.answers() {
            assert!(Instant::now() < deadline, "the killed node still answers");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (at most `START_PATIENCE`) until every one of these quorum
    /// `queues` has its name in the node's Ra name table on disk. RabbitMQ
    /// 3.10 writes a new queue's entry from a cache up to about 3 s later; a
    /// node killed before that restarts the queue as a new, empty member
    /// that never elects a leader.
    pub fn wait_until_registered_on_disk(&self, queues: &[String]) {
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            let missing = self.unregistered_on_disk(queues);
            if missing.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the node's Ra name table does not name {missing:?} after {START_PATIENCE:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Which of these quorum `queues` the node's Ra name table on disk does
    /// not name yet.
    pub fn unregistered_on_disk<'q>(&self, queues: &'q [String]) -> Vec<&'q String> {
        let table = self
            .dir
            .join("mnesia")
            .join(&self.name)
            .join("quorum")
            .join(&self.name)
            .join("names.dets");
        let written = std::fs::read(table).unwrap_or_default();
        queues
            .iter()
            .filter(|queue| !contains(&written, queue.as_bytes()))
            .collect()
    }

    /// Joins this node to `first`'s cluster (they share the rabbitmq
    /// user's Erlang cookie): its app stopped, joined, started again.
    pub fn join(&self, first: &Node) {
        self.ctl(&["stop_app"]);
        self.ctl(&["join_cluster", &first.name]);
        self.ctl(&["start_app"]);
        let deadline = Instant::now() + START_PATIENCE;
        while !self.answers() {
            assert!(
                Instant::now() < deadline,
                "{} did not answer after joining the cluster",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The Erlang node name, as `rabbitmqctl` and `list_queues leader`
    /// name it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `host:port`, as `AmqpHealth` names a node.
    pub fn label(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `rabbitmqctl -n <node> args…`.
    pub fn ctl(&self, args: &[&str]) -> String {
        run(
            Command::new("rabbitmqctl")
                .arg("-n")
                .arg(&self.name)
                .args(args),
            &format!("rabbitmqctl {}", args.join(" ")),
        )
    }

    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

/// A node started by a test that owns it (the cluster's) is killed and its
/// directory removed when the test ends, a panic included; the binary's
/// shared node lives in a static and is left to its watchdog.
impl Drop for Node {
    fn drop(&mut self) {
        // Only a process that is still this node: a pid from a file of a
        // node killed earlier may have been reused by now.
        if let Some(pid) = self.pid() {
            // The node's name is in its environment, not on its command line.
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let this_node = format!("RABBITMQ_NODENAME={}", self.name);
            if environ
                .split(|byte| *byte == 0)
                .any(|entry| entry == this_node.as_bytes())
            {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
                // A node still dying writes files into a directory being
                // removed, leaving part of it behind: wait until it is gone.
                let deadline = Instant::now() + Duration::from_secs(10);
                while std::path::Path::new(&format!("/proc/{pid}")).exists()
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}
