//! One subscription's side of a group queue, and the acker its deliveries
//! settle by.

use super::*;

/// A nacked message waiting out its delay, with its permit.
struct Delayed {
    entry: Entry,
    permit: OwnedSemaphorePermit,
}

/// One subscription's side of a group queue.
pub(super) struct Consumer {
    topic: Arc<Topic>,
    queue: Arc<GroupQueue>,
    permits: Arc<Semaphore>,
    delays: DelayQueue<Delayed>,
    started: Instant,
    /// When the next lag sample is due, in ms since `started`; an atomic,
    /// since every take looks at it.
    next_lag_ms: AtomicU64,
}

impl Consumer {
    pub(super) fn new(topic: Arc<Topic>, queue: Arc<GroupQueue>, permits: Arc<Semaphore>) -> Self {
        Self {
            topic,
            queue,
            permits,
            delays: DelayQueue::default(),
            started: Instant::now(),
            next_lag_ms: AtomicU64::new(0),
        }
    }

    pub(super) async fn next(&self) -> Option<Delivery> {
        // A nacked message coming due is handed out again with its own
        // permit, whatever else this subscription waits for.
        let (mut entry, permit) = tokio::select! {
            due = self.delays.next_due() => (due.entry, due.permit),
            taken = async {
                let permit = self.permits.clone().acquire_owned().await.ok()?;
                let entry = self.queue.pop().await;
                Some((entry, permit))
            } => taken?,
        };
        self.sample_lag();
        {
            entry.deliveries += 1;
            let acker = MemoryAcker {
                topic: self.topic.clone(),
                queue: self.queue.clone(),
                delays: self.delays.clone(),
                id: entry.id,
                deliveries: entry.deliveries,
                unsettled: entry.unsettled,
                permit: Some(permit),
            };
            Some(
                Delivery::new(
                    entry.message,
                    self.topic.name.clone(),
                    self.queue.name.clone(),
                    entry.deliveries,
                    Box::new(acker),
                )
                .with_delivery_count(entry.unsettled + 1),
            )
        }
    }

    fn sample_lag(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        if now < self.next_lag_ms.load(Ordering::Relaxed) {
            return;
        }
        self.next_lag_ms
            .store(now + LAG_EVERY.as_millis() as u64, Ordering::Relaxed);
        let depth = self.queue.depth() as u64;
        metrics::consumer_lag(
            NAME,
            self.topic.name.clone(),
            self.queue.name.clone(),
            depth,
        );
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // A stopping subscription gives its nacked messages back at once.
        for (delayed, _left) in self.delays.close() {
            self.queue.push(delayed.entry);
        }
    }
}

struct MemoryAcker {
    topic: Arc<Topic>,
    queue: Arc<GroupQueue>,
    delays: DelayQueue<Delayed>,
    id: u64,
    deliveries: u32,
    unsettled: u32,
    /// Held until the delivery is settled for good or back in the queue;
    /// counts it against the prefetch (through a nack's delay too).
    permit: Option<OwnedSemaphorePermit>,
}

impl MemoryAcker {
    fn entry(&self, message: RawMessage) -> Entry {
        Entry {
            id: self.id,
            message,
            deliveries: self.deliveries,
            unsettled: self.unsettled,
        }
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&mut self, _message: &RawMessage) -> Result<(), Error> {
        self.permit = None;
        Ok(())
    }

    fn ack_at_once(&mut self, _message: &RawMessage) -> Option<Result<(), Error>> {
        self.permit = None;
        Some(Ok(()))
    }

    async fn nack(&mut self, message: &RawMessage, delay: Duration) -> Result<(), Error> {
        let entry = self.entry(message.clone());
        let Some(permit) = self.permit.take() else {
            return Err(Error::closed("memory delivery"));
        };
        if delay.is_zero() {
            self.queue.push(entry);
            return Ok(());
        }
        let delayed = Delayed { entry, permit };
        if let Err(delayed) = self.delays.push(delay, delayed) {
            // The subscription stopped: back in the queue now.
            self.queue.push(delayed.entry);
        }
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        message: &RawMessage,
        letter: &DeadLetter,
    ) -> Result<(), Error> {
        let id = match message.headers.get(header::EVENT_ID) {
            Some(event_id) => event_id.clone(),
            None => self.id.to_string(),
        };
        lock(&self.topic.dead_letters).push_back(DeadLettered {
            id,
            topic: self.topic.name.to_string(),
            group: self.queue.name.to_string(),
            message: message.clone(),
            reason: letter.reason().to_owned(),
            attempts: letter.attempts().unwrap_or(self.deliveries),
            last_error: letter.last_error().map(str::to_owned),
            dead_lettered_at: Utc::now(),
        });
        self.permit = None;
        Ok(())
    }

    /// Out of sight for a pause that doubles with each give-back (10 ms up
    /// to 1 s), then at the back of the group's queue for any member; the
    /// permit is freed now. Its attempt count stays: a give-back is not an
    /// attempt.
    async fn give_back(&mut self, message: &RawMessage, _reason: &str) -> Result<(), Error> {
        let Some(permit) = self.permit.take() else {
            return Err(Error::closed("memory delivery"));
        };
        drop(permit);
        let times = message
            .headers
            .get(header::GIVEN_BACK)
            .and_then(|times| times.parse().ok())
            .unwrap_or(1);
        let mut entry = self.entry(message.clone());
        entry.deliveries = entry.deliveries.saturating_sub(1);
        self.queue.park(give_back_pause(times), entry);
        Ok(())
    }

    fn abandoned(&mut self, message: RawMessage) {
        // Like a broker whose consumer went away: the message is due again
        // now, one more delivery without an outcome.
        let mut entry = self.entry(message);
        entry.unsettled += 1;
        self.queue.push(entry);
        self.permit = None;
    }
}
