use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use super::{Dedupe, DedupeStore, DedupeTtls, MemoryDedupeStore};

/// Wraps handlers in [`Dedupe`], all sharing one store.
#[derive(Clone)]
pub struct DedupeLayer {
    store: Arc<dyn DedupeStore>,
    ttls: DedupeTtls,
}

impl DedupeLayer {
    /// Marks kept in `store`, with the default [`DedupeTtls`].
    pub fn new(store: Arc<dyn DedupeStore>) -> Self {
        Self {
            store,
            ttls: DedupeTtls::default(),
        }
    }

    /// Marks kept in a new in-process [`MemoryDedupeStore`].
    pub fn in_memory() -> Self {
        Self::new(Arc::new(MemoryDedupeStore::new()))
    }

    /// Sets all three durations.
    pub fn with_ttls(mut self, ttls: DedupeTtls) -> Self {
        self.ttls = ttls;
        self
    }

    /// Sets how long an in-progress mark lives.
    pub fn with_in_progress_ttl(mut self, ttl: Duration) -> Self {
        self.ttls.in_progress = ttl;
        self
    }

    /// Sets how long a done mark lives.
    pub fn with_done_ttl(mut self, ttl: Duration) -> Self {
        self.ttls.done = ttl;
        self
    }

    /// Sets how soon a delivery that found its event in progress comes back.
    pub fn with_requeue_delay(mut self, delay: Duration) -> Self {
        self.ttls.requeue = delay;
        self
    }

    /// The durations in use.
    pub fn ttls(&self) -> DedupeTtls {
        self.ttls
    }
}

impl<S> Layer<S> for DedupeLayer {
    type Service = Dedupe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Dedupe::new(inner, self.store.clone(), self.ttls)
    }
}

impl fmt::Debug for DedupeLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupeLayer")
            .field("ttls", &self.ttls)
            .finish_non_exhaustive()
    }
}
