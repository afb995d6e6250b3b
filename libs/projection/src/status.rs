use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// What a projection is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProjectionState {
    Running,
    Rebuilding,
    Halted,
}

/// Shared, lock-light status of one projection, read by HTTP handlers.
#[derive(Debug)]
pub struct Status {
    name: String,
    visible: watch::Sender<u64>,
    /// Applied to the store, committed or not: ahead of `visible` while a
    /// store holds changes back (far behind). For progress.
    applied: AtomicU64,
    state: AtomicU8,
    parked_total: AtomicU64,
    caught_up_once: std::sync::atomic::AtomicBool,
    last_error: Mutex<Option<String>>,
    /// When the last error was set, in Unix seconds; 0 before any.
    last_error_at: AtomicU64,
}

/// Progress of a rebuild in another process, reported to the service.
/// `at_unix_ms` lets the service ignore a report from a replay that died.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RebuildProgress {
    pub applied_seq: u64,
    pub target_seq: u64,
    pub events_per_sec: f64,
    pub at_unix_ms: u64,
}

/// A copy of [`Status`] for `/projections`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusSnapshot {
    pub name: String,
    pub checkpoint: u64,
    /// See [`Status::applied`].
    pub applied: u64,
    pub state: ProjectionState,
    pub parked: u64,
    pub caught_up_once: bool,
    pub last_error: Option<String>,
}

impl Status {
    #[must_use]
    pub fn new(name: &str, visible: u64, parked_total: u64) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_string(),
            visible: watch::channel(visible).0,
            applied: AtomicU64::new(visible),
            state: AtomicU8::new(0),
            parked_total: AtomicU64::new(parked_total),
            caught_up_once: std::sync::atomic::AtomicBool::new(false),
            last_error: Mutex::new(None),
            last_error_at: AtomicU64::new(0),
        })
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    #[must_use]
    pub fn visible(&self) -> u64 {
        *self.visible.borrow()
    }

    /// The last sequence applied to the store, visible or not yet: what a
    /// rebuild's progress counts.
    #[must_use]
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed).max(self.visible())
    }

    /// Records the last sequence applied; after a rollback, the checkpoint.
    pub fn set_applied(&self, seq: u64) {
        self.applied.store(seq, Ordering::Relaxed);
    }

    /// Publishes a new visible sequence; it never goes backwards, except
    /// through [`Status::reset_visible`] when a store is swapped.
    pub fn set_visible(&self, seq: u64) {
        self.visible.send_if_modified(|v| {
            if seq > *v {
                *v = seq;
                true
            } else {
                false
            }
        });
    }

    pub fn reset_visible(&self, seq: u64) {
        self.visible.send_replace(seq);
    }

    /// Waits until the visible sequence reaches `seq` or `timeout` passes.
    /// Returns whether it was reached. Wakes on each advance: no polling.
    pub async fn wait_visible(&self, seq: u64, timeout: std::time::Duration) -> bool {
        let mut rx = self.visible.subscribe();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|v| *v >= seq)).await;
        matches!(reached, Ok(Ok(_)))
    }

    #[must_use]
    pub fn state(&self) -> ProjectionState {
        match self.state.load(Ordering::Relaxed) {
            1 => ProjectionState::Rebuilding,
            2 => ProjectionState::Halted,
            _ => ProjectionState::Running,
        }
    }

    pub fn set_state(&self, state: ProjectionState) {
        let v = match state {
            ProjectionState::Running => 0,
            ProjectionState::Rebuilding => 1,
            ProjectionState::Halted => 2,
        };
        self.state.store(v, Ordering::Relaxed);
    }

    pub fn set_parked_total(&self, n: u64) {
        self.parked_total.store(n, Ordering::Relaxed);
    }

    #[must_use]
    pub fn parked_total(&self) -> u64 {
        self.parked_total.load(Ordering::Relaxed)
    }

    pub fn mark_caught_up(&self) {
        self.caught_up_once.store(true, Ordering::Relaxed);
    }

    #[must_use]
    pub fn caught_up_once(&self) -> bool {
        self.caught_up_once.load(Ordering::Relaxed)
    }

    pub fn set_error(&self, e: Option<String>) {
        if e.is_some() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.last_error_at.store(now.max(1), Ordering::Relaxed);
        }
        if let Ok(mut g) = self.last_error.lock() {
            *g = e;
        }
    }

    /// When the last error was set (it may have cleared since), in Unix
    /// seconds; `None` before any.
    #[must_use]
    pub fn last_error_at(&self) -> Option<u64> {
        Some(self.last_error_at.load(Ordering::Relaxed)).filter(|t| *t > 0)
    }

    #[must_use]
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }

    #[must_use]
    pub fn snapshot(&self) -> StatusSnapshot {
        StatusSnapshot {
            name: self.name.clone(),
            checkpoint: self.visible(),
            applied: self.applied(),
            state: self.state(),
            parked: self.parked_total(),
            caught_up_once: self.caught_up_once(),
            last_error: self.last_error(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a replay's progress counts runs ahead of what readers see while
    /// a store holds changes back, and is never behind it.
    #[test]
    fn applied_runs_ahead_of_visible_and_never_behind() {
        let status = Status::new("p", 5, 0);
        assert_eq!((status.applied(), status.visible()), (5, 5));
        status.set_applied(9);
        assert_eq!((status.applied(), status.visible()), (9, 5));
        status.set_visible(12);
        assert_eq!(status.applied(), 12);
        // A rollback to the checkpoint.
        status.set_applied(20);
        status.set_applied(12);
        assert_eq!(status.applied(), 12);
    }
}
