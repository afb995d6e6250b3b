//! The ordered consumer that follows the stream: fetches, stall detection
//! and recreation from the next sequence.

use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy, pull::OrderedConfig};
use eventstore::EventStore;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;

use crate::Incoming;

use super::*;

/// Reads the stream from `from` into batches, a long backlog first in
/// ranges by several consumers at once (see [`read_ranges`]); recreates the
/// consumer after an error, from the sequence after the last one it sent.
pub(super) async fn fetch(
    store: EventStore,
    from: u64,
    tx: mpsc::Sender<Batch>,
    options: RunnerOptions,
    name: String,
    health: Health,
) {
    let mut next = from;
    let budget = Budget::new(FEED_BYTES_MAX);
    if let Ok(head) = store.last_seq().await {
        let end = options.stop_at.map_or(head, |stop| stop.min(head));
        if end >= from && end + 1 - from >= options.ranges_from_events {
            match read_ranges(&store, from, end, &tx, &options, &name).await {
                Some(reached) => next = reached,
                None => return, // receiver gone: we are being stopped
            }
        }
    }
    let mut backoff = BACKOFF_MIN;
    loop {
        let before = next;
        match fetch_once(&store, &mut next, &tx, &options, &health, &budget).await {
            Ok(()) => return, // receiver gone: we are being stopped
            Err(e) => {
                if next > before {
                    // It delivered before failing: a fresh fault, not a streak.
                    backoff = BACKOFF_MIN;
                }
                tracing::warn!(
                    projection = name,
                    from = next,
                    error = e,
                    "stream follower failed; recreating"
                );
                health.set(Some(format!("stream follower failed: {e}")));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// What the messages of one pull request may take, about. async-nats's
/// ordered consumer asks for a count (500, or `max_batch` when lower) with
/// no byte limit, and asks again when half have arrived, so up to one and
/// a half requests wait in the client, ahead of any [`Budget`]: 750
/// events of 100 KB were 75 MB per consumer, and a catch-up runs three.
const PULL_BYTES: u64 = 4 * 1024 * 1024;
/// A pull request asks for this many events at least, however big.
const PULL_EVENTS_MIN: i64 = 16;

/// The pull batch for `stream`: `pull_batch_max`, or fewer so that a
/// request of events of the stream's average size stays near
/// [`PULL_BYTES`].
#[must_use]
pub(super) fn pull_batch(stream: &async_nats::jetstream::stream::Info, pull_batch_max: i64) -> i64 {
    let state = &stream.state;
    let Some(average) = state.bytes.checked_div(state.messages) else {
        return pull_batch_max;
    };
    i64::try_from(PULL_BYTES / average.max(1))
        .unwrap_or(i64::MAX)
        .clamp(PULL_EVENTS_MIN.min(pull_batch_max), pull_batch_max)
}

/// The consumer a runner reads the stream with, from `start_sequence`:
/// ordered (no server state, no acks: the checkpoint in the projection's own
/// store is the position), with pull requests capped at `pull_batch_max`
/// messages (the library asks for at most 500). Public so a benchmark's raw
/// drain reads exactly the same way.
#[must_use]
pub fn follower_config(start_sequence: u64, pull_batch_max: i64) -> OrderedConfig {
    OrderedConfig {
        name: None,
        description: Some("projection follower".to_string()),
        filter_subject: String::new(),
        filter_subjects: Vec::new(),
        replay_policy: ReplayPolicy::Instant,
        rate_limit: 0,
        sample_frequency: 0,
        headers_only: false,
        deliver_policy: DeliverPolicy::ByStartSequence { start_sequence },
        max_waiting: 0,
        metadata: std::collections::HashMap::new(),
        max_batch: pull_batch_max,
        max_bytes: 0,
        max_expires: FETCH_EXPIRES,
    }
}

pub(super) async fn fetch_once(
    store: &EventStore,
    next: &mut u64,
    tx: &mpsc::Sender<Batch>,
    options: &RunnerOptions,
    health: &Health,
    budget: &Budget,
) -> Result<(), String> {
    let stream = store
        .jetstream()
        .get_stream(store.stream_name())
        .await
        .map_err(|e| e.to_string())?;
    let batch = pull_batch(stream.cached_info(), options.pull_batch_max);
    let consumer = stream
        .create_consumer(follower_config(*next, batch))
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    let prefix = store.subjects().clone();
    loop {
        let first = loop {
            match tokio::time::timeout(STALL_TIMEOUT, messages.next()).await {
                Ok(first) => break first,
                Err(_quiet) => {
                    let wanted = options.stop_at.is_none_or(|stop| *next <= stop);
                    match store.last_seq().await {
                        Ok(head) => {
                            health.set(None);
                            if wanted && head >= *next {
                                return Err(format!(
                                    "nothing delivered for {STALL_TIMEOUT:?} while the stream has sequence {next}; the consumer is presumed lost"
                                ));
                            }
                        }
                        Err(e) => health.set(Some(format!("stream unreachable: {e}"))),
                    }
                }
            }
        };
        let mut items = Vec::new();
        // Returns what the server still had for us after this message.
        let push = |msg: async_nats::jetstream::Message,
                    items: &mut Vec<Incoming>,
                    next: &mut u64|
         -> Result<u64, String> {
            let (seq, pending) = {
                let info = msg.info().map_err(|e| e.to_string())?;
                (info.stream_sequence, info.pending)
            };
            // A recreated consumer may resend: keep strict stream order.
            if seq >= *next && options.stop_at.is_none_or(|stop| seq <= stop) {
                items.push(to_incoming(&msg.message, seq, &prefix));
                *next = seq + 1;
            }
            Ok(pending)
        };
        let mut pending_after = match first {
            Some(Ok(msg)) => {
                health.set(None);
                push(msg, &mut items, next)?
            }
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("consumer closed".into()),
        };
        // Sized once from what the server still has: grown by doubling, a
        // catch-up's batches (2000 events of 216 bytes) cost several
        // reallocations each, and their fresh pages 2% of its CPU.
        items.reserve(
            usize::try_from(pending_after)
                .unwrap_or(usize::MAX)
                .min(options.batch_events_max.saturating_sub(1)),
        );
        let mut bytes = items.first().map_or(0, event_bytes);
        while items.len() < options.batch_events_max && bytes < BATCH_BYTES_MAX {
            let ready = match messages.next().now_or_never() {
                Some(m) => Some(m),
                // Behind the head, wait a moment for a fuller batch: tiny
                // ones cost a wake-up and a store transaction each.
                None if pending_after > 0
                    && items.len() < BATCH_FILL_MIN
                    && options.stop_at.is_none_or(|stop| *next <= stop) =>
                {
                    tokio::time::timeout(BATCH_FILL_WAIT, messages.next())
                        .await
                        .ok()
                }
                None => None,
            };
            match ready {
                Some(Some(Ok(msg))) => {
                    let had = items.len();
                    pending_after = push(msg, &mut items, next)?;
                    if items.len() > had {
                        bytes += items.last().map_or(0, event_bytes);
                    }
                }
                Some(Some(Err(e))) => {
                    if !items.is_empty() {
                        let share = budget.take(&items).await;
                        let batch = Batch {
                            items,
                            pending_after,
                            _bytes: share,
                        };
                        if tx.send(batch).await.is_err() {
                            return Ok(());
                        }
                    }
                    return Err(e.to_string());
                }
                Some(None) => return Err("consumer closed".into()),
                None => break,
            }
        }
        if items.is_empty() {
            if options.stop_at.is_some_and(|stop| *next > stop) {
                // Everything up to stop_at was sent; idle until stopped.
                std::future::pending::<()>().await;
            }
            continue;
        }
        let share = budget.take(&items).await;
        let batch = Batch {
            items,
            pending_after,
            _bytes: share,
        };
        if tx.send(batch).await.is_err() {
            return Ok(());
        }
    }
}
