//! Closing the RabbitMQ transport logs no error: both connections close
//! with `connection.close(200)` after the consumers' channels.

use std::sync::Arc;

use switchboard::transport::amqp::AmqpTransport;

#[path = "../common/clean_exit.rs"]
mod harness;

#[test]
fn a_closed_transport_exits_without_an_error_in_any_log() {
    harness::assert_clean_exit(
        "clean_exit::a_closed_transport_exits_without_an_error_in_any_log",
        || async {
            let transport = AmqpTransport::connect(super::config(super::QueueType::Classic))
                .await
                .expect("RabbitMQ on 127.0.0.1:5672 (guest/guest)");
            harness::publish_consume_close(Arc::new(transport), 20).await;
        },
    );
}
