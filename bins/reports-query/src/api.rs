//! HTTP contract of reports-query (see docs/api.md).

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use reports::author_stats::{AUTHOR_STATS, AuthorRow, STREAMS, StatsError};
use serde_json::{Value, json};
use servicekit::Problem;

use crate::AppState;

const LIMIT_DEFAULT: usize = 20;
const LIMIT_MAX: usize = 1000;
const MIN_SEQ_WAIT_MAX: Duration = Duration::from_secs(3);
const RETRY_AFTER_SECS: u64 = 1;
const STREAM_INFO_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest author name a path may carry (the contract's bound is 100
/// characters, 400 bytes of UTF-8).
const AUTHOR_BYTES_MAX: usize = 400;

pub(crate) fn app(state: AppState) -> Router {
    Router::new()
        .route("/reports/authors", get(list))
        .route("/reports/authors/{author_name}", get(one))
        .route("/projections", get(projections))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route_layer(axum::middleware::from_fn(servicekit::http_metrics))
        .fallback(servicekit::no_route)
        .method_not_allowed_fallback(servicekit::method_not_allowed)
        .with_state(state)
}

pub(crate) fn starting_app() -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .fallback(|| async {
            Problem::unavailable(
                "reports-query is starting: waiting for streams POSTS and COMMENTS (created by their command services) or opening its store",
                RETRY_AFTER_SECS,
            )
        })
}

fn bad(slug: &'static str, detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, slug, detail)
}

fn stats_problem(e: StatsError) -> Problem {
    match e {
        StatsError::BadCursor => bad(
            "invalid-cursor",
            "cursor is malformed; pass next_cursor as it was returned",
        ),
        e @ StatsError::Store(_) => Problem::internal(&e),
    }
}

/// The reports reads, for the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(list, one))]
pub struct ApiDoc;

/// One author's figures over both streams.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct AuthorStats {
    author_name: String,
    /// Live posts the author has now.
    posts: u64,
    /// Live comments the author wrote.
    comments_written: u64,
    /// Live comments on the author's live posts.
    comments_received: u64,
    /// The latest `Occurred-At` of the author's own creates and edits.
    #[schema(format = DateTime)]
    last_activity_at: Option<String>,
}

/// One author.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct AuthorOne {
    data: AuthorStats,
}

/// A page of authors, by name.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct AuthorPage {
    data: Vec<AuthorStats>,
    /// Pass it as `cursor` for the next page; `null` on the last.
    next_cursor: Option<String>,
}

fn dto(author: &str, row: &AuthorRow) -> AuthorStats {
    AuthorStats {
        author_name: author.to_string(),
        posts: row.posts,
        comments_written: row.comments_written,
        comments_received: row.comments_received,
        last_activity_at: row.last_activity_us.map(eventstore_time),
    }
}

/// RFC 3339 text of a microsecond timestamp.
fn eventstore_time(us: i64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    eventstore::format_rfc3339(at)
}

/// Waits until author-stats has applied what the read's `min_seq` names:
/// `POSTS:n`, `COMMENTS:n` or both (a bare number names no stream here).
async fn read_your_writes(
    state: &AppState,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<(), Problem> {
    let raw = match (params.get("min_seq"), headers.get("x-min-seq")) {
        (Some(p), _) => p.clone(),
        (None, Some(h)) => h
            .to_str()
            .map_err(|_| bad("invalid-min-seq", "X-Min-Seq must be visible ASCII"))?
            .to_string(),
        (None, None) => return Ok(()),
    };
    let wanted =
        projection::parse_min_seq(&raw, &STREAMS).map_err(|e| bad("invalid-min-seq", e))?;
    for (stream, seq) in wanted {
        let Some(i) = STREAMS.iter().position(|s| *s == stream) else {
            continue;
        };
        let status = &state.inner.sources[i].status;
        if !status.wait_visible(seq, MIN_SEQ_WAIT_MAX).await {
            return Err(Problem::unavailable(
                format!(
                    "{AUTHOR_STATS} has applied {stream} up to sequence {}, not yet {seq}; retry shortly",
                    status.visible()
                ),
                RETRY_AFTER_SECS,
            ));
        }
    }
    Ok(())
}

fn limit(params: &HashMap<String, String>) -> Result<usize, Problem> {
    match params.get("limit") {
        None => Ok(LIMIT_DEFAULT),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=LIMIT_MAX).contains(&n) => Ok(n),
            _ => Err(bad(
                "invalid-limit",
                format!("limit must be an integer in 1..={LIMIT_MAX}, got {v:?}"),
            )),
        },
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Problem> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Problem::internal(&e))
}

/// One author's figures; 404 for a name never seen.
#[utoipa::path(
    get,
    operation_id = "getAuthorStats",
    path = "/reports/authors/{author_name}",
    tag = "reports",
    params(
        ("author_name" = String, Path, description = "The author's name, percent-encoded."),
        ("min_seq" = Option<String>, Query, description = "Wait until author-stats has applied these sequences: POSTS:n, COMMENTS:m or both, comma separated."),
        ("X-Min-Seq" = Option<String>, Header, description = "min_seq as a header."),
    ),
    responses(
        (status = 200, description = "The author's figures", body = AuthorOne),
        servicekit::openapi::ReadProblems,
    ),
)]
async fn one(
    State(state): State<AppState>,
    raw: Result<Path<String>, axum::extract::rejection::PathRejection>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    servicekit::only_params(&params, &["min_seq"])?;
    let Path(author) = raw.map_err(|r| {
        bad(
            "invalid-path",
            format!("the path is malformed: {}", r.body_text()),
        )
    })?;
    if author.is_empty() || author.len() > AUTHOR_BYTES_MAX {
        return Err(bad(
            "invalid-author",
            format!("author_name must be 1..={AUTHOR_BYTES_MAX} bytes"),
        ));
    }
    read_your_writes(&state, &params, &headers).await?;
    let reader = state.inner.reader.clone();
    let name = author.clone();
    let row = blocking(move || reader.get(&name))
        .await?
        .map_err(stats_problem)?;
    match row {
        Some(row) => Ok(Json(AuthorOne {
            data: dto(&author, &row),
        })
        .into_response()),
        None => Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("author {author:?} never appeared"),
        )),
    }
}

/// Every author seen in either stream, by name.
#[utoipa::path(
    get,
    operation_id = "listAuthorStats",
    path = "/reports/authors",
    tag = "reports",
    params(
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Page size, default 20."),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page."),
        ("min_seq" = Option<String>, Query, description = "Wait until author-stats has applied these sequences: POSTS:n, COMMENTS:m or both, comma separated."),
        ("X-Min-Seq" = Option<String>, Header, description = "min_seq as a header."),
    ),
    responses(
        (status = 200, description = "A page of authors", body = AuthorPage),
        servicekit::openapi::ReadProblems,
    ),
)]
async fn list(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    servicekit::only_params(&params, &["limit", "cursor", "min_seq"])?;
    let limit = limit(&params)?;
    read_your_writes(&state, &params, &headers).await?;
    let cursor = params.get("cursor").filter(|c| !c.is_empty()).cloned();
    let reader = state.inner.reader.clone();
    let page = blocking(move || reader.list(cursor.as_deref(), limit))
        .await?
        .map_err(stats_problem)?;
    let data: Vec<AuthorStats> = page.rows.iter().map(|(a, r)| dto(a, r)).collect();
    Ok(Json(AuthorPage {
        data,
        next_cursor: page.next_cursor,
    })
    .into_response())
}

/// author-stats in `/metrics`: lag and figures summed over both streams.
pub(crate) async fn refresh_metrics(state: &AppState) {
    let (mut lag, mut applied, mut parked, mut halted) = (0u64, 0u64, 0u64, false);
    let mut failed_at = None;
    for source in &state.inner.sources {
        let snap = source.status.snapshot();
        failed_at = failed_at.max(source.status.last_error_at());
        let last = tokio::time::timeout(STREAM_INFO_TIMEOUT, source.store.last_seq())
            .await
            .ok()
            .and_then(Result::ok);
        lag += last.map_or(0, |l| l.saturating_sub(snap.checkpoint));
        applied += snap.applied;
        parked += snap.parked;
        halted |= snap.state == projection::ProjectionState::Halted;
    }
    telemetry::metrics().set_projection(
        AUTHOR_STATS,
        lag,
        applied,
        parked,
        if halted { 2 } else { 0 },
    );
    if let Some(at) = failed_at {
        telemetry::metrics().set_projection_last_error(AUTHOR_STATS, at);
    }
}

async fn projections(State(state): State<AppState>) -> Response {
    let mut checkpoints = serde_json::Map::new();
    let mut lags = serde_json::Map::new();
    let mut last_seqs = serde_json::Map::new();
    let mut total_lag = Some(0u64);
    let mut states = Vec::new();
    let mut errors = Vec::new();
    let mut parked = 0;
    let mut caught_up = true;
    for (stream, source) in STREAMS.iter().zip(&state.inner.sources) {
        let snap = source.status.snapshot();
        let last = tokio::time::timeout(STREAM_INFO_TIMEOUT, source.store.last_seq())
            .await
            .ok()
            .and_then(Result::ok);
        checkpoints.insert((*stream).to_string(), json!(snap.checkpoint));
        last_seqs.insert((*stream).to_string(), json!(last));
        let lag = last.map(|l| l.saturating_sub(snap.checkpoint));
        lags.insert((*stream).to_string(), json!(lag));
        total_lag = total_lag.zip(lag).map(|(t, l)| t + l);
        states.push(snap.state);
        parked += snap.parked;
        caught_up &= snap.caught_up_once;
        if let Some(e) = snap.last_error {
            errors.push(format!("{stream}: {e}"));
        }
    }
    let state_shown = if states.contains(&projection::ProjectionState::Halted) {
        projection::ProjectionState::Halted
    } else {
        states[0]
    };
    Json(json!({ "data": [{
        "name": AUTHOR_STATS,
        // Events applied over both streams; `checkpoints` has each.
        "checkpoint": checkpoints.values().filter_map(Value::as_u64).sum::<u64>(),
        "checkpoints": checkpoints,
        "stream_last_seqs": last_seqs,
        "lags": lags,
        "lag": total_lag,
        "state": state_shown,
        "parked": parked,
        "caught_up_once": caught_up,
        "last_error": if errors.is_empty() { Value::Null } else { json!(errors.join("; ")) },
    }] }))
    .into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    let mut not_ready = Vec::new();
    for (stream, source) in STREAMS.iter().zip(&state.inner.sources) {
        let s = &source.status;
        if s.state() == projection::ProjectionState::Halted {
            not_ready.push(format!(
                "{AUTHOR_STATS} is halted on {stream}: {}",
                s.last_error().unwrap_or_default()
            ));
        } else if !s.caught_up_once() {
            not_ready.push(format!("{AUTHOR_STATS} is still catching up on {stream}"));
        }
    }
    if not_ready.is_empty() {
        (StatusCode::OK, "ready").into_response()
    } else {
        Problem::unavailable(not_ready.join("; "), RETRY_AFTER_SECS).into_response()
    }
}
