//! The Redis Streams transport on a Redis Cluster: three private
//! `redis-server` nodes in cluster mode on free ports (each port and its bus
//! port, port + 10000, checked free), formed with `redis-cli --cluster
//! create`, polled until every node reports `cluster_state:ok`; then the
//! conformance cases run against it, one after another, and the nodes are
//! stopped by PID (also when a case panics).
//!
//! This file is its own test binary with a single test, so the cluster's
//! load never competes with the other Redis tests' cases.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard::Transport;
use switchboard::testing::{conformance, run_case};
use switchboard::transport::redis_streams::{RedisStreamsConfig, RedisStreamsTransport};

/// Three masters, no replicas; killed when dropped.
struct Cluster {
    ports: Vec<u16>,
    dir: PathBuf,
    nodes: Vec<Child>,
}

impl Cluster {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("sb-cluster-{}", uuid::Uuid::new_v4()));
        let ports = free_cluster_ports(3);
        let mut cluster = Self {
            ports: ports.clone(),
            dir,
            nodes: Vec::new(),
        };
        for port in ports {
            let node_dir = cluster.dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ])
                .args(["--cluster-node-timeout", "5000"])
                .args(["--appendonly", "no", "--save", ""])
                .arg("--dir")
                .arg(&node_dir)
                .args(["--logfile", "redis.log"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server (is it installed?)");
            cluster.nodes.push(child);
        }
        for &port in &cluster.ports {
            wait_for(port, "PING", |reply| reply.trim() == "PONG");
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for port in &cluster.ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let output = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        for &port in &cluster.ports {
            wait_for(port, "CLUSTER INFO", |reply| {
                reply.contains("cluster_state:ok")
            });
        }
        cluster
    }

    fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Ports whose cluster bus port (port + 10000) is free too.
fn free_cluster_ports(count: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    while ports.len() < count {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("address").port();
        let Some(bus) = port.checked_add(10_000) else {
            continue;
        };
        if ports.contains(&port) || ports.contains(&bus) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            ports.push(port);
        }
    }
    ports
}

/// Runs `redis-cli -p port <command>` until `done(reply)`, failing after 30 s.
fn wait_for(port: u16, command: &str, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(command.split(' '))
            .output()
            .expect("run redis-cli");
        let reply = String::from_utf8_lossy(&output.stdout);
        if done(&reply) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {port}: `{command}` still answers {reply:?} after 30 s"
        );
        // Polling processes we started; nothing to wait on instead.
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn conformance_cases_pass_on_a_three_node_cluster() {
    let cluster = Cluster::start();
    let urls = cluster.urls();
    let factory = || {
        let urls = urls.clone();
        async move {
            let config = RedisStreamsConfig::default()
                .with_claim_idle(Duration::from_millis(500))
                .with_block(Duration::from_millis(300));
            let transport = RedisStreamsTransport::connect_cluster(urls, config)
                .await
                .expect("connect to the cluster");
            Arc::new(transport) as Arc<dyn Transport>
        }
    };
    // A stream and its dead letters share a slot: hash-tagged keys.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let transport = runtime.block_on(async {
        RedisStreamsTransport::connect_cluster(urls.clone(), RedisStreamsConfig::default())
            .await
            .expect("connect to the cluster")
    });
    let (stream, dlq) = (
        transport.stream_key("trade.executed"),
        transport.dead_letter_key("trade.executed"),
    );
    assert_eq!(
        (stream.as_str(), dlq.as_str()),
        ("{trade.executed}", "{trade.executed}.dlq")
    );
    let slot = |key: &str| {
        let output = Command::new("redis-cli")
            .args([
                "-p",
                &cluster.ports[0].to_string(),
                "CLUSTER",
                "KEYSLOT",
                key,
            ])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    assert_eq!(slot(&stream), slot(&dlq));
    drop(transport);
    drop(runtime);

    run_case(factory, conformance::round_trip_keeps_payload_and_headers);
    run_case(
        factory,
        conformance::concurrent_publishers_and_subscribers_lose_nothing,
    );
    run_case(factory, conformance::topics_are_isolated);
    run_case(factory, conformance::bad_input_is_refused);
    run_case(factory, conformance::nack_redelivers);
    run_case(factory, conformance::groups_each_get_every_message_once);
    run_case(factory, conformance::order_is_kept_with_concurrency_one);
    run_case(
        factory,
        conformance::resubscriber_receives_what_was_published_meanwhile,
    );
    run_case(
        factory,
        conformance::shutdown_in_flight_then_new_subscriber_receives_everything,
    );
    run_case(
        factory,
        conformance::declared_topology_keeps_messages_published_before_subscribe,
    );
    run_case(
        factory,
        conformance::dead_letters_can_be_listed_inspected_and_redriven,
    );
    // The sorted set of scheduled messages shares its stream's slot, so the
    // mover's script runs on a cluster too.
    run_case(
        factory,
        conformance::scheduled_messages_arrive_not_before_their_time,
    );
    drop(cluster);
}
