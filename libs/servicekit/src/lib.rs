//! What every HTTP service here shares and nothing domain-specific: RFC 9457
//! problem documents, body and id parsing, the command host ([`command`],
//! [`idempotency`]), the server with its limits, tracing set-up, and the
//! shutdown signal.
//!
//! ```
//! use servicekit::Problem;
//! let p = Problem::new(axum::http::StatusCode::NOT_FOUND, "not-found", "order 42 not found");
//! assert_eq!(p.status.as_u16(), 404);
//! ```

pub mod command;
pub mod idempotency;
mod problem;

pub use problem::{
    PROBLEM_CONTENT_TYPE, PROBLEM_DOCS_PATH, PROBLEM_TYPES, Problem, ProblemDocument, ProblemType,
    problem_page, problem_type,
};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Reads and parses a JSON body of at most `bytes_max` bytes: 415, 413 and
/// 400 with a precise detail.
///
/// # Errors
/// The problem document to answer with.
pub async fn json_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    bytes_max: usize,
) -> Result<T, Problem> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence != "application/json" {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            format!("Content-Type must be application/json, got {content_type:?}"),
        ));
    }
    // No body is decompressed: a compressed one would only read as
    // malformed JSON (RFC 9110 15.5.16: 415 for an unsupported coding).
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let value = value.to_str().unwrap_or("?");
        // A list, possibly over several header lines.
        for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if !coding.eq_ignore_ascii_case("identity") {
                return Err(Problem::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported-content-encoding",
                    format!(
                        "Content-Encoding {coding:?} is not supported; send the body uncompressed"
                    ),
                ));
            }
        }
    }
    let too_large = || {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            format!("request body is over the {bytes_max} byte limit"),
        )
    };
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|len| len > bytes_max as u64)
    {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(body, bytes_max).await.map_err(|e| {
        let e = e.into_inner();
        if e.is::<http_body_util::LengthLimitError>() {
            too_large()
        } else {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-body",
                format!("the request body could not be read: {e}"),
            )
        }
    })?;
    // serde takes a struct from an array of its fields in order too; the
    // contract is an object with named fields.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-body",
            "invalid JSON body: an array where an object with named fields belongs",
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                "malformed JSON"
            }
            serde_json::error::Category::Data | serde_json::error::Category::Io => {
                "invalid JSON body"
            }
        };
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-body",
            format!("{what}: {e}"),
        )
    })
}

/// A refusal that may not have read the request body (413; 415 and a 400
/// for a header or an id, refused before the body was read) makes hyper
/// drop the connection after answering. Say so: without `Connection: close`
/// clients put the connection back in their pool and their next request
/// fails on a dead socket. A 400 whose body was read closes too: bad input
/// is rare, and one reconnection is all it costs. Use as
/// `map_response(close_after_unread_body)`.
pub async fn close_after_unread_body(mut resp: Response) -> Response {
    if matches!(
        resp.status(),
        StatusCode::BAD_REQUEST
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNSUPPORTED_MEDIA_TYPE
    ) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Parses an aggregate id from a path: a UUID, returned in canonical
/// lowercase hyphenated form, so it can never break a NATS subject.
///
/// # Errors
/// A 400 problem naming the bad id.
pub fn parse_id(raw: &str, what: &str) -> Result<String, Problem> {
    let shown: String = raw.chars().take(80).collect();
    match uuid::Uuid::try_parse(raw) {
        Ok(id) if raw.len() == 36 => Ok(id.hyphenated().to_string()),
        _ => Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-id",
            format!("{what} id {shown:?} is not a UUID like 0190a0b4-7c1e-7a3f-9d2e-5b6c7d8e9f00"),
        )),
    }
}

/// The one path parameter of a route such as `/orders/{id}`, raw (check it
/// with [`parse_id`]). Unlike axum's `Path`, a parameter axum cannot decode
/// (`/orders/%FF`, not UTF-8) is refused with a problem document.
#[derive(Debug)]
pub struct PathParam(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for PathParam {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(raw)| Self(raw))
            .map_err(|rejection| {
                let status = rejection.status();
                let cause = rejection.body_text();
                if status.is_client_error() {
                    Problem::new(
                        status,
                        "invalid-path",
                        format!("the path is malformed: {cause}"),
                    )
                } else {
                    Problem::internal(&cause)
                }
            })
    }
}

/// 400 for a query parameter the route does not take, naming it: bodies
/// are strict, and so are query strings.
///
/// # Errors
/// The problem naming the first unknown parameter and the known ones.
pub fn only_params<V>(
    params: &std::collections::HashMap<String, V>,
    known: &[&str],
) -> Result<(), Problem> {
    let mut unknown: Vec<&String> = params
        .keys()
        .filter(|k| !known.contains(&k.as_str()))
        .collect();
    unknown.sort();
    match unknown.first() {
        None => Ok(()),
        Some(name) => {
            let shown: String = name.chars().take(64).collect();
            Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "unknown-parameter",
                if known.is_empty() {
                    format!("unknown query parameter {shown:?}; this route takes none")
                } else {
                    format!(
                        "unknown query parameter {shown:?}; this route takes {}",
                        known.join(", ")
                    )
                },
            ))
        }
    }
}

/// For routes that take no query parameters (the commands): any is a 400,
/// as [`only_params`] answers. Add it with `route_layer`.
pub async fn no_query_params(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(query) = req.uri().query().filter(|q| !q.is_empty()) {
        let params: std::collections::HashMap<String, ()> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| (p.split('=').next().unwrap_or(p).to_string(), ()))
            .collect();
        if let Err(p) = only_params(&params, &[]) {
            return p.into_response();
        }
    }
    next.run(req).await
}

/// `resp` with `ETag: "<version>"`: what a client sends back as `If-Match`.
#[must_use]
pub fn with_etag(mut resp: Response, version: u64) -> Response {
    if let Ok(v) = HeaderValue::from_str(&format!("\"{version}\"")) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

/// 404 for any route that does not exist, as a problem document.
pub async fn no_route() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "no-route", "no such route")
}

/// 405 for a route that exists without this method, as a problem document
/// (axum adds the `Allow` header).
pub async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "method not allowed on this route",
    )
}

/// Installs the tracing subscriber: `RUST_LOG` or `info` for this service.
/// `LOG_FORMAT=json` switches to one JSON object per line.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a terminal, not in log files.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(color_wanted());
    if std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Colour codes only on a terminal, and never when `NO_COLOR` is set to
/// anything but the empty string (<https://no-color.org>).
fn color_wanted() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::IsTerminal::is_terminal(&std::io::stdout())
}

/// Turns transparent huge pages off for this process, on Linux; a no-op
/// elsewhere. The query services call it at start-up.
///
/// mimalloc asks for huge pages on its arenas, so the first touch of any
/// 2 MiB region of them faulted in and zeroed all of it, used or not: 16%
/// of a query service's CPU in a catch-up went to the kernel zeroing pages
/// (`perf`, `clear_page_erms`). With 4 KiB pages only what is used is
/// faulted in. In 8 alternating pairs of `bench --only catchup`, peak RSS
/// fell from 365–383 to 312–331 MiB; throughput and CPU per event stayed
/// within the machine's noise.
pub fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::warn!(error = %e, "could not turn transparent huge pages off");
    }
}

/// What one service lets its clients hold (see [`serve`]).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; the next ones wait in the listen backlog.
    pub connections_max: usize,
    /// How long a connection may take to send a request's headers, and may
    /// sit idle between two requests (hyper times both alike): a client's
    /// pool should drop idle connections sooner.
    pub header_read_timeout: std::time::Duration,
}

impl Limits {
    /// 1024 connections (a bench runs under 100; slowloris needs thousands),
    /// and 20 s for a request's headers (slowloris sends one byte at a time).
    pub const SERVICE: Self = Self {
        connections_max: 1024,
        header_read_timeout: std::time::Duration::from_secs(20),
    };
}

/// After a failed accept (out of file descriptors, say), wait this long
/// before the next: retrying at once would spin.
const ACCEPT_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Serves `router` over HTTP/1.1 on `listener` until `shutdown` resolves,
/// then lets the requests in flight finish. Unlike `axum::serve`, with
/// [`Limits`]: a cap on connections and a timeout on reading headers, so a
/// client that opens many connections, or sends its headers one byte at a
/// time, holds neither memory nor tasks without bound.
///
/// # Errors
/// Never, today: a failed accept is logged and retried.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let router = router.layer(axum::middleware::from_fn(problem_bodies));
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.connections_max.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Responses are single writes: no reason to let Nagle hold any back.
        let _ = tcp.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(tcp), service));
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Longest request target (path and query) a service takes: a longer one
/// is a 414 problem. (Past 64 KiB hyper itself answers 414, without a body.)
pub const URI_BYTES_MAX: usize = 8 * 1024;
/// The most of a non-problem error body [`problem_bodies`] reads to quote it.
const ERROR_BODY_BYTES_MAX: usize = 16 * 1024;

/// Every error answer is a JSON document, a problem unless a handler chose
/// another JSON body: a request target over [`URI_BYTES_MAX`] is a 414
/// problem, and an error that some layer answered otherwise (an
/// extractor's plain-text rejection, an empty body) gets a problem body with
/// the same status and headers, quoting what it said.
async fn problem_bodies(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let target_len = req
        .uri()
        .path_and_query()
        .map_or(req.uri().path().len(), |pq| pq.as_str().len());
    // Answered on every listener, before any router: the metrics and the
    // pages the problem types point at.
    if req.method() == axum::http::Method::GET {
        let path = req.uri().path();
        if path == "/metrics" {
            let text = telemetry::render().await;
            return (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(telemetry::CONTENT_TYPE),
                )],
                text,
            )
                .into_response();
        }
        if let Some(page) = problem_page(path) {
            return page;
        }
    }
    if target_len > URI_BYTES_MAX {
        let mut resp = Problem::new(
            StatusCode::URI_TOO_LONG,
            "uri-too-long",
            format!("the request target is {target_len} bytes; at most {URI_BYTES_MAX} are taken"),
        )
        .into_response();
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    let resp = next.run(req).await;
    let status = resp.status();
    // A problem, or a deliberate JSON document (a `/readyz` that says
    // which part is not ready), stays as it is.
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.starts_with(PROBLEM_CONTENT_TYPE) || ct.starts_with("application/json")
        });
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let said = axum::body::to_bytes(body, ERROR_BODY_BYTES_MAX)
        .await
        .map(|b| {
            String::from_utf8_lossy(&b)
                .trim()
                .chars()
                .take(500)
                .collect::<String>()
        })
        .unwrap_or_default();
    let detail = if said.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        said
    };
    let slug = match status.as_u16() {
        400 => "bad-request",
        404 => "no-route",
        405 => "method-not-allowed",
        408 => "request-timeout",
        413 => "body-too-large",
        414 => "uri-too-long",
        415 => "unsupported-media-type",
        422 => "unprocessable",
        431 => "headers-too-large",
        503 => "unavailable",
        _ => "http-error",
    };
    let mut out = Problem::new(status, slug, detail).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// Records `http_requests_total` and `http_request_duration_seconds` by
/// route template: add it with `route_layer` (after routing, where the
/// template is known), so that labels stay bounded.
pub async fn http_metrics(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().as_str().to_string();
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let m = telemetry::metrics();
    m.http_duration
        .get_or_create(&telemetry::RouteLabels {
            route: route.clone(),
            method: method.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    m.http_requests
        .get_or_create(&telemetry::HttpLabels {
            route,
            method,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

/// One router from the start of a service that needs time to get ready
/// (waiting for its streams, opening its stores): it answers as `starting`
/// until `ready` is set, then as that. Two servers one after the other on
/// the socket would close the first one's connections at the handover.
pub fn gated(
    ready: std::sync::Arc<std::sync::OnceLock<axum::Router>>,
    starting: axum::Router,
) -> axum::Router {
    axum::Router::new().fallback_service(tower::service_fn(move |req: axum::extract::Request| {
        let target = ready.get().cloned().unwrap_or_else(|| starting.clone());
        async move { tower::ServiceExt::oneshot(target, req).await }
    }))
}

/// The `main` of a service binary: runs `service` (given the SIGINT/SIGTERM
/// future) on `runtime` and turns its outcome into the exit code, the
/// failure logged and printed to stderr with the service's `name`.
pub fn main_with<F, Fut>(
    name: &str,
    runtime: std::io::Result<tokio::runtime::Runtime>,
    service: F,
) -> std::process::ExitCode
where
    F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let rt = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(service(Box::pin(shutdown_signal()))) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "{name} failed");
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A runtime with two worker threads: one per core of the machines this
/// runs on.
///
/// # Errors
/// When the runtime cannot be built.
pub fn two_threads() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received; draining");
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn started(limits: Limits) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, router, limits, async {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    /// Reads until the server closes the connection, or `deadline` passes.
    async fn read_to_close(
        tcp: &mut tokio::net::TcpStream,
        deadline: std::time::Duration,
    ) -> Option<Vec<u8>> {
        let mut got = Vec::new();
        tokio::time::timeout(deadline, tcp.read_to_end(&mut got))
            .await
            .ok()?
            .ok()?;
        Some(got)
    }

    async fn exchange(addr: std::net::SocketAddr, request: &str) -> String {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let got = read_to_close(&mut tcp, std::time::Duration::from_secs(10))
            .await
            .unwrap();
        String::from_utf8_lossy(&got).into_owned()
    }

    /// Every error answer has a problem body: a long target, and a layer's
    /// own plain-text or empty error answer.
    #[tokio::test]
    async fn every_error_answer_is_a_problem_document() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new()
            .route(
                "/q",
                axum::routing::get(
                    |q: axum::extract::Query<std::collections::HashMap<String, u32>>| async move {
                        q.0.len().to_string()
                    },
                ),
            )
            .route(
                "/empty",
                axum::routing::get(|| async { StatusCode::IM_A_TEAPOT }),
            );
        let (_tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, router, Limits::SERVICE, async {
            let _ = rx.await;
        }));
        let long = format!(
            "GET /q?x={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "1".repeat(URI_BYTES_MAX)
        );
        let bad_query = "GET /q?x=abc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let empty = "GET /empty HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        for (request, status, detail) in [
            (long.as_str(), "414", "at most 8192"),
            (bad_query, "400", "query"),
            (empty, "418", "teapot"),
        ] {
            let answer = exchange(addr, request).await;
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status}")),
                "{answer}"
            );
            assert!(answer.contains("application/problem+json"), "{answer}");
            assert!(answer.to_lowercase().contains(detail), "{answer}");
        }
        let fine = exchange(
            addr,
            "GET /q?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(fine.starts_with("HTTP/1.1 200"), "{fine}");
    }

    /// Finding 10 of the hardening review: no header-read timeout, so a
    /// client sending its headers slowly held a connection for ever.
    #[tokio::test]
    async fn a_slow_client_is_cut_off_and_a_prompt_one_served() {
        let limits = Limits {
            connections_max: 8,
            header_read_timeout: std::time::Duration::from_millis(300),
        };
        let (addr, _stop) = started(limits).await;
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let cut = read_to_close(&mut slow, std::time::Duration::from_secs(10)).await;
        assert!(cut.is_some(), "the slow client was never cut off");
        let mut prompt = tokio::net::TcpStream::connect(addr).await.unwrap();
        prompt
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut prompt, std::time::Duration::from_secs(10))
            .await
            .unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }

    /// Finding 10: no connection cap. Past it, a connection waits for a slot.
    #[tokio::test]
    async fn connections_past_the_cap_wait_for_a_slot() {
        let limits = Limits {
            connections_max: 2,
            header_read_timeout: std::time::Duration::from_secs(30),
        };
        let (addr, _stop) = started(limits).await;
        let held: Vec<tokio::net::TcpStream> = answered_connections(addr, 2).await;
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        third
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        assert!(
            read_to_close(&mut third, std::time::Duration::from_millis(500))
                .await
                .is_none(),
            "a third connection was served past a cap of 2"
        );
        drop(held);
        let answer = read_to_close(&mut third, std::time::Duration::from_secs(10))
            .await
            .unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }

    /// `n` connections that have each been answered once and stay open.
    async fn answered_connections(
        addr: std::net::SocketAddr,
        n: usize,
    ) -> Vec<tokio::net::TcpStream> {
        let mut out = Vec::new();
        for _ in 0..n {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 256];
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            out.push(tcp);
        }
        out
    }

    #[test]
    fn ids_are_uuids_only() {
        assert!(parse_id("a.b.>", "order").is_err());
        assert!(parse_id("*", "order").is_err());
        assert!(parse_id("../../etc/passwd", "order").is_err());
        assert!(
            parse_id("0190A0B4-7C1E-7A3F-9D2E-5B6C7D8E9F00", "order")
                .is_ok_and(|id| id == "0190a0b4-7c1e-7a3f-9d2e-5b6c7d8e9f00")
        );
        assert!(parse_id("0190a0b47c1e7a3f9d2e5b6c7d8e9f00", "order").is_err());
    }
}

/// The problem answers the OpenAPI document lists for each kind of route
/// (`responses(..., servicekit::CommandProblems)` on a handler).
pub mod openapi {
    use super::ProblemDocument;

    /// What any command may answer besides its success.
    #[derive(utoipa::IntoResponses)]
    #[allow(dead_code)]
    pub enum CommandProblems {
        /// Malformed JSON, an unknown field, a bad id or header.
        #[response(status = 400, content_type = "application/problem+json")]
        BadRequest(ProblemDocument<'static>),
        /// No such aggregate.
        #[response(status = 404, content_type = "application/problem+json")]
        NotFound(ProblemDocument<'static>),
        /// Already deleted, or a version conflict that retries did not settle.
        #[response(status = 409, content_type = "application/problem+json")]
        Conflict(ProblemDocument<'static>),
        /// `If-Match` names another version.
        #[response(status = 412, content_type = "application/problem+json")]
        PreconditionFailed(ProblemDocument<'static>),
        /// The body is over the limit.
        #[response(status = 413, content_type = "application/problem+json")]
        TooLarge(ProblemDocument<'static>),
        /// Not `application/json`, or a compressed body.
        #[response(status = 415, content_type = "application/problem+json")]
        UnsupportedMediaType(ProblemDocument<'static>),
        /// A field out of bounds, or an `Idempotency-Key` reused with another body.
        #[response(status = 422, content_type = "application/problem+json")]
        Unprocessable(ProblemDocument<'static>),
        /// NATS is unavailable; `Retry-After` says when to retry.
        #[response(status = 503, content_type = "application/problem+json")]
        Unavailable(ProblemDocument<'static>),
        /// The stream's byte budget is full: nothing was stored.
        #[response(status = 507, content_type = "application/problem+json")]
        InsufficientStorage(ProblemDocument<'static>),
    }

    /// What any read may answer besides its success.
    #[derive(utoipa::IntoResponses)]
    #[allow(dead_code)]
    pub enum ReadProblems {
        /// A bad id, parameter, cursor or `min_seq`.
        #[response(status = 400, content_type = "application/problem+json")]
        BadRequest(ProblemDocument<'static>),
        /// Not found (or deleted).
        #[response(status = 404, content_type = "application/problem+json")]
        NotFound(ProblemDocument<'static>),
        /// `min_seq` not reached within the bounded wait, or the service is
        /// starting; `Retry-After` says when to retry.
        #[response(status = 503, content_type = "application/problem+json")]
        Unavailable(ProblemDocument<'static>),
    }
}
