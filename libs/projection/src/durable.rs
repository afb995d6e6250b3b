//! A durable follower: what a process manager runs on. Unlike a projection,
//! whose checkpoint lives in its own store, a process manager's service may
//! keep no local files, so its position is a durable JetStream consumer: a
//! message is acknowledged only after its effects are, and one that is not
//! (a crash, a stop, a transient fault) is delivered again. Several
//! instances may bind the same consumer: the server hands each message to
//! one of them at a time, and effects with deterministic `Nats-Msg-Id`s and
//! optimistic concurrency make a second delivery harmless.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, ReplayPolicy, pull};
use eventstore::{EventStore, RecordedEvent};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::watch;

/// How long the server waits for an ack (or a progress ack) before it
/// delivers the message again, to this instance or another: the longest a
/// crashed instance's message waits. A message that takes longer is handed
/// to another instance as well, which is harmless (see the module).
pub const ACK_WAIT: Duration = Duration::from_secs(10);
/// A transient fault asks for redelivery after this long.
const NAK_DELAY: Duration = Duration::from_secs(1);
/// Pause after the consumer could not be made or read, before trying again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Why a message's handling failed.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// NATS down, a timeout: the message is delivered again later.
    #[error("transient: {0}")]
    Transient(String),
}

/// What one durable follower has done, for `/projections`.
#[derive(Debug, Default)]
pub struct FollowerStatus {
    handled: AtomicU64,
    effects: AtomicU64,
    poison: AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
}

impl FollowerStatus {
    /// Counts `n` effects (appends) made by this instance.
    pub fn add_effects(&self, n: u64) {
        self.effects.fetch_add(n, Ordering::Relaxed);
    }

    fn set_error(&self, e: Option<String>) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = e;
        }
    }
}

/// One source stream of a process manager as `/projections` shows it.
#[derive(Debug, Serialize)]
pub struct FollowerSnapshot {
    pub stream: String,
    pub consumer: String,
    /// Every message at or below this stream sequence is handled.
    pub checkpoint: u64,
    /// Messages not yet handled: pending plus in flight.
    pub lag: u64,
    /// Handled by this instance since it started.
    pub handled: u64,
    pub effects: u64,
    /// Messages whose envelope could not be read: skipped, logged.
    pub poison: u64,
    pub last_error: Option<String>,
}

/// A durable consumer on one stream and its handler's status.
#[derive(Clone)]
pub struct Durable {
    store: EventStore,
    name: String,
    status: Arc<FollowerStatus>,
}

impl Durable {
    /// The durable consumer `name` on `store`'s stream: every subject, from
    /// sequence 1.
    #[must_use]
    pub fn new(store: EventStore, name: &str) -> Self {
        Self {
            store,
            name: name.to_string(),
            status: Arc::default(),
        }
    }

    #[must_use]
    pub fn status(&self) -> &Arc<FollowerStatus> {
        &self.status
    }

    fn config(&self) -> pull::Config {
        pull::Config {
            durable_name: Some(self.name.clone()),
            name: Some(self.name.clone()),
            description: Some("process manager position: acked after its effects".into()),
            // Every event since the stream began: a process manager
            // started late still reacts to what it has not seen.
            deliver_policy: DeliverPolicy::All,
            // An ack per message, sent after its effects are acknowledged.
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            // Never give up on a message: a transient fault must not lose an effect.
            max_deliver: -1,
            filter_subject: String::new(),
            filter_subjects: Vec::new(),
            replay_policy: ReplayPolicy::Instant,
            rate_limit: 0,
            sample_frequency: 0,
            max_waiting: 512,
            // Messages delivered and not yet acked, across instances: a
            // prefetch deep enough to keep one busy; each is handled alone.
            max_ack_pending: 256,
            headers_only: false,
            max_batch: 0,
            max_bytes: 0,
            max_expires: Duration::ZERO,
            // Durable: the position outlives every instance.
            inactive_threshold: Duration::ZERO,
            // As many replicas as the stream: the position is as safe as the events.
            num_replicas: self.store.replicas(),
            memory_storage: false,
            metadata: std::collections::HashMap::new(),
            backoff: Vec::new(),
            priority_policy: consumer::PriorityPolicy::None,
            priority_groups: Vec::new(),
            priority_timeout: Duration::ZERO,
            pause_until: None,
        }
    }

    /// Where the consumer stands, asked of the server.
    ///
    /// # Errors
    /// When the server does not answer.
    pub async fn snapshot(&self) -> Result<FollowerSnapshot, String> {
        let mut consumer: consumer::PullConsumer = self
            .store
            .stream()
            .get_consumer(&self.name)
            .await
            .map_err(|e| e.to_string())?;
        let info = consumer.info().await.map_err(|e| e.to_string())?;
        let s = &self.status;
        Ok(FollowerSnapshot {
            stream: self.store.stream_name().to_string(),
            consumer: self.name.clone(),
            checkpoint: info.ack_floor.stream_sequence,
            lag: info.num_pending + info.num_ack_pending as u64,
            handled: s.handled.load(Ordering::Relaxed),
            effects: s.effects.load(Ordering::Relaxed),
            poison: s.poison.load(Ordering::Relaxed),
            last_error: s.last_error.lock().ok().and_then(|e| e.clone()),
        })
    }

    /// Follows the stream until `stop` turns true: each message goes to
    /// `handle`, and is acknowledged once it returns `Ok`; on `Err` it is
    /// delivered again after a pause. A message whose envelope cannot be
    /// read is logged, counted and acknowledged: a process manager reacts to
    /// events, and one that is not an event has nothing to react to.
    pub async fn run<F, Fut>(self, mut stop: watch::Receiver<bool>, mut handle: F)
    where
        F: FnMut(RecordedEvent) -> Fut,
        Fut: std::future::Future<Output = Result<(), HandleError>>,
    {
        let name = self.name.clone();
        loop {
            if *stop.borrow() {
                return;
            }
            let consumer = match self
                .store
                .stream()
                .get_or_create_consumer(&name, self.config())
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(consumer = name, error = %e, "cannot open the durable consumer");
                    self.status.set_error(Some(e.to_string()));
                    if pause(&mut stop, RETRY_PAUSE).await {
                        return;
                    }
                    continue;
                }
            };
            let mut messages = match consumer.messages().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(consumer = name, error = %e, "cannot pull");
                    self.status.set_error(Some(e.to_string()));
                    if pause(&mut stop, RETRY_PAUSE).await {
                        return;
                    }
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    next = messages.next() => next,
                    _ = stop.wait_for(|s| *s) => return,
                };
                let msg = match next {
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => {
                        tracing::warn!(consumer = name, error = %e, "pull failed; pulling again");
                        self.status.set_error(Some(e.to_string()));
                        if pause(&mut stop, RETRY_PAUSE).await {
                            return;
                        }
                        break;
                    }
                    None => break,
                };
                let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
                let event = match RecordedEvent::from_message(
                    &msg.message,
                    seq,
                    self.store.subjects(),
                ) {
                    Ok(event) => event,
                    Err(e) => {
                        // Parked to DLQ (`dlq.<consumer>.<STREAM>.<seq>`)
                        // before the ack: a copy that did not make it is
                        // redelivered, and parked then.
                        let mut queue = vec![crate::Parked {
                            seq,
                            reason: e.to_string(),
                        }];
                        crate::runner::dlq::deliver_dlq(&self.store, &name, &mut queue).await;
                        if !queue.is_empty() {
                            tracing::warn!(
                                consumer = name,
                                seq,
                                "poison event not parked yet; it will be redelivered"
                            );
                            if pause(&mut stop, RETRY_PAUSE).await {
                                return;
                            }
                            break;
                        }
                        tracing::error!(consumer = name, seq, error = %e, "not an event; parked to DLQ");
                        self.status.poison.fetch_add(1, Ordering::Relaxed);
                        let _ = msg.double_ack().await;
                        continue;
                    }
                };
                // The handler runs to the end even when a stop arrives: a
                // stop between two effects would only mean a redelivery,
                // but there is no reason to make one.
                match handle(event).await {
                    Ok(()) => {
                        self.status.handled.fetch_add(1, Ordering::Relaxed);
                        self.status.set_error(None);
                        // Waits for the server's confirmation: the position
                        // has moved only when this returns.
                        if let Err(e) = msg.double_ack().await {
                            tracing::warn!(consumer = name, seq, error = %e, "ack not confirmed; the message may come again");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(consumer = name, seq, error = %e, "handling failed; it comes again");
                        self.status.set_error(Some(e.to_string()));
                        let _ = msg.ack_with(AckKind::Nak(Some(NAK_DELAY))).await;
                    }
                }
            }
        }
    }
}

/// Waits `d` or until `stop`; true when stopped.
async fn pause(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    let stopped = tokio::select! {
        _ = stop.wait_for(|s| *s) => true,
        () = tokio::time::sleep(d) => false,
    };
    stopped || *stop.borrow()
}
