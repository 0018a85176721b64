//! The RabbitMQ transport against the machine's broker (127.0.0.1:5672,
//! guest/guest): the conformance suite on classic and quorum queues.
//!
//! Every transport gets a random exchange (auto-deleted once its last queue
//! goes) and every queue an `x-expires`, so a failed run leaves nothing
//! behind on the shared broker.

use std::sync::Arc;
use std::time::Duration;

use switchboard::Transport;
use switchboard::transport::amqp::{AmqpConfig, AmqpTransport, QueueType};

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn config(queue_type: QueueType) -> AmqpConfig {
    AmqpConfig::new(BROKER)
        .with_exchange(format!("sb-test-{}", uuid::Uuid::new_v4().simple()))
        .with_exchange_auto_delete(true)
        .with_queue_expires(Duration::from_secs(60))
        .with_queue_type(queue_type)
}

async fn transport(queue_type: QueueType) -> Arc<dyn Transport> {
    Arc::new(
        AmqpTransport::connect(config(queue_type))
            .await
            .expect("RabbitMQ on 127.0.0.1:5672 (guest/guest)"),
    )
}

mod classic {
    use super::*;
    switchboard::conformance_tests!(|| transport(QueueType::Classic));
}

mod quorum {
    use super::*;
    switchboard::conformance_tests!(|| transport(QueueType::Quorum));
}
