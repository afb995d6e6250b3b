//! The event store on NATS JetStream. It knows no domain: each
//! context declares its stream with [`StreamSpec::new`] and its aggregate
//! with [`Aggregate`].
//!
//! - [`provision`] creates or checks a stream with every setting spelled out.
//! - [`EventStore::append`] publishes one event with optimistic concurrency
//!   (`Nats-Expected-Last-Subject-Sequence`) and idempotency (`Nats-Msg-Id`).
//! - [`EventStore::load`] reads one aggregate's events in order.
//! - [`Repository`] keeps a bounded cache of folded aggregates and reloads and
//!   re-decides on a concurrency conflict.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use eventstore::{connect_checked, provision, StreamSpec};
//! let client = connect_checked(&["nats://127.0.0.1:4222".to_string()], "demo").await?;
//! let js = async_nats::jetstream::new(client.clone());
//! provision(&js, &StreamSpec::new("ORDERS", "orders", 1, "order events")).await?;
//! # Ok(()) }
//! ```

mod codec;
mod connect;
mod envelope;
mod repository;
mod store;
mod stream;

pub use codec::{DecodeError, postcard_payload};
pub use connect::{ConnectCheckError, connect_checked, shown_urls, with_credentials};
pub use envelope::{
    EncodedEvent, EnvelopeError, HEADER_ACTOR, HEADER_CAUSATION_ID, HEADER_CORRELATION_ID,
    HEADER_EVENT_SCHEMA, HEADER_EVENT_TYPE, HEADER_OCCURRED_AT, HEADER_TRACEPARENT, Metadata,
    RecordedEvent, Subjects, format_rfc3339, parse_rfc3339,
};
pub use repository::{Aggregate, ExecuteError, Executed, Loaded, Repository};
pub use store::{
    AppendError, EventStore, HistoryPage, LoadError, Replica, StartError, is_storage_full,
};
pub use stream::{
    DLQ_MAX_BYTES, DUPLICATE_WINDOW, ProvisionError, STREAM_MAX_BYTES_DEFAULT, StreamSpec,
    dlq_spec, provision,
};

/// The JetStream header that makes a publish idempotent inside the duplicate window.
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
/// The JetStream header that makes a publish conditional on the aggregate's last sequence.
pub const HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";

/// Lowercase hex of `bytes`: digests, hashed keys.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}
