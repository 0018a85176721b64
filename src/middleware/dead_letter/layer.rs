use std::sync::Arc;

use tower::Layer;

use super::{DeadLetterAlert, DeadLettering, LogOnly};

/// Wraps handlers in [`DeadLettering`].
#[derive(Debug, Clone)]
pub struct DeadLetteringLayer {
    alert: Arc<dyn DeadLetterAlert>,
}

impl DeadLetteringLayer {
    /// Logs each dead letter with `tracing` and tells `alert`.
    pub fn new(alert: Arc<dyn DeadLetterAlert>) -> Self {
        Self { alert }
    }

    /// Logs each dead letter with `tracing` only.
    pub fn log_only() -> Self {
        Self::new(Arc::new(LogOnly))
    }
}

impl Default for DeadLetteringLayer {
    fn default() -> Self {
        Self::log_only()
    }
}

impl<S> Layer<S> for DeadLetteringLayer {
    type Service = DeadLettering<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadLettering::new(inner, self.alert.clone())
    }
}
