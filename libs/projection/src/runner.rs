use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy, pull::OrderedConfig};
use async_nats::jetstream::stream::DirectGetErrorKind;
use eventstore::{EventStore, RecordedEvent};
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch};

use crate::status::{ProjectionState, Status};
use crate::{Incoming, Parked, Projection};

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
const FEED_BYTES_MAX: usize = 32 * 1024 * 1024;
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

/// One ordered consumer on the stream, shared by every runner subscribed to
/// it: each message is received and its envelope decoded once, however many
/// projections follow (receiving and parsing headers was a fifth of
/// a query service's CPU per projection in catch-up profiles).
///
/// The feed reads from the lowest position any subscriber asked for; a
/// subscriber that asks for an earlier one (a projection resuming from its
/// checkpoint after a fault, or swapped for a rebuilt store) makes it
/// re-read from there, and the others skip what they already applied.
/// Batches go to each subscriber through its own bounded channel, so the
/// slowest one sets the pace.
#[derive(Clone)]
pub struct Feed {
    store: EventStore,
    ctl: mpsc::UnboundedSender<Subscriber>,
    health: Health,
}

/// What is wrong with reading the stream right now, if anything: the
/// projections keep their state and retry, and an operator can see why
/// nothing arrives.
#[derive(Clone, Default)]
struct Health(Arc<std::sync::Mutex<Option<String>>>);

impl Health {
    fn set(&self, error: Option<String>) {
        if let Ok(mut g) = self.0.lock() {
            *g = error;
        }
    }

    fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|g| g.clone())
    }
}

impl Feed {
    /// Starts the feed's task; it reads nothing until someone subscribes,
    /// and ends when the last clone of the feed is dropped.
    #[must_use]
    pub fn start(store: EventStore, options: &RunnerOptions, name: &str) -> Self {
        let (ctl, ctl_rx) = mpsc::unbounded_channel();
        let health = Health::default();
        tokio::spawn(feed(
            store.clone(),
            options.clone(),
            name.to_string(),
            ctl_rx,
            health.clone(),
        ));
        Self { store, ctl, health }
    }

    /// Why the stream could not be read when last tried (NATS or the stream
    /// unreachable, the consumer failing), or `None` when it could. It is
    /// seen a few seconds after NATS goes (the idle check's stream-info
    /// request times out first), and stays as it was while nothing follows
    /// the feed.
    #[must_use]
    pub fn stream_error(&self) -> Option<String> {
        self.health.get()
    }

    fn subscribe(&self, from: u64, depth: usize) -> mpsc::Receiver<Arc<Batch>> {
        let (tx, rx) = mpsc::channel(depth.max(1));
        // A closed feed drops `tx` with the message: the receiver then ends,
        // which the runner treats as a fault and retries.
        let _ = self.ctl.send(Subscriber { next: from, tx });
        rx
    }
}

/// A subscription: batches from `next` on, as long as `tx` is open.
struct Subscriber {
    /// First sequence it still wants.
    next: u64,
    tx: mpsc::Sender<Arc<Batch>>,
}

async fn feed(
    store: EventStore,
    options: RunnerOptions,
    name: String,
    mut ctl: mpsc::UnboundedReceiver<Subscriber>,
    health: Health,
) {
    let mut subs: Vec<Subscriber> = Vec::new();
    loop {
        if subs.is_empty() {
            match ctl.recv().await {
                Some(s) => subs.push(s),
                None => return,
            }
        }
        while let Ok(s) = ctl.try_recv() {
            subs.push(s);
        }
        let Some(from) = subs.iter().map(|s| s.next).min() else {
            continue;
        };
        let (tx, mut rx) = mpsc::channel::<Batch>(2);
        let fetcher = tokio::spawn(fetch(
            store.clone(),
            from,
            tx,
            options.clone(),
            name.clone(),
            health.clone(),
        ));
        // Next sequence the fetcher will hand over.
        let mut position = from;
        loop {
            tokio::select! {
                biased;
                s = ctl.recv() => match s {
                    None => {
                        fetcher.abort();
                        return;
                    }
                    Some(s) => {
                        let rewind = s.next < position;
                        subs.push(s);
                        if rewind {
                            break;
                        }
                    }
                },
                b = rx.recv() => {
                    let Some(batch) = b else { break };
                    let last = batch.last_seq();
                    position = last + 1;
                    let batch = Arc::new(batch);
                    for sub in &mut subs {
                        if last >= sub.next
                            && !sub.tx.is_closed()
                            && sub.tx.send(batch.clone()).await.is_ok()
                        {
                            sub.next = last + 1;
                        }
                    }
                    subs.retain(|s| !s.tx.is_closed());
                    if subs.is_empty() {
                        break;
                    }
                }
            }
        }
        fetcher.abort();
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

/// Keeps only the decoded envelope: the message, header map included, is
/// dropped here rather than held in every queued batch (a dead-letter copy
/// is read back from the stream instead).
fn to_incoming(msg: &async_nats::Message, seq: u64, prefix: &eventstore::Subjects) -> Incoming {
    Incoming {
        seq,
        envelope: RecordedEvent::from_message(msg, seq, prefix),
    }
}

/// What a range reader hands over for one range.
enum RangePart {
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
async fn read_ranges(
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
    for reader in 0..RANGE_READERS.min(ranges) {
        let (part_tx, part_rx) = mpsc::channel(depth);
        parts.push(part_rx);
        let store = store.clone();
        let pull_batch_max = options.pull_batch_max;
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
async fn read_range_set(
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

/// Reads the stream from `from` into batches, a long backlog first in
/// ranges by several consumers at once (see [`read_ranges`]); recreates the
/// consumer after an error, from the sequence after the last one it sent.
async fn fetch(
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

async fn fetch_once(
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
    let consumer = stream
        .create_consumer(follower_config(*next, options.pull_batch_max))
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

/// `dlq.<projection>.<STREAM>.<seq>` (docs/api.md): the source stream named,
/// as a projection may follow several.
fn dlq_subject(name: &str, stream: &str, seq: u64) -> String {
    format!("dlq.{name}.{stream}.{seq}")
}

/// After a crash between a commit and the DLQ publish, the parked records in
/// the store are the truth: republish the ones the DLQ lacks.
async fn reconcile_dlq(store: &EventStore, name: &str, parked: Vec<Parked>, out: &mut Vec<Parked>) {
    if parked.is_empty() {
        return;
    }
    let Ok(dlq) = store.jetstream().get_stream("DLQ").await else {
        return;
    };
    for p in parked {
        match dlq
            .direct_get_last_for_subject(dlq_subject(name, store.stream_name(), p.seq))
            .await
        {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => out.push(p),
            Err(_) => {}
        }
    }
    deliver_dlq(store, name, out).await;
}

/// Publishes parked events to `dlq.<projection>.<STREAM>.<seq>`, at most one message
/// per subject: the publish expects the subject to be empty, so a re-park
/// (the projection re-applied a tail it had not made durable before a
/// crash, however long ago) is refused by the server instead of stored
/// twice, as is a retry whose first attempt was stored. What fails
/// otherwise stays queued for the next call.
///
/// The copy is the stream's own message, read back by sequence: subject,
/// headers and payload exactly as stored, and the runner keeps no raw
/// headers for the events it applies (parking is rare; receiving is not).
async fn deliver_dlq(store: &EventStore, name: &str, queue: &mut Vec<Parked>) {
    if queue.is_empty() {
        return;
    }
    let stream = match store.jetstream().get_stream(store.stream_name()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(projection = name, error = %e, "DLQ: stream unavailable; will retry");
            return;
        }
    };
    let mut kept = Vec::new();
    for parked in queue.drain(..) {
        let original = match stream.direct_get(parked.seq).await {
            Ok(m) => m,
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => {
                tracing::warn!(
                    projection = name,
                    seq = parked.seq,
                    "parked event is no longer in the stream; no DLQ copy"
                );
                continue;
            }
            Err(e) => {
                tracing::warn!(projection = name, seq = parked.seq, error = %e, "DLQ: reading the parked event failed; will retry");
                kept.push(parked);
                continue;
            }
        };
        let mut headers = HeaderMap::new();
        for (k, vs) in original.headers.iter() {
            let key: &str = k.as_ref();
            if key.starts_with("Nats-") {
                continue;
            }
            for v in vs {
                headers.append(key, v.as_str());
            }
        }
        headers.insert("Nats-Msg-Id", format!("{name}-{}", parked.seq).as_str());
        headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
        headers.insert("Parked-By", name);
        headers.insert("Parked-Seq", parked.seq.to_string().as_str());
        headers.insert(
            "Parked-Reason",
            parked.reason.replace(['\r', '\n'], " ").as_str(),
        );
        headers.insert("Original-Subject", original.subject.as_str());
        let sent = async {
            store
                .jetstream()
                .publish_with_headers(
                    dlq_subject(name, store.stream_name(), parked.seq),
                    headers,
                    original.payload,
                )
                .await?
                .await
        }
        .await;
        match sent {
            Ok(_) => {}
            Err(e)
                if e.kind()
                    == async_nats::jetstream::context::PublishErrorKind::WrongLastSequence => {}
            Err(e) => {
                tracing::warn!(projection = name, seq = parked.seq, error = %e, "DLQ publish failed; will retry");
                kept.push(parked);
            }
        }
    }
    *queue = kept;
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream;
    use eventstore::StreamSpec;
    use testkit::NatsServer;

    fn options(ranges_from_events: u64, range_events: u64) -> RunnerOptions {
        RunnerOptions {
            ranges_from_events,
            range_events,
            ..RunnerOptions::live()
        }
    }

    /// A test stream of one-token aggregates: `orders.<id>`.
    fn orders() -> StreamSpec {
        StreamSpec::new("ORDERS", "orders", 1, "test events")
    }

    /// `n` messages on `subject_prefix` + a few subjects; no envelope is
    /// needed to check sequences.
    async fn publish(js: &jetstream::Context, subject_prefix: &str, n: u64) {
        let mut acks = Vec::new();
        for i in 0..n {
            let ack = js
                .publish(format!("{subject_prefix}{}", i % 7), "x".into())
                .await
                .unwrap();
            acks.push(ack);
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }

    /// Everything `rx` holds once the sender is gone.
    async fn seqs(mut rx: mpsc::Receiver<Batch>) -> (Vec<u64>, Vec<u64>) {
        let mut seqs = Vec::new();
        let mut pending = Vec::new();
        while let Some(b) = rx.recv().await {
            seqs.extend(b.items.iter().map(|i| i.seq));
            pending.push(b.pending_after);
        }
        (seqs, pending)
    }

    /// A projection that keeps no store: it applies by moving its
    /// checkpoint, or fails every batch (a disk that stays full) while
    /// `failing` is set.
    struct Fake {
        name: &'static str,
        checkpoint: u64,
        failing: Arc<std::sync::atomic::AtomicBool>,
        attempts: Arc<std::sync::atomic::AtomicU64>,
    }

    impl Fake {
        fn boxed(
            name: &'static str,
            failing: bool,
        ) -> (Box<dyn Projection>, Arc<std::sync::atomic::AtomicU64>) {
            let attempts = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let fake = Self {
                name,
                checkpoint: 0,
                failing: Arc::new(std::sync::atomic::AtomicBool::new(failing)),
                attempts: attempts.clone(),
            };
            (Box::new(fake), attempts)
        }
    }

    impl Projection for Fake {
        fn name(&self) -> &str {
            self.name
        }
        fn checkpoint(&self) -> u64 {
            self.checkpoint
        }
        fn visible(&self) -> u64 {
            self.checkpoint
        }
        fn apply_batch(
            &mut self,
            batch: &[&Incoming],
        ) -> Result<Vec<Parked>, crate::ProjectionError> {
            self.attempts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(crate::ProjectionError::new("simulated disk full"));
            }
            if let Some(last) = batch.last() {
                self.checkpoint = last.seq;
            }
            Ok(Vec::new())
        }
        fn flush(&mut self) -> Result<(), crate::ProjectionError> {
            Ok(())
        }
        fn recover(&mut self) -> Result<(), crate::ProjectionError> {
            Ok(())
        }
        fn parked_total(&self) -> u64 {
            0
        }
        fn parked_recent(&self) -> Vec<Parked> {
            Vec::new()
        }
    }

    async fn wait_attempts(attempts: &std::sync::atomic::AtomicU64, n: u64) {
        tokio::time::timeout(Duration::from_secs(30), async {
            while attempts.load(std::sync::atomic::Ordering::Relaxed) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the failing projection was not retried");
    }

    /// Finding 2: the backoff after a fault consumed the stop signal, and
    /// `Runner::stop` then waited forever.
    #[tokio::test]
    async fn a_stop_during_a_fault_backoff_ends_the_runner() {
        let nats = NatsServer::start().unwrap();
        let store = EventStore::connect(&[nats.url()], "stop-test", &orders())
            .await
            .unwrap();
        publish(store.jetstream(), "orders.", 5).await;
        let (p, attempts) = Fake::boxed("failing", true);
        let status = Status::new("failing", 0, 0);
        let runner = Runner::start(p, store, status.clone(), RunnerOptions::live());
        // Four faults: the backoff is 400 ms now, where the stop lands.
        wait_attempts(&attempts, 4).await;
        assert_eq!(status.state(), ProjectionState::Halted);
        let stopped = tokio::time::timeout(Duration::from_secs(10), runner.stop())
            .await
            .expect("Runner::stop hung on a projection in its fault backoff");
        assert_eq!(stopped.map(|p| p.checkpoint()), Some(0));
    }

    /// Finding 2: `drain_to` waited with no bound on a projection that could
    /// never reach its target, and a replay hung.
    #[tokio::test]
    async fn a_drain_that_stays_halted_gives_up_with_the_fault() {
        let nats = NatsServer::start().unwrap();
        let store = EventStore::connect(&[nats.url()], "drain-test", &orders())
            .await
            .unwrap();
        publish(store.jetstream(), "orders.", 5).await;
        let (p, _) = Fake::boxed("failing", true);
        let status = Status::new("failing", 0, 0);
        let drained = tokio::time::timeout(
            DRAIN_HALTED_MAX * 3,
            drain_to(p, store, status, RunnerOptions::replay(), 5),
        )
        .await
        .expect("drain_to hung on a halted projection");
        let e = drained.err().expect("a halted drain is an error");
        assert!(e.to_string().contains("simulated disk full"), "{e}");
    }

    /// Finding 3: a runner sleeping on a fault held its queue of the shared
    /// feed, which then blocked every other projection; each retry rewound
    /// the feed for everyone.
    #[tokio::test]
    async fn a_faulting_projection_does_not_hold_back_the_others() {
        const EVENTS: u64 = 120;
        let nats = NatsServer::start().unwrap();
        let store = EventStore::connect(&[nats.url()], "freeze-test", &orders())
            .await
            .unwrap();
        let options = RunnerOptions::live();
        let feed = Feed::start(store.clone(), &options, "freeze-test");
        let (bad, attempts) = Fake::boxed("failing", true);
        let (good, _) = Fake::boxed("healthy", false);
        let bad_status = Status::new("failing", 0, 0);
        let good_status = Status::new("healthy", 0, 0);
        let _bad = Runner::start_on(bad, &feed, bad_status, options.clone());
        let _good = Runner::start_on(good, &feed, good_status.clone(), options);
        publish(store.jetstream(), "orders.", 1).await;
        // Faults enough for a backoff past a second.
        wait_attempts(&attempts, 7).await;
        // One event at a time: each its own batch, far more than a queue holds.
        for seq in 2..=EVENTS {
            publish(store.jetstream(), "orders.", 1).await;
            assert!(
                good_status.wait_visible(seq, Duration::from_secs(1)).await,
                "the healthy projection stalled at {} of {seq}",
                good_status.visible()
            );
        }
    }

    /// Finding 4: the feed's buffers counted events, so a backlog of
    /// 100 KB events filled GBs. What a reader holds unapplied is bounded in
    /// bytes, and a batch stops at [`BATCH_BYTES_MAX`].
    #[tokio::test]
    async fn big_events_are_read_within_the_byte_budget() {
        const EVENTS: u64 = 100;
        const EVENT_BYTES: usize = 900 * 1024;
        let nats = NatsServer::start().unwrap();
        let store = EventStore::connect(&[nats.url()], "budget-test", &orders())
            .await
            .unwrap();
        let mut acks = Vec::new();
        for i in 0..EVENTS {
            let payload = bytes::Bytes::from(vec![b'x'; EVENT_BYTES]);
            // A whole envelope: an event whose envelope does not decode
            // keeps no payload, and would take nothing of the budget.
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("e{i}").as_str());
            headers.insert("Event-Type", "Big");
            headers.insert("Event-Schema", "1");
            headers.insert("Occurred-At", "2026-01-01T00:00:00Z");
            headers.insert("Correlation-Id", "c");
            headers.insert("Causation-Id", "c");
            acks.push(
                store
                    .jetstream()
                    .publish_with_headers(format!("orders.{i}"), headers, payload)
                    .await
                    .unwrap(),
            );
        }
        for ack in acks {
            ack.await.unwrap();
        }
        let (tx, mut rx) = mpsc::channel(10_000);
        let options = RunnerOptions {
            ranges_from_events: u64::MAX,
            ..RunnerOptions::live()
        };
        let fetcher = tokio::spawn(fetch(
            store,
            1,
            tx,
            options,
            "test".into(),
            Health::default(),
        ));
        // Nothing is applied: every batch received is held here, with its share.
        let mut held = Vec::new();
        let mut held_bytes = 0;
        while let Ok(Some(batch)) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
            let bytes = events_bytes(&batch.items);
            assert!(
                bytes <= BATCH_BYTES_MAX + EVENT_BYTES + EVENT_OVERHEAD_BYTES,
                "{bytes}"
            );
            held_bytes += bytes;
            held.push(batch);
        }
        let held_events: usize = held.iter().map(|b| b.items.len()).sum();
        assert!(
            held.iter()
                .all(|b| b.items.iter().all(|i| i.envelope.is_ok())),
            "envelopes decode"
        );
        assert!(held_bytes <= FEED_BYTES_MAX, "{held_bytes} bytes held");
        assert!(
            (held_events as u64) < EVENTS,
            "the feed stopped at its budget"
        );
        // Applied (dropped): the rest comes.
        let mut last = held.last().map(Batch::last_seq).unwrap_or(0);
        drop(held);
        while last < EVENTS {
            let batch = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("the feed resumes once batches are applied")
                .expect("the feed ended");
            last = batch.last_seq();
        }
        fetcher.abort();
    }

    #[tokio::test]
    async fn a_backlog_read_in_ranges_comes_in_stream_order() {
        let nats = NatsServer::start().unwrap();
        let store = EventStore::connect(&[nats.url()], "ranges-test", &orders())
            .await
            .unwrap();
        publish(store.jetstream(), "orders.", 230).await;
        // 6 ranges of 40 over 2 readers, then a start and end inside ranges.
        for (from, end) in [(1, 230), (17, 201)] {
            let (tx, rx) = mpsc::channel(10_000);
            let reached = read_ranges(&store, from, end, &tx, &options(1, 40), "test").await;
            drop(tx);
            assert_eq!(reached, Some(end + 1), "a reader failed");
            let (seqs, pending) = seqs(rx).await;
            assert_eq!(seqs, (from..=end).collect::<Vec<_>>());
            assert_eq!(pending.last(), Some(&0));
        }
    }

    #[tokio::test]
    async fn ranges_step_over_missing_events() {
        let nats = NatsServer::start().unwrap();
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = jetstream::new(client.clone());
        js.create_stream(jetstream::stream::Config {
            name: "GAPS".into(),
            subjects: vec!["gaps.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        publish(&js, "gaps.", 100).await;
        let stream = js.get_stream("GAPS").await.unwrap();
        // A range's last event, the next range's first, and one inside.
        for seq in [40, 41, 55] {
            stream.delete_message(seq).await.unwrap();
        }
        let spec = StreamSpec::new("GAPS", "gaps", 1, "").with_max_bytes(-1);
        let store = EventStore::open_existing(client, js, &spec)
            .await
            .unwrap()
            .with_dial(&[nats.url()], "gaps-test");
        let (tx, rx) = mpsc::channel(10_000);
        let reached = read_ranges(&store, 1, 100, &tx, &options(1, 20), "test").await;
        drop(tx);
        assert_eq!(reached, Some(101), "a reader failed");
        let (seqs, _) = seqs(rx).await;
        let want: Vec<u64> = (1..=100).filter(|s| ![40, 41, 55].contains(s)).collect();
        assert_eq!(seqs, want);
    }

    #[tokio::test]
    async fn without_its_urls_the_feed_reads_on_with_one_consumer() {
        let nats = NatsServer::start().unwrap();
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = jetstream::new(client.clone());
        let spec = orders();
        eventstore::provision(&js, &spec).await.unwrap();
        publish(&js, "orders.", 100).await;
        // No `with_dial`: the second reader cannot open its connection.
        let store = EventStore::open_existing(client, js, &spec).await.unwrap();
        let (tx, rx) = mpsc::channel(10_000);
        let reached = read_ranges(&store, 1, 100, &tx, &options(1, 20), "test").await;
        drop(tx);
        // Reader 0 did range 1..=20; reader 1 failed on 21..=40.
        assert_eq!(reached, Some(21));
        assert_eq!(seqs(rx).await.0, (1..=20).collect::<Vec<_>>());
        // The feed as a whole still hands over everything, in order.
        let (tx, mut rx) = mpsc::channel(10_000);
        let fetcher = tokio::spawn(fetch(
            store,
            1,
            tx,
            options(1, 20),
            "test".into(),
            Health::default(),
        ));
        let mut got = Vec::new();
        while got.len() < 100 {
            let batch = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("the feed stalled")
                .expect("the feed ended");
            got.extend(batch.items.iter().map(|i| i.seq));
        }
        fetcher.abort();
        assert_eq!(got, (1..=100).collect::<Vec<_>>());
    }
}
