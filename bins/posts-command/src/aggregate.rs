//! Glue between the pure posts domain and the generic event store.

use eventstore::{Aggregate, EncodedEvent, RecordedEvent};
use posts::{Event, PostState};

pub struct PostAggregate;

impl Aggregate for PostAggregate {
    type State = PostState;
    type Event = Event;

    fn initial() -> PostState {
        PostState::Absent
    }

    fn decode(event: &RecordedEvent) -> Result<Event, String> {
        posts::decode(&event.event_type, event.schema, &event.payload).map_err(|e| e.to_string())
    }

    fn encode(event: &Event) -> EncodedEvent {
        let (event_type, schema, payload) = posts::encode(event);
        EncodedEvent {
            event_type,
            schema,
            payload,
        }
    }

    fn apply(state: PostState, event: &Event) -> Result<PostState, String> {
        posts::apply(state, event).map_err(|e| e.to_string())
    }
}
