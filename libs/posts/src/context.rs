//! The posts context as the platform sees it: its stream and its aggregate.
//! Declared once here; the command service, the query service, replay and
//! the tests all take it from here.

use eventstore::{Aggregate, EncodedEvent, RecordedEvent, StreamSpec};

use crate::{Command, DecodeError, Event, InvariantViolation, PostState, Rejection};

/// The context's stream: the single source of truth of posts.
pub const STREAM: &str = "POSTS";
/// Subjects `posts.<post_id>`: one per post.
pub const SUBJECT_ROOT: &str = "posts";
/// The event types this context writes, with their current schema.
pub const EVENT_TYPES: [(&str, u32); 3] = [
    ("PostCreated", crate::codec::CREATED_SCHEMA),
    ("PostUpdated", crate::codec::UPDATED_SCHEMA),
    ("PostDeleted", crate::codec::DELETED_SCHEMA),
];

/// Stream `POSTS`, as the command service provisions it.
#[must_use]
pub fn stream(replicas: usize) -> StreamSpec {
    StreamSpec::new(
        STREAM,
        SUBJECT_ROOT,
        1,
        "blog post domain events; the single source of truth",
    )
    .with_replicas(replicas)
}

/// The post aggregate: [`crate::decide`] and [`crate::apply`].
pub struct PostAggregate;

impl Aggregate for PostAggregate {
    type State = PostState;
    type Event = Event;
    type Command = Command;
    type Rejection = Rejection;
    type Invariant = InvariantViolation;
    type DecodeError = DecodeError;

    fn decide(state: &PostState, command: &Command) -> Result<Vec<Event>, Rejection> {
        crate::decide(state, command)
    }

    fn evolve(state: PostState, event: &Event) -> Result<PostState, InvariantViolation> {
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
