use serde::{Deserialize, Serialize};

/// Body bound, in UTF-8 bytes, kept as sent; not only whitespace.
pub const BODY_BYTES_MAX: usize = 10_000;
/// Author bound, in characters after trimming, as for posts.
pub const AUTHOR_NAME_CHARS_MAX: usize = posts::AUTHOR_NAME_CHARS_MAX;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comment {
    pub post_id: String,
    pub body: String,
    pub author_name: String,
}

/// The state of one comment aggregate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CommentState {
    #[default]
    Absent,
    Live(Comment),
    Removed(Comment, RemovalReason),
}

/// Why a comment was removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemovalReason {
    /// Its author (or a moderator) removed it.
    Author,
    /// Its post was deleted: the cascade's effect.
    PostDeleted,
}

impl RemovalReason {
    /// The name in the HTTP contract and the docs.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            RemovalReason::Author => "author",
            RemovalReason::PostDeleted => "post_deleted",
        }
    }
}

/// The post a new comment is for, as stream `POSTS` has it when the command
/// is decided (the last event of `posts.<post_id>`). The command host reads
/// it; `decide` stays pure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostStatus {
    Missing,
    Live,
    Deleted,
}

impl PostStatus {
    /// The status a post's last event gives it: none is a missing post.
    #[must_use]
    pub fn from_last_event_type(event_type: Option<&str>) -> Self {
        match event_type {
            None => PostStatus::Missing,
            Some(t) if t == posts::Event::Deleted.name() => PostStatus::Deleted,
            Some(_) => PostStatus::Live,
        }
    }
}

/// What a client (or the cascade) asks for. Field values arrive raw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Add {
        post_id: String,
        post: PostStatus,
        body: String,
        author_name: String,
    },
    Edit {
        body: String,
    },
    Remove {
        reason: RemovalReason,
    },
}

/// What happened. Each variant has a stable name and schema (see codec).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Added {
        post_id: String,
        body: String,
        author_name: String,
    },
    Edited {
        body: String,
    },
    Removed {
        reason: RemovalReason,
    },
}

impl Event {
    /// The stable event type name carried in the `Event-Type` header.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Event::Added { .. } => "CommentAdded",
            Event::Edited { .. } => "CommentEdited",
            Event::Removed { .. } => "CommentRemoved",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("post not found")]
    PostNotFound,
    #[error("post is deleted")]
    PostDeleted,
    #[error("comment already exists")]
    AlreadyExists,
    #[error("comment not found")]
    NotFound,
    #[error("comment is removed")]
    Removed,
    #[error("{field} {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl From<posts::text::FieldError> for Rejection {
    fn from(e: posts::text::FieldError) -> Self {
        Rejection::Invalid {
            field: e.field,
            reason: e.reason,
        }
    }
}

/// An event that cannot follow the state it is applied to: corrupt history.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event} cannot follow a comment that is {state}")]
pub struct InvariantViolation {
    pub event: &'static str,
    pub state: &'static str,
}

fn body(value: &str) -> Result<String, Rejection> {
    Ok(posts::text::body("body", value, BODY_BYTES_MAX)?)
}

/// Decides which events a command produces on a state.
///
/// # Errors
/// [`Rejection`] when the command is not allowed on this state (or on its
/// post) or a field is out of bounds.
pub fn decide(state: &CommentState, command: &Command) -> Result<Vec<Event>, Rejection> {
    match (state, command) {
        (
            CommentState::Absent,
            Command::Add {
                post_id,
                post,
                body: text,
                author_name,
            },
        ) => {
            let event = Event::Added {
                post_id: post_id.clone(),
                body: body(text)?,
                author_name: posts::text::line("author_name", author_name, AUTHOR_NAME_CHARS_MAX)?,
            };
            match post {
                PostStatus::Missing => Err(Rejection::PostNotFound),
                PostStatus::Deleted => Err(Rejection::PostDeleted),
                PostStatus::Live => Ok(vec![event]),
            }
        }
        (_, Command::Add { .. }) => Err(Rejection::AlreadyExists),
        (CommentState::Absent, _) => Err(Rejection::NotFound),
        // The cascade removes what is live and leaves the rest alone, so
        // running it twice changes nothing.
        (
            CommentState::Removed(..),
            Command::Remove {
                reason: RemovalReason::PostDeleted,
            },
        ) => Ok(Vec::new()),
        (CommentState::Removed(..), _) => Err(Rejection::Removed),
        (CommentState::Live(comment), Command::Edit { body: text }) => {
            let text = body(text)?;
            // The same text again appends nothing.
            if text == comment.body {
                return Ok(Vec::new());
            }
            Ok(vec![Event::Edited { body: text }])
        }
        (CommentState::Live(_), Command::Remove { reason }) => {
            Ok(vec![Event::Removed { reason: *reason }])
        }
    }
}

fn state_name(state: &CommentState) -> &'static str {
    match state {
        CommentState::Absent => "absent",
        CommentState::Live(_) => "live",
        CommentState::Removed(..) => "removed",
    }
}

/// Folds one event into the state.
///
/// # Errors
/// [`InvariantViolation`] when the event cannot follow the state.
pub fn apply(state: CommentState, event: &Event) -> Result<CommentState, InvariantViolation> {
    match (state, event) {
        (
            CommentState::Absent,
            Event::Added {
                post_id,
                body,
                author_name,
            },
        ) => Ok(CommentState::Live(Comment {
            post_id: post_id.clone(),
            body: body.clone(),
            author_name: author_name.clone(),
        })),
        (CommentState::Live(mut c), Event::Edited { body }) => {
            c.body.clone_from(body);
            Ok(CommentState::Live(c))
        }
        (CommentState::Live(c), Event::Removed { reason }) => Ok(CommentState::Removed(c, *reason)),
        (state, event) => Err(InvariantViolation {
            event: event.name(),
            state: state_name(&state),
        }),
    }
}

/// The `post-deleted-cascade` decision for one comment of a deleted post:
/// remove it if it is live, else nothing.
#[must_use]
pub fn cascade() -> Command {
    Command::Remove {
        reason: RemovalReason::PostDeleted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn added(post_id: &str) -> Event {
        Event::Added {
            post_id: post_id.into(),
            body: "hello".into(),
            author_name: "bo".into(),
        }
    }

    fn add(post: PostStatus) -> Command {
        Command::Add {
            post_id: "p1".into(),
            post,
            body: "  hello  ".into(),
            author_name: "  bo ".into(),
        }
    }

    fn given(events: &[Event]) -> CommentState {
        events
            .iter()
            .try_fold(CommentState::Absent, apply)
            .expect("a valid history")
    }

    #[test]
    fn given_a_live_post_when_a_comment_is_added_then_it_keeps_its_body_and_trims_the_name() {
        let events = decide(&given(&[]), &add(PostStatus::Live)).unwrap();
        assert_eq!(
            events,
            vec![Event::Added {
                post_id: "p1".into(),
                body: "  hello  ".into(),
                author_name: "bo".into(),
            }]
        );
    }

    #[test]
    fn given_a_missing_or_deleted_post_when_a_comment_is_added_then_it_is_refused() {
        assert_eq!(
            decide(&given(&[]), &add(PostStatus::Missing)),
            Err(Rejection::PostNotFound)
        );
        assert_eq!(
            decide(&given(&[]), &add(PostStatus::Deleted)),
            Err(Rejection::PostDeleted)
        );
    }

    #[test]
    fn given_bad_fields_when_a_comment_is_added_then_the_field_is_named_before_the_post() {
        let cases = [
            ("   ", "bo", "body"),
            (&*"x".repeat(BODY_BYTES_MAX + 1), "bo", "body"),
            ("ok", " ", "author_name"),
            ("ok", "a\u{202E}b", "author_name"),
            ("ok", &*"n".repeat(AUTHOR_NAME_CHARS_MAX + 1), "author_name"),
        ];
        for (body, author, field) in cases {
            let cmd = Command::Add {
                post_id: "p1".into(),
                post: PostStatus::Missing,
                body: body.into(),
                author_name: author.into(),
            };
            match decide(&CommentState::Absent, &cmd) {
                Err(Rejection::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let at_bound = Command::Add {
            post_id: "p1".into(),
            post: PostStatus::Live,
            body: "é".repeat(BODY_BYTES_MAX / 2),
            author_name: "n".repeat(AUTHOR_NAME_CHARS_MAX),
        };
        assert!(decide(&CommentState::Absent, &at_bound).is_ok());
    }

    #[test]
    fn given_a_live_comment_when_edited_then_removed_then_both_happen_once() {
        let live = given(&[added("p1")]);
        let edit = Command::Edit { body: "new".into() };
        assert_eq!(
            decide(&live, &edit).unwrap(),
            vec![Event::Edited { body: "new".into() }]
        );
        let same = match &live {
            CommentState::Live(c) => Command::Edit {
                body: c.body.clone(),
            },
            other => panic!("{other:?}"),
        };
        assert_eq!(
            decide(&live, &same).unwrap(),
            vec![],
            "the same text is no edit"
        );
        let remove = Command::Remove {
            reason: RemovalReason::Author,
        };
        let removed = given(&[
            added("p1"),
            Event::Removed {
                reason: RemovalReason::Author,
            },
        ]);
        assert_eq!(decide(&removed, &remove), Err(Rejection::Removed));
        assert_eq!(decide(&removed, &edit), Err(Rejection::Removed));
        assert_eq!(decide(&given(&[]), &edit), Err(Rejection::NotFound));
        assert_eq!(
            decide(&live, &add(PostStatus::Live)),
            Err(Rejection::AlreadyExists)
        );
    }

    #[test]
    fn given_a_comment_when_the_cascade_runs_twice_then_it_is_removed_once() {
        let live = given(&[added("p1")]);
        let first = decide(&live, &cascade()).unwrap();
        assert_eq!(
            first,
            vec![Event::Removed {
                reason: RemovalReason::PostDeleted
            }]
        );
        let removed = apply(live, &first[0]).unwrap();
        assert_eq!(decide(&removed, &cascade()).unwrap(), Vec::new());
        assert_eq!(
            decide(&CommentState::Absent, &cascade()),
            Err(Rejection::NotFound)
        );
    }

    #[test]
    fn an_edit_after_a_removal_is_corrupt_history() {
        let removed = given(&[
            added("p1"),
            Event::Removed {
                reason: RemovalReason::Author,
            },
        ]);
        assert!(apply(removed, &Event::Edited { body: "x".into() }).is_err());
        assert!(apply(given(&[added("p1")]), &added("p1")).is_err());
    }

    #[test]
    fn a_post_status_comes_from_the_posts_last_event_type() {
        assert_eq!(PostStatus::from_last_event_type(None), PostStatus::Missing);
        assert_eq!(
            PostStatus::from_last_event_type(Some("PostDeleted")),
            PostStatus::Deleted
        );
        assert_eq!(
            PostStatus::from_last_event_type(Some("PostUpdated")),
            PostStatus::Live
        );
    }
}
