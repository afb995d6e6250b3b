//! The command host: the loop every command service runs, whatever its
//! context. Load the aggregate from the cache or the stream, decide, append
//! with optimistic concurrency and idempotency, retry a bounded number of
//! times on a conflict; and the HTTP around it: `If-Match`,
//! `Idempotency-Key`, `X-Correlation-Id`, `Actor`, and the problem document
//! of every way a command can fail.
//!
//! A service builds one [`CommandHost`] per aggregate from its context's
//! [`StreamSpec`], and maps only its own rejections to problems.

use std::time::Duration;

use async_nats::jetstream::kv;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use eventstore::{
    Aggregate, AppendError, EventStore, ExecuteError, Executed, LoadError, Metadata, Repository,
    StreamSpec,
};
use sha2::{Digest, Sha256};

use crate::Problem;
use crate::idempotency::{self, Reservation, Reserve};

/// Seconds a client should wait before retrying after a 503.
pub const RETRY_AFTER_SECS: u64 = 1;
/// How long readyz waits for the stream to answer.
const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest `Actor` header: a token's `sub`.
const ACTOR_BYTES_MAX: usize = 255;
/// Longest `X-Correlation-Id`.
const CORRELATION_ID_BYTES_MAX: usize = 128;

/// One context's command side: its repository and its idempotency bucket.
pub struct CommandHost<A: Aggregate> {
    repo: Repository<A>,
    idempotency: kv::Store,
    /// What an aggregate is called in problem details: "post", "comment".
    noun: &'static str,
    /// The service, for the operator hint of a 507.
    service: &'static str,
}

/// What a create produced.
pub struct Created<S> {
    pub id: String,
    pub executed: Executed<S>,
    /// The key's first request made it; this one appended nothing.
    pub replayed: bool,
}

impl<A: Aggregate> CommandHost<A> {
    /// Connects, checks JetStream, and provisions the context's stream
    /// (`spec`), stream `DLQ` and the bucket `<STREAM>_IDEMPOTENCY`: only
    /// command services create streams and buckets.
    ///
    /// # Errors
    /// A message naming the URL and the cause.
    pub async fn start(
        urls: &[String],
        service: &'static str,
        noun: &'static str,
        spec: &StreamSpec,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        let store = EventStore::connect(urls, service, spec).await?;
        Self::on(store, service, noun, spec.replicas)
            .await
            .with_context(|| eventstore::shown_urls(urls))
    }

    /// The host on a store already opened.
    ///
    /// # Errors
    /// When stream `DLQ` or the idempotency bucket cannot be used.
    pub async fn on(
        store: EventStore,
        service: &'static str,
        noun: &'static str,
        replicas: usize,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        telemetry::metrics().declare_stream(store.stream_name());
        let js = store.jetstream().clone();
        eventstore::provision(&js, &eventstore::dlq_spec(replicas))
            .await
            .context("cannot use stream DLQ")?;
        let bucket = format!("{}_IDEMPOTENCY", store.stream_name());
        let idempotency = idempotency::open_bucket(&js, &bucket, replicas)
            .await
            .map_err(|e| anyhow::anyhow!("cannot use bucket {bucket}: {e}"))?;
        Ok(Self {
            repo: Repository::new(store),
            idempotency,
            noun,
            service,
        })
    }

    #[must_use]
    pub fn repo(&self) -> &Repository<A> {
        &self.repo
    }

    #[must_use]
    pub fn store(&self) -> &EventStore {
        self.repo.store()
    }

    /// 200 while NATS and the stream answer, else 503 with `Retry-After`.
    pub async fn readyz(&self) -> Response {
        ready(self.store()).await
    }

    /// Runs `command` on aggregate `id` through the aggregate's `decide`.
    ///
    /// # Errors
    /// The problem document to answer with.
    pub async fn run(
        &self,
        id: &str,
        headers: &HeaderMap,
        command: &A::Command,
        reject: impl FnOnce(A::Rejection) -> Problem,
    ) -> Result<(Executed<A::State>, Metadata), Problem> {
        let expected = if_match(headers)?;
        let meta = metadata(headers)?;
        let executed = self
            .repo
            .run(
                id,
                expected,
                &meta,
                time::OffsetDateTime::now_utc(),
                command,
            )
            .await
            .map_err(|e| self.execute_problem(e, id, reject))?;
        Ok((executed, meta))
    }

    /// Creates a new aggregate with the events `decided` (already checked on
    /// the empty state, so a bad body never burns a key). Without an
    /// `Idempotency-Key` the id is `fresh_id()`; with one, the id the key
    /// reserved, scoped by `route` and the `Actor`: the same key and body
    /// again answer as the first time and append nothing; another body is
    /// a 422.
    ///
    /// # Errors
    /// The problem document to answer with.
    pub async fn create(
        &self,
        headers: &HeaderMap,
        route: &str,
        decided: Vec<A::Event>,
        fresh_id: impl FnOnce() -> String,
    ) -> Result<(Created<A::State>, Metadata), Problem> {
        let mut meta = metadata(headers)?;
        let (id, keyed) = match header_str(headers, "idempotency-key")? {
            None => (fresh_id(), false),
            Some(key) => {
                if key.is_empty() || key.len() > idempotency::KEY_BYTES_MAX {
                    return Err(Problem::new(
                        StatusCode::BAD_REQUEST,
                        "invalid-header",
                        format!(
                            "Idempotency-Key must be 1..={} characters",
                            idempotency::KEY_BYTES_MAX
                        ),
                    ));
                }
                let scoped = idempotency::key_for(route, meta.actor.as_deref().unwrap_or(""), key);
                let candidate = Reservation {
                    id: fresh_id(),
                    body_sha256: events_sha256::<A>(&decided),
                };
                let want = candidate.body_sha256.clone();
                meta.event_id = Some(idempotency::event_id_for(&scoped));
                match idempotency::reserve(&self.idempotency, &scoped, candidate).await {
                    Ok(Reserve::Fresh(id)) => (id, true),
                    Ok(Reserve::Existing(r)) if r.body_sha256 == want => (r.id, true),
                    Ok(Reserve::Existing(_)) => {
                        return Err(Problem::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "idempotency-key-reused",
                            "Idempotency-Key was already used with a different body",
                        ));
                    }
                    Err(why) if eventstore::is_storage_full(&why) => {
                        tracing::warn!(error = %why, "idempotency bucket full");
                        return Err(self.storage_full());
                    }
                    Err(why) => {
                        tracing::warn!(error = %why, "idempotency bucket unavailable");
                        return Err(Problem::unavailable(
                            "event store unavailable; retry shortly",
                            RETRY_AFTER_SECS,
                        ));
                    }
                }
            }
        };
        let noun = self.noun;
        let executed = self
            .repo
            .execute(
                &id,
                !keyed,
                None,
                &meta,
                time::OffsetDateTime::now_utc(),
                |_, version| match version {
                    0 => Ok(decided.clone()),
                    // The key's aggregate exists already: answer as the
                    // first time, append nothing.
                    _ if keyed => Ok(Vec::new()),
                    _ => Err(Problem::new(
                        StatusCode::CONFLICT,
                        "exists",
                        format!("{noun} {id} already exists"),
                    )),
                },
            )
            .await
            .map_err(|e| self.execute_problem(e, &id, |p| p))?;
        let replayed = !executed.appended;
        if replayed {
            telemetry::metrics()
                .idempotency_hits
                .get_or_create(&telemetry::StreamLabels {
                    stream: self.repo.store().stream_name().to_string(),
                })
                .inc();
        }
        Ok((
            Created {
                id,
                executed,
                replayed,
            },
            meta,
        ))
    }

    /// The problem for a failed command on aggregate `id`.
    pub fn execute_problem<R>(
        &self,
        e: ExecuteError<R>,
        id: &str,
        reject: impl FnOnce(R) -> Problem,
    ) -> Problem {
        let noun = self.noun;
        match e {
            ExecuteError::Rejected(r) => reject(r),
            ExecuteError::VersionMismatch { expected, actual } => Problem::new(
                StatusCode::PRECONDITION_FAILED,
                "version-mismatch",
                format!("{noun} {id} is at version {actual}, If-Match asked for {expected}"),
            )
            .with_current_version(actual),
            ExecuteError::TooManyConflicts(n) => Problem::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("{noun} {id} kept changing under {n} retries; try again"),
            ),
            ExecuteError::Append(AppendError::Unavailable(why))
            | ExecuteError::Load(LoadError::Unavailable(why)) => {
                tracing::warn!(id, error = %why, "event store unavailable");
                Problem::unavailable("event store unavailable; retry shortly", RETRY_AFTER_SECS)
            }
            ExecuteError::Append(AppendError::OutcomeUnknown(why)) => {
                tracing::warn!(id, error = %why, "append outcome unknown");
                Problem::unavailable(
                    "the event store did not confirm the write, which may or may not be stored; \
                     retry with the same Idempotency-Key (create) or If-Match (update) to stay exactly-once",
                    RETRY_AFTER_SECS,
                )
            }
            ExecuteError::Append(AppendError::Rejected(why)) => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "rejected-by-store",
                format!("the event store refused the event: {why}"),
            ),
            ExecuteError::Append(AppendError::StorageFull(why)) => {
                tracing::warn!(id, error = %why, "stream byte budget full");
                self.storage_full()
            }
            ExecuteError::Append(AppendError::Conflict { .. }) => Problem::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("{noun} {id} changed concurrently; try again"),
            ),
            ExecuteError::Load(LoadError::Corrupt { seq, reason }) => {
                tracing::error!(id, seq, reason, "refusing to fold corrupt history");
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "corrupt-history",
                    format!(
                        "history of {noun} {id} is corrupt at stream sequence {seq}; the {noun} cannot be changed until it is repaired"
                    ),
                )
            }
            ExecuteError::Load(e @ LoadError::TooLong(_)) => Problem::internal(&e),
            e @ ExecuteError::SeveralEvents(_) => Problem::internal(&e),
        }
    }

    /// 507: the byte budget of the stream (or of the idempotency bucket) is used up.
    fn storage_full(&self) -> Problem {
        Problem::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "storage-full",
            format!(
                "the event store's byte budget is full; nothing was stored. An operator raises it \
                 ({} --stream-max-bytes) or frees space",
                self.service
            ),
        )
    }
}

/// 200 while NATS and `store`'s stream answer, else 503 with `Retry-After`.
pub async fn ready(store: &EventStore) -> Response {
    let stream = store.stream_name().to_string();
    if !store.is_connected() {
        return Problem::unavailable("not connected to NATS", RETRY_AFTER_SECS).into_response();
    }
    match tokio::time::timeout(READY_CHECK_TIMEOUT, store.last_seq()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready").into_response(),
        Ok(Err(e)) => Problem::unavailable(
            format!("stream {stream} unreachable: {e}"),
            RETRY_AFTER_SECS,
        )
        .into_response(),
        Err(_) => Problem::unavailable(
            format!("stream {stream} did not answer in time"),
            RETRY_AFTER_SECS,
        )
        .into_response(),
    }
}

/// SHA-256 of a create as it will be stored: the events `decide` made of the
/// body, encoded. Two bodies that normalise alike (surrounding blanks of a
/// name, say) hash alike, as the same create should.
fn events_sha256<A: Aggregate>(events: &[A::Event]) -> String {
    let mut h = Sha256::new();
    for event in events {
        let encoded = A::encode(event);
        h.update(encoded.event_type.as_bytes());
        h.update(encoded.schema.to_le_bytes());
        h.update((encoded.payload.len() as u64).to_le_bytes());
        h.update(&encoded.payload);
    }
    eventstore::hex(&h.finalize())
}

/// A header's value as text: 400 when it is not visible ASCII.
///
/// # Errors
/// The 400 problem naming the header.
pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, Problem> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-header",
                format!("{name} must be visible ASCII"),
            )
        }),
    }
}

/// `If-Match: "3"` pins version 3; `*` or no header pins nothing.
///
/// # Errors
/// A 400 problem for anything else.
pub fn if_match(headers: &HeaderMap) -> Result<Option<u64>, Problem> {
    let Some(raw) = header_str(headers, "if-match")? else {
        return Ok(None);
    };
    let raw = raw.trim();
    if raw == "*" {
        return Ok(None);
    }
    raw.strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|v| *v > 0)
        .map(Some)
        .ok_or_else(|| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-if-match",
                format!("If-Match must be a quoted version like \"3\", got {raw:?}"),
            )
        })
}

/// The metadata of a command's events: the correlation id from
/// `X-Correlation-Id` (bounded, visible ASCII) or a new one, the causation id
/// this command's own id, and the `Actor` the gateway sets from the token.
///
/// # Errors
/// A 400 problem for a malformed header.
pub fn metadata(headers: &HeaderMap) -> Result<Metadata, Problem> {
    let correlation_id = match header_str(headers, "x-correlation-id")? {
        Some(v) if !v.is_empty() && v.len() <= CORRELATION_ID_BYTES_MAX => v.to_string(),
        Some(_) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-header",
                format!("X-Correlation-Id must be 1..={CORRELATION_ID_BYTES_MAX} characters"),
            ));
        }
        None => uuid::Uuid::now_v7().to_string(),
    };
    let actor = match header_str(headers, "actor")? {
        None => None,
        Some(v) if v.len() <= ACTOR_BYTES_MAX => Some(v.to_string()).filter(|v| !v.is_empty()),
        Some(_) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-header",
                format!("Actor must be at most {ACTOR_BYTES_MAX} bytes"),
            ));
        }
    };
    Ok(Metadata {
        correlation_id,
        causation_id: uuid::Uuid::now_v7().to_string(),
        event_id: None,
        actor,
        traceparent: Some(traceparent(headers)),
    })
}

/// The request's W3C `traceparent` when it is a valid one, else a new trace
/// (a request without one starts a trace, as W3C Trace Context says an
/// invalid one must be treated: restart).
#[must_use]
pub fn traceparent(headers: &HeaderMap) -> String {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| valid_traceparent(v))
        .map_or_else(new_traceparent, str::to_string)
}

fn valid_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let [version, trace, parent, flags] = parts.as_slice() else {
        return false;
    };
    *version == "00"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2)
}

fn new_traceparent() -> String {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = uuid::Uuid::new_v4().simple().to_string();
    format!("00-{trace}-{}-01", &span[..16])
}

/// A command's answer: `body` as JSON with `ETag: "<version>"`, the
/// correlation id, and `Location` when given.
#[must_use]
pub fn ack(
    status: StatusCode,
    body: &impl serde::Serialize,
    version: u64,
    location: Option<&str>,
    meta: &Metadata,
) -> Response {
    let mut resp = crate::with_etag((status, axum::Json(body)).into_response(), version);
    let h = resp.headers_mut();
    if let Some(location) = location
        && let Ok(v) = HeaderValue::from_str(location)
    {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&meta.correlation_id) {
        h.insert("x-correlation-id", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_is_kept_and_anything_else_starts_a_trace() {
        let mut h = HeaderMap::new();
        let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert("traceparent", HeaderValue::from_static(given));
        assert_eq!(traceparent(&h), given);
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            h.insert("traceparent", HeaderValue::from_static(bad));
            let made = traceparent(&h);
            assert_ne!(made, bad);
            assert!(valid_traceparent(&made), "{made}");
        }
        assert!(valid_traceparent(&traceparent(&HeaderMap::new())));
    }
}
