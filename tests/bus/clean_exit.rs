//! Closing the in-memory transport through the bus logs nothing alarming.

use std::sync::Arc;

use switchboard::MemoryTransport;

#[path = "../common/clean_exit.rs"]
mod harness;

#[test]
fn a_closed_bus_exits_without_an_error_in_any_log() {
    harness::assert_clean_exit(
        "clean_exit::a_closed_bus_exits_without_an_error_in_any_log",
        || async { harness::publish_consume_close(Arc::new(MemoryTransport::new()), 20).await },
    );
}
