//! The in-memory dead-letter queue: list, inspect and redrive.

use async_trait::async_trait;

use super::{Entry, MemoryTransport, lock};
use crate::error::{Error, ErrorKind};
use crate::transport::{DeadLetterQueue, DeadLettered, Redrive};

#[async_trait]
impl DeadLetterQueue for MemoryTransport {
    async fn list(&self, topic: &str, limit: usize) -> Result<Vec<DeadLettered>, Error> {
        let Some(topic) = self.topic(topic) else {
            return Ok(Vec::new());
        };
        let letters = lock(&topic.dead_letters);
        Ok(letters.iter().take(limit).cloned().collect())
    }

    async fn inspect(&self, topic: &str, id: &str) -> Result<DeadLettered, Error> {
        self.topic(topic)
            .and_then(|state| {
                lock(&state.dead_letters)
                    .iter()
                    .find(|letter| letter.id == id)
                    .cloned()
            })
            .ok_or_else(|| not_found(topic, id))
    }

    async fn redrive(&self, topic: &str, which: Redrive) -> Result<usize, Error> {
        let state = self.topic(topic);
        let taken: Vec<DeadLettered> = match (&state, &which) {
            (None, Redrive::All) => Vec::new(),
            (None, Redrive::One(id)) => return Err(not_found(topic, id)),
            (Some(state), Redrive::All) => lock(&state.dead_letters).drain(..).collect(),
            (Some(state), Redrive::One(id)) => {
                let mut letters = lock(&state.dead_letters);
                let position = letters
                    .iter()
                    .position(|letter| &letter.id == id)
                    .ok_or_else(|| not_found(topic, id))?;
                letters.remove(position).into_iter().collect()
            }
        };
        let count = taken.len();
        if let Some(state) = state {
            for letter in taken {
                state
                    .group(&letter.group)
                    .push(Entry::new(self.next_id(), letter.message));
            }
        }
        Ok(count)
    }
}

fn not_found(topic: &str, id: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("no dead letter {id:?} on topic {topic:?}"),
    )
}
