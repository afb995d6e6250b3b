//! HTTP contract of the query side (see docs/api.md).

use std::collections::HashMap;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use eventstore::Replica;
use posts::Event;
use posts_projections::search::{Hit, SEARCH_OFFSET_MAX, SearchError};
use posts_projections::view::{Row, ViewError};
use posts_projections::{POST_SEARCH, POST_VIEW, format_micros};
use serde::Serialize;
use serde_json::{Value, json};
use servicekit::{PathParam, Problem, parse_id};

use crate::AppState;

/// Default and largest page size.
const LIMIT_DEFAULT: usize = 20;
const LIMIT_MAX: usize = 1000;
/// A history page's default size.
const HISTORY_LIMIT_DEFAULT: usize = 100;
/// Every list stops before its body reaches this (docs/api.md): `limit`
/// counts items, this bounds what one answer costs in memory whatever the
/// items' size; `next_cursor` carries on.
pub(crate) const PAGE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// History pages read from the stream at once; the others wait their turn.
/// Each holds at most a page in memory (~[`PAGE_BYTES_MAX`]).
pub(crate) const HISTORY_READS_MAX: usize = 16;
/// Longest a read waits for its `min_seq` before answering 503.
const MIN_SEQ_WAIT_MAX: Duration = Duration::from_secs(3);
const RETRY_AFTER_SECS: u64 = 1;
/// How long `/projections` waits for the stream's last sequence.
const STREAM_INFO_TIMEOUT: Duration = Duration::from_secs(1);

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/posts", get(list))
        .route("/posts/search", get(search))
        .route("/posts/{id}", get(get_post))
        .route("/posts/{id}/events", get(history))
        .route("/posts/{id}/comments", get(crate::comments_api::list))
        .route(
            "/posts/{id}/comments/{comment_id}",
            get(crate::comments_api::get_one),
        )
        .route("/projections", get(projections))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route_layer(axum::middleware::from_fn(servicekit::http_metrics))
        .fallback(servicekit::no_route)
        .method_not_allowed_fallback(servicekit::method_not_allowed)
        .with_state(state)
}

/// What the service answers while it waits for its stream and opens its
/// stores: `/livez` 200, everything else 503 with `Retry-After`.
pub(crate) fn starting_app() -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .fallback(|| async {
            Problem::unavailable(
                "posts-query is starting: waiting for stream POSTS (created by posts-command) or opening its stores",
                RETRY_AFTER_SECS,
            )
        })
}

type Params = Query<HashMap<String, String>>;

fn bad(slug: &'static str, detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, slug, detail)
}

pub(crate) fn limit(params: &HashMap<String, String>) -> Result<usize, Problem> {
    limit_or(params, LIMIT_DEFAULT)
}

fn limit_or(params: &HashMap<String, String>, default: usize) -> Result<usize, Problem> {
    match params.get("limit") {
        None => Ok(default),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=LIMIT_MAX).contains(&n) => Ok(n),
            _ => Err(bad(
                "invalid-limit",
                format!("limit must be an integer in 1..={LIMIT_MAX}, got {v:?}"),
            )),
        },
    }
}

fn flag(params: &HashMap<String, String>, name: &str) -> Result<bool, Problem> {
    match params.get(name).map(String::as_str) {
        None | Some("false" | "0") => Ok(false),
        Some("true" | "1" | "") => Ok(true),
        Some(v) => Err(bad(
            "invalid-parameter",
            format!("{name} must be true or false, got {v:?}"),
        )),
    }
}

/// The read's `min_seq` (query param, else `X-Min-Seq`) for `stream`, the
/// one stream the route's projection follows: a bare number, or the
/// `STREAM:n[,STREAM:n...]` form naming only that stream.
pub(crate) fn min_seq_of(
    params: &HashMap<String, String>,
    headers: &HeaderMap,
    stream: &str,
) -> Result<Option<u64>, Problem> {
    let invalid = |detail: String| bad("invalid-min-seq", detail);
    let raw = match (params.get("min_seq"), headers.get("x-min-seq")) {
        (Some(p), _) => p.as_str(),
        (None, Some(h)) => h.to_str().map_err(|_| {
            invalid(format!(
                "min_seq must be a stream sequence (u64), got {:?}",
                String::from_utf8_lossy(h.as_bytes())
            ))
        })?,
        (None, None) => return Ok(None),
    };
    let wanted = projection::parse_min_seq(raw, &[stream]).map_err(invalid)?;
    Ok(wanted.into_iter().map(|(_, n)| n).max())
}

/// The read's `min_seq` for stream `POSTS`.
fn min_seq(params: &HashMap<String, String>, headers: &HeaderMap) -> Result<Option<u64>, Problem> {
    min_seq_of(params, headers, posts::context::STREAM)
}

/// Waits until `projection` has applied `min_seq` (query param or
/// `X-Min-Seq`), on a notification, at most [`MIN_SEQ_WAIT_MAX`].
async fn read_your_writes(
    state: &AppState,
    projection: &str,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<(), Problem> {
    let Some(min_seq) = min_seq(params, headers)? else {
        return Ok(());
    };
    let Some(status) = state.status(projection) else {
        return Ok(());
    };
    wait_visible(&status, min_seq).await
}

/// Waits until `status`'s projection has applied `min_seq`, on a
/// notification, at most [`MIN_SEQ_WAIT_MAX`]; then 503 with `Retry-After`.
pub(crate) async fn wait_visible(status: &projection::Status, min_seq: u64) -> Result<(), Problem> {
    if status.wait_visible(min_seq, MIN_SEQ_WAIT_MAX).await {
        Ok(())
    } else {
        Err(Problem::unavailable(
            format!(
                "{} has applied up to sequence {}, not yet {min_seq}; retry shortly",
                status.name(),
                status.visible()
            ),
            RETRY_AFTER_SECS,
        ))
    }
}

/// The posts reads, for the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    list,
    search,
    get_post,
    history,
    crate::comments_api::list,
    crate::comments_api::get_one
))]
pub struct ApiDoc;

/// A post as post-view holds it.
#[derive(Serialize, utoipa::ToSchema)]
struct PostDto {
    #[schema(format = Uuid)]
    post_id: String,
    title: String,
    content: String,
    author_name: String,
    /// RFC 3339, UTC, microseconds.
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
    /// The post's event count.
    version: u64,
    /// Shown only with `include_deleted=true`.
    deleted: bool,
}

/// One post.
#[derive(Serialize, utoipa::ToSchema)]
struct PostOne {
    data: PostDto,
}

/// One message of a post's history. A message that cannot be decoded is
/// shown in its place with `data: null` and an `error`.
#[derive(Serialize, utoipa::ToSchema)]
struct HistoryEntry {
    /// Its sequence in stream POSTS.
    seq: u64,
    /// `PostCreated`, `PostUpdated` or `PostDeleted`.
    #[serde(rename = "type")]
    event_type: Option<String>,
    schema: Option<u32>,
    #[schema(format = DateTime)]
    occurred_at: Option<String>,
    event_id: Option<String>,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    /// The token's `sub` of the write, through the gateway.
    actor: Option<String>,
    /// The W3C trace context of the request that made the event.
    traceparent: Option<String>,
    /// The event's fields.
    #[schema(value_type = Option<Object>)]
    data: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// A page of a post's history.
#[derive(Serialize, utoipa::ToSchema)]
struct HistoryPage {
    data: Vec<HistoryEntry>,
    /// Pass it as `cursor` for the next page; `null` on the last.
    next_cursor: Option<String>,
}

fn dto(id: String, r: Row) -> PostDto {
    PostDto {
        post_id: id,
        title: r.title,
        content: r.content,
        author_name: r.author_name,
        created_at: format_micros(r.created_at_us),
        updated_at: format_micros(r.updated_at_us),
        version: r.version,
        deleted: r.deleted,
    }
}

fn view_problem(e: ViewError) -> Problem {
    match e {
        ViewError::BadCursor => bad(
            "invalid-cursor",
            "cursor is malformed; use next_cursor from a previous page",
        ),
        ViewError::Store(_) => Problem::internal(&e),
    }
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Problem> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Problem::internal(&e))
}

/// One post; 404 when unknown or deleted.
#[utoipa::path(
    get,
    operation_id = "getPost",
    path = "/posts/{id}",
    tag = "posts",
    params(
        ("id" = String, Path, format = Uuid, description = "The post's id."),
        ("include_deleted" = Option<bool>, Query, description = "Show a deleted post, with deleted: true."),
        ("min_seq" = Option<String>, Query, description = "Wait until this read's projection has applied this sequence of stream POSTS (or answer 503 with Retry-After)."),
        ("X-Min-Seq" = Option<String>, Header, description = "min_seq as a header."),
    ),
    responses(
        (status = 200, description = "The post", body = PostOne, headers(("ETag" = String, description = "\"<version>\": send it as If-Match with an update"))),
        servicekit::openapi::ReadProblems,
    ),
)]
async fn get_post(
    State(state): State<AppState>,
    PathParam(raw_id): PathParam,
    Query(params): Params,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    servicekit::only_params(&params, &["include_deleted", "min_seq"])?;
    let id = parse_id(&raw_id, "post")?;
    let include_deleted = flag(&params, "include_deleted")?;
    read_your_writes(&state, POST_VIEW, &params, &headers).await?;
    let view = state.view();
    let lookup = id.clone();
    let row = blocking(move || view.get(&lookup))
        .await?
        .map_err(view_problem)?;
    match row {
        Some(r) if !r.deleted || include_deleted => {
            let version = r.version;
            Ok(servicekit::with_etag(
                Json(PostOne { data: dto(id, r) }).into_response(),
                version,
            ))
        }
        _ => Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("post {id} not found"),
        )),
    }
}

/// Live posts, newest first, optionally by one author.
#[utoipa::path(
    get,
    operation_id = "listPosts",
    path = "/posts",
    tag = "posts",
    params(
        ("author_name" = Option<String>, Query, description = "Only this author's posts."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Page size, default 20; a page also stops before 4 MiB."),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page."),
        ("min_seq" = Option<String>, Query, description = "Wait until this read's projection has applied this sequence of stream POSTS (or answer 503 with Retry-After)."),
        ("X-Min-Seq" = Option<String>, Header, description = "min_seq as a header."),
    ),
    responses(
        (status = 200, description = "A page of posts", body = ListPage),
        servicekit::openapi::ReadProblems,
    ),
)]
async fn list(
    State(state): State<AppState>,
    Query(params): Params,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    servicekit::only_params(&params, &["author_name", "limit", "cursor", "min_seq"])?;
    let limit = limit(&params)?;
    read_your_writes(&state, POST_VIEW, &params, &headers).await?;
    let author = params.get("author_name").filter(|a| !a.is_empty()).cloned();
    let cursor = params.get("cursor").filter(|c| !c.is_empty()).cloned();
    let view = state.view();
    let page = blocking(move || {
        view.list_within(author.as_deref(), limit, cursor.as_deref(), PAGE_BYTES_MAX)
    })
    .await?
    .map_err(view_problem)?;
    let data: Vec<PostDto> = page.rows.into_iter().map(|(id, r)| dto(id, r)).collect();
    Ok(Json(ListPage {
        data,
        next_cursor: page.next_cursor,
    })
    .into_response())
}

/// A history page's cursor: `s<seq>`, the last sequence of the page before.
fn decode_history_cursor(cursor: &str) -> Result<u64, Problem> {
    cursor
        .strip_prefix('s')
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| {
            bad(
                "invalid-cursor",
                "cursor is malformed; use next_cursor from a previous page",
            )
        })
}

fn decode_offset(cursor: &str) -> Result<usize, Problem> {
    cursor
        .strip_prefix("o")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n <= SEARCH_OFFSET_MAX)
        .ok_or_else(|| {
            bad(
                "invalid-cursor",
                "cursor is malformed; use next_cursor from a previous page",
            )
        })
}

/// Full-text search over titles (boosted) and contents: BM25, phrases in
/// quotes, typo tolerance, highlighted snippets; deleted posts never match.
#[utoipa::path(
    get,
    operation_id = "searchPosts",
    path = "/posts/search",
    tag = "posts",
    params(
        ("q" = String, Query, description = "The words to search for; \"a phrase\" in quotes."),
        ("highlight_pre_tag" = Option<String>, Query, max_length = 64, description = "Put before each highlighted word instead of <b> (at most 64 bytes)."),
        ("highlight_post_tag" = Option<String>, Query, max_length = 64, description = "Put after each highlighted word instead of </b>."),
        ("author_name" = Option<String>, Query, description = "Only this author's posts."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Page size, default 20."),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page."),
        ("min_seq" = Option<String>, Query, description = "Wait until this read's projection has applied this sequence of stream POSTS (or answer 503 with Retry-After)."),
        ("X-Min-Seq" = Option<String>, Header, description = "min_seq as a header."),
    ),
    responses(
        (status = 200, description = "A page of hits", body = SearchPage),
        servicekit::openapi::ReadProblems,
    ),
)]
async fn search(
    State(state): State<AppState>,
    Query(params): Params,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    servicekit::only_params(
        &params,
        &[
            "q",
            "author_name",
            "limit",
            "cursor",
            "min_seq",
            "highlight_pre_tag",
            "highlight_post_tag",
        ],
    )?;
    let tags = (
        highlight_tag(&params, "highlight_pre_tag")?,
        highlight_tag(&params, "highlight_post_tag")?,
    );
    let limit = limit(&params)?;
    let q = params
        .get("q")
        .cloned()
        .ok_or_else(|| bad("missing-query", "q is required"))?;
    let offset = params
        .get("cursor")
        .filter(|c| !c.is_empty())
        .map(|c| decode_offset(c))
        .transpose()?
        .unwrap_or(0);
    read_your_writes(&state, POST_SEARCH, &params, &headers).await?;
    let author = params.get("author_name").filter(|a| !a.is_empty()).cloned();
    let reader = state.search();
    let slot = state
        .inner
        .search_slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| Problem::internal(&e))?;
    // The slot goes with the search: a client that disconnects drops this
    // future, but the blocking search runs on, and must keep its slot.
    let results = blocking(move || {
        let _slot = slot;
        let started = std::time::Instant::now();
        let found = reader.search(&q, author.as_deref(), limit, offset);
        telemetry::metrics()
            .search_duration
            .observe(started.elapsed().as_secs_f64());
        found
    })
    .await?
    .map_err(|e| match e {
        SearchError::Empty => bad("invalid-query", "q has no searchable words"),
        SearchError::TooLong | SearchError::TooManyTerms | SearchError::WordTooLong(..) => {
            bad("invalid-query", e.to_string())
        }
        SearchError::Index(_) => Problem::internal(&e),
    })?;
    let mut hits = results.hits;
    if tags.0.is_some() || tags.1.is_some() {
        // The snippets' text is HTML-escaped: a literal `<b>` or `</b>` in
        // them can only be a marker.
        let (pre, post) = (
            tags.0.as_deref().unwrap_or("<b>"),
            tags.1.as_deref().unwrap_or("</b>"),
        );
        for hit in &mut hits {
            for v in hit.highlights.values_mut() {
                *v = v
                    .replace("<b>", "\u{0}")
                    .replace("</b>", post)
                    .replace('\u{0}', pre);
            }
        }
    }
    Ok(Json(SearchPage {
        data: hits,
        total: results.total,
        next_cursor: results.next_offset.map(|o| format!("o{o}")),
    })
    .into_response())
}

/// Longest highlight tag.
const HIGHLIGHT_TAG_BYTES_MAX: usize = 64;

/// A highlight tag from `name`: at most 64 bytes, no control characters;
/// inserted as given (it is the client's markup), around escaped text.
fn highlight_tag(params: &HashMap<String, String>, name: &str) -> Result<Option<String>, Problem> {
    match params.get(name) {
        None => Ok(None),
        Some(tag) if tag.len() <= HIGHLIGHT_TAG_BYTES_MAX && !tag.chars().any(char::is_control) => {
            Ok(Some(tag.clone()))
        }
        Some(_) => Err(bad(
            "invalid-highlight-tag",
            format!(
                "{name} must be at most {HIGHLIGHT_TAG_BYTES_MAX} bytes, without control characters"
            ),
        )),
    }
}

/// A page of search hits, serialised straight from them: a `json!` tree
/// copied every hit's strings into maps first, most of the JSON work in a
/// search's CPU profile.
#[derive(Serialize, utoipa::ToSchema)]
struct SearchPage {
    data: Vec<Hit>,
    /// Every live post that matches, exactly.
    total: usize,
    next_cursor: Option<String>,
}

/// A page of a listing, serialised straight from its rows.
#[derive(Serialize, utoipa::ToSchema)]
struct ListPage {
    data: Vec<PostDto>,
    /// Pass it as `cursor` for the next page; `null` on the last.
    next_cursor: Option<String>,
}

fn event_json(event: &Event) -> Value {
    match event {
        Event::Created {
            title,
            content,
            author_name,
        } => {
            json!({ "title": title, "content": content, "author_name": author_name })
        }
        Event::Updated {
            title,
            content,
            author_name,
        } => {
            let mut m = serde_json::Map::new();
            for (k, v) in [
                ("title", title),
                ("content", content),
                ("author_name", author_name),
            ] {
                if let Some(v) = v {
                    m.insert(k.to_string(), json!(v));
                }
            }
            Value::Object(m)
        }
        Event::Deleted => json!({}),
    }
}

/// A post's events, from the stream itself, oldest first.
#[utoipa::path(
    get,
    operation_id = "getPostHistory",
    path = "/posts/{id}/events",
    tag = "posts",
    params(
        ("id" = String, Path, format = Uuid, description = "The post's id."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Page size, default 100."),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page."),
        ("min_seq" = Option<String>, Query, description = "Wait until this read's projection has applied this sequence of stream POSTS (or answer 503 with Retry-After)."),
        ("X-Min-Seq" = Option<String>, Header, description = "min_seq as a header."),
    ),
    responses(
        (status = 200, description = "A page of the post's history", body = HistoryPage),
        servicekit::openapi::ReadProblems,
    ),
)]
async fn history(
    State(state): State<AppState>,
    PathParam(raw_id): PathParam,
    Query(params): Params,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    servicekit::only_params(&params, &["limit", "cursor", "min_seq"])?;
    let id = parse_id(&raw_id, "post")?;
    // History is read from the stream itself. With `min_seq` it is read
    // through the stream leader, which has every acknowledged write, once
    // the stream has reached `min_seq`; without, any replica answers.
    let store_down =
        || Problem::unavailable("event store unavailable; retry shortly", RETRY_AFTER_SECS);
    let from = match min_seq(&params, &headers)? {
        None => Replica::Any,
        Some(min_seq) => {
            let last = stream_last_seq(&state).await.ok_or_else(store_down)?;
            if last < min_seq {
                return Err(Problem::unavailable(
                    format!("the stream is at sequence {last}, not yet {min_seq}; retry shortly"),
                    RETRY_AFTER_SECS,
                ));
            }
            Replica::Leader
        }
    };
    let limit = limit_or(&params, HISTORY_LIMIT_DEFAULT)?;
    let after_seq = match params.get("cursor").filter(|c| !c.is_empty()) {
        None => 0,
        Some(c) => decode_history_cursor(c)?,
    };
    let _slot = state
        .inner
        .history_slots
        .acquire()
        .await
        .map_err(|e| Problem::internal(&e))?;
    let page = state
        .inner
        .store
        .history(&id, after_seq, from, limit, PAGE_BYTES_MAX)
        .await
        .map_err(|e| match e {
            eventstore::LoadError::Unavailable(_) => store_down(),
            e @ (eventstore::LoadError::Corrupt { .. } | eventstore::LoadError::TooLong(_)) => {
                Problem::internal(&e)
            }
        })?;
    if page.entries.is_empty() && after_seq == 0 {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("post {id} not found"),
        ));
    }
    let mut data: Vec<HistoryEntry> = Vec::with_capacity(page.entries.len());
    let mut body_bytes = 0usize;
    let mut more = page.more;
    for entry in &page.entries {
        let v = history_entry(entry);
        // JSON escapes can make an entry far bigger than its payload.
        let size = serde_json::to_vec(&v).map_or(0, |b| b.len()) + 1;
        if !data.is_empty() && body_bytes + size > PAGE_BYTES_MAX {
            more = true;
            break;
        }
        body_bytes += size;
        data.push(v);
    }
    let next_cursor = more
        .then(|| data.last().map(|v| v.seq))
        .flatten()
        .map(|seq| format!("s{seq}"));
    Ok(Json(HistoryPage { data, next_cursor }).into_response())
}

/// One message of a post's history as JSON. A message something other than
/// a command service put on the post's subject is shown in its place, like
/// an undecodable payload.
fn history_entry(entry: &Result<eventstore::RecordedEvent, (u64, String)>) -> HistoryEntry {
    let e = match entry {
        Ok(e) => e,
        Err((seq, reason)) => {
            return HistoryEntry {
                seq: *seq,
                event_type: None,
                schema: None,
                occurred_at: None,
                event_id: None,
                correlation_id: None,
                causation_id: None,
                actor: None,
                traceparent: None,
                data: None,
                error: Some(format!("broken envelope: {reason}")),
            };
        }
    };
    let (data, error) = match posts::decode(&e.event_type, e.schema, &e.payload) {
        Ok(ev) => (Some(event_json(&ev)), None),
        Err(err) => (None, Some(err.to_string())),
    };
    HistoryEntry {
        seq: e.seq,
        event_type: Some(e.event_type.clone()),
        schema: Some(e.schema),
        occurred_at: Some(eventstore::format_rfc3339(e.occurred_at)),
        event_id: Some(e.event_id.clone()),
        correlation_id: Some(e.correlation_id.clone()),
        causation_id: Some(e.causation_id.clone()),
        actor: e.actor.clone(),
        traceparent: e.traceparent.clone(),
        data,
        error,
    }
}

/// The stream's last sequence, from its leader; `None` if it does not answer
/// within [`STREAM_INFO_TIMEOUT`].
async fn stream_last_seq(state: &AppState) -> Option<u64> {
    tokio::time::timeout(STREAM_INFO_TIMEOUT, state.inner.store.last_seq())
        .await
        .ok()
        .and_then(Result::ok)
}

async fn projections(State(state): State<AppState>) -> Response {
    let last = stream_last_seq(&state).await;
    let view = state.view();
    let search = state.search();
    let recent: HashMap<&str, Vec<projection::Parked>> = blocking(move || {
        let mut m = HashMap::new();
        m.insert(POST_VIEW, view.parked_recent().unwrap_or_default());
        m.insert(POST_SEARCH, search.parked_recent().unwrap_or_default());
        m
    })
    .await
    .unwrap_or_default();
    let stream_error = state.inner.feed.stream_error();
    let data: Vec<Value> = state
        .inner
        .statuses
        .iter()
        .map(|s| {
            let snap = s.snapshot();
            let rebuild = state.rebuild(&snap.name);
            let shown_state = if rebuild.is_some() {
                projection::ProjectionState::Rebuilding
            } else {
                snap.state
            };
            json!({
                "name": snap.name,
                "checkpoint": snap.checkpoint,
                "checkpoints": { posts::context::STREAM: snap.checkpoint },
                "applied": snap.applied,
                "stream_last_seq": last,
                "lag": last.map(|l| l.saturating_sub(snap.checkpoint)),
                "state": shown_state,
                "parked": snap.parked,
                "parked_recent": recent.get(snap.name.as_str()).cloned().unwrap_or_default(),
                "caught_up_once": snap.caught_up_once,
                "last_error": snap.last_error,
                "stream_error": stream_error,
                "rebuild": rebuild,
            })
        })
        .collect();
    let mut data = data;
    data.push(comment_view_entry(&state).await);
    Json(json!({ "data": data })).into_response()
}

/// The projection families of `/metrics`: the figures `/projections` shows.
pub(crate) async fn refresh_metrics(state: &AppState) {
    let code = |s: projection::ProjectionState| match s {
        projection::ProjectionState::Running => 0,
        projection::ProjectionState::Rebuilding => 1,
        projection::ProjectionState::Halted => 2,
    };
    let last = stream_last_seq(state).await;
    for s in &state.inner.statuses {
        let snap = s.snapshot();
        let shown = if state.rebuild(&snap.name).is_some() {
            projection::ProjectionState::Rebuilding
        } else {
            snap.state
        };
        let lag = last.map_or(0, |l| l.saturating_sub(snap.checkpoint));
        telemetry::metrics().set_projection(
            &snap.name,
            lag,
            snap.applied,
            snap.parked,
            code(shown),
        );
        if let Some(at) = s.last_error_at() {
            telemetry::metrics().set_projection_last_error(&snap.name, at);
        }
    }
    let dlq = tokio::time::timeout(STREAM_INFO_TIMEOUT, async {
        let mut stream = state
            .inner
            .store
            .jetstream()
            .get_stream(eventstore::dlq_spec(1).name)
            .await
            .ok()?;
        stream.info().await.ok().map(|i| i.state.messages)
    })
    .await
    .ok()
    .flatten();
    if let Some(n) = dlq {
        telemetry::metrics()
            .dlq_messages
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    let side = &state.inner.comments;
    let snap = side.status.snapshot();
    let last = match side.followed.get() {
        Some((store, _)) => tokio::time::timeout(STREAM_INFO_TIMEOUT, store.last_seq())
            .await
            .ok()
            .and_then(Result::ok),
        None => None,
    };
    let lag = last.map_or(0, |l| l.saturating_sub(snap.checkpoint));
    telemetry::metrics().set_projection(
        &snap.name,
        lag,
        snap.applied,
        snap.parked,
        code(snap.state),
    );
    if let Some(at) = side.status.last_error_at() {
        telemetry::metrics().set_projection_last_error(&snap.name, at);
    }
}

/// The `/projections` entry of comment-view, which follows `COMMENTS`.
async fn comment_view_entry(state: &AppState) -> Value {
    let side = &state.inner.comments;
    let snap = side.status.snapshot();
    let followed = side.followed.get();
    let last = match followed {
        Some((store, _)) => tokio::time::timeout(STREAM_INFO_TIMEOUT, store.last_seq())
            .await
            .ok()
            .and_then(Result::ok),
        None => None,
    };
    let reader = state.comment_reader();
    let recent = blocking(move || reader.parked_recent().unwrap_or_default())
        .await
        .unwrap_or_default();
    json!({
        "name": snap.name,
        "checkpoint": snap.checkpoint,
        "checkpoints": { comments::context::STREAM: snap.checkpoint },
        "applied": snap.applied,
        "stream_last_seq": last,
        "lag": last.map(|l| l.saturating_sub(snap.checkpoint)),
        "state": snap.state,
        "parked": snap.parked,
        "parked_recent": recent,
        "caught_up_once": snap.caught_up_once,
        "last_error": snap.last_error,
        "stream_error": match followed {
            Some((_, feed)) => feed.stream_error(),
            None => Some("waiting for stream COMMENTS (created by comments-command)".to_string()),
        },
        "rebuild": Value::Null,
    })
}

/// Ready once every projection has caught up once, and while none is
/// halted (a fault it retries, a panicked runner) and every store is still
/// on disk: a balancer then sends reads to another instance.
async fn readyz(State(state): State<AppState>) -> Response {
    let mut not_ready = Vec::new();
    for s in &state.inner.statuses {
        if s.state() == projection::ProjectionState::Halted {
            not_ready.push(format!(
                "{} is halted: {}",
                s.name(),
                s.last_error().unwrap_or_default()
            ));
        } else if !s.caught_up_once() {
            not_ready.push(format!("{} is still catching up", s.name()));
        }
    }
    // comment-view counts once its stream exists: until comments-command
    // has created it there is nothing to catch up with.
    let comments = &state.inner.comments;
    if comments.followed.get().is_some() {
        let s = &comments.status;
        if s.state() == projection::ProjectionState::Halted {
            not_ready.push(format!(
                "{} is halted: {}",
                s.name(),
                s.last_error().unwrap_or_default()
            ));
        } else if !s.caught_up_once() {
            not_ready.push(format!("{} is still catching up", s.name()));
        }
    }
    for name in [POST_VIEW, POST_SEARCH] {
        if !posts_projections::rebuild::live_path(&state.inner.data_dir, name).exists() {
            not_ready.push(format!(
                "{name} is gone: its store is missing from the data dir"
            ));
        }
    }
    if not_ready.is_empty() {
        (StatusCode::OK, "ready").into_response()
    } else {
        Problem::unavailable(not_ready.join("; "), RETRY_AFTER_SECS).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Fuzz targets (hardening finding 11): every parameter parser of a read
    // takes any text and answers a value or a 400, never a panic.
    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4_000))]
        #[test]
        fn any_parameter_text_parses_or_is_a_400(
            raw in proptest::prelude::prop_oneof![
                "\\PC{0,30}",
                "[so]?[0-9]{0,25}",
                "[ +-]?[0-9]{0,22} ?",
            ],
            header in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24),
        ) {
            let params: HashMap<String, String> = [
                ("min_seq".to_string(), raw.clone()),
                ("limit".to_string(), raw.clone()),
                ("include_deleted".to_string(), raw.clone()),
            ]
            .into();
            let mut headers = HeaderMap::new();
            if let Ok(v) = axum::http::HeaderValue::from_bytes(&header) {
                headers.insert("x-min-seq", v);
            }
            let problems = [
                min_seq(&params, &headers).err(),
                min_seq(&HashMap::new(), &headers).err(),
                limit(&params).err(),
                flag(&params, "include_deleted").err(),
                decode_offset(&raw).err(),
                decode_history_cursor(&raw).err(),
            ];
            for p in problems.into_iter().flatten() {
                proptest::prop_assert_eq!(p.status, StatusCode::BAD_REQUEST);
            }
            if let Ok(n) = limit(&params) {
                proptest::prop_assert!((1..=LIMIT_MAX).contains(&n));
            }
            if let Ok(n) = decode_offset(&raw) {
                proptest::prop_assert!(n <= SEARCH_OFFSET_MAX);
            }
        }
    }
}
