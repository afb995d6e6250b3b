//! What every context's codec shares: the decode error, and postcard
//! payloads read whole (trailing bytes are an error, not ignored).

/// Why a stored payload is not one of a context's events: a poison event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("{event_type} schema {schema} is not supported (newest known is {newest})")]
    UnknownSchema {
        event_type: String,
        schema: u32,
        newest: u32,
    },
    #[error("{event_type} schema {schema} payload is malformed: {reason}")]
    Malformed {
        event_type: String,
        schema: u32,
        reason: String,
    },
}

impl DecodeError {
    /// `event_type` at `schema` is newer (or older) than this code knows.
    #[must_use]
    pub fn unknown_schema(event_type: &str, schema: u32, newest: u32) -> Self {
        Self::UnknownSchema {
            event_type: event_type.to_string(),
            schema,
            newest,
        }
    }
}

/// Reads a postcard payload of `event_type` at `schema` as `T`, whole.
///
/// # Errors
/// [`DecodeError::Malformed`] when the bytes do not decode or some are left.
pub fn postcard_payload<'a, T: serde::Deserialize<'a>>(
    event_type: &str,
    schema: u32,
    bytes: &'a [u8],
) -> Result<T, DecodeError> {
    let malformed = |reason: String| DecodeError::Malformed {
        event_type: event_type.to_string(),
        schema,
        reason,
    };
    match postcard::take_from_bytes::<T>(bytes) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(malformed(format!("{} trailing bytes", rest.len()))),
        Err(e) => Err(malformed(e.to_string())),
    }
}
