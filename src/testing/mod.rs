//! Test utilities (feature `test-util`): the transport conformance suite.
//!
//! Any [`Transport`] — one of this crate's or one written elsewhere — proves
//! it keeps the delivery contract by expanding [`conformance_tests!`](crate::conformance_tests) in a
//! test file with a factory that builds a fresh transport:
//!
//! ```
//! // tests/conformance_memory.rs
//! use std::sync::Arc;
//! use switchboard::{MemoryTransport, Transport};
//!
//! switchboard::conformance_tests!(|| async {
//!     Arc::new(MemoryTransport::new()) as Arc<dyn Transport>
//! });
//! # fn main() {}
//! ```
//!
//! That expands to one `#[test]` per case of [`conformance`]. The core cases
//! run on every transport; the rest run by what
//! [`Transport::capabilities`] claims, and for an operation that is not
//! claimed they check that it fails with
//! [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) instead of
//! silently succeeding (in the spirit of Watermill's universal pub/sub tests).
//!
//! Every case uses fresh random topic names, so cases run in parallel against
//! one broker and reruns never see stale data. Two environment variables
//! tune the suite:
//!
//! * `SWITCHBOARD_CONFORMANCE_MESSAGES` — messages in the concurrent case
//!   (default and minimum 5000);
//! * `SWITCHBOARD_CONFORMANCE_TIMEOUT_SECS` — how long a case waits for
//!   messages before it fails, listing the ids still missing (default 60).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::transport::Transport;

mod claimed;
pub mod conformance;
mod dead_letters;
pub mod delayed;
pub mod flow;
mod lifecycle;
pub mod outcomes;
pub mod proxy;

/// Expands to one `#[test]` per conformance case, each running against a
/// transport built by `$factory` (an `Fn() -> impl Future<Output =
/// Arc<dyn Transport>>`, called once per case inside the test's runtime).
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(@cases $factory;
            round_trip_keeps_payload_and_headers,
            concurrent_publishers_and_subscribers_lose_nothing,
            topics_are_isolated,
            bad_input_is_refused,
            nack_redelivers,
            groups_each_get_every_message_once,
            order_is_kept_with_concurrency_one,
            resubscriber_receives_what_was_published_meanwhile,
            shutdown_in_flight_then_new_subscriber_receives_everything,
            declared_topology_keeps_messages_published_before_subscribe,
            dead_letters_can_be_listed_inspected_and_redriven,
            a_requeue_storm_holds_only_the_prefetch,
            a_poison_message_is_dead_lettered_after_max_deliveries,
            a_publish_nothing_would_receive_is_refused_or_kept,
            a_handler_that_gives_up_is_never_a_silent_success,
            a_mixed_group_hands_each_version_to_a_member_that_reads_it,
            what_no_member_can_read_is_dead_lettered_past_the_give_back_limit,
            typed_dead_letters_are_alerted_once_stored_and_redriven_by_key_or_id,
            close_ends_subscriptions_and_refuses_new_work,
            scheduled_messages_arrive_not_before_their_time,
        );
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::testing::run_case($factory, $crate::testing::conformance::$case);
            }
        )*
    };
}

/// Runs one conformance case on a fresh two-worker runtime: builds the
/// transport with `factory`, then runs `case` against it.
pub fn run_case<F, FFut, C, CFut>(factory: F, case: C)
where
    F: FnOnce() -> FFut,
    FFut: Future<Output = Arc<dyn Transport>>,
    C: FnOnce(Arc<dyn Transport>) -> CFut,
    CFut: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime for the conformance case");
    runtime.block_on(async move {
        let transport = factory().await;
        case(transport).await;
    });
}

/// Messages in the concurrent case (`SWITCHBOARD_CONFORMANCE_MESSAGES`,
/// at least 5000).
pub fn message_count() -> usize {
    env_number("SWITCHBOARD_CONFORMANCE_MESSAGES").map_or(5000, |count| count.max(5000) as usize)
}

/// How long a case waits for messages
/// (`SWITCHBOARD_CONFORMANCE_TIMEOUT_SECS`, default 60 s).
pub fn patience() -> Duration {
    Duration::from_secs(env_number("SWITCHBOARD_CONFORMANCE_TIMEOUT_SECS").unwrap_or(60))
}

pub(crate) fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    match text.trim().parse() {
        Ok(number) => Some(number),
        Err(_) => panic!("{name}={text:?} is not a whole number"),
    }
}
