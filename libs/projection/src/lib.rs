//! The projection runtime: a [`Projection`] trait and a [`Runner`] that follows
//! a stream from the projection's own checkpoint + 1 with an ordered consumer,
//! applies events in batches on a blocking thread, parks poison events to the
//! `DLQ` stream, and retries transient faults without ever advancing the
//! checkpoint past an event that was not applied. Knows no domain and no
//! HTTP.
//!
//! ```no_run
//! # fn demo(p: Box<dyn projection::Projection>, store: eventstore::EventStore) {
//! let status = projection::Status::new(p.name(), p.checkpoint(), p.parked_total());
//! let runner = projection::Runner::start(p, store, status.clone(), projection::RunnerOptions::live());
//! # }
//! ```

mod consistency;
pub mod durable;
pub mod redb_file;
mod runner;
mod status;

pub use consistency::parse_min_seq;
pub use redb_file::{RedbFile, RedbFileError};
pub use runner::{DrainError, Feed, Runner, RunnerOptions, drain_to, follower_config};
pub use status::{ProjectionState, RebuildProgress, Status, StatusSnapshot};

use eventstore::{EnvelopeError, RecordedEvent};

/// One message from the stream as a projection sees it: its sequence and
/// decoded envelope, or why the envelope does not decode. The raw message is
/// not kept (a dead-letter copy is read back from the stream by sequence):
/// every queued event would otherwise hold its header map.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub seq: u64,
    pub envelope: Result<RecordedEvent, EnvelopeError>,
}

/// An event the projection refused: recorded with its sequence and reason.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Parked {
    pub seq: u64,
    pub reason: String,
}

/// A fault worth retrying (disk full, IO error): the batch was not applied.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProjectionError(pub String);

impl ProjectionError {
    pub fn new(e: impl std::fmt::Display) -> Self {
        Self(e.to_string())
    }
}

/// A read model built from the stream. Implementations own their store.
///
/// Contract:
/// - `apply_batch` applies every event of the batch (parking the ones it
///   refuses) and records the batch's last sequence as applied. Effects,
///   parked records and the checkpoint become durable together, atomically:
///   after a crash the store is either before or after the whole unit.
/// - Re-applying an event at or below the durable checkpoint must not happen:
///   the runner starts at `checkpoint() + 1`.
/// - On `Err`, nothing of the batch is durable; the runner calls `recover`
///   and resumes from `checkpoint() + 1`.
pub trait Projection: Send + 'static {
    fn name(&self) -> &str;
    /// Last stream sequence whose effect is committed to the store, together
    /// with the checkpoint itself: the runner resumes from here + 1 after a
    /// fault. A store may commit without fsync in between durable flushes;
    /// after a crash it reopens at its last durable commit, which holds its
    /// own (older) checkpoint, so effects and position never part.
    fn checkpoint(&self) -> u64;
    /// Last stream sequence readers can see (≤ applied, ≥ checkpoint).
    fn visible(&self) -> u64;
    /// Applies a batch in stream order.
    ///
    /// # Errors
    /// [`ProjectionError`] for a transient fault; nothing was made durable.
    fn apply_batch(&mut self, batch: &[&Incoming]) -> Result<Vec<Parked>, ProjectionError>;
    /// How many events the server said were still to come after the batch
    /// about to be applied (a lower bound for a runner behind the shared
    /// feed): a store may work differently while far behind. Default: ignored.
    fn set_backlog(&mut self, _events: u64) {}
    /// Makes everything applied durable and visible (no-op where each batch
    /// already is). Called when the runner has caught up, and at shutdown.
    ///
    /// # Errors
    /// [`ProjectionError`] for a transient fault.
    fn flush(&mut self) -> Result<(), ProjectionError>;
    /// Whether a flush is worth doing now. A store whose flush is costly (a
    /// tantivy commit writes and fsyncs a segment) says no for a short while
    /// after the last one, so a trickle of events shares commits; the runner
    /// retries on its idle tick, and always flushes at stop.
    fn flush_due(&self) -> bool {
        true
    }
    /// Called once a rebuild has applied everything up to its target, before
    /// the store is aligned, compared and installed: the store makes itself
    /// durable and may reorganise itself for reads. Default: a flush.
    ///
    /// # Errors
    /// [`ProjectionError`] for a transient fault.
    fn compact(&mut self) -> Result<(), ProjectionError> {
        self.flush()
    }
    /// Drops whatever was applied but not durable, back to `checkpoint()`.
    ///
    /// # Errors
    /// [`ProjectionError`] when even that fails.
    fn recover(&mut self) -> Result<(), ProjectionError>;
    /// Total events ever parked, and the most recent ones.
    fn parked_total(&self) -> u64;
    fn parked_recent(&self) -> Vec<Parked>;
}
