use async_nats::connection::State;
use async_nats::jetstream::stream::{DirectGetErrorKind, LastRawMessageErrorKind};
use async_nats::jetstream::{self, context::PublishErrorKind};
use std::ops::ControlFlow;

use time::OffsetDateTime;

use crate::envelope::{EncodedEvent, Metadata, RecordedEvent, Subjects, headers_for};
use crate::stream::{ProvisionError, StreamSpec, provision};

/// Extra attempts of the same publish (same `Nats-Msg-Id`, so deduplicated)
/// after an ack timed out: the event may or may not be stored, and only a
/// retry inside the duplicate window tells which without a double append.
const PUBLISH_TIMEOUT_RETRIES_MAX: u32 = 2;

/// JetStream API and publish-ack timeout. With `sync_interval: always` an ack
/// takes a few ms; three seconds means the server is gone or overloaded.
const JETSTREAM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// How often a reading service looks again for a stream that does not exist yet.
const STREAM_WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(250);
/// Upper bound on opening the stream at start-up (a cluster may be electing).
const START_DEADLINE: std::time::Duration = std::time::Duration::from_secs(15);

/// Why [`EventStore::connect`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Connect(#[from] crate::ConnectCheckError),
    #[error("{urls}: no JetStream answer in {secs}s")]
    NoAnswer { urls: String, secs: u64 },
    #[error("{urls}: cannot use stream {stream}: {source}")]
    Stream {
        urls: String,
        stream: String,
        source: ProvisionError,
    },
}

/// An aggregate longer than this is a bug or an attack: refuse to fold it.
const AGGREGATE_EVENTS_MAX: usize = 100_000;
/// Messages of one read fetched by direct gets, a round trip each; past
/// this, the rest comes in batched direct gets. Most aggregates
/// have a few events, and a consumer costs a round trip or two to set up.
const DIRECT_GETS_MAX: usize = 64;
/// Messages per batched direct get of such a read.
const LOAD_BATCH: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Another writer appended to the aggregate since `expected` was read.
    #[error("aggregate {aggregate_id} moved past sequence {expected}")]
    Conflict { aggregate_id: String, expected: u64 },
    /// Nothing was sent: the event is certainly not stored.
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    /// Sent, but no ack came back even after retries with the same
    /// `Nats-Msg-Id`: the event may or may not be stored.
    #[error("no ack for the event (outcome unknown): {0}")]
    OutcomeUnknown(String),
    #[error("event rejected by the server: {0}")]
    Rejected(String),
    /// The stream's byte budget (`max_bytes`, `discard: new`) is used up:
    /// nothing was stored, and nothing will be until an operator raises it.
    #[error("the stream's byte budget is full: {0}")]
    StorageFull(String),
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    #[error("event at sequence {seq} is corrupt: {reason}")]
    Corrupt { seq: u64, reason: String },
    #[error("aggregate {0} has more events than the fold limit")]
    TooLong(String),
}

/// A page of one aggregate's messages, see [`EventStore::history`].
#[derive(Debug)]
pub struct HistoryPage {
    pub entries: Vec<Result<RecordedEvent, (u64, String)>>,
    /// More messages follow the last entry.
    pub more: bool,
}

/// Which server answers a read.
#[derive(Clone, Copy, Debug)]
pub enum Replica {
    /// Direct gets: any replica, the nearest or least busy; one that lags
    /// answers from what it has.
    Any,
    /// The stream leader, which has every acknowledged write.
    Leader,
}

/// Appends and reads the events of one stream, one subject per aggregate.
#[derive(Clone, Debug)]
pub struct EventStore {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    subjects: Subjects,
    /// How this store's connection was made, when known: what
    /// [`EventStore::reader`] opens more connections with.
    dial: Option<std::sync::Arc<Dial>>,
}

#[derive(Debug)]
struct Dial {
    urls: Vec<String>,
    client_name: String,
}

impl EventStore {
    /// Provisions the stream described by `spec` and opens it.
    ///
    /// # Errors
    /// [`ProvisionError`] when the stream cannot be created or checked.
    pub async fn open(
        client: async_nats::Client,
        js: jetstream::Context,
        spec: &StreamSpec,
    ) -> Result<Self, ProvisionError> {
        let stream = provision(&js, spec).await?;
        Ok(Self {
            client,
            js,
            stream,
            subjects: spec.subjects_layout(),
            dial: None,
        })
    }

    /// The start-up check every service runs before it serves: connects
    /// (failing fast when the URL is not a NATS server), checks JetStream,
    /// and opens `spec`, creating it if missing, all within a deadline.
    ///
    /// # Errors
    /// [`StartError`] naming the URL(s) and the cause.
    pub async fn connect(
        urls: &[String],
        client_name: &str,
        spec: &StreamSpec,
    ) -> Result<Self, StartError> {
        let (client, js) = dial(urls, client_name).await?;
        let store = within_start_deadline(urls, spec, Self::open(client, js, spec)).await?;
        Ok(store.with_dial(urls, client_name))
    }

    /// The start-up of a service that only reads (a query service): connects
    /// (failing fast when the URL is not a NATS server or has no JetStream),
    /// then waits, however long, until `spec`'s stream exists. It never
    /// creates, changes or deletes a stream: the command services do.
    ///
    /// # Errors
    /// [`StartError`] naming the URL(s) and the cause.
    pub async fn connect_existing(
        urls: &[String],
        client_name: &str,
        spec: &StreamSpec,
    ) -> Result<Self, StartError> {
        let (client, js) = dial(urls, client_name).await?;
        within_start_deadline(urls, spec, crate::stream::check_jetstream(&js)).await?;
        let mut waiting = false;
        loop {
            match Self::open_existing(client.clone(), js.clone(), spec).await {
                Ok(store) => {
                    if waiting {
                        tracing::info!(stream = %spec.name, "the stream exists now");
                    }
                    return Ok(store.with_dial(urls, client_name));
                }
                Err(e) => {
                    if !waiting {
                        tracing::warn!(
                            stream = %spec.name,
                            error = %e,
                            "waiting for the stream, which the command service creates"
                        );
                        waiting = true;
                    }
                    tokio::time::sleep(STREAM_WAIT_POLL).await;
                }
            }
        }
    }

    /// Opens a stream that must already exist (tools that must not create one).
    ///
    /// # Errors
    /// [`ProvisionError::Unreachable`] when the stream is missing or NATS does not answer.
    pub async fn open_existing(
        client: async_nats::Client,
        js: jetstream::Context,
        spec: &StreamSpec,
    ) -> Result<Self, ProvisionError> {
        let stream = js
            .get_stream(&spec.name)
            .await
            .map_err(|e| ProvisionError::Unreachable(format!("stream {}: {e}", spec.name)))?;
        Ok(Self {
            client,
            js,
            stream,
            subjects: spec.subjects_layout(),
            dial: None,
        })
    }

    /// Remembers the URLs and client name this store's connection was made
    /// with, so that [`EventStore::reader`] can open more.
    #[must_use]
    pub fn with_dial(mut self, urls: &[String], client_name: &str) -> Self {
        self.dial = Some(std::sync::Arc::new(Dial {
            urls: urls.to_vec(),
            client_name: client_name.to_string(),
        }));
        self
    }

    /// The same stream over a new connection of its own, for reading in
    /// parallel: each connection's messages are parsed by its own task, and
    /// one connection's parsing is what bounds a single consumer's rate.
    /// The connection closes when the returned store and its clones are
    /// dropped. `Ok(None)` when this store does not know its URLs (it was
    /// opened on a client made elsewhere, without [`EventStore::with_dial`]).
    ///
    /// # Errors
    /// When the connection or the stream lookup fails.
    pub async fn reader(&self) -> Result<Option<Self>, String> {
        let Some(dial) = &self.dial else {
            return Ok(None);
        };
        let client = crate::connect_checked(&dial.urls, &format!("{}-reader", dial.client_name))
            .await
            .map_err(|e| e.to_string())?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(JETSTREAM_TIMEOUT);
        let stream = js
            .get_stream(self.stream_name())
            .await
            .map_err(|e| format!("stream {}: {e}", self.stream_name()))?;
        Ok(Some(Self {
            client,
            js,
            stream,
            subjects: self.subjects.clone(),
            dial: self.dial.clone(),
        }))
    }

    #[must_use]
    pub fn subject_prefix(&self) -> &str {
        self.subjects.prefix()
    }

    /// How this stream's subjects name aggregates.
    #[must_use]
    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    #[must_use]
    pub fn subject_for(&self, aggregate_id: &str) -> String {
        format!("{}{aggregate_id}", self.subjects.prefix())
    }

    #[must_use]
    pub fn stream_name(&self) -> &str {
        &self.stream.cached_info().config.name
    }

    /// The stream, as looked up when this store was opened: consumers made
    /// on it use this store's connection.
    #[must_use]
    pub fn stream(&self) -> &jetstream::stream::Stream {
        &self.stream
    }

    #[must_use]
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    #[must_use]
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    #[must_use]
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// The stream's replica count, as it was when this store was opened.
    #[must_use]
    pub fn replicas(&self) -> usize {
        self.stream.cached_info().config.num_replicas.max(1)
    }

    /// The stream's last sequence, asked of the server.
    ///
    /// # Errors
    /// [`LoadError::Unavailable`] when the server does not answer.
    pub async fn last_seq(&self) -> Result<u64, LoadError> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|e| LoadError::Unavailable(e.to_string()))?;
        Ok(info.state.last_sequence)
    }

    /// Appends one event to `aggregate_id` if its last event is still at
    /// `expected_last_subject_seq` (0 for a new aggregate). Returns the stream
    /// sequence of the stored event.
    ///
    /// # Errors
    /// [`AppendError::Conflict`] when another writer got there first,
    /// [`AppendError::Unavailable`] when NATS is down or the ack never came.
    pub async fn append(
        &self,
        aggregate_id: &str,
        expected_last_subject_seq: u64,
        event: &EncodedEvent,
        occurred_at: OffsetDateTime,
        meta: &Metadata,
    ) -> Result<u64, AppendError> {
        if !self.is_connected() {
            // Publishing now would queue the event in the client and send it
            // after we have already answered 503: refuse before publishing.
            return Err(AppendError::Unavailable("not connected to NATS".into()));
        }
        let event_id = meta
            .event_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let headers = headers_for(
            &event_id,
            expected_last_subject_seq,
            event,
            occurred_at,
            meta,
        );
        let subject = self.subject_for(aggregate_id);
        let payload = bytes::Bytes::from(event.payload.clone());
        let mut attempt = 0;
        let started = std::time::Instant::now();
        loop {
            let result = async {
                self.js
                    .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                    .await?
                    .await
            }
            .await;
            match result {
                Ok(ack) => {
                    telemetry::metrics()
                        .append_duration
                        .get_or_create(&telemetry::StreamLabels {
                            stream: self.stream_name().to_string(),
                        })
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(ack.sequence);
                }
                Err(e) => match e.kind() {
                    PublishErrorKind::WrongLastSequence => {
                        // The server checks the expected sequence before the
                        // duplicate window, so a retry whose first attempt was
                        // stored (ack lost) is refused as a conflict instead of
                        // acked as a duplicate. Ours, if stored, is the subject's
                        // first event after the one we expected.
                        if attempt > 0
                            && let Some(seq) = self
                                .stored_by_us(&subject, expected_last_subject_seq, &event_id)
                                .await?
                        {
                            return Ok(seq);
                        }
                        telemetry::metrics()
                            .command_conflicts
                            .get_or_create(&telemetry::StreamLabels {
                                stream: self.stream_name().to_string(),
                            })
                            .inc();
                        return Err(AppendError::Conflict {
                            aggregate_id: aggregate_id.to_string(),
                            expected: expected_last_subject_seq,
                        });
                    }
                    PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe
                        if attempt < PUBLISH_TIMEOUT_RETRIES_MAX && self.is_connected() =>
                    {
                        attempt += 1;
                    }
                    PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
                        return Err(AppendError::OutcomeUnknown(e.to_string()));
                    }
                    // After a timed-out attempt, any failure leaves the
                    // first attempt's fate unknown.
                    _ if attempt > 0 => return Err(AppendError::OutcomeUnknown(e.to_string())),
                    PublishErrorKind::StreamNotFound => {
                        return Err(AppendError::Unavailable(e.to_string()));
                    }
                    PublishErrorKind::MaxPayloadExceeded => {
                        return Err(AppendError::Rejected(e.to_string()));
                    }
                    _ if storage_full(&e) => {
                        return Err(AppendError::StorageFull(e.to_string()));
                    }
                    _ => return Err(AppendError::Unavailable(e.to_string())),
                },
            }
        }
    }

    /// The sequence of the event `event_id` if it is the first event on
    /// `subject` after `after_seq`: where an append expecting `after_seq` lands.
    /// Asked of the stream leader (it just refused the retry), not of a replica
    /// that may lag.
    async fn stored_by_us(
        &self,
        subject: &str,
        after_seq: u64,
        event_id: &str,
    ) -> Result<Option<u64>, AppendError> {
        match self
            .stream
            .get_first_raw_message_by_subject(subject, after_seq + 1)
            .await
        {
            Ok(msg) => Ok((msg.headers.get(crate::HEADER_MSG_ID).map(|v| v.as_str())
                == Some(event_id))
            .then_some(msg.sequence)),
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
            Err(e) => Err(AppendError::OutcomeUnknown(e.to_string())),
        }
    }

    /// Folds the events of `aggregate_id` with a sequence above `after_seq`
    /// through `each`, in order (pass 0 for the whole history), one at a
    /// time: nothing holds the whole history, however long it is.
    ///
    /// # Errors
    /// [`LoadError::Corrupt`] names the sequence of an event whose envelope is
    /// broken; [`LoadError::Unavailable`] when NATS does not answer; and
    /// whatever `each` returns.
    pub async fn fold(
        &self,
        aggregate_id: &str,
        after_seq: u64,
        from: Replica,
        mut each: impl FnMut(RecordedEvent) -> Result<(), LoadError>,
    ) -> Result<(), LoadError> {
        self.read_subject(aggregate_id, after_seq, from, |entry| {
            each(entry.map_err(|(seq, reason)| LoadError::Corrupt { seq, reason })?)?;
            Ok(ControlFlow::Continue(()))
        })
        .await
    }

    /// One page of `aggregate_id`'s messages after `after_seq`, in order, for
    /// showing them: at most `events_max`, and it stops before the payloads
    /// pass `payload_bytes_max` (always at least one). A message whose
    /// envelope is broken (published by something other than a command
    /// service) is an `Err` with its sequence and the reason, in its place.
    /// [`Replica::Leader`] holds every acknowledged write; with
    /// [`Replica::Any`] one that lags may miss the latest.
    ///
    /// # Errors
    /// [`LoadError::Unavailable`] when NATS does not answer;
    /// [`LoadError::TooLong`] past the fold limit.
    pub async fn history(
        &self,
        aggregate_id: &str,
        after_seq: u64,
        from: Replica,
        events_max: usize,
        payload_bytes_max: usize,
    ) -> Result<HistoryPage, LoadError> {
        let mut page = HistoryPage {
            entries: Vec::new(),
            more: false,
        };
        let mut bytes = 0usize;
        self.read_subject(aggregate_id, after_seq, from, |entry| {
            let size = entry.as_ref().map_or(0, |e| e.payload.len());
            if page.entries.len() >= events_max
                || (!page.entries.is_empty() && bytes + size > payload_bytes_max)
            {
                page.more = true;
                return Ok(ControlFlow::Break(()));
            }
            bytes += size;
            page.entries.push(entry);
            Ok(ControlFlow::Continue(()))
        })
        .await?;
        Ok(page)
    }

    /// Every message on `aggregate_id`'s subject after `after_seq`, in order,
    /// through `each` until it breaks.
    async fn read_subject(
        &self,
        aggregate_id: &str,
        after_seq: u64,
        from: Replica,
        each: impl FnMut(Result<RecordedEvent, (u64, String)>) -> Result<ControlFlow<()>, LoadError>,
    ) -> Result<(), LoadError> {
        let subject = self.subject_for(aggregate_id);
        self.read_filter(&subject, aggregate_id, after_seq, from, each)
            .await
    }

    /// The ids of the aggregates whose ids start with the tokens `parent`
    /// (`<order>` for `lines.<order>.<line>`), in the order of
    /// their first event, read from the leader: one pass over their events.
    ///
    /// # Errors
    /// [`LoadError::Unavailable`] when NATS does not answer;
    /// [`LoadError::TooLong`] past the fold limit.
    pub async fn aggregate_ids_under(&self, parent: &str) -> Result<Vec<String>, LoadError> {
        let filter = format!("{}{parent}.>", self.subjects.prefix());
        let mut ids: Vec<String> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        self.read_filter(&filter, parent, 0, Replica::Leader, |entry| {
            // A broken envelope still names its aggregate by subject; the
            // aggregate's own load reports the corruption.
            if let Ok(event) = entry
                && seen.insert(event.aggregate_id.clone())
            {
                ids.push(event.aggregate_id);
            }
            Ok(ControlFlow::Continue(()))
        })
        .await?;
        Ok(ids)
    }

    /// The last event of `aggregate_id`, asked of `from`; `Ok(None)` when it
    /// has none.
    ///
    /// # Errors
    /// [`LoadError::Unavailable`] when NATS does not answer,
    /// [`LoadError::Corrupt`] when the envelope is broken.
    pub async fn last_event(
        &self,
        aggregate_id: &str,
        from: Replica,
    ) -> Result<Option<RecordedEvent>, LoadError> {
        if !self.is_connected() {
            return Err(LoadError::Unavailable("not connected to NATS".into()));
        }
        let subject = self.subject_for(aggregate_id);
        if matches!(from, Replica::Any) && stale_replica() {
            return Ok(None);
        }
        let msg = match from {
            Replica::Any => match self.stream.direct_get_last_for_subject(subject).await {
                Ok(msg) => msg,
                Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => return Ok(None),
                Err(e) => return Err(LoadError::Unavailable(e.to_string())),
            },
            Replica::Leader => match self.stream.get_last_raw_message_by_subject(&subject).await {
                Ok(msg) => msg,
                Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => {
                    return Ok(None);
                }
                Err(e) => return Err(LoadError::Unavailable(e.to_string())),
            },
        };
        RecordedEvent::from_parts(
            msg.subject.as_str(),
            &self.subjects,
            msg.sequence,
            Some(&msg.headers),
            msg.payload,
        )
        .map(Some)
        .map_err(|e| LoadError::Corrupt {
            seq: msg.sequence,
            reason: e.to_string(),
        })
    }

    /// Every message on `subject` (a filter, wildcards allowed) after
    /// `after_seq`, in order, through `each` until it breaks. `what` names
    /// the aggregate(s) in errors. The first [`DIRECT_GETS_MAX`] messages
    /// come one get at a time from `from`; the rest of a long history in
    /// batched direct gets (see [`EventStore::read_batches`]), and then,
    /// for [`Replica::Leader`], from the leader what a lagging replica
    /// missed (usually one round trip, which finds nothing).
    async fn read_filter(
        &self,
        subject: &str,
        what: &str,
        after_seq: u64,
        from: Replica,
        mut each: impl FnMut(Result<RecordedEvent, (u64, String)>) -> Result<ControlFlow<()>, LoadError>,
    ) -> Result<(), LoadError> {
        if !self.is_connected() {
            return Err(LoadError::Unavailable("not connected to NATS".into()));
        }
        if matches!(from, Replica::Any) && stale_replica() {
            return Ok(());
        }
        let mut at = Cursor {
            subject,
            what,
            next: after_seq + 1,
            count: 0,
        };
        if self
            .read_singly(&mut at, from, DIRECT_GETS_MAX, &mut each)
            .await?
            .is_break()
        {
            return Ok(());
        }
        if self.read_batches(&mut at, &mut each).await?.is_break() || matches!(from, Replica::Any) {
            return Ok(());
        }
        self.read_singly(&mut at, Replica::Leader, usize::MAX, &mut each)
            .await
            .map(|_| ())
    }

    /// Up to `max` messages from `at`, a get each. `Break` when the subject
    /// has no more or `each` broke; `Continue` when `max` were read.
    async fn read_singly<F>(
        &self,
        at: &mut Cursor<'_>,
        from: Replica,
        max: usize,
        each: &mut F,
    ) -> Result<ControlFlow<()>, LoadError>
    where
        F: FnMut(Result<RecordedEvent, (u64, String)>) -> Result<ControlFlow<()>, LoadError>,
    {
        for _ in 0..max {
            let msg = match from {
                Replica::Any => match self
                    .stream
                    .direct_get_next_for_subject(at.subject, Some(at.next))
                    .await
                {
                    Ok(msg) => msg,
                    Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => {
                        return Ok(ControlFlow::Break(()));
                    }
                    Err(e) => return Err(LoadError::Unavailable(e.to_string())),
                },
                Replica::Leader => match self
                    .stream
                    .get_first_raw_message_by_subject(at.subject, at.next)
                    .await
                {
                    Ok(msg) => msg,
                    Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => {
                        return Ok(ControlFlow::Break(()));
                    }
                    Err(e) => return Err(LoadError::Unavailable(e.to_string())),
                },
            };
            let seq = msg.sequence;
            at.advance(seq)?;
            let entry = RecordedEvent::from_parts(
                msg.subject.as_str(),
                &self.subjects,
                seq,
                Some(&msg.headers),
                msg.payload,
            )
            .map_err(|e| (seq, e.to_string()));
            if each(entry)?.is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
        Ok(ControlFlow::Continue(()))
    }

    /// The rest of a long read from `at`, in batched direct gets
    /// (nats-server 2.11+, ADR-31): each request is answered by up to
    /// [`LOAD_BATCH`] messages and an end-of-batch status, where a get per
    /// message cost a round trip each (a cold command on a post of 100k
    /// events: 11 s in `aggregate_load_long_stream_ms`). The same requests
    /// as single direct gets, so no consumer and no other permission; any
    /// replica answers them. `Break` when `each` broke.
    async fn read_batches<F>(
        &self,
        at: &mut Cursor<'_>,
        each: &mut F,
    ) -> Result<ControlFlow<()>, LoadError>
    where
        F: FnMut(Result<RecordedEvent, (u64, String)>) -> Result<ControlFlow<()>, LoadError>,
    {
        use futures::StreamExt;
        let unavailable = |e: &dyn std::fmt::Display| LoadError::Unavailable(e.to_string());
        let api = format!("$JS.API.DIRECT.GET.{}", self.stream_name());
        let subject = at.subject;
        loop {
            let inbox = self.client.new_inbox();
            let mut replies = self
                .client
                .subscribe(inbox.clone())
                .await
                .map_err(|e| unavailable(&e))?;
            let request = serde_json::json!({
                "seq": at.next,
                "next_by_subj": subject,
                "batch": LOAD_BATCH,
            });
            self.client
                .publish_with_reply(api.clone(), inbox, request.to_string().into())
                .await
                .map_err(|e| unavailable(&e))?;
            let mut got = 0;
            // Messages on the subject after the last one received, as the
            // replica said with it; unknown until one arrives.
            let mut pending_after: Option<u64> = None;
            loop {
                let msg = match tokio::time::timeout(JETSTREAM_TIMEOUT, replies.next()).await {
                    Ok(Some(msg)) => msg,
                    Ok(None) => return Err(unavailable(&"the batch's replies ended")),
                    Err(_) => {
                        return Err(unavailable(&format!(
                            "no batch of {subject} within {JETSTREAM_TIMEOUT:?}"
                        )));
                    }
                };
                match msg.status.map(|s| s.as_u16()) {
                    None | Some(200) => {}
                    // End of batch; or nothing (more) on the subject.
                    Some(204 | 404) => break,
                    Some(other) => {
                        return Err(unavailable(&format!(
                            "a batch of {subject} answered {other} {}",
                            msg.description.as_deref().unwrap_or("")
                        )));
                    }
                }
                let header = |name: &str| {
                    msg.headers
                        .as_ref()
                        .and_then(|h| h.get(name))
                        .map(|v| v.as_str().to_string())
                };
                let seq: u64 = header("Nats-Sequence")
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| unavailable(&"a batched message without Nats-Sequence"))?;
                let stored_subject = header("Nats-Subject")
                    .ok_or_else(|| unavailable(&"a batched message without Nats-Subject"))?;
                pending_after = header("Nats-Num-Pending").and_then(|v| v.parse().ok());
                at.advance(seq)?;
                got += 1;
                let entry = RecordedEvent::from_parts(
                    &stored_subject,
                    &self.subjects,
                    seq,
                    msg.headers.as_ref(),
                    msg.payload,
                )
                .map_err(|e| (seq, e.to_string()));
                if each(entry)?.is_break() {
                    return Ok(ControlFlow::Break(()));
                }
            }
            // The server may end a batch early (a byte limit, say): ask again
            // unless the replica said nothing follows, or had nothing.
            if got == 0 || pending_after == Some(0) {
                return Ok(ControlFlow::Continue(()));
            }
        }
    }

    /// Reads one message by stream sequence.
    ///
    /// # Errors
    /// [`LoadError`] as for [`EventStore::load`]; `Ok(None)` when there is none.
    pub async fn get(&self, seq: u64) -> Result<Option<RecordedEvent>, LoadError> {
        match self.stream.direct_get(seq).await {
            Ok(msg) => RecordedEvent::from_parts(
                msg.subject.as_str(),
                &self.subjects,
                msg.sequence,
                Some(&msg.headers),
                msg.payload,
            )
            .map(Some)
            .map_err(|e| LoadError::Corrupt {
                seq,
                reason: e.to_string(),
            }),
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => Ok(None),
            Err(e) => Err(LoadError::Unavailable(e.to_string())),
        }
    }
}

/// A checked connection to `urls` and its JetStream context, with the
/// store's API timeout.
async fn dial(
    urls: &[String],
    client_name: &str,
) -> Result<(async_nats::Client, jetstream::Context), StartError> {
    let client = crate::connect_checked(urls, client_name).await?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(JETSTREAM_TIMEOUT);
    Ok((client, js))
}

/// `step` of a start-up within [`START_DEADLINE`], a failure named after the
/// URLs and the stream.
async fn within_start_deadline<T>(
    urls: &[String],
    spec: &StreamSpec,
    step: impl std::future::Future<Output = Result<T, ProvisionError>>,
) -> Result<T, StartError> {
    match tokio::time::timeout(START_DEADLINE, step).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(StartError::Stream {
            urls: crate::shown_urls(urls),
            stream: spec.name.clone(),
            source,
        }),
        Err(_) => Err(StartError::NoAnswer {
            urls: crate::shown_urls(urls),
            secs: START_DEADLINE.as_secs(),
        }),
    }
}

/// Whether a publish was refused because the stream (or the account) has no
/// room left: nats-server answers "maximum bytes exceeded" for a stream at
/// its `max_bytes` with `discard: new`, and "insufficient resources" when the
/// server's own store limit is reached.
fn storage_full(e: &jetstream::context::PublishError) -> bool {
    is_storage_full(&e.to_string())
}

/// Whether an error's text says the stream, bucket or account is full (see
/// the append's [`AppendError::StorageFull`]); for writes that are not
/// appends, such as a KV bucket's.
#[must_use]
pub fn is_storage_full(error_text: &str) -> bool {
    let text = error_text.to_ascii_lowercase();
    text.contains("maximum bytes exceeded") || text.contains("insufficient resources")
}

/// Whether reads from [`Replica::Any`] answer as a replica that has received
/// nothing yet: `EVENTSTORE_FAULT=stale-replica`. A replica that lags is
/// legal in a cluster and hard to get on demand; the tests arm this to show
/// that no rejection, mismatch or no-op is final until the leader confirms
/// it. Debug builds only.
#[cfg(debug_assertions)]
fn stale_replica() -> bool {
    static ARMED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ARMED.get_or_init(|| {
        let armed = std::env::var("EVENTSTORE_FAULT").is_ok_and(|v| v == "stale-replica");
        if armed {
            tracing::warn!("fault stale-replica: direct gets answer as a replica that has nothing");
        }
        armed
    })
}

/// Release builds: replicas answer as they are.
#[cfg(not(debug_assertions))]
#[inline(always)]
fn stale_replica() -> bool {
    false
}

/// Where a read of one subject is: the next sequence it expects and how
/// many messages it has read, for the fold limit.
struct Cursor<'a> {
    subject: &'a str,
    what: &'a str,
    next: u64,
    count: usize,
}

impl Cursor<'_> {
    /// Takes message `seq`. Reads must move forward; anything else is a
    /// server bug: an error, not a loop.
    fn advance(&mut self, seq: u64) -> Result<(), LoadError> {
        if seq < self.next {
            return Err(LoadError::Unavailable(format!(
                "a read of {} after sequence {} answered sequence {seq}",
                self.subject,
                self.next - 1
            )));
        }
        self.next = seq + 1;
        self.count += 1;
        if self.count > AGGREGATE_EVENTS_MAX {
            return Err(LoadError::TooLong(self.what.to_string()));
        }
        Ok(())
    }
}
