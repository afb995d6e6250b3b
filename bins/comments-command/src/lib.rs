//! `comments-command`: the command side of the comments context, and the
//! only writer of stream `COMMENTS`. It decides a new comment against the
//! post as stream `POSTS` has it, and runs the `post-deleted-cascade`
//! process manager. It keeps no local files.
//!
//! Entry points: [`serve`] binds and runs; [`run`] takes a bound listener
//! and a shutdown future (tests start it in-process); [`app`] is the router.

mod api;
pub mod cascade;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use comments::CommentAggregate;
use eventstore::EventStore;
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
    name = "comments-command",
    version,
    about = "HTTP command service for comments on posts, with the post-deleted-cascade process manager",
    after_help = "Examples:\n  comments-command\n  comments-command --nats-url nats://10.0.0.1:4222 --listen 0.0.0.0:3001"
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
    #[arg(
        long,
        env = "COMMENTS_COMMAND_LISTEN",
        default_value = "127.0.0.1:3001"
    )]
    pub listen: SocketAddr,
    /// Stream replicas when the stream is created: 1 locally, 3 on a cluster.
    #[arg(long, env = "STREAM_REPLICAS", default_value_t = 1)]
    pub replicas: usize,
    /// Byte budget of stream COMMENTS: once it is full, commands answer 507
    /// and nothing is stored (or lost) until it is raised. Set on every start.
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

/// Everything a request handler needs, behind one `Arc`.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    host: CommandHost<CommentAggregate>,
    /// Stream `POSTS`, read only: whether a post exists or is deleted.
    posts: EventStore,
    cascade: cascade::Cascade,
}

impl AppState {
    pub(crate) fn host(&self) -> &CommandHost<CommentAggregate> {
        &self.inner.host
    }

    pub(crate) fn posts(&self) -> &EventStore {
        &self.inner.posts
    }

    pub(crate) fn cascade(&self) -> &cascade::Cascade {
        &self.inner.cascade
    }
}

/// Connects to NATS, provisions stream `COMMENTS` (with its byte budget),
/// `DLQ` and the idempotency bucket, and waits for stream `POSTS`, which
/// posts-command creates: this service never creates another context's stream.
///
/// # Errors
/// A message naming the URL and the cause.
pub async fn connect(config: &Config) -> anyhow::Result<AppState> {
    let spec = comments::context::stream(config.replicas).with_max_bytes(config.stream_max_bytes);
    let host =
        CommandHost::start(&config.nats_urls(), "comments-command", "comment", &spec).await?;
    let posts = EventStore::connect_existing(
        &config.nats_urls(),
        "comments-command-posts",
        &posts::context::stream(config.replicas),
    )
    .await?;
    let cascade = cascade::Cascade::new(host.store().clone(), posts.clone());
    let state = AppState {
        inner: Arc::new(Inner {
            host,
            posts,
            cascade,
        }),
    };
    // The process manager in `/metrics`.
    telemetry::on_scrape_of(&state.inner, |inner| async move {
        let snap = inner.cascade.snapshot().await;
        let sum = |field: &str| {
            snap["sources"]
                .as_array()
                .map_or(0, |s| s.iter().filter_map(|x| x[field].as_u64()).sum())
        };
        let state = if snap["last_error"].is_null() { 0 } else { 2 };
        telemetry::metrics().set_projection(
            cascade::NAME,
            snap["lag"].as_u64().unwrap_or(0),
            sum("handled"),
            sum("poison"),
            state,
        );
    });
    Ok(state)
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

/// Runs the cascade and serves on `listener` until `shutdown` resolves,
/// then drains in-flight requests, stops the cascade (an unacknowledged
/// message is delivered again) and flushes the NATS connection.
///
/// # Errors
/// When the server fails.
pub async fn run(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "comments-command listening");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cascade = state.cascade().start(&state, stop_rx);
    let client = state.host().store().client().clone();
    servicekit::serve(listener, app(state), servicekit::Limits::SERVICE, shutdown).await?;
    let _ = stop_tx.send(true);
    for task in cascade {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    tracing::info!("comments-command stopped");
    Ok(())
}
