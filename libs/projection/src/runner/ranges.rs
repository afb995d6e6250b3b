//! Reading a long backlog in ranges, several ordered consumers at once,
//! each on a connection of its own, handed over in order.

use eventstore::{EventStore, RecordedEvent};
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::Incoming;

use super::*;

/// Keeps only the decoded envelope: the message, header map included, is
/// dropped here rather than held in every queued batch (a dead-letter copy
/// is read back from the stream instead).
pub(super) fn to_incoming(
    msg: &async_nats::Message,
    seq: u64,
    prefix: &eventstore::Subjects,
) -> Incoming {
    Incoming {
        seq,
        envelope: RecordedEvent::from_message(msg, seq, prefix),
    }
}

/// What a range reader hands over for one range.
pub(super) enum RangePart {
    Events(Vec<Incoming>, Option<tokio::sync::OwnedSemaphorePermit>),
    /// The range is done: every event of it was handed over.
    Done,
    Failed(String),
}

/// Reads `from..=end` in ranges of `options.range_events`, range `i` by
/// reader `i % RANGE_READERS`, each reader an ordered consumer per range on
/// a connection of its own, and hands the batches over in stream order.
///
/// One consumer's rate is bounded by its connection's task, which parses
/// every message (headers into maps, allocations) on one core: `just
/// bench`'s raw drain spends 6 us per event in the client against 3 in
/// nats-server. Two connections parse on two cores.
///
/// Returns the sequence after the last event handed over: `end + 1`, or
/// less when a reader failed (the caller reads on from there with one
/// consumer, which has the recovery logic); `None` when `tx` closed.
pub(super) async fn read_ranges(
    store: &EventStore,
    from: u64,
    end: u64,
    tx: &mpsc::Sender<Batch>,
    options: &RunnerOptions,
    name: &str,
) -> Option<u64> {
    let range = options.range_events.max(1);
    let ranges = (end + 1 - from).div_ceil(range);
    // Range `i`'s first and last sequence.
    let bounds = move |i: u64| (from + i * range, (from + (i + 1) * range - 1).min(end));
    // Dropped on return, aborting the readers (and closing their connections).
    let mut readers = tokio::task::JoinSet::new();
    let mut parts = Vec::new();
    // Room for a whole range ahead, so a reader never waits on the handover
    // while the range before its own is handed over.
    let depth = usize::try_from(range)
        .unwrap_or(usize::MAX)
        .div_ceil(RANGE_BATCH_EVENTS)
        .saturating_add(2);
    let pull_batch_max = match store.jetstream().get_stream(store.stream_name()).await {
        Ok(stream) => super::fetch::pull_batch(stream.cached_info(), options.pull_batch_max),
        Err(_) => options.pull_batch_max,
    };
    for reader in 0..RANGE_READERS.min(ranges) {
        let (part_tx, part_rx) = mpsc::channel(depth);
        parts.push(part_rx);
        let store = store.clone();
        readers.spawn(async move {
            let own = (reader..ranges)
                .step_by(usize::try_from(RANGE_READERS).unwrap_or(1))
                .map(bounds);
            if let Err(e) = read_range_set(store, reader, own, pull_batch_max, &part_tx).await {
                let _ = part_tx.send(RangePart::Failed(e)).await;
            }
        });
    }
    tracing::info!(
        projection = name,
        from,
        end,
        ranges,
        "reading a backlog in ranges"
    );
    let mut next = from;
    for i in 0..ranges {
        let (_, range_end) = bounds(i);
        let part_rx = &mut parts[usize::try_from(i % RANGE_READERS).unwrap_or(0)];
        loop {
            match part_rx.recv().await {
                Some(RangePart::Events(mut items, bytes)) => {
                    // Each reader hands its ranges over in order; keep
                    // strict stream order whatever happens.
                    items.retain(|e| e.seq >= next && e.seq <= range_end);
                    let Some(last) = items.last().map(|e| e.seq) else {
                        continue;
                    };
                    next = last + 1;
                    let batch = Batch {
                        items,
                        pending_after: end - last,
                        _bytes: bytes,
                    };
                    if tx.send(batch).await.is_err() {
                        return None;
                    }
                }
                Some(RangePart::Done) => {
                    next = range_end + 1;
                    break;
                }
                Some(RangePart::Failed(error)) => {
                    tracing::warn!(
                        projection = name,
                        from = next,
                        error,
                        "range reader failed; reading on with one consumer"
                    );
                    return Some(next);
                }
                None => return Some(next),
            }
        }
    }
    Some(next)
}

/// One reader's ranges, in order: reader 0 on `store`'s own connection, the
/// others each on a new one.
pub(super) async fn read_range_set(
    store: EventStore,
    reader: u64,
    bounds: impl Iterator<Item = (u64, u64)>,
    pull_batch_max: i64,
    parts: &mpsc::Sender<RangePart>,
) -> Result<(), String> {
    let store = if reader == 0 {
        store
    } else {
        store
            .reader()
            .await?
            .ok_or("no URLs to open another connection with")?
    };
    let prefix = store.subjects().clone();
    let budget = Budget::new(RANGE_READER_BYTES_MAX);
    for (first, last) in bounds {
        let consumer = store
            .stream()
            .create_consumer(follower_config(first, pull_batch_max))
            .await
            .map_err(|e| e.to_string())?;
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        let mut items = Vec::with_capacity(RANGE_BATCH_EVENTS);
        let mut bytes = 0;
        loop {
            // Every event of the range is in the stream already.
            let msg = match tokio::time::timeout(STALL_TIMEOUT, messages.next()).await {
                Ok(Some(Ok(msg))) => msg,
                Ok(Some(Err(e))) => return Err(e.to_string()),
                Ok(None) => return Err("consumer closed".into()),
                Err(_) => {
                    return Err(format!(
                        "nothing delivered for {STALL_TIMEOUT:?} in range {first}..={last}"
                    ));
                }
            };
            let seq = msg.info().map_err(|e| e.to_string())?.stream_sequence;
            if seq > last {
                break;
            }
            let incoming = to_incoming(&msg.message, seq, &prefix);
            bytes += event_bytes(&incoming);
            items.push(incoming);
            if seq == last {
                break;
            }
            if items.len() >= RANGE_BATCH_EVENTS || bytes >= BATCH_BYTES_MAX {
                let full = std::mem::replace(&mut items, Vec::with_capacity(RANGE_BATCH_EVENTS));
                bytes = 0;
                let share = budget.take(&full).await;
                if parts.send(RangePart::Events(full, share)).await.is_err() {
                    return Ok(());
                }
            }
        }
        if !items.is_empty() {
            let share = budget.take(&items).await;
            if parts.send(RangePart::Events(items, share)).await.is_err() {
                return Ok(());
            }
        }
        if parts.send(RangePart::Done).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}
