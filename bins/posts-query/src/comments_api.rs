//! The reads of `comment-view`: one post's comments, and one comment.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use posts_projections::comment_view::{CommentRow, CommentViewError};
use serde::Serialize;
use servicekit::{Problem, parse_id};

use crate::AppState;
use crate::api::{PAGE_BYTES_MAX, blocking, limit, min_seq_of, wait_visible};

/// A comment as comment-view holds it.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct CommentDto {
    #[schema(format = Uuid)]
    comment_id: String,
    #[schema(format = Uuid)]
    post_id: String,
    body: String,
    author_name: String,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
    /// The comment's event count.
    version: u64,
}

/// One comment.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct CommentOne {
    data: CommentDto,
}

/// A page of a post's comments.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct CommentPage {
    data: Vec<CommentDto>,
    /// Pass it as `cursor` for the next page; `null` on the last.
    next_cursor: Option<String>,
}

fn dto(comment_id: &str, row: &CommentRow) -> CommentDto {
    CommentDto {
        comment_id: comment_id.to_string(),
        post_id: row.post_id.clone(),
        body: row.body.clone(),
        author_name: row.author_name.clone(),
        created_at: posts_projections::format_micros(row.created_at_us),
        updated_at: posts_projections::format_micros(row.updated_at_us),
        version: row.version,
    }
}

fn view_problem(e: CommentViewError) -> Problem {
    match e {
        CommentViewError::BadCursor => Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-cursor",
            "cursor is malformed; pass next_cursor as it was returned",
        ),
        e @ CommentViewError::Store(_) => Problem::internal(&e),
    }
}

fn path_problem(rejection: axum::extract::rejection::PathRejection) -> Problem {
    Problem::new(
        rejection.status(),
        "invalid-path",
        format!("the path is malformed: {}", rejection.body_text()),
    )
}

/// Waits until comment-view has applied the read's `min_seq` of stream
/// `COMMENTS` (a bare number, or `COMMENTS:n`).
async fn read_your_writes(
    state: &AppState,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<(), Problem> {
    let Some(seq) = min_seq_of(params, headers, comments::context::STREAM)? else {
        return Ok(());
    };
    wait_visible(&state.inner.comments.status, seq).await
}

/// `GET /posts/{id}/comments`: live comments, oldest first; an unknown or
/// deleted post has none.
#[utoipa::path(
    get,
    operation_id = "listComments",
    path = "/posts/{id}/comments",
    tag = "comments",
    params(
        ("id" = String, Path, format = Uuid, description = "The post's id."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Page size, default 20."),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page."),
        ("min_seq" = Option<String>, Query, description = "Wait until comment-view has applied this sequence of stream COMMENTS: COMMENTS:n (or a bare n)."),
        ("X-Min-Seq" = Option<String>, Header, description = "min_seq as a header."),
    ),
    responses(
        (status = 200, description = "A page of comments", body = CommentPage),
        servicekit::openapi::ReadProblems,
    ),
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    raw: Result<Path<String>, axum::extract::rejection::PathRejection>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    servicekit::only_params(&params, &["limit", "cursor", "min_seq"])?;
    let Path(raw_post) = raw.map_err(path_problem)?;
    let post_id = parse_id(&raw_post, "post")?;
    let limit = limit(&params)?;
    read_your_writes(&state, &params, &headers).await?;
    let cursor = params.get("cursor").filter(|c| !c.is_empty()).cloned();
    let reader = state.comment_reader();
    let page = blocking(move || reader.list(&post_id, cursor.as_deref(), limit, PAGE_BYTES_MAX))
        .await?
        .map_err(view_problem)?;
    let data: Vec<CommentDto> = page.rows.iter().map(|(id, row)| dto(id, row)).collect();
    Ok(Json(CommentPage {
        data,
        next_cursor: page.next_cursor,
    })
    .into_response())
}

/// `GET /posts/{id}/comments/{comment_id}`: 404 when unknown or removed.
#[utoipa::path(
    get,
    operation_id = "getComment",
    path = "/posts/{id}/comments/{comment_id}",
    tag = "comments",
    params(
        ("id" = String, Path, format = Uuid, description = "The post's id."),
        ("comment_id" = String, Path, format = Uuid, description = "The comment's id."),
        ("min_seq" = Option<String>, Query, description = "Wait until comment-view has applied this sequence of stream COMMENTS: COMMENTS:n (or a bare n)."),
        ("X-Min-Seq" = Option<String>, Header, description = "min_seq as a header."),
    ),
    responses(
        (status = 200, description = "The comment", body = CommentOne, headers(("ETag" = String, description = "\"<version>\""))),
        servicekit::openapi::ReadProblems,
    ),
)]
pub(crate) async fn get_one(
    State(state): State<AppState>,
    raw: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    servicekit::only_params(&params, &["min_seq"])?;
    let Path((raw_post, raw_comment)) = raw.map_err(path_problem)?;
    let post_id = parse_id(&raw_post, "post")?;
    let comment_id = parse_id(&raw_comment, "comment")?;
    read_your_writes(&state, &params, &headers).await?;
    let reader = state.comment_reader();
    let (p, c) = (post_id.clone(), comment_id.clone());
    let row = blocking(move || reader.get(&p, &c))
        .await?
        .map_err(view_problem)?;
    match row {
        Some(row) if !row.removed => Ok(servicekit::with_etag(
            Json(CommentOne {
                data: dto(&comment_id, &row),
            })
            .into_response(),
            row.version,
        )),
        _ => Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("comment {comment_id} of post {post_id} not found"),
        )),
    }
}
