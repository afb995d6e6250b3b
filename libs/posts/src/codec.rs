//! Postcard payloads, decoded through (`Event-Type`, `Event-Schema`) so an old
//! schema is upcast to the current one before the domain sees it.

use serde::{Deserialize, Serialize};

use crate::domain::Event;

pub use eventstore::DecodeError;

#[derive(Serialize, Deserialize)]
struct CreatedV1 {
    title: String,
    content: String,
    author_name: String,
}

/// `PostUpdated` as the original system wrote it: title and content always set.
#[derive(Serialize, Deserialize)]
struct UpdatedV1 {
    title: String,
    content: String,
}

#[derive(Serialize, Deserialize)]
struct UpdatedV2 {
    title: Option<String>,
    content: Option<String>,
    author_name: Option<String>,
}

pub(crate) const CREATED_SCHEMA: u32 = 1;
pub(crate) const UPDATED_SCHEMA: u32 = 2;
pub(crate) const DELETED_SCHEMA: u32 = 1;

/// Encodes an event: (type name, schema, postcard bytes).
#[must_use]
pub fn encode(event: &Event) -> (&'static str, u32, Vec<u8>) {
    // Serialising owned strings into a Vec cannot fail.
    let bytes = match event {
        Event::Created {
            title,
            content,
            author_name,
        } => postcard::to_stdvec(&CreatedV1 {
            title: title.clone(),
            content: content.clone(),
            author_name: author_name.clone(),
        }),
        Event::Updated {
            title,
            content,
            author_name,
        } => postcard::to_stdvec(&UpdatedV2 {
            title: title.clone(),
            content: content.clone(),
            author_name: author_name.clone(),
        }),
        Event::Deleted => Ok(Vec::new()),
    };
    let schema = match event {
        Event::Created { .. } => CREATED_SCHEMA,
        Event::Updated { .. } => UPDATED_SCHEMA,
        Event::Deleted => DELETED_SCHEMA,
    };
    (event.name(), schema, bytes.unwrap_or_default())
}

/// Decodes a payload by type and schema, upcasting old schemas.
///
/// # Errors
/// [`DecodeError`] for an unknown type, a schema newer than this code knows,
/// or bytes that do not decode: a poison event.
pub fn decode(event_type: &str, schema: u32, bytes: &[u8]) -> Result<Event, DecodeError> {
    let unknown_schema = |newest| DecodeError::unknown_schema(event_type, schema, newest);
    match (event_type, schema) {
        ("PostCreated", 1) => {
            let v: CreatedV1 = eventstore::postcard_payload(event_type, schema, bytes)?;
            Ok(Event::Created {
                title: v.title,
                content: v.content,
                author_name: v.author_name,
            })
        }
        ("PostCreated", _) => Err(unknown_schema(CREATED_SCHEMA)),
        // Upcast: schema 1 always carried title and content, never the author.
        ("PostUpdated", 1) => {
            let v: UpdatedV1 = eventstore::postcard_payload(event_type, schema, bytes)?;
            Ok(Event::Updated {
                title: Some(v.title),
                content: Some(v.content),
                author_name: None,
            })
        }
        ("PostUpdated", 2) => {
            let v: UpdatedV2 = eventstore::postcard_payload(event_type, schema, bytes)?;
            Ok(Event::Updated {
                title: v.title,
                content: v.content,
                author_name: v.author_name,
            })
        }
        ("PostUpdated", _) => Err(unknown_schema(UPDATED_SCHEMA)),
        ("PostDeleted", 1) if bytes.is_empty() => Ok(Event::Deleted),
        ("PostDeleted", 1) => Err(DecodeError::Malformed {
            event_type: event_type.to_string(),
            schema,
            reason: "payload must be empty".into(),
        }),
        ("PostDeleted", _) => Err(unknown_schema(DELETED_SCHEMA)),
        (other, _) => Err(DecodeError::UnknownType(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_round_trips() {
        let events = [
            Event::Created {
                title: "t".into(),
                content: "c".into(),
                author_name: "a".into(),
            },
            Event::Updated {
                title: None,
                content: Some("c2".into()),
                author_name: None,
            },
            Event::Deleted,
        ];
        for e in events {
            let (ty, schema, bytes) = encode(&e);
            assert_eq!(decode(ty, schema, &bytes), Ok(e));
        }
    }

    #[test]
    fn updated_v1_is_upcast() {
        let bytes = postcard::to_stdvec(&UpdatedV1 {
            title: "t".into(),
            content: "c".into(),
        })
        .unwrap();
        assert_eq!(
            decode("PostUpdated", 1, &bytes),
            Ok(Event::Updated {
                title: Some("t".into()),
                content: Some("c".into()),
                author_name: None
            })
        );
    }

    #[test]
    fn garbage_future_schemas_and_unknown_types_are_errors_not_panics() {
        assert!(matches!(
            decode("PostCreated", 1, &[0xff, 0xff, 0xff]),
            Err(DecodeError::Malformed { .. })
        ));
        assert!(matches!(
            decode("PostCreated", 9, &[]),
            Err(DecodeError::UnknownSchema { newest: 1, .. })
        ));
        assert!(matches!(
            decode("PostArchived", 1, &[]),
            Err(DecodeError::UnknownType(_))
        ));
        assert!(matches!(
            decode("PostDeleted", 1, &[1]),
            Err(DecodeError::Malformed { .. })
        ));
        let (ty, schema, mut bytes) = encode(&Event::Created {
            title: "t".into(),
            content: "c".into(),
            author_name: "a".into(),
        });
        bytes.push(0);
        assert!(matches!(
            decode(ty, schema, &bytes),
            Err(DecodeError::Malformed { .. })
        ));
    }

    // Fuzz target (hardening finding 11): any type, schema and bytes decode
    // to an event or an error, never a panic; what `encode` wrote decodes
    // back to the same event.
    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4_000))]
        #[test]
        fn any_bytes_decode_or_fail_cleanly(
            ty in proptest::prelude::prop_oneof![
                proptest::prelude::Just("PostCreated".to_string()),
                proptest::prelude::Just("PostUpdated".to_string()),
                proptest::prelude::Just("PostDeleted".to_string()),
                ".{0,20}",
            ],
            schema in 0u32..5,
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
        ) {
            let _ = decode(&ty, schema, &bytes);
        }

        #[test]
        fn encoded_events_decode_to_themselves(
            title in ".{0,40}",
            content in ".{0,200}",
            author in proptest::option::of(".{0,20}"),
            kind in 0u8..3,
        ) {
            let event = match kind {
                0 => Event::Created { title, content, author_name: author.unwrap_or_default() },
                1 => Event::Updated { title: Some(title), content: None, author_name: author },
                _ => Event::Deleted,
            };
            let (ty, schema, bytes) = encode(&event);
            proptest::prop_assert_eq!(decode(ty, schema, &bytes), Ok(event));
        }
    }
}
