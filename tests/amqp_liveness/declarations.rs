//! A declaration the broker refuses fails the subscription or `declare`
//! that needed it, with the broker's reason, and is not remembered: the
//! next reconnection does not fail on it, and everything else resumes.

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use switchboard::testing::proxy::FaultProxy;
use switchboard::transport::amqp::{AmqpTransport, ConnectionState};
use switchboard::{ErrorKind, Publisher, SubscribeOptions, Subscriber, Topology, Transport};

use super::{PATIENCE, config, init_tracing, recv, seq_message, seq_of, unique};

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_declaration_fails_what_needed_it_and_no_reconnection() {
    init_tracing();
    let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap())
        .await
        .expect("proxy");
    let uri = format!("amqp://guest:guest@{}/%2f", proxy.addr());
    let transport = AmqpTransport::connect(config(uri, std::time::Duration::from_secs(5)))
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (guest/guest)");
    let topic = unique("refused");
    let queue = transport.config().queue_name(&topic, "bad").expect("name");

    // Another application owns the queue, with other arguments.
    let raw = Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .expect("raw connection");
    let channel = raw.create_channel().await.expect("raw channel");
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(5));
    arguments.insert("x-expires".into(), AMQPValue::LongInt(60_000));
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .expect("the other application's queue");

    let error = transport
        .subscribe(&topic, SubscribeOptions::new("bad"))
        .await
        .expect_err("the broker refuses the queue's arguments");
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    assert!(!error.is_retryable(), "{error}");
    assert!(error.message().contains("PRECONDITION_FAILED"), "{error}");
    let error = transport
        .declare(&Topology::new().with_groups(topic.clone(), ["bad"]))
        .await
        .expect_err("declare fails the same way");
    assert!(error.message().contains("PRECONDITION_FAILED"), "{error}");

    let mut good = transport
        .subscribe(&topic, SubscribeOptions::new("good"))
        .await
        .expect("another group's subscription is not affected");

    // A network blip: both connections come back, and the refused queue
    // does not keep them down.
    proxy.cut();
    proxy.all_closed().await;
    proxy.restore();
    for (which, mut state) in [
        ("publishing", transport.connection_state()),
        ("consuming", transport.consumer_connection_state()),
    ] {
        tokio::time::timeout(
            PATIENCE,
            state.wait_for(|state| *state == ConnectionState::Connected),
        )
        .await
        .unwrap_or_else(|_| panic!("the {which} connection is back within {PATIENCE:?}"))
        .expect("state watch");
    }
    transport
        .publish(&topic, seq_message(7))
        .await
        .expect("publish after the blip");
    let delivery = recv(&mut good, "the good group after the blip").await;
    assert_eq!(seq_of(&delivery), 7);
    delivery.ack().await.expect("ack");
    assert!(
        transport.connection_health().is_up(),
        "{:?}",
        transport.connection_health()
    );
}
