//! HTTP contract of the command side (see DESIGN.md). DTOs live here; the
//! domain never sees HTTP types.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use eventstore::{AppendError, ExecuteError, LoadError, Metadata};
use posts::{Command, PostState, Rejection};
use serde::{Deserialize, Serialize};
use servicekit::{PathParam, Problem, json_body, parse_id};
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::idempotency::{self, Reservation, Reserve};

/// Largest request body. Content is bounded at 100 000 bytes decoded; JSON
/// escaping can double that (or worse for `\uXXXX`), so allow 512 KiB raw.
pub const BODY_BYTES_MAX: usize = 512 * 1024;
/// How long readyz waits for the stream to answer.
const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Seconds a client should wait before retrying after a 503.
const RETRY_AFTER_SECS: u64 = 1;

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/posts", post(create))
        .route("/posts/{id}", patch(update).delete(delete))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(servicekit::no_route)
        .method_not_allowed_fallback(servicekit::method_not_allowed)
        .layer(axum::middleware::map_response(
            servicekit::close_after_unread_body,
        ))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> Response {
    let store = state.repo().store();
    if !store.is_connected() {
        return Problem::unavailable("not connected to NATS", RETRY_AFTER_SECS).into_response();
    }
    match tokio::time::timeout(READY_CHECK_TIMEOUT, store.last_seq()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready").into_response(),
        Ok(Err(e)) => {
            Problem::unavailable(format!("stream POSTS unreachable: {e}"), RETRY_AFTER_SECS)
                .into_response()
        }
        Err(_) => Problem::unavailable("stream POSTS did not answer in time", RETRY_AFTER_SECS)
            .into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    title: String,
    content: String,
    author_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    title: Option<String>,
    content: Option<String>,
    author_name: Option<String>,
}

#[derive(Serialize)]
struct Ack {
    post_id: String,
    version: u64,
    seq: u64,
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, Problem> {
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
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, Problem> {
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

/// Correlation id from `X-Correlation-Id` (bounded, visible ASCII) or a new one;
/// the causation id is this command's own id.
fn metadata(headers: &HeaderMap) -> Result<Metadata, Problem> {
    let correlation_id = match header_str(headers, "x-correlation-id")? {
        Some(v) if !v.is_empty() && v.len() <= 128 => v.to_string(),
        Some(_) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-header",
                "X-Correlation-Id must be 1..=128 characters",
            ));
        }
        None => uuid::Uuid::now_v7().to_string(),
    };
    Ok(Metadata {
        correlation_id,
        causation_id: uuid::Uuid::now_v7().to_string(),
        event_id: None,
    })
}

fn rejection_problem(rejection: &Rejection, post_id: &str) -> Problem {
    match rejection {
        Rejection::NotFound => Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("post {post_id} not found"),
        ),
        Rejection::Deleted => Problem::new(
            StatusCode::CONFLICT,
            "deleted",
            format!("post {post_id} is deleted"),
        ),
        Rejection::AlreadyExists => Problem::new(
            StatusCode::CONFLICT,
            "exists",
            format!("post {post_id} already exists"),
        ),
        Rejection::EmptyUpdate => Problem::new(
            StatusCode::BAD_REQUEST,
            "empty-update",
            rejection.to_string(),
        ),
        Rejection::Invalid { .. } => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "out-of-bounds",
            rejection.to_string(),
        ),
    }
}

fn execute_problem(e: ExecuteError<Rejection>, post_id: &str) -> Problem {
    match e {
        ExecuteError::Rejected(r) => rejection_problem(&r, post_id),
        ExecuteError::VersionMismatch { expected, actual } => Problem::new(
            StatusCode::PRECONDITION_FAILED,
            "version-mismatch",
            format!("post {post_id} is at version {actual}, If-Match asked for {expected}"),
        ),
        ExecuteError::TooManyConflicts(n) => Problem::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("post {post_id} kept changing under {n} retries; try again"),
        ),
        ExecuteError::Append(AppendError::Unavailable(why))
        | ExecuteError::Load(LoadError::Unavailable(why)) => {
            tracing::warn!(post_id, error = %why, "event store unavailable");
            Problem::unavailable("event store unavailable; retry shortly", RETRY_AFTER_SECS)
        }
        ExecuteError::Append(AppendError::OutcomeUnknown(why)) => {
            tracing::warn!(post_id, error = %why, "append outcome unknown");
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
            tracing::warn!(post_id, error = %why, "stream byte budget full");
            storage_full_problem()
        }
        ExecuteError::Append(AppendError::Conflict { .. }) => Problem::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("post {post_id} changed concurrently; try again"),
        ),
        ExecuteError::Load(LoadError::Corrupt { seq, reason }) => {
            tracing::error!(post_id, seq, reason, "refusing to fold corrupt history");
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "corrupt-history",
                format!(
                    "history of post {post_id} is corrupt at stream sequence {seq}; the post cannot be changed until it is repaired"
                ),
            )
        }
        ExecuteError::Load(e @ LoadError::TooLong(_)) => Problem::internal(&e),
    }
}

/// 507: the byte budget of the stream (or of the idempotency bucket) is used up.
fn storage_full_problem() -> Problem {
    Problem::new(
        StatusCode::INSUFFICIENT_STORAGE,
        "storage-full",
        "the event store's byte budget is full; nothing was stored. An operator raises it \
         (posts-command --stream-max-bytes) or frees space",
    )
}

fn ack_response(status: StatusCode, ack: &Ack, meta: &Metadata, location: bool) -> Response {
    let mut resp = (status, axum::Json(ack)).into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", ack.version)) {
        h.insert(header::ETAG, v);
    }
    if location && let Ok(v) = HeaderValue::from_str(&format!("/posts/{}", ack.post_id)) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&meta.correlation_id) {
        h.insert("x-correlation-id", v);
    }
    resp
}

/// SHA-256 of the create as it will be stored: the event `decide` made of
/// the body, encoded. Two bodies that normalise alike (surrounding blanks of
/// a title, say) hash alike, as the same create should.
fn body_sha256(event: &posts::Event) -> String {
    let (event_type, schema, payload) = posts::encode(event);
    let mut h = Sha256::new();
    h.update(event_type.as_bytes());
    h.update(schema.to_le_bytes());
    h.update(&payload);
    eventstore::hex(&h.finalize())
}

/// Who sends a command, for scoping its `Idempotency-Key`: the `Actor` the
/// gateway sets from the token's `sub`; empty for a direct call without one.
fn caller(headers: &HeaderMap) -> Result<String, Problem> {
    match header_str(headers, "actor")? {
        None => Ok(String::new()),
        Some(v) if v.len() <= ACTOR_BYTES_MAX => Ok(v.to_string()),
        Some(_) => Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-header",
            format!("Actor must be at most {ACTOR_BYTES_MAX} bytes"),
        )),
    }
}

/// Longest `Actor` header: a token's `sub`.
const ACTOR_BYTES_MAX: usize = 255;

async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let mut meta = metadata(&headers)?;
    let idem_key = header_str(&headers, "idempotency-key")?;
    let body: CreateBody = json_body(&headers, body, BODY_BYTES_MAX).await?;
    let command = Command::Create {
        title: body.title.clone(),
        content: body.content.clone(),
        author_name: body.author_name.clone(),
    };
    // Validate before reserving a key, so a bad body never burns one.
    let decided =
        posts::decide(&PostState::Absent, &command).map_err(|r| rejection_problem(&r, "new"))?;

    let (post_id, replay_allowed) = match idem_key {
        None => (uuid::Uuid::now_v7().to_string(), false),
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
            let scoped = idempotency::key_for("POST /posts", &caller(&headers)?, key);
            let candidate = Reservation {
                post_id: uuid::Uuid::now_v7().to_string(),
                body_sha256: decided.first().map(body_sha256).unwrap_or_default(),
            };
            let want = candidate.body_sha256.clone();
            meta.event_id = Some(idempotency::event_id_for(&scoped));
            match idempotency::reserve(state.idempotency(), &scoped, candidate).await {
                Ok(Reserve::Fresh(id)) => (id, true),
                Ok(Reserve::Existing(r)) if r.body_sha256 == want => (r.post_id, true),
                Ok(Reserve::Existing(_)) => {
                    return Err(Problem::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "idempotency-key-reused",
                        "Idempotency-Key was already used with a different body",
                    ));
                }
                Err(why) if eventstore::is_storage_full(&why) => {
                    tracing::warn!(error = %why, "idempotency bucket full");
                    return Err(storage_full_problem());
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
    let executed = state
        .repo()
        .execute(
            &post_id,
            !replay_allowed,
            None,
            &meta,
            time::OffsetDateTime::now_utc(),
            |s, _| match s {
                PostState::Absent => posts::decide(s, &command).map(|mut evs| evs.pop()),
                // The key's post exists already: answer as the first time, append nothing.
                _ if replay_allowed => Ok(None),
                _ => Err(Rejection::AlreadyExists),
            },
        )
        .await
        .map_err(|e| execute_problem(e, &post_id))?;
    let loaded = &executed.loaded;
    let ack = Ack {
        post_id: post_id.clone(),
        version: 1,
        seq: loaded.first_seq,
    };
    // Debug, not info: one formatted line and one write(2) per command was
    // a measurable share of a create's CPU under load, and the stream
    // already records every command with its correlation id.
    tracing::debug!(
        command = "create",
        post_id,
        version = 1,
        seq = ack.seq,
        correlation_id = meta.correlation_id,
        replayed = !executed.appended,
        "command applied"
    );
    let mut resp = ack_response(StatusCode::CREATED, &ack, &meta, true);
    if !executed.appended {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

async fn update(
    State(state): State<AppState>,
    PathParam(raw_id): PathParam,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let post_id = parse_id(&raw_id, "post")?;
    let expected = if_match(&headers)?;
    let meta = metadata(&headers)?;
    let body: PatchBody = json_body(&headers, body, BODY_BYTES_MAX).await?;
    let command = Command::Update {
        title: body.title,
        content: body.content,
        author_name: body.author_name,
    };
    if let Command::Update {
        title: None,
        content: None,
        author_name: None,
    } = command
    {
        return Err(rejection_problem(&Rejection::EmptyUpdate, &post_id));
    }
    run_command(&state, &post_id, expected, &meta, &command, "update").await
}

async fn delete(
    State(state): State<AppState>,
    PathParam(raw_id): PathParam,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let post_id = parse_id(&raw_id, "post")?;
    let expected = if_match(&headers)?;
    let meta = metadata(&headers)?;
    run_command(
        &state,
        &post_id,
        expected,
        &meta,
        &Command::Delete,
        "delete",
    )
    .await
}

async fn run_command(
    state: &AppState,
    post_id: &str,
    expected: Option<u64>,
    meta: &Metadata,
    command: &Command,
    name: &'static str,
) -> Result<Response, Problem> {
    let executed = state
        .repo()
        .execute(
            post_id,
            false,
            expected,
            meta,
            time::OffsetDateTime::now_utc(),
            |s, _| posts::decide(s, command).map(|mut evs| evs.pop()),
        )
        .await
        .map_err(|e| execute_problem(e, post_id))?;
    let ack = Ack {
        post_id: post_id.to_string(),
        version: executed.loaded.version,
        seq: executed.loaded.last_seq,
    };
    // Debug, not info: one formatted line and one write(2) per command was
    // a measurable share of a create's CPU under load, and the stream
    // already records every command with its correlation id.
    tracing::debug!(
        command = name,
        post_id,
        version = ack.version,
        seq = ack.seq,
        correlation_id = meta.correlation_id,
        "command applied"
    );
    Ok(ack_response(StatusCode::OK, &ack, meta, false))
}
