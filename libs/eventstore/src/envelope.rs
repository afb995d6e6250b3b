use async_nats::HeaderMap;
use bytes::Bytes;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::HEADER_MSG_ID;

pub const HEADER_EVENT_TYPE: &str = "Event-Type";
pub const HEADER_EVENT_SCHEMA: &str = "Event-Schema";
pub const HEADER_OCCURRED_AT: &str = "Occurred-At";
pub const HEADER_CORRELATION_ID: &str = "Correlation-Id";
pub const HEADER_CAUSATION_ID: &str = "Causation-Id";
/// Who asked for the event: the caller's identity (a token's `sub`), when known.
pub const HEADER_ACTOR: &str = "Actor";
/// The W3C trace context of the request that made the event.
pub const HEADER_TRACEPARENT: &str = "traceparent";

/// An event body already encoded by its domain, ready for the envelope.
#[derive(Debug, Clone)]
pub struct EncodedEvent {
    pub event_type: &'static str,
    pub schema: u32,
    pub payload: Vec<u8>,
}

/// Who asked for the events: carried as headers on every event of a command.
#[derive(Debug, Clone)]
pub struct Metadata {
    pub correlation_id: String,
    pub causation_id: String,
    /// The event's id (`Nats-Msg-Id`) when it must be deterministic: a
    /// name-based UUID for an `Idempotency-Key` command or a process
    /// manager's effect, so that the stream's duplicate window refuses a
    /// second copy. `None`: a fresh UUIDv7.
    pub event_id: Option<String>,
    /// Who asked (`Actor` header), when known.
    pub actor: Option<String>,
    /// The W3C `traceparent` of the request (or of the event that caused
    /// this one), when known.
    pub traceparent: Option<String>,
}

/// One event as stored in the stream, with its envelope decoded and checked.
#[derive(Debug, Clone)]
pub struct RecordedEvent {
    pub seq: u64,
    pub subject: String,
    /// The aggregate id: the subject without the stream's prefix.
    pub aggregate_id: String,
    pub event_id: String,
    pub event_type: String,
    pub schema: u32,
    pub occurred_at: OffsetDateTime,
    pub correlation_id: String,
    pub causation_id: String,
    /// The `Actor` header: who asked, when known.
    pub actor: Option<String>,
    /// The `traceparent` header, when the event has one.
    pub traceparent: Option<String>,
    pub payload: Bytes,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("header {0} is missing")]
    Missing(&'static str),
    #[error("header {name} is malformed: {value:?}")]
    Malformed { name: &'static str, value: String },
    #[error("subject {0:?} is not an aggregate subject")]
    Subject(String),
}

/// How a stream's subjects name aggregates: `<prefix><id>`, where the id has
/// exactly `id_tokens` non-empty tokens and no wildcard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
    id_tokens: usize,
}

impl Subjects {
    /// `prefix` ends with the dot: `"posts."`.
    #[must_use]
    pub fn new(prefix: &str, id_tokens: usize) -> Self {
        Self {
            prefix: prefix.to_string(),
            id_tokens: id_tokens.max(1),
        }
    }

    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The aggregate id a subject names, or `None` when it names none.
    #[must_use]
    pub fn aggregate_id<'a>(&self, subject: &'a str) -> Option<&'a str> {
        let id = subject.strip_prefix(self.prefix.as_str())?;
        let mut tokens = 0;
        for token in id.split('.') {
            if token.is_empty() || token == "*" || token == ">" {
                return None;
            }
            tokens += 1;
        }
        (tokens == self.id_tokens).then_some(id)
    }
}

/// Formats a timestamp as RFC 3339 UTC with microseconds, the precision the
/// views keep.
#[must_use]
pub fn format_rfc3339(at: OffsetDateTime) -> String {
    // One shape everywhere: UTC, `Z`, always six fractional digits (the
    // well-known RFC 3339 format trims trailing zeros, so lengths varied).
    const MICROS: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    let at = at.to_offset(time::UtcOffset::UTC);
    at.format(MICROS)
        .or_else(|_| at.format(&Rfc3339))
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

/// Parses an RFC 3339 timestamp.
///
/// # Errors
/// When the text is not RFC 3339.
pub fn parse_rfc3339(text: &str) -> Result<OffsetDateTime, time::error::Parse> {
    OffsetDateTime::parse(text, &Rfc3339)
}

pub(crate) fn headers_for(
    event_id: &str,
    expected_last_subject_seq: u64,
    event: &EncodedEvent,
    occurred_at: OffsetDateTime,
    meta: &Metadata,
) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(HEADER_MSG_ID, event_id);
    h.insert(
        crate::HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE,
        expected_last_subject_seq.to_string().as_str(),
    );
    h.insert(HEADER_EVENT_TYPE, event.event_type);
    h.insert(HEADER_EVENT_SCHEMA, event.schema.to_string().as_str());
    h.insert(HEADER_OCCURRED_AT, format_rfc3339(occurred_at).as_str());
    h.insert(HEADER_CORRELATION_ID, meta.correlation_id.as_str());
    h.insert(HEADER_CAUSATION_ID, meta.causation_id.as_str());
    if let Some(actor) = &meta.actor {
        h.insert(HEADER_ACTOR, actor.as_str());
    }
    if let Some(tp) = &meta.traceparent {
        h.insert(HEADER_TRACEPARENT, tp.as_str());
    }
    h
}

/// The envelope's headers, in this order.
const ENVELOPE_HEADERS: [&str; 8] = [
    HEADER_MSG_ID,
    HEADER_EVENT_TYPE,
    HEADER_EVENT_SCHEMA,
    HEADER_OCCURRED_AT,
    HEADER_CORRELATION_ID,
    HEADER_CAUSATION_ID,
    HEADER_ACTOR,
    HEADER_TRACEPARENT,
];

/// The first value of each envelope header, in one pass over the map:
/// `HeaderMap::get` parses and hashes the name on every call, and six calls
/// per event showed in catch-up profiles.
fn envelope_headers(h: Option<&HeaderMap>) -> [Option<&str>; 8] {
    let mut out = [None; 8];
    for (name, values) in h.into_iter().flat_map(HeaderMap::iter) {
        let name: &str = name.as_ref();
        if let Some(i) = ENVELOPE_HEADERS.iter().position(|n| *n == name)
            && out[i].is_none()
        {
            out[i] = values.first().map(async_nats::HeaderValue::as_str);
        }
    }
    out
}

fn required<'a>(value: Option<&'a str>, name: &'static str) -> Result<&'a str, EnvelopeError> {
    value.ok_or(EnvelopeError::Missing(name))
}

impl RecordedEvent {
    /// Decodes the envelope of a stored message. The payload is left to the domain.
    ///
    /// # Errors
    /// [`EnvelopeError`] when a header is missing or malformed: a poison event.
    pub fn from_parts(
        subject: &str,
        subjects: &Subjects,
        seq: u64,
        headers: Option<&HeaderMap>,
        payload: Bytes,
    ) -> Result<Self, EnvelopeError> {
        let aggregate_id = subjects
            .aggregate_id(subject)
            .ok_or_else(|| EnvelopeError::Subject(subject.to_string()))?
            .to_string();
        let [
            msg_id,
            event_type,
            schema,
            occurred_at,
            correlation_id,
            causation_id,
            actor,
            traceparent,
        ] = envelope_headers(headers);
        let event_type = required(event_type, HEADER_EVENT_TYPE)?.to_string();
        let schema_text = required(schema, HEADER_EVENT_SCHEMA)?;
        let schema = schema_text.parse().map_err(|_| EnvelopeError::Malformed {
            name: HEADER_EVENT_SCHEMA,
            value: schema_text.to_string(),
        })?;
        let at_text = required(occurred_at, HEADER_OCCURRED_AT)?;
        let occurred_at = parse_rfc3339(at_text).map_err(|_| EnvelopeError::Malformed {
            name: HEADER_OCCURRED_AT,
            value: at_text.to_string(),
        })?;
        Ok(Self {
            seq,
            subject: subject.to_string(),
            aggregate_id,
            event_id: required(msg_id, HEADER_MSG_ID)?.to_string(),
            event_type,
            schema,
            occurred_at,
            correlation_id: required(correlation_id, HEADER_CORRELATION_ID)?.to_string(),
            causation_id: required(causation_id, HEADER_CAUSATION_ID)?.to_string(),
            actor: actor.map(str::to_string),
            traceparent: traceparent.map(str::to_string),
            payload,
        })
    }

    /// Decodes a message delivered by a consumer.
    ///
    /// # Errors
    /// [`EnvelopeError`] as for [`RecordedEvent::from_parts`].
    pub fn from_message(
        msg: &async_nats::Message,
        seq: u64,
        subjects: &Subjects,
    ) -> Result<Self, EnvelopeError> {
        Self::from_parts(
            msg.subject.as_str(),
            subjects,
            seq,
            msg.headers.as_ref(),
            msg.payload.clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_at_microsecond_precision() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789).unwrap();
        let text = format_rfc3339(at);
        assert_eq!(text, "2023-11-14T22:13:20.123456Z");
        assert_eq!(
            parse_rfc3339(&text).unwrap().unix_timestamp_nanos(),
            1_700_000_000_123_456_000
        );
    }

    #[test]
    fn envelope_without_type_is_rejected() {
        let mut h = HeaderMap::new();
        h.insert(HEADER_EVENT_SCHEMA, "1");
        let err = RecordedEvent::from_parts(
            "orders.a",
            &Subjects::new("orders.", 1),
            1,
            Some(&h),
            Bytes::new(),
        )
        .unwrap_err();
        assert_eq!(err, EnvelopeError::Missing(HEADER_EVENT_TYPE));
    }

    #[test]
    fn a_subject_with_another_token_count_is_not_an_aggregate() {
        let one = Subjects::new("orders.", 1);
        let two = Subjects::new("lines.", 2);
        assert_eq!(one.aggregate_id("orders.a"), Some("a"));
        assert_eq!(one.aggregate_id("orders.a.b"), None);
        assert_eq!(two.aggregate_id("lines.a.b"), Some("a.b"));
        for bad in [
            "lines.a",
            "lines.a.b.c",
            "lines.a.",
            "lines..b",
            "lines.*.b",
            "lines.a.>",
        ] {
            assert_eq!(two.aggregate_id(bad), None, "{bad}");
        }
        let err = RecordedEvent::from_parts("orders.a.b", &one, 1, None, Bytes::new()).unwrap_err();
        assert!(matches!(err, EnvelopeError::Subject(_)));
    }

    // Fuzz target (hardening finding 11): any subject, headers and payload
    // give an envelope or an error, never a panic, and a decoded envelope
    // holds exactly what the headers said.
    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4_000))]
        #[test]
        fn any_message_decodes_or_fails_cleanly(
            subject in "(orders\\.)?[a-z0-9.>*-]{0,40}",
            headers in proptest::collection::vec(
                (
                    proptest::prelude::prop_oneof![
                        proptest::prelude::Just(HEADER_MSG_ID),
                        proptest::prelude::Just(HEADER_EVENT_TYPE),
                        proptest::prelude::Just(HEADER_EVENT_SCHEMA),
                        proptest::prelude::Just(HEADER_OCCURRED_AT),
                        proptest::prelude::Just(HEADER_CORRELATION_ID),
                        proptest::prelude::Just(HEADER_CAUSATION_ID),
                        proptest::prelude::Just("Other"),
                    ],
                    proptest::prelude::prop_oneof![
                        "[ -~]{0,40}",
                        proptest::prelude::Just("2026-12-07T05:23:52.123456Z".to_string()),
                        "[0-9]{1,12}",
                    ],
                ),
                0..10,
            ),
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let mut map = HeaderMap::new();
            for (name, value) in &headers {
                map.insert(*name, value.as_str());
            }
            if let Ok(env) =
                RecordedEvent::from_parts(&subject, &Subjects::new("orders.", 1), 7, Some(&map), Bytes::from(payload))
            {
                proptest::prop_assert_eq!(env.seq, 7);
                proptest::prop_assert!(!env.aggregate_id.contains('.'));
                proptest::prop_assert_eq!(
                    Some(env.event_type.as_str()),
                    map.get(HEADER_EVENT_TYPE).map(|v| v.as_str())
                );
            }
        }
    }
}
