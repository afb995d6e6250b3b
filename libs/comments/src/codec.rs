//! Postcard payloads, decoded through (`Event-Type`, `Event-Schema`) so an
//! old schema can be upcast to the current one before the domain sees it.

use serde::{Deserialize, Serialize};

use crate::domain::{Event, RemovalReason};

pub use eventstore::DecodeError;

#[derive(Serialize, Deserialize)]
struct AddedV1 {
    post_id: String,
    body: String,
    author_name: String,
}

#[derive(Serialize, Deserialize)]
struct EditedV1 {
    body: String,
}

#[derive(Serialize, Deserialize)]
struct RemovedV1 {
    reason: RemovalReason,
}

pub(crate) const ADDED_SCHEMA: u32 = 1;
pub(crate) const EDITED_SCHEMA: u32 = 1;
pub(crate) const REMOVED_SCHEMA: u32 = 1;

/// Encodes an event: (type name, schema, postcard bytes).
#[must_use]
pub fn encode(event: &Event) -> (&'static str, u32, Vec<u8>) {
    // Serialising owned strings into a Vec cannot fail.
    let (schema, bytes) = match event {
        Event::Added {
            post_id,
            body,
            author_name,
        } => (
            ADDED_SCHEMA,
            postcard::to_stdvec(&AddedV1 {
                post_id: post_id.clone(),
                body: body.clone(),
                author_name: author_name.clone(),
            }),
        ),
        Event::Edited { body } => (
            EDITED_SCHEMA,
            postcard::to_stdvec(&EditedV1 { body: body.clone() }),
        ),
        Event::Removed { reason } => (
            REMOVED_SCHEMA,
            postcard::to_stdvec(&RemovedV1 { reason: *reason }),
        ),
    };
    (event.name(), schema, bytes.unwrap_or_default())
}

/// Decodes a payload by type and schema.
///
/// # Errors
/// [`DecodeError`] for an unknown type, a schema newer than this code knows,
/// or bytes that do not decode: a poison event.
pub fn decode(event_type: &str, schema: u32, bytes: &[u8]) -> Result<Event, DecodeError> {
    let unknown_schema = |newest| DecodeError::unknown_schema(event_type, schema, newest);
    match (event_type, schema) {
        ("CommentAdded", ADDED_SCHEMA) => {
            let v: AddedV1 = eventstore::postcard_payload(event_type, schema, bytes)?;
            Ok(Event::Added {
                post_id: v.post_id,
                body: v.body,
                author_name: v.author_name,
            })
        }
        ("CommentAdded", _) => Err(unknown_schema(ADDED_SCHEMA)),
        ("CommentEdited", EDITED_SCHEMA) => {
            let v: EditedV1 = eventstore::postcard_payload(event_type, schema, bytes)?;
            Ok(Event::Edited { body: v.body })
        }
        ("CommentEdited", _) => Err(unknown_schema(EDITED_SCHEMA)),
        ("CommentRemoved", REMOVED_SCHEMA) => {
            let v: RemovedV1 = eventstore::postcard_payload(event_type, schema, bytes)?;
            Ok(Event::Removed { reason: v.reason })
        }
        ("CommentRemoved", _) => Err(unknown_schema(REMOVED_SCHEMA)),
        _ => Err(DecodeError::UnknownType(event_type.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_round_trips() {
        let events = [
            Event::Added {
                post_id: "p".into(),
                body: "b".into(),
                author_name: "a".into(),
            },
            Event::Edited { body: "c".into() },
            Event::Removed {
                reason: RemovalReason::Author,
            },
            Event::Removed {
                reason: RemovalReason::PostDeleted,
            },
        ];
        for event in events {
            let (t, s, bytes) = encode(&event);
            assert_eq!(decode(t, s, &bytes).unwrap(), event);
        }
    }

    #[test]
    fn unknown_types_schemas_and_bytes_are_errors() {
        assert!(matches!(
            decode("PostCreated", 1, &[]),
            Err(DecodeError::UnknownType(_))
        ));
        assert!(matches!(
            decode("CommentAdded", 2, &[]),
            Err(DecodeError::UnknownSchema { .. })
        ));
        assert!(matches!(
            decode("CommentRemoved", 1, &[9]),
            Err(DecodeError::Malformed { .. })
        ));
    }

    // Fuzz target: any bytes under any type decode or fail, never panic.
    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]
        #[test]
        fn any_payload_decodes_or_fails_cleanly(
            t in proptest::prelude::prop_oneof![
                proptest::prelude::Just("CommentAdded".to_string()),
                proptest::prelude::Just("CommentEdited".to_string()),
                proptest::prelude::Just("CommentRemoved".to_string()),
                "[A-Za-z]{0,12}",
            ],
            schema in 0u32..3,
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let _ = decode(&t, schema, &bytes);
        }
    }
}
