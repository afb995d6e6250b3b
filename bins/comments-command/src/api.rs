//! HTTP contract of comments-command (see docs/api.md). DTOs live here; the
//! domain never sees HTTP types, and the command loop is the platform's.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use comments::{Command, CommentState, PostStatus, Rejection, RemovalReason};
use eventstore::{LoadError, Replica};
use serde::{Deserialize, Serialize};
use servicekit::command::{RETRY_AFTER_SECS, ack};
use servicekit::{Problem, json_body, parse_id};

use crate::AppState;

/// Largest request body: a comment is at most 10 000 bytes decoded, and JSON
/// escaping can make that several times longer.
pub const BODY_BYTES_MAX: usize = 64 * 1024;

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/posts/{post_id}/comments", post(add))
        .route(
            "/posts/{post_id}/comments/{comment_id}",
            patch(edit).delete(remove),
        )
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/projections", get(projections))
        .route_layer(axum::middleware::from_fn(servicekit::no_query_params))
        .route_layer(axum::middleware::from_fn(servicekit::http_metrics))
        .fallback(servicekit::no_route)
        .method_not_allowed_fallback(servicekit::method_not_allowed)
        .layer(axum::middleware::map_response(
            servicekit::close_after_unread_body,
        ))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> Response {
    let comments = state.host().readyz().await;
    if !comments.status().is_success() {
        return comments;
    }
    servicekit::command::ready(state.posts()).await
}

async fn projections(State(state): State<AppState>) -> Response {
    axum::Json(serde_json::json!({ "data": [state.cascade().snapshot().await] })).into_response()
}

/// The comments commands, for the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(add, edit, remove))]
pub struct ApiDoc;

/// A new comment.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct AddBody {
    /// 1..=10 000 bytes, trimmed.
    #[schema(min_length = 1, max_length = 10000, example = "Great read.")]
    body: String,
    /// 1..=100 characters, trimmed; no control or format characters.
    #[schema(min_length = 1, max_length = 100, example = "bo")]
    author_name: String,
}

/// A comment's new text.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct EditBody {
    #[schema(min_length = 1, max_length = 10000)]
    body: String,
}

/// A comment command's outcome.
#[derive(Serialize, utoipa::ToSchema)]
struct CommentAck {
    #[schema(format = Uuid)]
    comment_id: String,
    #[schema(format = Uuid)]
    post_id: String,
    /// The comment's event count.
    version: u64,
    /// The sequence in stream COMMENTS: `min_seq=COMMENTS:<seq>` on reads.
    seq: u64,
}

use CommentAck as Ack;

fn rejection_problem(rejection: &Rejection, post_id: &str, comment_id: &str) -> Problem {
    match rejection {
        Rejection::PostNotFound => Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("post {post_id} not found"),
        ),
        Rejection::PostDeleted => Problem::new(
            StatusCode::CONFLICT,
            "deleted",
            format!("post {post_id} is deleted"),
        ),
        Rejection::NotFound => Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("comment {comment_id} of post {post_id} not found"),
        ),
        Rejection::Removed => Problem::new(
            StatusCode::CONFLICT,
            "removed",
            format!("comment {comment_id} is removed"),
        ),
        Rejection::AlreadyExists => Problem::new(
            StatusCode::CONFLICT,
            "exists",
            format!("comment {comment_id} already exists"),
        ),
        Rejection::Invalid { field, .. } => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "out-of-bounds",
            rejection.to_string(),
        )
        .with_field(field),
    }
}

/// The two path parameters, each a UUID; a malformed one is a 400.
fn ids(
    raw: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
) -> Result<(String, String), Problem> {
    let Path((post, comment)) = raw.map_err(path_problem)?;
    Ok((parse_id(&post, "post")?, parse_id(&comment, "comment")?))
}

fn path_problem(rejection: axum::extract::rejection::PathRejection) -> Problem {
    Problem::new(
        rejection.status(),
        "invalid-path",
        format!("the path is malformed: {}", rejection.body_text()),
    )
}

/// Whether the post exists and is live, as stream `POSTS` has it: the last
/// event of `posts.<post_id>`, read from the leader, which has every
/// acknowledged write (a comment right after its post was created through
/// another node must not be a 404).
async fn post_status(state: &AppState, post_id: &str) -> Result<PostStatus, Problem> {
    match state.posts().last_event(post_id, Replica::Leader).await {
        Ok(last) => Ok(PostStatus::from_last_event_type(
            last.as_ref().map(|e| e.event_type.as_str()),
        )),
        Err(LoadError::Corrupt { .. }) => Ok(PostStatus::Live),
        Err(e) => {
            tracing::warn!(post_id, error = %e, "stream POSTS unavailable");
            Err(Problem::unavailable(
                "event store unavailable; retry shortly",
                RETRY_AFTER_SECS,
            ))
        }
    }
}

/// Adds a comment to a live post (checked against stream POSTS):
/// appends `CommentAdded` to stream COMMENTS.
#[utoipa::path(
    post,
    operation_id = "addComment",
    path = "/posts/{id}/comments",
    tag = "comments",
    request_body(content = AddBody, content_type = "application/json"),
    params(
        ("id" = String, Path, format = Uuid, description = "The post's id."),
        ("Idempotency-Key" = Option<String>, Header, description = "The same key and body again answer the same comment and append nothing."),
        ("X-Correlation-Id" = Option<String>, Header, description = "Lands in the event's Correlation-Id."),
    ),
    responses(
        (status = 201, description = "Added", body = CommentAck, headers(
            ("Location" = String, description = "/posts/{id}/comments/{comment_id}"),
            ("ETag" = String, description = "\"1\""),
        )),
        servicekit::openapi::CommandProblems,
    ),
)]
async fn add(
    State(state): State<AppState>,
    raw: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let Path(raw_post) = raw.map_err(path_problem)?;
    let post_id = parse_id(&raw_post, "post")?;
    let body: AddBody = json_body(&headers, body, BODY_BYTES_MAX).await?;
    let unchecked = |post| Command::Add {
        post_id: post_id.clone(),
        post,
        body: body.body.clone(),
        author_name: body.author_name.clone(),
    };
    // Fields first, so a bad body is a 422 without a read of POSTS.
    comments::decide(&CommentState::Absent, &unchecked(PostStatus::Live))
        .map_err(|r| rejection_problem(&r, &post_id, "new"))?;
    let post = post_status(&state, &post_id).await?;
    let decided = comments::decide(&CommentState::Absent, &unchecked(post))
        .map_err(|r| rejection_problem(&r, &post_id, "new"))?;
    let route = format!("POST /posts/{post_id}/comments");
    let (created, meta) = state
        .host()
        .create(&headers, &route, decided, || {
            comments::context::aggregate_id(&post_id, &uuid::Uuid::now_v7().to_string())
        })
        .await?;
    let (_, comment_id) = comments::context::split_id(&created.id)
        .ok_or_else(|| Problem::internal(&"a reserved comment id without its post"))?;
    let ack_body = Ack {
        comment_id: comment_id.to_string(),
        post_id: post_id.clone(),
        version: 1,
        seq: created.executed.loaded.first_seq,
    };
    tracing::debug!(
        command = "add",
        post_id,
        comment_id = ack_body.comment_id,
        seq = ack_body.seq,
        correlation_id = meta.correlation_id,
        replayed = created.replayed,
        "command applied"
    );
    let location = format!("/posts/{post_id}/comments/{}", ack_body.comment_id);
    let mut resp = ack(StatusCode::CREATED, &ack_body, 1, Some(&location), &meta);
    if created.replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// Edits a comment's text: appends `CommentEdited`.
#[utoipa::path(
    patch,
    operation_id = "editComment",
    path = "/posts/{id}/comments/{comment_id}",
    tag = "comments",
    request_body(content = EditBody, content_type = "application/json"),
    params(
        ("id" = String, Path, format = Uuid, description = "The post's id."),
        ("comment_id" = String, Path, format = Uuid, description = "The comment's id."),
        ("If-Match" = Option<String>, Header, description = "\"<version>\": 412 when the comment is at another version."),
        ("X-Correlation-Id" = Option<String>, Header, description = "Lands in the event's Correlation-Id."),
    ),
    responses(
        (status = 200, description = "Edited", body = CommentAck, headers(("ETag" = String, description = "\"<version>\""))),
        servicekit::openapi::CommandProblems,
    ),
)]
async fn edit(
    State(state): State<AppState>,
    raw: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let (post_id, comment_id) = ids(raw)?;
    let body: EditBody = json_body(&headers, body, BODY_BYTES_MAX).await?;
    run(
        &state,
        &post_id,
        &comment_id,
        &headers,
        &Command::Edit { body: body.body },
    )
    .await
}

/// Removes a comment: appends `CommentRemoved {reason: "author"}`.
#[utoipa::path(
    delete,
    operation_id = "removeComment",
    path = "/posts/{id}/comments/{comment_id}",
    tag = "comments",
    params(
        ("id" = String, Path, format = Uuid, description = "The post's id."),
        ("comment_id" = String, Path, format = Uuid, description = "The comment's id."),
        ("If-Match" = Option<String>, Header, description = "\"<version>\": 412 when the comment is at another version."),
        ("X-Correlation-Id" = Option<String>, Header, description = "Lands in the event's Correlation-Id."),
    ),
    responses(
        (status = 200, description = "Removed", body = CommentAck, headers(("ETag" = String, description = "\"<version>\""))),
        servicekit::openapi::CommandProblems,
    ),
)]
async fn remove(
    State(state): State<AppState>,
    raw: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let (post_id, comment_id) = ids(raw)?;
    let command = Command::Remove {
        reason: RemovalReason::Author,
    };
    run(&state, &post_id, &comment_id, &headers, &command).await
}

async fn run(
    state: &AppState,
    post_id: &str,
    comment_id: &str,
    headers: &HeaderMap,
    command: &Command,
) -> Result<Response, Problem> {
    let id = comments::context::aggregate_id(post_id, comment_id);
    let (executed, meta) = state
        .host()
        .run(&id, headers, command, |r| {
            rejection_problem(&r, post_id, comment_id)
        })
        .await?;
    let ack_body = Ack {
        comment_id: comment_id.to_string(),
        post_id: post_id.to_string(),
        version: executed.loaded.version,
        seq: executed.loaded.last_seq,
    };
    Ok(ack(
        StatusCode::OK,
        &ack_body,
        ack_body.version,
        None,
        &meta,
    ))
}
