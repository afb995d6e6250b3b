//! The process manager `post-deleted-cascade`: every `PostDeleted` in stream
//! `POSTS` removes the post's live comments (`CommentRemoved {reason:
//! "post_deleted"}`), exactly once.
//!
//! - It follows `POSTS` with a durable consumer, acknowledged only after the
//!   removals are: its position lives in NATS, and a crash mid-cascade
//!   delivers the `PostDeleted` again.
//! - It also follows `COMMENTS`: a comment decided before the `PostDeleted`
//!   but appended after the cascade listed the post's comments is removed
//!   when its `CommentAdded` comes by.
//! - Each removal goes through the comment aggregate (it removes only a live
//!   comment) with optimistic concurrency, and its `Nats-Msg-Id` is a
//!   name-based UUID of the `PostDeleted`'s id and the comment's: however
//!   many times and from however many instances it runs, one removal lands.
//!   Its `Causation-Id` is the `PostDeleted`'s id; its `Actor` and
//!   `Correlation-Id` are the `PostDeleted`'s.

use eventstore::{ExecuteError, LoadError, Metadata, RecordedEvent, Replica};
use projection::durable::{Durable, HandleError};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::AppState;

/// The process manager's name: `/projections` and its consumers.
pub const NAME: &str = "post-deleted-cascade";
/// Namespace of the effects' name-based event ids (UUIDv5).
const EFFECT_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x3c5e_91a7_0b2d_5e64_8f19_d0c2_7a4b_6e13);

/// The event id of the removal of comment `comment` caused by `source`.
#[must_use]
pub fn effect_id(source_event_id: &str, comment: &str) -> String {
    let name = format!("{source_event_id}/{comment}");
    uuid::Uuid::new_v5(&EFFECT_NAMESPACE, name.as_bytes()).to_string()
}

/// The cascade's two followers.
pub struct Cascade {
    on_posts: Durable,
    on_comments: Durable,
}

impl Cascade {
    #[must_use]
    pub fn new(comments: eventstore::EventStore, posts: eventstore::EventStore) -> Self {
        Self {
            on_posts: Durable::new(posts, NAME),
            on_comments: Durable::new(comments, &format!("{NAME}-comments")),
        }
    }

    /// Starts both followers; they end when `stop` turns true.
    #[must_use]
    pub fn start(&self, state: &AppState, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        let posts = {
            let state = state.clone();
            let follower = self.on_posts.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                follower
                    .run(stop, |event| {
                        let state = state.clone();
                        async move { on_post_event(&state, event).await }
                    })
                    .await;
            })
        };
        let comments = {
            let state = state.clone();
            let follower = self.on_comments.clone();
            tokio::spawn(async move {
                follower
                    .run(stop, |event| {
                        let state = state.clone();
                        async move { on_comment_event(&state, event).await }
                    })
                    .await;
            })
        };
        vec![posts, comments]
    }

    /// The `/projections` entry: one checkpoint and lag per source stream.
    pub async fn snapshot(&self) -> Value {
        let mut checkpoints = serde_json::Map::new();
        let mut lags = serde_json::Map::new();
        let mut sources = Vec::new();
        let mut total_lag = Some(0u64);
        let mut error = None;
        for follower in [&self.on_posts, &self.on_comments] {
            match follower.snapshot().await {
                Ok(s) => {
                    checkpoints.insert(s.stream.clone(), json!(s.checkpoint));
                    lags.insert(s.stream.clone(), json!(s.lag));
                    total_lag = total_lag.map(|t| t + s.lag);
                    sources.push(json!(s));
                }
                Err(e) => {
                    total_lag = None;
                    error = Some(e);
                }
            }
        }
        json!({
            "name": NAME,
            "kind": "process-manager",
            "state": if error.is_none() { "running" } else { "unknown" },
            "checkpoints": checkpoints,
            "lags": lags,
            "lag": total_lag,
            "sources": sources,
            "last_error": error,
        })
    }
}

fn transient(e: impl std::fmt::Display) -> HandleError {
    HandleError::Transient(e.to_string())
}

/// A `PostDeleted` removes every live comment of the post.
async fn on_post_event(state: &AppState, event: RecordedEvent) -> Result<(), HandleError> {
    if event.event_type != posts::Event::Deleted.name() {
        return Ok(());
    }
    let comments = state
        .host()
        .store()
        .aggregate_ids_under(&event.aggregate_id)
        .await
        .map_err(transient)?;
    let mut removed = 0u64;
    for comment in &comments {
        removed += remove(state, comment, &event).await?;
    }
    state.cascade().on_posts.status().add_effects(removed);
    tracing::info!(
        post_id = event.aggregate_id,
        comments = comments.len(),
        removed,
        "post deleted: cascade done"
    );
    Ok(())
}

/// A `CommentAdded` on a post that is deleted by now is removed.
async fn on_comment_event(state: &AppState, event: RecordedEvent) -> Result<(), HandleError> {
    if event.event_type != "CommentAdded" {
        return Ok(());
    }
    let Some((post_id, _)) = comments::context::split_id(&event.aggregate_id) else {
        return Ok(());
    };
    let last = match state.posts().last_event(post_id, Replica::Leader).await {
        Ok(last) => last,
        Err(LoadError::Corrupt { seq, reason }) => {
            tracing::error!(
                post_id,
                seq,
                reason,
                "the post's last event is corrupt; no cascade"
            );
            return Ok(());
        }
        Err(e) => return Err(transient(e)),
    };
    if let Some(deleted) = last
        && deleted.event_type == posts::Event::Deleted.name()
    {
        let removed = remove(state, &event.aggregate_id, &deleted).await?;
        state.cascade().on_comments.status().add_effects(removed);
        if removed > 0 {
            tracing::info!(
                comment = event.aggregate_id,
                "comment on a deleted post removed"
            );
        }
    }
    Ok(())
}

/// Removes comment `comment` (an aggregate id) because of `source`, if it
/// is live: 1 when this call appended the removal.
async fn remove(
    state: &AppState,
    comment: &str,
    source: &RecordedEvent,
) -> Result<u64, HandleError> {
    let meta = Metadata {
        correlation_id: source.correlation_id.clone(),
        causation_id: source.event_id.clone(),
        event_id: Some(effect_id(&source.event_id, comment)),
        actor: source.actor.clone(),
        // The removal continues the trace of the PostDeleted that caused it.
        traceparent: source.traceparent.clone(),
    };
    match state
        .host()
        .repo()
        .run(
            comment,
            None,
            &meta,
            time::OffsetDateTime::now_utc(),
            &comments::cascade(),
        )
        .await
    {
        Ok(executed) => Ok(u64::from(executed.appended)),
        // Nothing to remove (a subject without a comment): nothing to retry.
        Err(ExecuteError::Rejected(r)) => {
            tracing::warn!(comment, rejection = %r, "cascade: nothing to remove");
            Ok(0)
        }
        // Retrying cannot repair a corrupt history; the command side
        // refuses the comment too, and the log says where.
        Err(ExecuteError::Load(LoadError::Corrupt { seq, reason })) => {
            tracing::error!(
                comment,
                seq,
                reason,
                "cascade: the comment's history is corrupt"
            );
            Ok(0)
        }
        Err(e) => Err(transient(e)),
    }
}
