use std::sync::Arc;
use std::time::Duration;

use eventstore::EventStore;
use tokio::sync::watch;

use crate::status::{ProjectionState, Status};
use crate::{Incoming, Parked, Projection};

pub(crate) mod dlq;
mod feed;
mod fetch;
mod ranges;
#[cfg(test)]
mod tests;

use dlq::*;
pub use feed::*;
pub use fetch::*;
use ranges::*;

/// Capped exponential backoff for transient faults (NATS down, disk full).
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// With nothing new for this long, make what was applied visible.
const IDLE_FLUSH: Duration = Duration::from_millis(20);
/// ... unless the server said more is pending: then only after this long
/// (the feed is held up by another runner or by the server).
const IDLE_FLUSH_BEHIND: Duration = Duration::from_millis(1000);
/// While the server has more for the follower, a batch is handed over once
/// it holds this many events (or [`BATCH_FILL_WAIT`] passed without one):
/// catching up, what is ready at any instant can be a few dozen messages.
const BATCH_FILL_MIN: usize = 500;
const BATCH_FILL_WAIT: Duration = Duration::from_millis(5);
/// How often the consumer's idle heartbeat is expected; missing ones make the
/// ordered consumer recreate itself.
const FETCH_EXPIRES: Duration = Duration::from_secs(5);
/// A follower handed nothing for this long while the stream holds events past
/// its position is presumed lost and recreated (from the next sequence, as
/// the library's own recovery does). Two causes: a restarted nats-server
/// forgets ephemeral consumers, and the client library notices only after
/// ~15 s (five consumer-info retries on reconnect); and async-nats 0.51's
/// pull stream can stop pulling mid-backlog, at a 500-message boundary, when
/// a pull request's acknowledgement reaches the stream after messages of
/// that pull (its pending count saturates at zero, then overshoots; `just
/// bench` on a loaded 2-core machine hit it in about one catch-up in 30,
/// always at sequence 500k + 1). The library
/// recovers only after two missed heartbeats, 2 × `FETCH_EXPIRES`. A false
/// alarm (a delivery gap this long under load) costs one consumer re-creation.
const STALL_TIMEOUT: Duration = Duration::from_millis(500);
/// Consumers reading a long backlog at once, one range each (see
/// [`read_ranges`]).
const RANGE_READERS: u64 = 2;
/// The backlog from which a feed reads in ranges, and the range length. A
/// range is one ordered consumer, made and dropped (the events the server
/// sent past the range's end are read again by the next range's reader, at
/// most a pull of 500 per range); a reader keeps up to a range in memory
/// ahead of the one being handed over, ~20 MB in `just bench`.
const RANGES_FROM_EVENTS: u64 = 50_000;
const RANGE_EVENTS: u64 = 25_000;
/// Events per batch a range reader hands over.
const RANGE_BATCH_EVENTS: usize = 500;

#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// Events per batch handed to `apply_batch`: one redb transaction each.
    pub batch_events_max: usize,
    /// Batches fetched ahead while one is being applied.
    pub batches_ahead_max: usize,
    /// The consumer's `max_batch`: a cap on one pull request. async-nats
    /// 0.51's ordered stream asks for 500 messages a pull whatever this is,
    /// so values of 500 and more all read 500 at a time.
    pub pull_batch_max: i64,
    /// Apply nothing past this sequence (aligning two stores to one checkpoint).
    pub stop_at: Option<u64>,
    /// A backlog at least this long (from where the feed starts to the
    /// stream's last sequence then) is read in ranges of `range_events`,
    /// by [`RANGE_READERS`] consumers at once, each on a connection of its
    /// own (see [`read_ranges`]); `u64::MAX` never does.
    pub ranges_from_events: u64,
    /// Events per range when reading in ranges.
    pub range_events: u64,
}

impl RunnerOptions {
    /// Live following: small enough batches that a read-your-writes wait is
    /// short, big enough to catch up a backlog at full speed.
    #[must_use]
    pub fn live() -> Self {
        Self {
            batch_events_max: 2_000,
            // The feed waits for the slowest subscriber's queue, so while
            // a search index commits (about 0.1-0.2 s a second while catching
            // up), a redb view only has what is queued for it. With 8 batches
            // it ran dry and both cores idled through part of each commit:
            // 32 took idle time during catch-up from 3.7% to 1.8% of the
            // two cores (3 profiled runs each) for ~13 MiB more peak RSS.
            batches_ahead_max: 32,
            pull_batch_max: 2_000,
            stop_at: None,
            ranges_from_events: tuned("FEED_RANGES_FROM_EVENTS", RANGES_FROM_EVENTS),
            range_events: tuned("FEED_RANGE_EVENTS", RANGE_EVENTS),
        }
    }

    /// Replay from sequence 1: large batches, deep pipeline.
    #[must_use]
    pub fn replay() -> Self {
        Self {
            batch_events_max: 10_000,
            batches_ahead_max: 8,
            pull_batch_max: 5_000,
            stop_at: None,
            ranges_from_events: tuned("FEED_RANGES_FROM_EVENTS", RANGES_FROM_EVENTS),
            range_events: tuned("FEED_RANGE_EVENTS", RANGE_EVENTS),
        }
    }
}

/// `default`, or in debug builds the number in env var `name`: the chaos
/// suite makes the range phase start at a backlog it can write in seconds
/// (kills mid-range). Release builds read nothing: not a setting.
fn tuned(name: &str, default: u64) -> u64 {
    #[cfg(debug_assertions)]
    if let Some(v) = std::env::var(name).ok().and_then(|v| v.parse().ok()) {
        return v;
    }
    let _ = name;
    default
}

struct Batch {
    items: Vec<Incoming>,
    /// Messages the server still had for us after the last one of the batch.
    pending_after: u64,
    /// The batch's share of its reader's [`Budget`], given back when the
    /// last runner is done with it.
    _bytes: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What one reader of the stream may hold in batches not yet applied, in
/// bytes: the event counts (batches of 2000, 32 queued per runner, ranges
/// of 25k read ahead) bound nothing when events are 100 KB each, and a
/// catch-up of such events took several GB.
const FEED_BYTES_MAX: usize = 24 * 1024 * 1024;
/// The same for each range reader (each its own, so that the reader of the
/// range being handed over never waits on one reading ahead).
const RANGE_READER_BYTES_MAX: usize = 16 * 1024 * 1024;
/// A batch is handed over at this size whatever its event count.
const BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;
/// What an event takes beyond its payload: envelope strings, the struct.
const EVENT_OVERHEAD_BYTES: usize = 320;

/// A byte budget in KiB permits: a batch takes its size before it is handed
/// over and gives it back when dropped.
#[derive(Clone)]
struct Budget {
    permits: Arc<tokio::sync::Semaphore>,
    kib_max: u32,
}

impl Budget {
    fn new(bytes_max: usize) -> Self {
        let kib_max = u32::try_from(bytes_max / 1024).unwrap_or(u32::MAX).max(1);
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(kib_max as usize)),
            kib_max,
        }
    }

    /// Waits until `items` fit, and returns their share; `None` only if the
    /// budget was closed (never).
    async fn take(&self, items: &[Incoming]) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let kib = u32::try_from(events_bytes(items).div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, self.kib_max);
        self.permits.clone().acquire_many_owned(kib).await.ok()
    }
}

fn event_bytes(i: &Incoming) -> usize {
    EVENT_OVERHEAD_BYTES + i.envelope.as_ref().map_or(0, |e| e.payload.len())
}

fn events_bytes(items: &[Incoming]) -> usize {
    items.iter().map(event_bytes).sum()
}

impl Batch {
    fn last_seq(&self) -> u64 {
        self.items.last().map_or(0, |i| i.seq)
    }
}

/// Follows a stream into one projection until stopped.
pub struct Runner {
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<Option<Box<dyn Projection>>>,
}

impl Runner {
    /// Starts following from `projection.checkpoint() + 1` on a feed of its own.
    #[must_use]
    pub fn start(
        projection: Box<dyn Projection>,
        store: EventStore,
        status: Arc<Status>,
        options: RunnerOptions,
    ) -> Self {
        let feed = Feed::start(store, &options, projection.name());
        Self::start_on(projection, &feed, status, options)
    }

    /// Starts following from `projection.checkpoint() + 1` on a shared feed.
    /// `options.stop_at` is the feed's business, not the runner's.
    #[must_use]
    pub fn start_on(
        projection: Box<dyn Projection>,
        feed: &Feed,
        status: Arc<Status>,
        options: RunnerOptions,
    ) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let handle = tokio::spawn(supervise(
            projection,
            feed.clone(),
            status,
            options,
            stop_rx,
        ));
        Self { stop, handle }
    }

    /// Stops after the batch in progress, flushes, and hands the projection back.
    pub async fn stop(self) -> Option<Box<dyn Projection>> {
        let _ = self.stop.send(true);
        self.handle.await.ok().flatten()
    }
}

/// How long [`drain_to`] lets its projection stay halted (faulting again
/// on every retry, as a full disk does) before it gives up: a replay then
/// fails with the fault instead of waiting forever.
const DRAIN_HALTED_MAX: Duration = Duration::from_secs(10);

/// Why [`drain_to`] did not reach its target.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("projection runner died (apply panicked)")]
    RunnerDied,
    #[error("projection halted for {0:?} at sequence {1}: {2}")]
    Halted(Duration, u64, String),
}

/// Runs `projection` until its visible checkpoint reaches `target_seq`
/// exactly (nothing past it is applied), then stops and returns it. Used to
/// rebuild and to align two stores on one checkpoint.
///
/// # Errors
/// When the runner dies before reaching the target, or stays halted on a
/// fault for [`DRAIN_HALTED_MAX`].
pub async fn drain_to(
    projection: Box<dyn Projection>,
    store: EventStore,
    status: Arc<Status>,
    mut options: RunnerOptions,
    target_seq: u64,
) -> Result<Box<dyn Projection>, DrainError> {
    if projection.visible() >= target_seq {
        return Ok(projection);
    }
    options.stop_at = Some(target_seq);
    let mut runner = Runner::start(projection, store, status.clone(), options);
    let mut halted_since: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            reached = status.wait_visible(target_seq, Duration::from_millis(100)) => {
                if reached {
                    break;
                }
            }
            // The runner ends only when stopped, or when it panicked.
            _ = &mut runner.handle => return Err(DrainError::RunnerDied),
        }
        if status.state() == ProjectionState::Halted {
            let since = *halted_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= DRAIN_HALTED_MAX {
                let error = status.last_error().unwrap_or_default();
                let _ = runner.stop().await;
                return Err(DrainError::Halted(
                    DRAIN_HALTED_MAX,
                    status.visible(),
                    error,
                ));
            }
        } else {
            halted_since = None;
        }
    }
    runner.stop().await.ok_or(DrainError::RunnerDied)
}

async fn supervise(
    mut projection: Box<dyn Projection>,
    feed: Feed,
    status: Arc<Status>,
    options: RunnerOptions,
    mut stop: watch::Receiver<bool>,
) -> Option<Box<dyn Projection>> {
    let name = projection.name().to_string();
    let store = feed.store.clone();
    let mut backoff = BACKOFF_MIN;
    let mut undelivered: Vec<Parked> = Vec::new();
    let mut stats = CatchUpStats::new();
    reconcile_dlq(&store, &name, projection.parked_recent(), &mut undelivered).await;
    // After its first fault the runner reads from a feed of its own: resuming
    // from its checkpoint on the shared feed would rewind it, and every
    // healthy projection would receive again what it had applied.
    let mut own_feed: Option<Feed> = None;
    let mut restarts = 0_u64;
    'restart: loop {
        if restarts > 0 && own_feed.is_none() {
            own_feed = Some(Feed::start(store.clone(), &options, &name));
        }
        restarts += 1;
        let from = projection.checkpoint() + 1;
        status.set_visible(projection.visible());
        status.set_applied(projection.checkpoint());
        let head = store.last_seq().await.unwrap_or(u64::MAX);
        if projection.visible() >= head {
            status.mark_caught_up();
        }
        // Dropped before every backoff: a runner sleeping on a fault must not
        // hold the feed back (it blocks on a subscriber whose queue is full).
        let mut rx = own_feed
            .as_ref()
            .unwrap_or(&feed)
            .subscribe(from, options.batches_ahead_max);
        // First sequence not yet handed to the projection: a shared feed may
        // re-send what this runner already applied when another rewinds it.
        let mut next_seq = from;
        let mut dirty = false;
        let mut applied_upto = 0;
        // Messages the server had left after the last batch.
        let mut last_pending = 0;
        let mut idle_since = std::time::Instant::now();
        // Since the last batch was done with: idle ticks count as waiting.
        let mut waited = std::time::Instant::now();
        loop {
            let next = tokio::select! {
                biased;
                _ = stop.wait_for(|stopped| *stopped) => None,
                b = tokio::time::timeout(IDLE_FLUSH, rx.recv()) => Some(b),
            };
            let batch = match next {
                None => {
                    // A flush that fails leaves applied events that are not
                    // durable: drop them (back to the checkpoint), so that the
                    // store handed back resumes from what it holds.
                    let (p, res) = run_blocking(projection, |p| match p.flush() {
                        Ok(()) => Ok(Ok(())),
                        Err(e) => p.recover().map(|()| Err(e)),
                    })
                    .await?;
                    match res {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::error!(
                            projection = name,
                            error = %e,
                            checkpoint = p.checkpoint(),
                            "flush at stop failed; what it held is re-applied from the stream at the next start"
                        ),
                        Err(e) => tracing::error!(
                            projection = name,
                            error = %e,
                            "flush at stop failed, and so did dropping what it held"
                        ),
                    }
                    status.set_visible(p.visible());
                    return Some(p);
                }
                Some(Err(_idle)) => {
                    // More is known to be coming (this runner waits on a
                    // slower one sharing the feed): flush only once the
                    // wait gets long, so a backlog is not cut into commits.
                    let behind = last_pending > 0 && idle_since.elapsed() < IDLE_FLUSH_BEHIND;
                    if dirty && !behind && projection.flush_due() {
                        let (p, res) = flush_visible(
                            projection,
                            &status,
                            applied_upto,
                            last_pending == 0,
                            &mut stats,
                        )
                        .await?;
                        projection = p;
                        match res {
                            Ok(clean) => dirty = !clean,
                            Err(e) => {
                                fault(&status, &name, &e.0);
                                drop(rx);
                                projection =
                                    recover(projection, &status, &name, &mut backoff, &mut stop)
                                        .await?;
                                continue 'restart;
                            }
                        }
                    }
                    deliver_dlq(&store, &name, &mut undelivered).await;
                    continue;
                }
                Some(Ok(None)) => {
                    // The fetch task only ends when aborted; treat as a fault.
                    fault(&status, &name, "stream follower ended");
                    drop(rx);
                    projection =
                        recover(projection, &status, &name, &mut backoff, &mut stop).await?;
                    continue 'restart;
                }
                Some(Ok(Some(batch))) => batch,
            };
            let mut pending_after = batch.pending_after;
            let mut count = batch.items.len();
            let mut chunks = vec![batch];
            // Batches that queued up while the last one was applied go in
            // together: one store transaction instead of many small ones.
            while count < options.batch_events_max {
                match rx.try_recv() {
                    Ok(more) => {
                        count += more.items.len();
                        pending_after = more.pending_after;
                        chunks.push(more);
                    }
                    Err(_) => break,
                }
            }
            stats.wait += waited.elapsed();
            waited = std::time::Instant::now();
            last_pending = pending_after;
            idle_since = std::time::Instant::now();
            let last = chunks.iter().map(|c| c.last_seq()).max().unwrap_or(0);
            if last < next_seq {
                continue; // all re-sent after another subscriber rewound the feed
            }
            let from_seq = next_seq;
            next_seq = last + 1;
            stats.events += last + 1 - from_seq;
            stats.batches += 1;
            let started = std::time::Instant::now();
            let (p, result) = match tokio::task::spawn_blocking(move || {
                let items: Vec<&Incoming> = chunks
                    .iter()
                    .flat_map(|c| c.items.iter())
                    .filter(|i| i.seq >= from_seq)
                    .collect();
                projection.set_backlog(pending_after);
                let r = projection.apply_batch(&items);
                if r.is_ok() {
                    trace_links(projection.name(), &items);
                }
                // The last runner done with a batch frees it, here rather
                // than on the runtime's threads.
                drop(items);
                drop(chunks);
                (projection, r)
            })
            .await
            {
                Ok(v) => v,
                Err(join) => {
                    tracing::error!(projection = name, error = %join, "apply panicked; projection lost");
                    status.set_state(ProjectionState::Halted);
                    status.set_error(Some(format!("apply panicked: {join}")));
                    return None;
                }
            };
            projection = p;
            stats.apply += started.elapsed();
            waited = std::time::Instant::now();
            match result {
                Ok(parked) => {
                    backoff = BACKOFF_MIN;
                    status.set_error(None);
                    if status.state() == ProjectionState::Halted {
                        status.set_state(ProjectionState::Running);
                    }
                    if !parked.is_empty() {
                        status.set_parked_total(projection.parked_total());
                        for p in parked {
                            tracing::warn!(
                                projection = name,
                                seq = p.seq,
                                reason = p.reason,
                                "event parked"
                            );
                            undelivered.push(p);
                        }
                        deliver_dlq(&store, &name, &mut undelivered).await;
                    }
                    dirty = true;
                    applied_upto = last;
                    status.set_applied(last);
                    status.set_visible(projection.visible());
                    if pending_after == 0 && rx.is_empty() && projection.flush_due() {
                        let (p, res) =
                            flush_visible(projection, &status, applied_upto, true, &mut stats)
                                .await?;
                        projection = p;
                        match res {
                            Ok(clean) => dirty = !clean,
                            Err(e) => {
                                fault(&status, &name, &e.0);
                                drop(rx);
                                projection =
                                    recover(projection, &status, &name, &mut backoff, &mut stop)
                                        .await?;
                                continue 'restart;
                            }
                        }
                    }
                }
                Err(e) => {
                    fault(&status, &name, &e.0);
                    drop(rx);
                    projection =
                        recover(projection, &status, &name, &mut backoff, &mut stop).await?;
                    continue 'restart;
                }
            }
        }
    }
}

/// Where a runner's time went until it first caught up: reading the log
/// line tells whether a slow catch-up waited on the stream or on its store.
struct CatchUpStats {
    /// When the runner started.
    since: std::time::Instant,
    events: u64,
    batches: u64,
    wait: Duration,
    apply: Duration,
    /// The flush that made it visible at the head.
    last_flush: Duration,
    reported: bool,
}

impl CatchUpStats {
    fn new() -> Self {
        Self {
            since: std::time::Instant::now(),
            events: 0,
            batches: 0,
            wait: Duration::ZERO,
            apply: Duration::ZERO,
            last_flush: Duration::ZERO,
            reported: false,
        }
    }

    fn report(&mut self, name: &str, status: &Status) {
        if self.reported || status.caught_up_once() {
            self.reported = true;
            return;
        }
        self.reported = true;
        tracing::info!(
            projection = name,
            events = self.events,
            batches = self.batches,
            wall_s = self.since.elapsed().as_secs_f64(),
            apply_s = self.apply.as_secs_f64(),
            wait_s = self.wait.as_secs_f64(),
            last_flush_s = self.last_flush.as_secs_f64(),
            "caught up"
        );
    }
}

async fn run_blocking<T: Send + 'static>(
    mut projection: Box<dyn Projection>,
    f: impl FnOnce(&mut dyn Projection) -> T + Send + 'static,
) -> Option<(Box<dyn Projection>, T)> {
    tokio::task::spawn_blocking(move || {
        let r = f(projection.as_mut());
        (projection, r)
    })
    .await
    .ok()
}

/// Flushes and publishes what became visible. `Ok(true)` when everything
/// applied up to `applied_upto` is visible; with `at_head` (the server had
/// nothing more) the projection has then caught up.
async fn flush_visible(
    projection: Box<dyn Projection>,
    status: &Status,
    applied_upto: u64,
    at_head: bool,
    stats: &mut CatchUpStats,
) -> Option<(Box<dyn Projection>, Result<bool, crate::ProjectionError>)> {
    let started = std::time::Instant::now();
    let (p, res) = run_blocking(projection, |p| p.flush()).await?;
    stats.last_flush = started.elapsed();
    let res = res.map(|()| {
        let clean = p.visible() >= applied_upto;
        if clean && at_head {
            // Logged before readers waiting on `min_seq` are woken (the
            // bench stops the service as soon as they answer).
            stats.report(p.name(), status);
            status.mark_caught_up();
        }
        status.set_visible(p.visible());
        clean
    });
    Some((p, res))
}

fn fault(status: &Status, name: &str, error: &str) {
    tracing::warn!(
        projection = name,
        error,
        "projection fault; will retry from checkpoint"
    );
    status.set_state(ProjectionState::Halted);
    status.set_error(Some(error.to_string()));
}

async fn recover(
    projection: Box<dyn Projection>,
    status: &Status,
    name: &str,
    backoff: &mut Duration,
    stop: &mut watch::Receiver<bool>,
) -> Option<Box<dyn Projection>> {
    // `wait_for`, not `changed`: a stop asked for during the backoff must
    // still be seen by the caller's next wait, which `changed` would have
    // consumed (and `Runner::stop` then waited forever).
    tokio::select! {
        _ = stop.wait_for(|stopped| *stopped) => {},
        () = tokio::time::sleep(*backoff) => {},
    }
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    let (p, res) = run_blocking(projection, |p| p.recover()).await?;
    if let Err(e) = res {
        tracing::error!(projection = name, error = %e, "recover failed");
        status.set_error(Some(e.0));
    }
    Some(p)
}

/// The apply of a batch, linked to the trace of each event it applied: a
/// batch mixes traces, so each event's trace id is recorded with the batch
/// rather than made its parent. At debug level under target
/// `projection::trace` (`RUST_LOG=projection::trace=debug`); checked once
/// per batch, so it costs nothing when off.
fn trace_links(projection: &str, items: &[&Incoming]) {
    if !tracing::enabled!(target: "projection::trace", tracing::Level::DEBUG) {
        return;
    }
    for item in items {
        let Ok(event) = &item.envelope else { continue };
        let Some(tp) = event.traceparent.as_deref() else {
            continue;
        };
        let mut parts = tp.split('-');
        let (Some(_), Some(trace_id), Some(span_id)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        tracing::debug!(
            target: "projection::trace",
            projection,
            seq = item.seq,
            trace_id,
            linked_span_id = span_id,
            "applied"
        );
    }
}
