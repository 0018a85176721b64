//! What each fuzz target checks of one input, shared by the targets in
//! `fuzz_targets/` and by `tests/decode.rs`, which replays the saved
//! corpora as plain tests: never a panic, whatever the bytes.

/// CloudEvents structured mode: any JSON document is read or refused.
pub fn cloudevents(bytes: &[u8]) {
    let Ok(document) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return;
    };
    let _ = switchboard::cloudevents::from_structured_value(&document);
    let _ = switchboard::cloudevents::from_structured_value_with(&document, Some("1.0"));
}

/// A Redis Pub/Sub payload, framed or plain, always becomes a message.
pub fn pubsub_frame(bytes: &[u8]) {
    let message =
        switchboard::transport::redis_pubsub::decode_payload(bytes::Bytes::copy_from_slice(bytes));
    assert!(message.body.len() <= bytes.len());
}

/// A gRPC push request body is decoded or refused.
pub fn push_request(bytes: &[u8]) {
    use prost::Message as _;
    let _ = switchboard::transport::grpc::proto::DeliverRequest::decode(bytes);
}

/// Every YAML config the crate reads is parsed or refused with a
/// configuration error.
pub fn config_yaml(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let config_error = |result: Result<(), switchboard::Error>| {
        if let Err(error) = result {
            assert_eq!(error.kind(), switchboard::ErrorKind::Config, "{error}");
        }
    };
    config_error(switchboard::config::ResilienceConfig::from_yaml(text).map(drop));
    config_error(switchboard::transport::push::PushConfig::from_yaml(text).map(drop));
    config_error(switchboard::observe::BudgetConfig::from_yaml(text).map(drop));
    config_error(switchboard::Topology::from_yaml(text).map(drop));
}
