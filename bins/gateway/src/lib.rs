//! `gateway`: the one public entry point. It routes every public path by
//! method and path to the service that owns it (posts-command, the
//! posts-query replicas, comments-command, reports-query), checks a bearer
//! token on every write, and turns the token's `sub` into the events'
//! `Actor` and the request id into their `Correlation-Id`.
//!
//! Entry points: [`serve`] binds and runs; [`Gateway::new`] + [`run`] let
//! tests run it in-process; [`app`] is the router.

pub mod auth;
pub mod openapi;
pub mod proxy;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, get};
use servicekit::Problem;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

use crate::proxy::{Client, Outgoing, Upstream};

/// Largest request body the gateway takes: above the command services' own
/// limit (512 KiB), so that theirs, with its precise detail, is the one a
/// client meets.
pub const BODY_BYTES_MAX: usize = 1024 * 1024;
/// Longest `X-Request-Id` kept from a client: the command services' bound
/// on a correlation id. A longer or non-ASCII one is replaced.
pub const REQUEST_ID_BYTES_MAX: usize = 128;
/// How long `/readyz` waits for each upstream's.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Gateway configuration: flags with env fallbacks.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address to serve HTTP on.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// posts-command's base URL.
    #[arg(
        long,
        env = "POSTS_COMMAND_URL",
        default_value = "http://127.0.0.1:3000"
    )]
    pub posts_command_url: String,
    /// posts-query replicas' base URLs, comma separated: reads are spread
    /// over them (min_seq keeps read-your-writes on any of them).
    #[arg(
        long,
        env = "POSTS_QUERY_URL",
        default_value = "http://127.0.0.1:4000",
        value_delimiter = ','
    )]
    pub posts_query_url: Vec<String>,
    /// comments-command's base URL.
    #[arg(
        long,
        env = "COMMENTS_COMMAND_URL",
        default_value = "http://127.0.0.1:3001"
    )]
    pub comments_command_url: String,
    /// reports-query's base URL.
    #[arg(
        long,
        env = "REPORTS_QUERY_URL",
        default_value = "http://127.0.0.1:4001"
    )]
    pub reports_query_url: String,
    /// posts-query's admin listener (its --admin-listen): proxied at
    /// /admin/posts-query/..., with a token.
    #[arg(long, env = "POSTS_QUERY_ADMIN_URL")]
    pub posts_query_admin_url: Option<String>,
    /// reports-query's admin listener: proxied at /admin/reports-query/...
    #[arg(long, env = "REPORTS_QUERY_ADMIN_URL")]
    pub reports_query_admin_url: Option<String>,
    /// HS256 secret (at least 32 bytes) that write tokens are signed with.
    #[arg(long, env = "GATEWAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Ed25519 public key (PEM) that write tokens are signed for, instead of
    /// a secret.
    #[arg(long, env = "GATEWAY_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<std::path::PathBuf>,
    /// When set, a token's `aud` must be this.
    #[arg(long, env = "GATEWAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// When set, a token's `iss` must be this.
    #[arg(long, env = "GATEWAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Longest wait for an upstream's whole answer, in milliseconds: then
    /// 504. Longer than the query side's min_seq wait, whose 503 passes.
    #[arg(long, env = "GATEWAY_UPSTREAM_TIMEOUT_MS", default_value_t = 10_000)]
    pub upstream_timeout_ms: u64,
    /// Longest wait for a connection to an upstream, in milliseconds: then
    /// the next replica, or 502.
    #[arg(long, env = "GATEWAY_CONNECT_TIMEOUT_MS", default_value_t = 1_000)]
    pub connect_timeout_ms: u64,
}

/// The command line: serve, or print a token.
#[derive(Debug, clap::Parser)]
#[command(
    name = "gateway",
    version,
    about = "The public entry point: routes to every service, bearer tokens on writes",
    after_help = "Examples:\n  GATEWAY_JWT_SECRET=... gateway\n  gateway --posts-query-url http://10.0.0.2:4000,http://10.0.0.3:4000\n  GATEWAY_JWT_SECRET=... gateway token alice"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Prints a write token for NAME, signed with GATEWAY_JWT_SECRET.
    Token {
        /// The token's `sub`: the `Actor` of the events it appends.
        name: String,
        /// How long the token is valid, in seconds.
        #[arg(long, default_value_t = 24 * 3600)]
        ttl_secs: u64,
    },
}

/// Which service a route goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    PostsCommand,
    PostsQuery,
    CommentsCommand,
    ReportsQuery,
}

/// The gateway's state: the upstreams, the client, the token verifier.
pub struct Gateway {
    posts_command: Upstream,
    posts_query: Upstream,
    comments_command: Upstream,
    reports_query: Upstream,
    posts_query_admin: Option<Upstream>,
    reports_query_admin: Option<Upstream>,
    client: Client,
    verifier: auth::Verifier,
}

impl Gateway {
    /// # Errors
    /// A malformed upstream URL, or no usable token key.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let admin = |name, url: &Option<String>| {
            url.as_ref()
                .map(|u| Upstream::new(name, std::slice::from_ref(u)))
                .transpose()
        };
        Ok(Self {
            posts_command: Upstream::new(
                "posts-command",
                std::slice::from_ref(&config.posts_command_url),
            )?,
            posts_query: Upstream::new("posts-query", &config.posts_query_url)?,
            comments_command: Upstream::new(
                "comments-command",
                std::slice::from_ref(&config.comments_command_url),
            )?,
            reports_query: Upstream::new(
                "reports-query",
                std::slice::from_ref(&config.reports_query_url),
            )?,
            posts_query_admin: admin("posts-query admin", &config.posts_query_admin_url)?,
            reports_query_admin: admin("reports-query admin", &config.reports_query_admin_url)?,
            client: Client::new(
                Duration::from_millis(config.connect_timeout_ms.max(1)),
                Duration::from_millis(config.upstream_timeout_ms.max(1)),
            )?,
            verifier: auth::Verifier::new(&auth::KeyConfig {
                secret: config.jwt_secret.clone(),
                public_key_file: config.jwt_public_key_file.clone(),
                audience: config.jwt_audience.clone(),
                issuer: config.jwt_issuer.clone(),
            })?,
        })
    }

    fn upstream(&self, target: Target) -> &Upstream {
        match target {
            Target::PostsCommand => &self.posts_command,
            Target::PostsQuery => &self.posts_query,
            Target::CommentsCommand => &self.comments_command,
            Target::ReportsQuery => &self.reports_query,
        }
    }

    /// Forwards `req` to `upstream` at `path_and_query`; with `sub`, as a
    /// write on behalf of that caller.
    async fn pass(
        &self,
        upstream: &Upstream,
        path_and_query: String,
        sub: Option<String>,
        req: Request,
    ) -> Response {
        let (parts, body) = req.into_parts();
        let mut headers = proxy::request_headers(&parts.headers);
        if let Some(sub) = sub {
            match HeaderValue::from_str(&sub) {
                Ok(v) => {
                    headers.insert("actor", v);
                }
                Err(_) => {
                    return Problem::internal(&"a checked sub is no header value").into_response();
                }
            }
        }
        if let Some(id) = parts.headers.get(&X_REQUEST_ID) {
            headers.insert("x-correlation-id", id.clone());
        }
        let body = match axum::body::to_bytes(body, BODY_BYTES_MAX).await {
            Ok(b) => b,
            Err(_) => {
                return Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body-too-large",
                    format!("request body is over the gateway's {BODY_BYTES_MAX} byte limit"),
                )
                .into_response();
            }
        };
        let out = Outgoing {
            method: parts.method,
            path_and_query,
            headers,
            body,
        };
        self.client.forward(upstream, out).await
    }
}

/// `?<query>` of `req`, or nothing.
fn query_suffix(req: &Request) -> String {
    req.uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default()
}

fn path_and_query(req: &Request) -> String {
    req.uri().path_and_query().map_or_else(
        || req.uri().path().to_string(),
        |pq| pq.as_str().to_string(),
    )
}

/// A write: needs a valid bearer token; nothing reaches the upstream
/// without one.
async fn write(gw: Arc<Gateway>, target: Target, req: Request) -> Response {
    let sub = match gw.verifier.check(req.headers()) {
        Ok(sub) => sub,
        Err(e) => return e.into_response(),
    };
    let pq = path_and_query(&req);
    gw.pass(gw.upstream(target), pq, Some(sub), req).await
}

/// `GET /projections/{service}`: that service's `/projections`.
#[utoipa::path(
    get,
    operation_id = "getProjections",
    path = "/projections/{service}",
    tag = "operations",
    params(("service" = String, Path, description = "posts-query, comments-command or reports-query")),
    responses(
        (status = 200, description = "One entry per projection: name, checkpoint(s), lag, state, parked events", body = Object),
        (status = 404, description = "No such service", body = servicekit::ProblemDocument, content_type = "application/problem+json"),
    ),
)]
async fn projections(
    State(gw): State<Arc<Gateway>>,
    Path(service): Path<String>,
    req: Request,
) -> Response {
    let target = match service.as_str() {
        "posts-query" => Target::PostsQuery,
        "comments-command" => Target::CommentsCommand,
        "reports-query" => Target::ReportsQuery,
        _ => {
            return Problem::new(
                StatusCode::NOT_FOUND,
                "no-route",
                format!(
                    "no service {service:?} with projections; there are posts-query, \
                     comments-command and reports-query"
                ),
            )
            .into_response();
        }
    };
    let query = query_suffix(&req);
    gw.pass(
        gw.upstream(target),
        format!("/projections{query}"),
        None,
        req,
    )
    .await
}

/// `/admin/{service}/{rest}`: the service's admin listener at
/// `/admin/{rest}`, for token holders only.
async fn admin(
    State(gw): State<Arc<Gateway>>,
    Path((service, rest)): Path<(String, String)>,
    req: Request,
) -> Response {
    let sub = match gw.verifier.check(req.headers()) {
        Ok(sub) => sub,
        Err(e) => return e.into_response(),
    };
    let upstream = match service.as_str() {
        "posts-query" => gw.posts_query_admin.as_ref(),
        "reports-query" => gw.reports_query_admin.as_ref(),
        _ => None,
    };
    let Some(upstream) = upstream else {
        return Problem::new(
            StatusCode::NOT_FOUND,
            "no-route",
            format!("no admin URL is configured for {service:?}"),
        )
        .into_response();
    };
    let query = query_suffix(&req);
    gw.pass(upstream, format!("/admin/{rest}{query}"), Some(sub), req)
        .await
}

/// 200 when every upstream's `/readyz` is, else 503; one entry each.
#[utoipa::path(
    get,
    operation_id = "gatewayReadyz",
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Every upstream is ready", body = Object),
        (status = 503, description = "An upstream is not: its entry says why", body = Object),
    ),
)]
async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    let mut checks = Vec::new();
    for upstream in [
        &gw.posts_command,
        &gw.posts_query,
        &gw.comments_command,
        &gw.reports_query,
    ] {
        for base in &upstream.bases {
            let client = &gw.client;
            checks.push(async move {
                let (ready, detail) = client.ready(base, READY_TIMEOUT).await;
                serde_json::json!({
                    "name": upstream.name,
                    "url": base,
                    "ready": ready,
                    "detail": detail,
                })
            });
        }
    }
    let upstreams = futures::future::join_all(checks).await;
    let all_ready = upstreams.iter().all(|u| u["ready"] == true);
    let status = if all_ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if all_ready { "ready" } else { "unavailable" },
        "upstreams": upstreams,
    });
    (status, axum::Json(body)).into_response()
}

/// A client's `X-Request-Id` is kept when it is 1..=128 visible ASCII
/// characters (it becomes the events' `Correlation-Id`); otherwise it is
/// dropped, and a new one is made.
async fn sanitize_request_id(mut req: Request) -> Request {
    let keep = req.headers().get(&X_REQUEST_ID).is_some_and(|v| {
        let b = v.as_bytes();
        !b.is_empty() && b.len() <= REQUEST_ID_BYTES_MAX && b.iter().all(u8::is_ascii_graphic)
    });
    if !keep {
        req.headers_mut().remove(&X_REQUEST_ID);
    }
    req
}

/// Whether a route needs a bearer token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Open,
    Token,
}

/// One public route the gateway forwards: method, path (the same template
/// in the router and in the OpenAPI document), owner, and access.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    target: Target,
    pub access: Access,
}

const fn route(method: &'static str, path: &'static str, target: Target) -> Route {
    let access = if matches!(method.as_bytes(), b"GET") {
        Access::Open
    } else {
        Access::Token
    };
    Route {
        method,
        path,
        target,
        access,
    }
}

/// Every route forwarded to a service as it is. `app` is built from this
/// table, and a test checks it against the OpenAPI document.
pub const ROUTES: &[Route] = {
    use Target::{CommentsCommand, PostsCommand, PostsQuery, ReportsQuery};
    &[
        route("GET", "/posts", PostsQuery),
        route("POST", "/posts", PostsCommand),
        route("GET", "/posts/search", PostsQuery),
        route("GET", "/posts/{id}", PostsQuery),
        route("PATCH", "/posts/{id}", PostsCommand),
        route("DELETE", "/posts/{id}", PostsCommand),
        route("GET", "/posts/{id}/events", PostsQuery),
        route("GET", "/posts/{id}/comments", PostsQuery),
        route("POST", "/posts/{id}/comments", CommentsCommand),
        route("GET", "/posts/{id}/comments/{comment_id}", PostsQuery),
        route(
            "PATCH",
            "/posts/{id}/comments/{comment_id}",
            CommentsCommand,
        ),
        route(
            "DELETE",
            "/posts/{id}/comments/{comment_id}",
            CommentsCommand,
        ),
        route("GET", "/reports/authors", ReportsQuery),
        route("GET", "/reports/authors/{author_name}", ReportsQuery),
    ]
};

fn forwarding(r: Route) -> MethodRouter<Arc<Gateway>> {
    let handler = move |State(gw): State<Arc<Gateway>>, req: Request| async move {
        match r.access {
            Access::Open => {
                let pq = path_and_query(&req);
                gw.pass(gw.upstream(r.target), pq, None, req).await
            }
            Access::Token => write(gw, r.target, req).await,
        }
    };
    let filter = match r.method {
        "GET" => axum::routing::MethodFilter::GET,
        "POST" => axum::routing::MethodFilter::POST,
        "PATCH" => axum::routing::MethodFilter::PATCH,
        _ => axum::routing::MethodFilter::DELETE,
    };
    axum::routing::on(filter, handler)
}

/// The public router.
pub fn app(gw: Arc<Gateway>) -> Router {
    let mut by_path: Vec<(&str, MethodRouter<Arc<Gateway>>)> = Vec::new();
    for r in ROUTES {
        match by_path.iter_mut().find(|(p, _)| *p == r.path) {
            Some((_, m)) => *m = std::mem::take(m).merge(forwarding(*r)),
            None => by_path.push((r.path, forwarding(*r))),
        }
    }
    let mut router = Router::new();
    for (path, methods) in by_path {
        router = router.route(path, methods);
    }
    router
        .route("/projections/{service}", get(projections))
        .route("/admin/{service}/{*rest}", any(admin))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi_json))
        .route("/docs", get(docs))
        .route_layer(axum::middleware::from_fn(servicekit::http_metrics))
        .fallback(servicekit::no_route)
        .method_not_allowed_fallback(servicekit::method_not_allowed)
        .layer(axum::middleware::map_response(
            servicekit::close_after_unread_body,
        ))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(axum::middleware::map_request(sanitize_request_id))
        .with_state(gw)
}

/// The gateway's own liveness: 200 `ok` while it runs.
#[utoipa::path(get, operation_id = "gatewayLivez", path = "/livez", tag = "operations", responses((status = 200, description = "Alive", body = String)))]
async fn livez() -> &'static str {
    "ok"
}

/// `GET /openapi.json`: this document.
async fn openapi_json() -> Response {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let doc = DOC.get_or_init(|| openapi::document().to_json().unwrap_or_default());
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        doc.as_str(),
    )
        .into_response()
}

/// `GET /docs`: interactive docs of the document (Scalar, loaded from its CDN).
async fn docs() -> Response {
    static HTML: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let html = HTML.get_or_init(|| {
        utoipa_scalar::Scalar::new(openapi::document())
            .title("posts platform API")
            .to_html()
    });
    axum::response::Html(html.as_str()).into_response()
}

/// Serves `app` on `listener` until `shutdown` resolves.
///
/// # Errors
/// Never, today (see [`servicekit::serve`]).
pub async fn run(
    gw: Arc<Gateway>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    servicekit::serve(listener, app(gw), servicekit::Limits::SERVICE, shutdown).await?;
    Ok(())
}

/// Checks the configuration, binds `config.listen` and serves until
/// `shutdown` resolves.
///
/// # Errors
/// A bad configuration, or the address cannot be bound.
pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let gw = Arc::new(Gateway::new(&config)?);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    tracing::info!(listen = %config.listen, "gateway listening");
    run(gw, listener, shutdown).await
}
