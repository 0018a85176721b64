//! The in-memory transport passes the whole conformance suite.

use std::sync::Arc;

use switchboard::{MemoryTransport, Transport};

switchboard::conformance_tests!(|| async {
    Arc::new(MemoryTransport::new()) as Arc<dyn Transport>
});
