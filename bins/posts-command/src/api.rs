//! HTTP contract of the command side (see docs/api.md). DTOs live here; the
//! domain never sees HTTP types, and the command loop is the platform's
//! ([`servicekit::command::CommandHost`]).

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, patch, post};
use posts::{Command, PostState, Rejection};
use serde::{Deserialize, Serialize};
use servicekit::command::ack;
use servicekit::{PathParam, Problem, json_body, parse_id};

use crate::AppState;

/// Largest request body. Content is bounded at 100 000 bytes decoded; JSON
/// escaping can double that (or worse for `\uXXXX`), so allow 512 KiB raw.
pub const BODY_BYTES_MAX: usize = 512 * 1024;

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/posts", post(create))
        .route("/posts/{id}", patch(update).delete(delete))
        .route("/livez", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(state): State<AppState>| async move { state.host().readyz().await }),
        )
        .route_layer(axum::middleware::from_fn(servicekit::no_query_params))
        .route_layer(axum::middleware::from_fn(servicekit::http_metrics))
        .fallback(servicekit::no_route)
        .method_not_allowed_fallback(servicekit::method_not_allowed)
        .layer(axum::middleware::map_response(
            servicekit::close_after_unread_body,
        ))
        .with_state(state)
}

/// The posts commands, for the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(create, update, delete))]
pub struct ApiDoc;

/// A new post.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    /// 1..=200 characters, trimmed; no control or format characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        example = "Event sourcing on JetStream"
    )]
    title: String,
    /// 1..=100 000 bytes, trimmed.
    #[schema(min_length = 1, max_length = 100000)]
    content: String,
    /// 1..=100 characters, trimmed; no control or format characters.
    #[schema(min_length = 1, max_length = 100, example = "ada")]
    author_name: String,
}

/// Any non-empty subset of a post's fields, with the same bounds.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    #[schema(min_length = 1, max_length = 200)]
    title: Option<String>,
    #[schema(min_length = 1, max_length = 100000)]
    content: Option<String>,
    #[schema(min_length = 1, max_length = 100)]
    author_name: Option<String>,
}

/// A command's outcome.
#[derive(Serialize, utoipa::ToSchema)]
struct Ack {
    /// A UUIDv7.
    #[schema(format = Uuid)]
    post_id: String,
    /// The post's event count: 1 after the create.
    version: u64,
    /// The stream sequence of the last event appended: hand it to reads as
    /// `min_seq` to read this write.
    seq: u64,
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
        Rejection::Invalid { field, .. } => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "out-of-bounds",
            rejection.to_string(),
        )
        .with_field(field),
    }
}

/// Creates a post: appends `PostCreated` to stream POSTS.
#[utoipa::path(
    post,
    operation_id = "createPost",
    path = "/posts",
    tag = "posts",
    request_body(content = CreateBody, content_type = "application/json"),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "The same key and body again (within 24 h) answer the same post and append nothing."),
        ("X-Correlation-Id" = Option<String>, Header, description = "Lands in the event's Correlation-Id (1..=128 visible ASCII)."),
    ),
    responses(
        (status = 201, description = "Created", body = Ack, headers(
            ("Location" = String, description = "/posts/{post_id}"),
            ("ETag" = String, description = "\"1\""),
        )),
        servicekit::openapi::CommandProblems,
    ),
)]
async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let body: CreateBody = json_body(&headers, body, BODY_BYTES_MAX).await?;
    let command = Command::Create {
        title: body.title,
        content: body.content,
        author_name: body.author_name,
    };
    // Validate before reserving a key, so a bad body never burns one.
    let decided =
        posts::decide(&PostState::Absent, &command).map_err(|r| rejection_problem(&r, "new"))?;
    let (created, meta) = state
        .host()
        .create(&headers, "POST /posts", decided, || {
            uuid::Uuid::now_v7().to_string()
        })
        .await?;
    let ack_body = Ack {
        post_id: created.id,
        version: 1,
        seq: created.executed.loaded.first_seq,
    };
    // Debug, not info: one formatted line and one write(2) per command was
    // a measurable share of a create's CPU under load, and the stream
    // already records every command with its correlation id.
    tracing::debug!(
        command = "create",
        post_id = ack_body.post_id,
        seq = ack_body.seq,
        correlation_id = meta.correlation_id,
        replayed = created.replayed,
        "command applied"
    );
    let location = format!("/posts/{}", ack_body.post_id);
    let mut resp = ack(StatusCode::CREATED, &ack_body, 1, Some(&location), &meta);
    if created.replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// Updates any non-empty subset of a post's fields: appends `PostUpdated`.
#[utoipa::path(
    patch,
    operation_id = "updatePost",
    path = "/posts/{id}",
    tag = "posts",
    request_body(content = PatchBody, content_type = "application/json"),
    params(
        ("id" = String, Path, format = Uuid, description = "The post's id."),
        ("If-Match" = Option<String>, Header, description = "\"<version>\": 412 when the post is at another version."),
        ("X-Correlation-Id" = Option<String>, Header, description = "Lands in the event's Correlation-Id."),
    ),
    responses(
        (status = 200, description = "Updated", body = Ack, headers(("ETag" = String, description = "\"<version>\""))),
        servicekit::openapi::CommandProblems,
    ),
)]
async fn update(
    State(state): State<AppState>,
    PathParam(raw_id): PathParam,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let post_id = parse_id(&raw_id, "post")?;
    let body: PatchBody = json_body(&headers, body, BODY_BYTES_MAX).await?;
    if body.title.is_none() && body.content.is_none() && body.author_name.is_none() {
        return Err(rejection_problem(&Rejection::EmptyUpdate, &post_id));
    }
    let command = Command::Update {
        title: body.title,
        content: body.content,
        author_name: body.author_name,
    };
    run_command(&state, &post_id, &headers, &command, "update").await
}

/// Soft-deletes a post: appends `PostDeleted`; its history stays.
#[utoipa::path(
    delete,
    operation_id = "deletePost",
    path = "/posts/{id}",
    tag = "posts",
    params(
        ("id" = String, Path, format = Uuid, description = "The post's id."),
        ("If-Match" = Option<String>, Header, description = "\"<version>\": 412 when the post is at another version."),
        ("X-Correlation-Id" = Option<String>, Header, description = "Lands in the event's Correlation-Id."),
    ),
    responses(
        (status = 200, description = "Deleted", body = Ack, headers(("ETag" = String, description = "\"<version>\""))),
        servicekit::openapi::CommandProblems,
    ),
)]
async fn delete(
    State(state): State<AppState>,
    PathParam(raw_id): PathParam,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let post_id = parse_id(&raw_id, "post")?;
    run_command(&state, &post_id, &headers, &Command::Delete, "delete").await
}

async fn run_command(
    state: &AppState,
    post_id: &str,
    headers: &HeaderMap,
    command: &Command,
    name: &'static str,
) -> Result<Response, Problem> {
    let (executed, meta) = state
        .host()
        .run(post_id, headers, command, |r| {
            rejection_problem(&r, post_id)
        })
        .await?;
    let ack_body = Ack {
        post_id: post_id.to_string(),
        version: executed.loaded.version,
        seq: executed.loaded.last_seq,
    };
    tracing::debug!(
        command = name,
        post_id,
        version = ack_body.version,
        seq = ack_body.seq,
        correlation_id = meta.correlation_id,
        "command applied"
    );
    Ok(ack(
        StatusCode::OK,
        &ack_body,
        ack_body.version,
        None,
        &meta,
    ))
}
