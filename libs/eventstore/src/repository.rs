use std::hash::{Hash, Hasher};
use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;
use time::OffsetDateTime;

use crate::envelope::{EncodedEvent, Metadata, RecordedEvent};
use crate::store::{AppendError, EventStore, LoadError, Replica};

/// Reload-and-re-decide attempts after a concurrency conflict. Within one
/// process writers to an aggregate are serialised, so conflicts only come from
/// other instances; eight rounds outlast any realistic handful of them.
const CONFLICT_RETRIES_MAX: u32 = 8;
/// Aggregates kept folded in memory. A post state is at most ~100 KB of content;
/// 4096 of them bound the cache near 400 MB in the worst case, a few MB typically.
const CACHE_AGGREGATES_MAX: usize = 4096;
/// Lock stripes serialising commands on the same aggregate inside one process.
const LOCK_STRIPES: usize = 1024;

/// A context's aggregate, as the repository sees it: pure functions, no IO.
/// Implemented by the domain crate, next to its events.
///
/// - `decide` turns a command on a state into events, or a typed rejection;
/// - `evolve` folds one event into the state (`State::default()` is the
///   state before the first event);
/// - `encode` and `decode` map events to and from the stream's payloads,
///   through (`Event-Type`, `Event-Schema`), upcasting old schemas.
pub trait Aggregate: Send + Sync + 'static {
    type State: Clone + Default + Send + Sync + 'static;
    type Event: Clone + Send + Sync;
    type Command: Send + Sync;
    type Rejection: Send;
    /// An event that cannot follow the state: corrupt history.
    type Invariant: std::fmt::Display;
    /// A payload that is not one of this context's events: a poison event.
    type DecodeError: std::fmt::Display;

    /// The events `command` produces on `state`.
    ///
    /// # Errors
    /// The rejection when the command is refused.
    fn decide(
        state: &Self::State,
        command: &Self::Command,
    ) -> Result<Vec<Self::Event>, Self::Rejection>;
    /// Folds one event into the state.
    ///
    /// # Errors
    /// When the event violates the aggregate's invariants.
    fn evolve(state: Self::State, event: &Self::Event) -> Result<Self::State, Self::Invariant>;
    /// Decodes a stored event, upcasting old schemas.
    ///
    /// # Errors
    /// When the event cannot be decoded.
    fn decode(event: &RecordedEvent) -> Result<Self::Event, Self::DecodeError>;
    fn encode(event: &Self::Event) -> EncodedEvent;
}

/// A folded aggregate with the position it was folded up to.
#[derive(Clone, Debug)]
pub struct Loaded<S> {
    pub state: S,
    /// Number of events folded: the version HTTP shows.
    pub version: u64,
    /// Stream sequence of the last folded event, 0 if none.
    pub last_seq: u64,
    /// Stream sequence of the first event, 0 if none.
    pub first_seq: u64,
}

/// What a successful command produced.
#[derive(Clone, Debug)]
pub struct Executed<S> {
    pub loaded: Loaded<S>,
    /// False when the decision produced no event (nothing was appended).
    pub appended: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecuteError<R> {
    #[error("command rejected")]
    Rejected(R),
    #[error("version mismatch: expected {expected}, actual {actual}")]
    VersionMismatch { expected: u64, actual: u64 },
    /// A decision of several events: each append is one publish with its
    /// own OCC check, so a command yields at most one (a domain bug).
    #[error("the command decided {0} events; a command may yield at most one")]
    SeveralEvents(usize),
    #[error("still conflicting after {0} reloads")]
    TooManyConflicts(u32),
    #[error(transparent)]
    Append(AppendError),
    #[error(transparent)]
    Load(LoadError),
}

/// Loads, decides and appends, with a bounded cache of folded aggregates.
pub struct Repository<A: Aggregate> {
    store: EventStore,
    cache: Mutex<LruCache<String, Loaded<A::State>>>,
    locks: Vec<tokio::sync::Mutex<()>>,
}

impl<A: Aggregate> Repository<A> {
    #[must_use]
    pub fn new(store: EventStore) -> Self {
        let cap = NonZeroUsize::new(CACHE_AGGREGATES_MAX).unwrap_or(NonZeroUsize::MIN);
        Self {
            store,
            cache: Mutex::new(LruCache::new(cap)),
            locks: (0..LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    #[must_use]
    pub fn store(&self) -> &EventStore {
        &self.store
    }

    fn lock_for(&self, id: &str) -> &tokio::sync::Mutex<()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        id.hash(&mut h);
        let stripe = usize::try_from(h.finish() % LOCK_STRIPES as u64).unwrap_or(0);
        &self.locks[stripe]
    }

    fn cached(&self, id: &str) -> Option<Loaded<A::State>> {
        self.cache.lock().ok()?.get(id).cloned()
    }

    fn remember(&self, id: &str, loaded: &Loaded<A::State>) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.put(id.to_string(), loaded.clone());
        }
    }

    fn forget(&self, id: &str) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.pop(id);
        }
    }

    /// Folds the events after `from.last_seq` into `from`, one at a time,
    /// read from `replica`.
    async fn catch_up(
        &self,
        id: &str,
        from: Loaded<A::State>,
        replica: Replica,
    ) -> Result<Loaded<A::State>, LoadError> {
        let after = from.last_seq;
        let mut folded = Some(from);
        self.store
            .fold(id, after, replica, |recorded| {
                let Some(mut from) = folded.take() else {
                    return Ok(());
                };
                let event = A::decode(&recorded).map_err(|e| LoadError::Corrupt {
                    seq: recorded.seq,
                    reason: e.to_string(),
                })?;
                from.state = A::evolve(from.state, &event).map_err(|e| LoadError::Corrupt {
                    seq: recorded.seq,
                    reason: e.to_string(),
                })?;
                // Each stored event bumps the version by one: contiguous versions.
                from.version += 1;
                assert!(recorded.seq > from.last_seq, "sequences must increase");
                if from.first_seq == 0 {
                    from.first_seq = recorded.seq;
                }
                from.last_seq = recorded.seq;
                folded = Some(from);
                Ok(())
            })
            .await?;
        folded.ok_or_else(|| LoadError::Unavailable(format!("the fold of {id} was cut short")))
    }

    fn empty() -> Loaded<A::State> {
        Loaded {
            state: A::State::default(),
            version: 0,
            last_seq: 0,
            first_seq: 0,
        }
    }

    /// Loads an aggregate from the stream, bypassing and refreshing the cache.
    ///
    /// # Errors
    /// [`LoadError`] when the store is down or the history is corrupt.
    pub async fn load_fresh(&self, id: &str) -> Result<Loaded<A::State>, LoadError> {
        let base = self.cached(id).unwrap_or_else(Self::empty);
        let loaded = self.catch_up(id, base, Replica::Leader).await?;
        if loaded.version > 0 {
            self.remember(id, &loaded);
        }
        Ok(loaded)
    }

    /// Runs `command` through the aggregate's own `decide`: the command loop
    /// every context shares (see [`Repository::execute`]). A command yields
    /// at most one event, so each append is one publish with its own OCC
    /// check; a decision of several events is refused as a domain bug.
    ///
    /// # Errors
    /// [`ExecuteError`] for rejections, mismatches, and store failures.
    pub async fn run(
        &self,
        id: &str,
        expected_version: Option<u64>,
        meta: &Metadata,
        occurred_at: OffsetDateTime,
        command: &A::Command,
    ) -> Result<Executed<A::State>, ExecuteError<A::Rejection>> {
        self.execute(
            id,
            false,
            expected_version,
            meta,
            occurred_at,
            |state, _| A::decide(state, command),
        )
        .await
    }

    /// Runs one command: `decide` sees the current state and version and
    /// returns the event to append, or none for a no-op. On a conflict the
    /// aggregate is reloaded and `decide` runs again, unless the caller pinned
    /// `expected_version`, in which case a moved aggregate is a mismatch.
    /// `assume_new` skips the initial read for an id the caller just generated.
    ///
    /// # Errors
    /// [`ExecuteError`] for rejections, mismatches, and store failures.
    pub async fn execute<R>(
        &self,
        id: &str,
        assume_new: bool,
        expected_version: Option<u64>,
        meta: &Metadata,
        occurred_at: OffsetDateTime,
        decide: impl Fn(&A::State, u64) -> Result<Vec<A::Event>, R>,
    ) -> Result<Executed<A::State>, ExecuteError<R>> {
        let _serialised = self.lock_for(id).lock().await;
        let (mut loaded, mut fresh) = match self.cached(id) {
            // A freshly generated id has no history: skip the read. The append
            // still expects sequence 0, so a wrong guess is a conflict, not a bug.
            None if assume_new => (Self::empty(), false),
            Some(l) => (l, false),
            // Read from any replica, which may lag: not fresh, so a rejection
            // or a version mismatch is checked against the leader before it
            // becomes final (a PATCH right after a create made through
            // another instance must not be a 404).
            None => (
                self.catch_up(id, Self::empty(), Replica::Any)
                    .await
                    .map_err(|e| self.load_failed(id, e))?,
                false,
            ),
        };
        for _ in 0..=CONFLICT_RETRIES_MAX {
            if let Some(expected) = expected_version
                && loaded.version != expected
            {
                if !fresh {
                    loaded = self.refresh(id, loaded).await?;
                    fresh = true;
                    continue;
                }
                return Err(ExecuteError::VersionMismatch {
                    expected,
                    actual: loaded.version,
                });
            }
            let event = match decide(&loaded.state, loaded.version) {
                Ok(mut events) if events.len() == 1 => events.remove(0),
                // Nothing to append on a state that may be stale: check it
                // against the stream first, as a rejection is.
                Ok(events) if events.is_empty() && !fresh => {
                    loaded = self.refresh(id, loaded).await?;
                    fresh = true;
                    continue;
                }
                Ok(events) if events.is_empty() => {
                    return Ok(Executed {
                        loaded,
                        appended: false,
                    });
                }
                Ok(events) => return Err(ExecuteError::SeveralEvents(events.len())),
                // A stale cached state could reject wrongly: decide once more
                // on the state as the stream has it before giving up.
                Err(_) if !fresh => {
                    loaded = self.refresh(id, loaded).await?;
                    fresh = true;
                    continue;
                }
                Err(rejection) => return Err(ExecuteError::Rejected(rejection)),
            };
            let encoded = A::encode(&event);
            match self
                .store
                .append(id, loaded.last_seq, &encoded, occurred_at, meta)
                .await
            {
                Ok(seq) => {
                    let state = A::evolve(loaded.state, &event).map_err(|e| {
                        // decide produced an event evolve refuses: a domain bug.
                        self.forget(id);
                        ExecuteError::Load(LoadError::Corrupt {
                            seq,
                            reason: e.to_string(),
                        })
                    })?;
                    let next = Loaded {
                        state,
                        version: loaded.version + 1,
                        last_seq: seq,
                        first_seq: if loaded.first_seq == 0 {
                            seq
                        } else {
                            loaded.first_seq
                        },
                    };
                    self.remember(id, &next);
                    return Ok(Executed {
                        loaded: next,
                        appended: true,
                    });
                }
                Err(AppendError::Conflict { .. }) => {
                    loaded = self.refresh(id, loaded).await?;
                    fresh = true;
                }
                Err(e) => {
                    self.forget(id);
                    return Err(ExecuteError::Append(e));
                }
            }
        }
        Err(ExecuteError::TooManyConflicts(CONFLICT_RETRIES_MAX))
    }

    async fn refresh<R>(
        &self,
        id: &str,
        loaded: Loaded<A::State>,
    ) -> Result<Loaded<A::State>, ExecuteError<R>> {
        // The leader has every acknowledged write: what it says is final.
        let loaded = self
            .catch_up(id, loaded, Replica::Leader)
            .await
            .map_err(|e| self.load_failed(id, e))?;
        if loaded.version > 0 {
            self.remember(id, &loaded);
        }
        Ok(loaded)
    }

    fn load_failed<R>(&self, id: &str, e: LoadError) -> ExecuteError<R> {
        self.forget(id);
        ExecuteError::Load(e)
    }
}
