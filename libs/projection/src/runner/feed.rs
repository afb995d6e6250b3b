//! The shared feed: one ordered consumer whose batches go to every
//! subscribed runner, with its byte budget and health.

use std::sync::Arc;

use eventstore::EventStore;
use tokio::sync::mpsc;

use super::*;

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
    pub(super) store: EventStore,
    pub(super) ctl: mpsc::UnboundedSender<Subscriber>,
    pub(super) health: Health,
}

/// What is wrong with reading the stream right now, if anything: the
/// projections keep their state and retry, and an operator can see why
/// nothing arrives.
#[derive(Clone, Default)]
pub(super) struct Health(Arc<std::sync::Mutex<Option<String>>>);

impl Health {
    pub(super) fn set(&self, error: Option<String>) {
        if let Ok(mut g) = self.0.lock() {
            *g = error;
        }
    }

    pub(super) fn get(&self) -> Option<String> {
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

    pub(super) fn subscribe(&self, from: u64, depth: usize) -> mpsc::Receiver<Arc<Batch>> {
        let (tx, rx) = mpsc::channel(depth.max(1));
        // A closed feed drops `tx` with the message: the receiver then ends,
        // which the runner treats as a fault and retries.
        let _ = self.ctl.send(Subscriber { next: from, tx });
        rx
    }
}

/// A subscription: batches from `next` on, as long as `tx` is open.
pub(super) struct Subscriber {
    /// First sequence it still wants.
    pub(super) next: u64,
    pub(super) tx: mpsc::Sender<Arc<Batch>>,
}

pub(super) async fn feed(
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
