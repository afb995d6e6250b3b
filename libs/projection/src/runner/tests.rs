use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use eventstore::EventStore;
use tokio::sync::mpsc;

use crate::status::{ProjectionState, Status};
use crate::{Incoming, Parked, Projection};

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
    fn apply_batch(&mut self, batch: &[&Incoming]) -> Result<Vec<Parked>, crate::ProjectionError> {
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
