//! Tests of the connection supervisor: node rotation and labels.

use super::super::open::{after, round};
use super::*;

#[test]
fn a_round_tries_every_node_once_from_its_start() {
    assert_eq!(round(0, 3).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(round(2, 3).collect::<Vec<_>>(), [2, 0, 1]);
    assert_eq!(round(0, 1).collect::<Vec<_>>(), [0]);
}

#[test]
fn after_a_loss_the_lost_node_is_tried_last() {
    for nodes in 1..5 {
        for lost in 0..nodes {
            let order: Vec<_> = round(after(lost, nodes), nodes).collect();
            assert_eq!(order.len(), nodes);
            assert_eq!(*order.last().unwrap(), lost, "{nodes} nodes, lost {lost}");
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..nodes).collect::<Vec<_>>(), "each node once");
        }
    }
}

#[test]
fn node_labels_carry_no_credentials() {
    let config =
        AmqpConfig::new_cluster(["amqp://app:secret@rabbit-1:5673/%2f", "amqp://rabbit-2"]);
    let supervisor = Supervisor::new(&config, Role::Publishing).expect("valid");
    let labels: Vec<_> = supervisor
        .nodes
        .iter()
        .map(|node| node.label.as_str())
        .collect();
    assert_eq!(labels, ["rabbit-1:5673", "rabbit-2:5672"]);
}

#[test]
fn an_invalid_node_uri_is_a_config_error_naming_it_without_password() {
    let config = AmqpConfig::new("amqp://rabbit-1").with_nodes(["http://u:secret@x"]);
    let error = Supervisor::new(&config, Role::Consuming)
        .err()
        .expect("invalid");
    assert_eq!(error.kind(), ErrorKind::Config);
    assert!(!error.message().contains("secret"), "{error}");
}

#[test]
fn passwords_are_kept_out_of_messages() {
    assert_eq!(
        redact("amqp://guest:secret@host:5672/%2f"),
        "amqp://guest:***@host:5672/%2f"
    );
    assert_eq!(redact("amqp://host"), "amqp://host");
}
