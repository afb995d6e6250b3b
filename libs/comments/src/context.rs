//! The comments context as the platform sees it: its stream and its
//! aggregate, declared once.

use eventstore::{Aggregate, EncodedEvent, RecordedEvent, StreamSpec};

use crate::{Command, CommentState, DecodeError, Event, InvariantViolation, Rejection};

/// The context's stream.
pub const STREAM: &str = "COMMENTS";
/// Subjects `comments.<post_id>.<comment_id>`: one per comment.
pub const SUBJECT_ROOT: &str = "comments";
/// The event types this context writes, with their current schema.
pub const EVENT_TYPES: [(&str, u32); 3] = [
    ("CommentAdded", crate::codec::ADDED_SCHEMA),
    ("CommentEdited", crate::codec::EDITED_SCHEMA),
    ("CommentRemoved", crate::codec::REMOVED_SCHEMA),
];

/// Stream `COMMENTS`, as comments-command provisions it.
#[must_use]
pub fn stream(replicas: usize) -> StreamSpec {
    StreamSpec::new(
        STREAM,
        SUBJECT_ROOT,
        2,
        "comment domain events: comments.<post_id>.<comment_id>",
    )
    .with_replicas(replicas)
}

/// The aggregate id of a comment: `<post_id>.<comment_id>`, so that one
/// post's comments share the subjects `comments.<post_id>.>`.
#[must_use]
pub fn aggregate_id(post_id: &str, comment_id: &str) -> String {
    format!("{post_id}.{comment_id}")
}

/// The (post id, comment id) of an aggregate id.
#[must_use]
pub fn split_id(aggregate_id: &str) -> Option<(&str, &str)> {
    aggregate_id.split_once('.')
}

/// The comment aggregate: [`crate::decide`] and [`crate::apply`].
pub struct CommentAggregate;

impl Aggregate for CommentAggregate {
    type State = CommentState;
    type Event = Event;
    type Command = Command;
    type Rejection = Rejection;
    type Invariant = InvariantViolation;
    type DecodeError = DecodeError;

    fn decide(state: &CommentState, command: &Command) -> Result<Vec<Event>, Rejection> {
        crate::decide(state, command)
    }

    fn evolve(state: CommentState, event: &Event) -> Result<CommentState, InvariantViolation> {
        crate::apply(state, event)
    }

    fn decode(event: &RecordedEvent) -> Result<Event, DecodeError> {
        crate::decode(&event.event_type, event.schema, &event.payload)
    }

    fn encode(event: &Event) -> EncodedEvent {
        let (event_type, schema, payload) = crate::encode(event);
        EncodedEvent {
            event_type,
            schema,
            payload,
        }
    }
}
