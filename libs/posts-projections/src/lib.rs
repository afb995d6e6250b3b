//! The read models of posts-query: `post-view` on redb (lookups, listings),
//! `post-search` on tantivy (full text), both on stream `POSTS`, and
//! `comment-view` on redb, on stream `COMMENTS`. Each implements
//! [`projection::Projection`]; each is a pure function of its stream: every
//! timestamp comes from the event's `Occurred-At`, never from the clock.
//!
//! ```no_run
//! # fn demo() -> anyhow::Result<()> {
//! let (view, reader) = posts_projections::view::open(std::path::Path::new("data/query/post-view.redb"))?;
//! println!("checkpoint {}", reader.checkpoint()?);
//! # Ok(()) }
//! ```

pub mod comment_view;
pub mod rebuild;
pub mod search;
mod snippet;
mod tokenizer;
pub mod view;

use eventstore::RecordedEvent;
use posts::Event;
use projection::Incoming;

pub const POST_VIEW: &str = "post-view";
pub const POST_SEARCH: &str = "post-search";
pub use comment_view::COMMENT_VIEW;
/// Every projection this crate knows, by name.
pub const PROJECTIONS: [&str; 3] = [POST_VIEW, POST_SEARCH, COMMENT_VIEW];

/// The stream projection `name` follows: `COMMENTS` for comment-view,
/// `POSTS` for the others.
#[must_use]
pub fn stream_of(name: &str) -> &'static str {
    if name == COMMENT_VIEW {
        comments::context::STREAM
    } else {
        posts::context::STREAM
    }
}
/// Parked events whose details are kept (the total is always counted).
pub const PARKED_RECENT_MAX: usize = 100;

/// Once at least this many events are still to come, a projection is far
/// behind (a catch-up, a replay): both hold changed posts in memory (see
/// `SearchProjection::held`, `ViewProjection::held`) and commit every
/// [`CATCH_UP_COMMIT_INTERVAL`], until near the head (see [`Backlog`]).
const FAR_BEHIND_EVENTS: u64 = 10_000;
/// Where being far behind ends. Ending it at [`FAR_BEHIND_EVENTS`] wrote
/// post-search's held posts with 10k events to go: in `just bench`'s stream those
/// were edits of ~10k posts just written, each indexed a second time and
/// its first version deleted (a tenth of the catch-up's indexing, and two
/// more segments for every search to visit).
const NEAR_HEAD_EVENTS: u64 = 500;
/// Commits while far behind: rarer, so that more events of one post fold
/// into one held post before it is written. Readers see a catch-up's
/// progress in steps of this; once near the head, commits come as they do
/// live, and at once when caught up.
const CATCH_UP_COMMIT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether a projection is far behind, from the events still to come after
/// each batch (as the runner says). It becomes far behind at
/// [`FAR_BEHIND_EVENTS`], and stops being so at the head (nothing to come),
/// or after two batches in a row left fewer than [`NEAR_HEAD_EVENTS`].
///
/// One batch under [`NEAR_HEAD_EVENTS`] is not enough: the feed hands
/// over what the server has sent, so a catch-up's second last batch often
/// leaves a few hundred events, already on their way. Leaving there wrote
/// the held posts, then committed those last events on their own: in
/// `just bench`, every catch-up ended with a second search commit (~80 ms
/// of a 2.5 s round) and two more, tiny, segments.
#[derive(Debug, Default, Clone, Copy)]
struct Backlog {
    far: bool,
    /// The last batch left fewer than [`NEAR_HEAD_EVENTS`] to come.
    near: bool,
}

impl Backlog {
    fn far_behind(self) -> bool {
        self.far
    }

    fn update(&mut self, events: u64) {
        let near = events < NEAR_HEAD_EVENTS;
        if events >= FAR_BEHIND_EVENTS {
            self.far = true;
        } else if events == 0 || (near && self.near) {
            self.far = false;
        }
        self.near = near;
    }
}

/// Why both read models refuse `event` for a post in this state: absent
/// (`None`), or stored or held, deleted or not (`Some(deleted)`).
fn cannot_follow(event: &Event, deleted: Option<bool>) -> String {
    let state = match deleted {
        None => "absent",
        Some(true) => "deleted",
        Some(false) => "live",
    };
    format!("{} cannot follow a post that is {state}", event.name())
}

/// Decodes envelope and payload of one incoming message, or says why not.
fn decode(incoming: &Incoming) -> Result<(&RecordedEvent, Event), String> {
    let env = incoming
        .envelope
        .as_ref()
        .map_err(|e| format!("bad envelope: {e}"))?;
    let event = posts::decode(&env.event_type, env.schema, &env.payload)
        .map_err(|e| format!("undecodable payload: {e}"))?;
    Ok((env, event))
}

/// Microseconds since the Unix epoch, the view's timestamp unit.
fn micros(at: time::OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
}

/// RFC 3339 text of a microsecond timestamp.
#[must_use]
pub fn format_micros(us: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .map(eventstore::format_rfc3339)
        .unwrap_or_default()
}

/// One event as the feed hands it over, for unit tests: post `id`,
/// occurring `at_s` seconds after the Unix epoch.
#[cfg(test)]
fn incoming_at(seq: u64, id: &str, at_s: i64, event: &Event) -> Incoming {
    let (event_type, schema, payload) = posts::encode(event);
    Incoming {
        seq,
        envelope: Ok(RecordedEvent {
            seq,
            subject: format!("posts.{id}"),
            aggregate_id: id.to_string(),
            event_id: format!("e{seq}"),
            event_type: event_type.to_string(),
            schema,
            occurred_at: time::OffsetDateTime::from_unix_timestamp(at_s).unwrap(),
            correlation_id: format!("c{seq}"),
            causation_id: format!("c{seq}"),
            actor: None,
            traceparent: None,
            payload: bytes::Bytes::from(payload),
        }),
    }
}

/// A small deterministic generator for unit tests (xorshift64*); the seed
/// must not be 0.
#[cfg(test)]
struct Rng(u64);

#[cfg(test)]
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        usize::try_from(x % n as u64).unwrap()
    }
}

use eventstore::hex;

/// Crashes the process at a named point when `POSTS_FAILPOINT` names it: the
/// chaos suite kills at exactly the dangerous instants (between two commits,
/// during a swap). Compiled only into debug builds: release builds have no
/// failpoints at all.
#[cfg(debug_assertions)]
pub fn failpoint(name: &str) {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        std::env::var("POSTS_FAILPOINT")
            .ok()
            .filter(|v| !v.is_empty())
    });
    if armed.as_deref() == Some(name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}

/// Release builds: failpoints compile to nothing.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn failpoint(_name: &str) {}

/// Whether the fault point `name` fails now: `POSTS_FAILPOINT=name@/a/file`
/// makes it fail while that file exists, as a full disk does until someone
/// frees space. The tests check what a projection fault looks like (state
/// `halted`, `/readyz` 503) and that the projection resumes from its
/// checkpoint, losing and doubling nothing. Debug builds only.
#[cfg(debug_assertions)]
pub fn failing(name: &str) -> bool {
    static ARMED: std::sync::OnceLock<Option<(String, std::path::PathBuf)>> =
        std::sync::OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        let v = std::env::var("POSTS_FAILPOINT").ok()?;
        let (point, file) = v.split_once('@')?;
        Some((point.to_string(), file.into()))
    });
    armed
        .as_ref()
        .is_some_and(|(point, file)| point == name && file.exists())
}

/// Release builds: fault points never fail.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn failing(_name: &str) -> bool {
    false
}
