//! RFC 9457 problem documents, and the registry of every problem `type`
//! the services answer with. A `type` is the URI reference
//! `/docs/problems/<slug>`: every listener serves that page (see
//! [`problem_page`]), so it resolves wherever the answer came from, the
//! gateway included. Its `title` is the type's own, the same on every
//! occurrence (RFC 9457 §3.1.3).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// Where the problem types are documented, on every listener.
pub const PROBLEM_DOCS_PATH: &str = "/docs/problems";

/// One problem `type`: its slug, its title, and what it means for a client.
#[derive(Debug)]
pub struct ProblemType {
    pub slug: &'static str,
    pub status: u16,
    pub title: &'static str,
    pub about: &'static str,
}

const fn t(
    slug: &'static str,
    status: u16,
    title: &'static str,
    about: &'static str,
) -> ProblemType {
    ProblemType {
        slug,
        status,
        title,
        about,
    }
}

/// Every problem type, by slug. A slug not in this table is a bug: debug
/// builds panic on it (the tests run them), release builds answer with the
/// status's reason phrase as the title.
pub const PROBLEM_TYPES: &[ProblemType] = &[
    t(
        "bad-request",
        400,
        "Bad request",
        "The request could not be read as HTTP; `detail` quotes the parser.",
    ),
    t(
        "body-too-large",
        413,
        "Body too large",
        "The request body is over the route's byte limit; `detail` gives the limit.",
    ),
    t(
        "conflict",
        409,
        "Concurrent change",
        "The aggregate kept changing under the command's retries. Send the command again.",
    ),
    t(
        "corrupt-history",
        500,
        "Corrupt history",
        "The aggregate's stored history does not decode, so no command can change it until an operator repairs it.",
    ),
    t(
        "deleted",
        409,
        "Deleted",
        "The post is deleted; it can no longer be changed.",
    ),
    t(
        "digest-mismatch",
        409,
        "Digest mismatch",
        "A verified rebuild differs from the live store at the same checkpoint; the live store was kept.",
    ),
    t(
        "empty-update",
        400,
        "Empty update",
        "A PATCH named no field to change.",
    ),
    t(
        "exists",
        409,
        "Already exists",
        "An aggregate with this id already exists.",
    ),
    t(
        "headers-too-large",
        431,
        "Headers too large",
        "The request's header section is over the server's limit.",
    ),
    t(
        "http-error",
        400,
        "HTTP error",
        "An HTTP-level refusal with no more specific type; `status` and `detail` say which.",
    ),
    t(
        "idempotency-key-reused",
        422,
        "Idempotency key reused",
        "This Idempotency-Key was already used, by the same caller on the same route, with a different body.",
    ),
    t(
        "internal",
        500,
        "Internal error",
        "The service failed; the cause is in its log, never in the answer.",
    ),
    t(
        "invalid-author",
        400,
        "Invalid author",
        "The author name in the path is empty or too long.",
    ),
    t(
        "invalid-body",
        400,
        "Invalid body",
        "The body is not the JSON document the route takes; `detail` names the field or the syntax error.",
    ),
    t(
        "invalid-cursor",
        400,
        "Invalid cursor",
        "The `cursor` was not one this service handed out for this listing.",
    ),
    t(
        "invalid-header",
        400,
        "Invalid header",
        "A header has a value the route does not take; `detail` names it.",
    ),
    t(
        "invalid-highlight-tag",
        400,
        "Invalid highlight tag",
        "`highlight_pre_tag` or `highlight_post_tag` is too long or not printable text.",
    ),
    t(
        "invalid-id",
        400,
        "Invalid id",
        "An id in the path is not a UUID.",
    ),
    t(
        "invalid-if-match",
        400,
        "Invalid If-Match",
        "`If-Match` is not a version (a non-negative integer, quoted or not).",
    ),
    t(
        "invalid-limit",
        400,
        "Invalid limit",
        "`limit` is not an integer in the route's range.",
    ),
    t(
        "invalid-min-seq",
        400,
        "Invalid min_seq",
        "`min_seq` or `X-Min-Seq` is not a sequence, or names a stream this read does not follow.",
    ),
    t(
        "invalid-parameter",
        400,
        "Invalid parameter",
        "A query parameter has a value the route does not take; `detail` names it.",
    ),
    t(
        "invalid-path",
        400,
        "Invalid path",
        "The path does not match the route's shape.",
    ),
    t(
        "invalid-query",
        400,
        "Invalid query",
        "The search text has no searchable words, or too many, or too long a word.",
    ),
    t(
        "invalid-shadow",
        422,
        "Invalid shadow",
        "The rebuilt store named by the swap cannot be opened.",
    ),
    t(
        "method-not-allowed",
        405,
        "Method not allowed",
        "The path exists, but not with this method; `Allow` lists the methods.",
    ),
    t("missing-query", 400, "Missing query", "A search needs `q`."),
    t("no-route", 404, "No such route", "No route has this path."),
    t(
        "not-found",
        404,
        "Not found",
        "The resource named in the path does not exist (or was deleted).",
    ),
    t(
        "out-of-bounds",
        422,
        "Out of bounds",
        "A field is empty, too long or holds characters it may not; `field` names it.",
    ),
    t(
        "rejected-by-store",
        422,
        "Rejected by the event store",
        "The event store refused the event (over its size limit, say); nothing was appended.",
    ),
    t(
        "removed",
        409,
        "Removed",
        "The comment was removed; it can no longer be changed.",
    ),
    t(
        "request-timeout",
        408,
        "Request timeout",
        "The request was not sent in time.",
    ),
    t(
        "storage-full",
        507,
        "Storage full",
        "The stream's byte budget is spent; nothing was appended. An operator must raise it.",
    ),
    t(
        "unauthorized",
        401,
        "Unauthorized",
        "The route needs a valid bearer token; `WWW-Authenticate` says what was wrong with it.",
    ),
    t(
        "unavailable",
        503,
        "Unavailable",
        "A dependency (NATS, a store) is not answering, or a read has not caught up; retry after `retry_after_ms`.",
    ),
    t(
        "unknown-parameter",
        400,
        "Unknown parameter",
        "A query parameter the route does not take; `detail` names it.",
    ),
    t(
        "unknown-projection",
        404,
        "Unknown projection",
        "No projection of this service has that name.",
    ),
    t(
        "unknown-shadow",
        404,
        "Unknown shadow",
        "The swap names a rebuild this service did not hand out, or one already used.",
    ),
    t(
        "unprocessable",
        422,
        "Unprocessable",
        "The body parsed but cannot be acted on.",
    ),
    t(
        "unsupported-content-encoding",
        415,
        "Unsupported content encoding",
        "Bodies are taken without Content-Encoding.",
    ),
    t(
        "unsupported-media-type",
        415,
        "Unsupported media type",
        "The body must be `application/json`.",
    ),
    t(
        "upstream-failed",
        502,
        "Upstream failed",
        "The gateway's upstream broke off its answer.",
    ),
    t(
        "upstream-timeout",
        504,
        "Upstream timeout",
        "The gateway's upstream did not answer in time.",
    ),
    t(
        "upstream-unavailable",
        502,
        "Upstream unavailable",
        "The gateway could not reach the service behind the route (any of its replicas).",
    ),
    t(
        "uri-too-long",
        414,
        "URI too long",
        "The request target is over 8 KiB.",
    ),
    t(
        "version-mismatch",
        412,
        "Version mismatch",
        "`If-Match` names a version the aggregate is not at; `current_version` is the one it is at.",
    ),
];

/// The registered type of `slug`.
#[must_use]
pub fn problem_type(slug: &str) -> Option<&'static ProblemType> {
    PROBLEM_TYPES.iter().find(|t| t.slug == slug)
}

/// An `application/problem+json` error document (RFC 9457).
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    /// A slug of [`PROBLEM_TYPES`]: the `type` is `/docs/problems/<slug>`.
    pub slug: &'static str,
    pub detail: String,
    /// Seconds for `Retry-After`, on 503s (also `retry_after_ms` in the body).
    pub retry_after_secs: Option<u64>,
    /// On a 412: the version the aggregate is at.
    pub current_version: Option<u64>,
    /// On a 422: the field out of bounds.
    pub field: Option<&'static str>,
}

/// The body of every error answer, `application/problem+json` (RFC 9457):
/// the schema the OpenAPI document gives them.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ProblemDocument<'a> {
    /// `/docs/problems/<slug>`, a URI reference (relative to the answer's
    /// URL) to the type's page; stable: what a client matches on.
    #[serde(rename = "type")]
    #[schema(example = "/docs/problems/not-found")]
    pub kind: String,
    /// The type's title, the same on every occurrence.
    #[schema(example = "Not found")]
    pub title: &'a str,
    /// The HTTP status, again.
    #[schema(example = 404)]
    pub status: u16,
    /// What exactly is wrong, for a human.
    #[schema(example = "post 0190a0b4-7c1e-7a3f-9d2e-5b6c7d8e9f00 not found")]
    pub detail: &'a str,
    /// On a 412: the version the aggregate is at now (send it as If-Match).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_version: Option<u64>,
    /// On a 422: which field is out of bounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'a str>,
    /// On a 503: when to retry, as `Retry-After` says, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}
impl Problem {
    #[must_use]
    pub fn new(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> Self {
        debug_assert!(
            problem_type(slug).is_some(),
            "problem type {slug:?} is not in servicekit::PROBLEM_TYPES"
        );
        Self {
            status,
            slug,
            detail: detail.into(),
            retry_after_secs: None,
            current_version: None,
            field: None,
        }
    }

    /// With the aggregate's current version (a 412's `current_version`).
    #[must_use]
    pub fn with_current_version(mut self, version: u64) -> Self {
        self.current_version = Some(version);
        self
    }

    /// With the field out of bounds (a 422's `field`).
    #[must_use]
    pub fn with_field(mut self, field: &'static str) -> Self {
        self.field = Some(field);
        self
    }

    /// A 503 that tells the client when to come back.
    #[must_use]
    pub fn unavailable(detail: impl Into<String>, retry_after_secs: u64) -> Self {
        Self {
            retry_after_secs: Some(retry_after_secs),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
        }
    }

    /// A 500 whose cause is logged once and never shown.
    #[must_use]
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the cause is in the service log",
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = ProblemDocument {
            kind: format!("{PROBLEM_DOCS_PATH}/{}", self.slug),
            title: problem_type(self.slug).map_or_else(
                || self.status.canonical_reason().unwrap_or("error"),
                |t| t.title,
            ),
            status: self.status.as_u16(),
            detail: &self.detail,
            current_version: self.current_version,
            field: self.field,
            retry_after_ms: self.retry_after_secs.map(|s| s * 1000),
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut resp = (self.status, bytes).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
        );
        if let Some(secs) = self.retry_after_secs {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// The answer to `GET /docs/problems` (every type) and
/// `GET /docs/problems/<slug>` (one), as HTML; `None` for another path.
#[must_use]
pub fn problem_page(path: &str) -> Option<Response> {
    let rest = path.strip_prefix(PROBLEM_DOCS_PATH)?;
    let page = |status: StatusCode, title: &str, body: String| {
        let html = format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title></head>\
             <body><h1>{title}</h1>{body}</body></html>",
            title = html_text(title)
        );
        (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            )],
            html,
        )
            .into_response()
    };
    let row = |t: &ProblemType| {
        format!(
            "<tr><td><a href=\"{PROBLEM_DOCS_PATH}/{slug}\"><code>{slug}</code></a></td><td>{status}</td><td>{title}</td><td>{about}</td></tr>",
            slug = t.slug,
            status = t.status,
            title = html_text(t.title),
            about = html_text(t.about),
        )
    };
    match rest {
        "" | "/" => {
            let rows: String = PROBLEM_TYPES.iter().map(row).collect();
            Some(page(
                StatusCode::OK,
                "Problem types",
                format!(
                    "<p>Every error answer is <code>application/problem+json</code> (RFC 9457) whose <code>type</code> is one of these.</p>\
                     <table><tr><th>type</th><th>status</th><th>title</th><th>meaning</th></tr>{rows}</table>"
                ),
            ))
        }
        _ => {
            let slug = rest.strip_prefix('/')?;
            Some(match problem_type(slug) {
                Some(t) => page(
                    StatusCode::OK,
                    t.title,
                    format!(
                        "<p><code>type</code>: <code>{PROBLEM_DOCS_PATH}/{slug}</code>, usually with status {status}.</p><p>{about}</p>\
                         <p><a href=\"{PROBLEM_DOCS_PATH}\">Every problem type</a></p>",
                        slug = t.slug,
                        status = t.status,
                        about = html_text(t.about),
                    ),
                ),
                None => Problem::new(
                    StatusCode::NOT_FOUND,
                    "not-found",
                    format!(
                        "no problem type is named {:?}",
                        slug.chars().take(64).collect::<String>()
                    ),
                )
                .into_response(),
            })
        }
    }
}

/// `text` as HTML, with `code` spans for backquoted parts.
fn html_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_code = false;
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '`' => {
                out.push_str(if in_code { "</code>" } else { "<code>" });
                in_code = !in_code;
            }
            c => out.push(c),
        }
    }
    if in_code {
        out.push_str("</code>");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() && path.file_name().is_some_and(|n| n != "target") {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The call's slug: a literal first argument, or second after a status.
    fn first_literal(text: &str) -> Option<&str> {
        let start = text.find('"')?;
        let before = &text[..start];
        if !before
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_:, \n".contains(c))
            || before.matches(',').count() > 1
        {
            return None;
        }
        let rest = &text[start + 1..];
        Some(&rest[..rest.find('"')?])
    }

    #[test]
    fn every_slug_the_workspace_answers_with_is_registered() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut files = Vec::new();
        rust_files(&root.join("libs"), &mut files);
        rust_files(&root.join("bins"), &mut files);
        let mut seen = 0;
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            for call in ["Problem::new(", " bad("] {
                for (at, _) in text.match_indices(call) {
                    let Some(slug) = first_literal(&text[at + call.len()..]) else {
                        continue;
                    };
                    if slug.is_empty() || !slug.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
                    {
                        continue;
                    }
                    seen += 1;
                    assert!(
                        problem_type(slug).is_some(),
                        "{}: problem type {slug:?} is not in PROBLEM_TYPES",
                        file.display()
                    );
                }
            }
        }
        assert!(
            seen > 40,
            "found only {seen} problem slugs: is the scan broken?"
        );
    }

    #[test]
    fn slugs_are_unique_and_every_page_is_served() {
        for (i, t) in PROBLEM_TYPES.iter().enumerate() {
            assert!(
                PROBLEM_TYPES[i + 1..].iter().all(|u| u.slug != t.slug),
                "{} twice",
                t.slug
            );
            let page = problem_page(&format!("{PROBLEM_DOCS_PATH}/{}", t.slug)).expect("a page");
            assert_eq!(page.status(), StatusCode::OK);
        }
        assert_eq!(
            problem_page(PROBLEM_DOCS_PATH).map(|p| p.status()),
            Some(StatusCode::OK)
        );
        assert_eq!(
            problem_page("/docs/problems/nope").map(|p| p.status()),
            Some(StatusCode::NOT_FOUND)
        );
        assert!(problem_page("/docs/problemsx").is_none());
        assert!(problem_page("/posts").is_none());
    }

    #[tokio::test]
    async fn a_problem_names_its_page_and_its_own_title() {
        let resp = Problem::new(StatusCode::PRECONDITION_FAILED, "version-mismatch", "at 3")
            .with_current_version(3)
            .into_response();
        assert_eq!(resp.status(), StatusCode::PRECONDITION_FAILED);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["type"], "/docs/problems/version-mismatch");
        assert_eq!(v["title"], "Version mismatch");
        assert_eq!(v["current_version"], 3);
    }
}
