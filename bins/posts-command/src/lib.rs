//! `posts-command`: the HTTP command side. It loads a post aggregate, decides,
//! and appends one event to stream `POSTS` per command.
//!
//! Entry points: [`serve`] binds and runs; [`run`] takes a bound listener and a
//! shutdown future (tests start it in-process); [`app`] is the router.

mod api;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use posts::PostAggregate;
use servicekit::command::CommandHost;

pub use api::app;

/// This service's routes as an OpenAPI document (the gateway merges them).
#[must_use]
pub fn openapi() -> utoipa::openapi::OpenApi {
    <api::ApiDoc as utoipa::OpenApi>::openapi()
}

/// Command-service configuration: flags with env fallbacks.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "posts-command",
    version,
    about = "HTTP command service for blog posts",
    after_help = "Examples:\n  posts-command\n  posts-command --nats-url nats://10.0.0.1:4222 --listen 0.0.0.0:3000 --replicas 3"
)]
pub struct Config {
    /// NATS server URL(s), comma separated for a cluster.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        value_delimiter = ','
    )]
    pub nats_url: Vec<String>,
    /// NATS user (nats/local.conf names one per service); none for an open
    /// server.
    #[arg(long, env = "NATS_USER")]
    pub nats_user: Option<String>,
    /// That user's NATS password.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// Address to serve HTTP on.
    #[arg(long, env = "COMMAND_LISTEN", default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,
    /// Stream replicas when the stream is created: 1 locally, 3 on a cluster.
    #[arg(long, env = "STREAM_REPLICAS", default_value_t = 1)]
    pub replicas: usize,
    /// Byte budget of stream POSTS: once it is full, commands answer 507 and
    /// nothing is stored (or lost) until it is raised. Set on every start.
    #[arg(long, env = "STREAM_MAX_BYTES", default_value_t = eventstore::STREAM_MAX_BYTES_DEFAULT)]
    pub stream_max_bytes: i64,
}

impl Config {
    /// The NATS URLs with this service's credentials in them.
    #[must_use]
    pub fn nats_urls(&self) -> Vec<String> {
        eventstore::with_credentials(
            &self.nats_url,
            self.nats_user.as_deref(),
            self.nats_password.as_deref(),
        )
    }
}

/// Everything a request handler needs. axum clones the state for every
/// request, so it is one `Arc`: a `kv::Store` carries the bucket's whole
/// stream info, and deep-copying it per request cost more CPU than the rest
/// of a create (measured with perf: malloc/free at ~40% of samples).
#[derive(Clone)]
pub struct AppState {
    host: Arc<CommandHost<PostAggregate>>,
}

impl AppState {
    pub(crate) fn host(&self) -> &CommandHost<PostAggregate> {
        &self.host
    }
}

/// Connects to NATS and checks, before serving, that the URL is a NATS server
/// with JetStream, and provisions stream `POSTS` (with its byte budget),
/// stream `DLQ` and the idempotency bucket.
///
/// # Errors
/// A message naming the URL and the cause.
pub async fn connect(config: &Config) -> anyhow::Result<AppState> {
    let spec = posts::context::stream(config.replicas).with_max_bytes(config.stream_max_bytes);
    let host = CommandHost::start(&config.nats_urls(), "posts-command", "post", &spec).await?;
    Ok(AppState {
        host: Arc::new(host),
    })
}

/// Binds `config.listen` and serves until `shutdown` resolves.
///
/// # Errors
/// When NATS fails the start-up check or the address cannot be bound.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = connect(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    run(state, listener, shutdown).await
}

/// Serves on `listener` until `shutdown` resolves, then drains in-flight
/// requests and flushes the NATS connection.
///
/// # Errors
/// When the server fails.
pub async fn run(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "posts-command listening");
    let client = state.host().store().client().clone();
    servicekit::serve(listener, app(state), servicekit::Limits::SERVICE, shutdown).await?;
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    tracing::info!("posts-command stopped");
    Ok(())
}
