//! Forwarding one request to one upstream service, over a pooled reqwest
//! client: end-to-end headers, body and status pass through, hop-by-hop
//! headers do not, and an upstream that is down or slow becomes a bounded
//! 502 or 504 problem, never a hang or a 500.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use servicekit::Problem;

/// Headers that describe one connection, not the message (RFC 9110 7.6.1),
/// plus the ones the gateway sets itself.
const NOT_FORWARDED: [&str; 12] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    // The caller's credentials stay at the gateway; the upstream gets the
    // `Actor` taken from them instead.
    "authorization",
];

/// Set by the gateway only: a client can never choose its own.
const SET_BY_GATEWAY: [&str; 2] = ["actor", "x-correlation-id"];

/// One upstream service: a name for problems and `/readyz`, and the base URL
/// of each of its replicas.
pub struct Upstream {
    pub name: &'static str,
    pub bases: Vec<String>,
    next: AtomicUsize,
}

impl Upstream {
    /// # Errors
    /// An empty list, or a URL that is not `http://host[:port]`.
    pub fn new(name: &'static str, urls: &[String]) -> anyhow::Result<Self> {
        let mut bases = Vec::new();
        for url in urls {
            let base = url.trim().trim_end_matches('/');
            if base.is_empty() {
                continue;
            }
            let parsed = reqwest::Url::parse(base)
                .map_err(|e| anyhow::anyhow!("{name} URL {base:?} is not a URL: {e}"))?;
            if parsed.scheme() != "http" || parsed.host().is_none() || parsed.path() != "/" {
                anyhow::bail!("{name} URL {base:?} must look like http://host:port");
            }
            bases.push(base.to_string());
        }
        if bases.is_empty() {
            anyhow::bail!("{name} needs at least one URL");
        }
        Ok(Self {
            name,
            bases,
            next: AtomicUsize::new(0),
        })
    }

    /// The replicas in the order to try them: round robin over requests.
    fn order(&self) -> impl Iterator<Item = &str> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.bases.len();
        (0..n).map(move |i| self.bases[(start + i) % n].as_str())
    }
}

/// A request on its way to an upstream.
pub struct Outgoing {
    pub method: Method,
    /// Path and query, as the upstream serves it.
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
}

/// The client every upstream shares, with its timeouts.
pub struct Client {
    http: reqwest::Client,
    timeout: Duration,
}

impl Client {
    /// # Errors
    /// When the client cannot be built (no TLS is compiled in; none is used).
    pub fn new(connect_timeout: Duration, timeout: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .timeout(timeout)
            // The services drop idle connections after 20 s; drop ours first.
            .pool_idle_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()?;
        Ok(Self { http, timeout })
    }

    /// Sends `out` to `upstream`, trying the next replica when one refuses
    /// the connection (safe for any method: nothing reached that replica),
    /// and streams the answer back.
    pub async fn forward(&self, upstream: &Upstream, out: Outgoing) -> Response {
        let mut last_refusal = None;
        for base in upstream.order() {
            let url = format!("{base}{}", out.path_and_query);
            let sent = self
                .http
                .request(out.method.clone(), &url)
                .headers(out.headers.clone())
                .body(out.body.clone())
                .send()
                .await;
            match sent {
                Ok(resp) => return answer(resp, base),
                // Refused, or no connection within the connect timeout.
                Err(e) if e.is_connect() => {
                    tracing::warn!(upstream = upstream.name, %url, error = %e, "upstream refused");
                    last_refusal = Some(format!("{base}: {}", root_cause(&e)));
                }
                Err(e) => return self.failure(upstream, base, &e),
            }
        }
        Problem::new(
            StatusCode::BAD_GATEWAY,
            "upstream-unavailable",
            format!(
                "{} is unreachable ({})",
                upstream.name,
                last_refusal.unwrap_or_default()
            ),
        )
        .into_response()
    }

    fn failure(&self, upstream: &Upstream, base: &str, e: &reqwest::Error) -> Response {
        tracing::warn!(upstream = upstream.name, base, error = %e, "upstream failed");
        if e.is_timeout() {
            Problem::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream-timeout",
                format!(
                    "{} did not answer within {} ms",
                    upstream.name,
                    self.timeout.as_millis()
                ),
            )
            .into_response()
        } else {
            Problem::new(
                StatusCode::BAD_GATEWAY,
                "upstream-failed",
                format!("{} failed: {}", upstream.name, root_cause(e)),
            )
            .into_response()
        }
    }

    /// `GET {base}/readyz` within `within`: whether it answered 200, and
    /// what it said otherwise.
    pub async fn ready(&self, base: &str, within: Duration) -> (bool, String) {
        let sent = self
            .http
            .get(format!("{base}/readyz"))
            .timeout(within)
            .send()
            .await;
        match sent {
            Ok(resp) if resp.status() == StatusCode::OK => (true, "ready".into()),
            Ok(resp) => {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                let detail = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_string))
                    .unwrap_or(body);
                (
                    false,
                    format!("{status}: {}", detail.chars().take(200).collect::<String>()),
                )
            }
            Err(e) if e.is_timeout() => (false, format!("no answer within {within:?}")),
            Err(e) => (false, root_cause(&e)),
        }
    }
}

/// The innermost cause: reqwest's own message says only "error sending
/// request".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// The upstream's answer as ours: status, end-to-end headers (a `Location`
/// on the upstream's own origin made relative), and the body streamed.
fn answer(resp: reqwest::Response, base: &str) -> Response {
    let status = resp.status();
    let mut headers = HeaderMap::with_capacity(resp.headers().len());
    for (name, value) in resp.headers() {
        if forwardable(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some(location) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok())
        && let Some(rest) = location.strip_prefix(base)
        && let Ok(v) = HeaderValue::from_str(if rest.is_empty() { "/" } else { rest })
    {
        headers.insert(header::LOCATION, v);
    }
    // Streamed, but with the upstream's length when it gave one: hyper then
    // sends Content-Length rather than chunks.
    if let Some(len) = resp.content_length() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    let body = Body::from_stream(resp.bytes_stream().map_err(std::io::Error::other));
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

fn forwardable(name: &HeaderName) -> bool {
    !NOT_FORWARDED.contains(&name.as_str())
}

/// The caller's end-to-end headers, minus the ones only the gateway sets.
pub fn request_headers(incoming: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(incoming.len() + 2);
    for (name, value) in incoming {
        if forwardable(name) && !SET_BY_GATEWAY.contains(&name.as_str()) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}
