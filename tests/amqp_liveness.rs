//! RabbitMQ liveness proofs: a declaration the broker refuses fails only
//! what needed it, and a transport with two nodes fails over from one to the
//! other (both on the shared broker, through `FaultProxy`s), and, on a
//! private node of this binary's own, a node killed with SIGKILL while
//! publishers and a consumer run, and a node whose memory alarm blocks
//! publishing, and a node killed while scheduled messages wait in its delay
//! buckets (`amqp_liveness/scheduled.rs`). The node proofs run at full
//! size in `scripts/chaos` and
//! at CI's size through `scripts/chaos --short`; `scripts/test`'s main run
//! skips them (`--skip a_killed_node --skip a_blocked_node`). The cluster
//! proof (three private nodes of its own, the quorum queue leader's node
//! killed) is `#[ignore]`d and run by the long `scripts/chaos` only.
//!
//! Sizes: `SWITCHBOARD_NODE_MESSAGES` (default 2 000) messages in the kill
//! proof, `SWITCHBOARD_CLUSTER_MESSAGES` (default 20 000) in the cluster's.

use std::ops::Deref;
use std::time::Duration;

use switchboard::header;
use switchboard::transport::amqp::AmqpConfig;
use switchboard::{RawMessage, Subscription};
use tokio::sync::{Mutex, MutexGuard};
use uuid::Uuid;

#[path = "amqp_liveness/blocked.rs"]
mod blocked;
#[path = "amqp_liveness/cluster.rs"]
mod cluster;
#[path = "amqp_liveness/declarations.rs"]
mod declarations;
#[path = "amqp_liveness/failover.rs"]
mod failover;
#[path = "amqp_liveness/killed.rs"]
mod killed;
#[path = "amqp_liveness/load.rs"]
mod load;
#[path = "common/rabbit_node.rs"]
mod node;
#[path = "amqp_liveness/scheduled.rs"]
mod scheduled;

use node::Node;

const PATIENCE: Duration = Duration::from_secs(60);

/// The binary's one private node, started by the first test that needs
/// it; holding the guard serializes the tests that kill or alarm it.
static NODE: Mutex<Option<Node>> = Mutex::const_new(None);

struct NodeGuard(MutexGuard<'static, Option<Node>>);

impl Deref for NodeGuard {
    type Target = Node;
    fn deref(&self) -> &Node {
        self.0.as_ref().expect("started")
    }
}

async fn node() -> NodeGuard {
    let mut node = NODE.lock().await;
    if node.is_none() {
        *node = Some(
            tokio::task::spawn_blocking(Node::start)
                .await
                .expect("start the private node"),
        );
    }
    NodeGuard(node)
}

/// Logs to the test output when `RUST_LOG` is set.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn unique(label: &str) -> String {
    format!("{label}-{}", Uuid::new_v4().simple())
}

/// A transport's config for `uri` that notices a dead peer within a second
/// or two and reconnects quickly.
fn config(uri: String, publish_timeout: Duration) -> AmqpConfig {
    AmqpConfig::new(uri)
        .with_exchange(unique("sb-live"))
        .with_exchange_auto_delete(true)
        .with_queue_expires(Duration::from_secs(120))
        .with_heartbeat(Duration::from_secs(1))
        .with_reconnect_delay(Duration::from_millis(50), Duration::from_millis(500))
        .with_publish_timeout(publish_timeout)
}

fn seq_message(seq: u64) -> RawMessage {
    RawMessage::new(format!(r#"{{"seq":{seq}}}"#))
        .with_header("seq", seq.to_string())
        .with_header(header::EVENT_ID, Uuid::new_v4().to_string())
}

fn seq_of(delivery: &switchboard::Delivery) -> u64 {
    delivery.headers()["seq"].parse().expect("seq header")
}

async fn recv(subscription: &mut Subscription, what: &str) -> switchboard::Delivery {
    tokio::time::timeout(PATIENCE, subscription.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing delivered within {PATIENCE:?}"))
        .unwrap_or_else(|| panic!("{what}: the subscription ended"))
}
