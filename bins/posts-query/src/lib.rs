//! `posts-query`: follows stream `POSTS` into the `post-view` (redb) and
//! `post-search` (tantivy) projections in-process and serves reads, with
//! read-your-writes through `min_seq` / `X-Min-Seq`.
//!
//! Entry points: [`serve`] binds and runs; [`start`] + [`run`] let tests run
//! it in-process; [`app`] is the router.

mod api;
mod live;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use eventstore::{EventStore, StreamSpec, dlq_spec, provision};

pub use api::app;
pub use live::{AppState, DataDirLock, LOCK_FILE, SERVICE_FILE};

/// Query-service configuration: flags with env fallbacks.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "posts-query",
    about = "Read models and HTTP reads for blog posts"
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
    /// Address to serve HTTP on.
    #[arg(long, env = "QUERY_LISTEN", default_value = "127.0.0.1:4000")]
    pub listen: SocketAddr,
    /// Where the projections' files live.
    #[arg(long, env = "QUERY_DATA_DIR", default_value = "./data/query")]
    pub data_dir: PathBuf,
    /// Stream replicas when a stream is created: 1 locally, 3 on a cluster.
    #[arg(long, env = "STREAM_REPLICAS", default_value_t = 1)]
    pub replicas: usize,
}

/// Connects and checks NATS, provisions `POSTS` and `DLQ`, locks the data dir,
/// opens both projections and starts following the stream.
///
/// # Errors
/// A message naming the URL or the path and the cause.
pub async fn start(config: &Config, listen: SocketAddr) -> anyhow::Result<AppState> {
    let urls = config.nats_url.join(",");
    let store = EventStore::connect(
        &config.nats_url,
        "posts-query",
        &StreamSpec::posts(config.replicas),
    )
    .await?;
    let js = store.jetstream().clone();
    provision(&js, &dlq_spec(config.replicas))
        .await
        .with_context(|| format!("{urls}: cannot use stream DLQ"))?;
    let lock = DataDirLock::acquire(&config.data_dir, listen)
        .with_context(|| format!("data dir {}", config.data_dir.display()))?;
    AppState::open(store, lock, &config.data_dir)
}

/// Binds `config.listen` and serves until `shutdown` resolves.
///
/// # Errors
/// When start-up checks fail or the address cannot be bound.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let state = start(&config, listener.local_addr()?).await?;
    run(state, listener, shutdown).await
}

/// Serves on `listener` until `shutdown`, then stops the runners, which
/// commit what they applied.
///
/// # Errors
/// When the server fails.
pub async fn run(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "posts-query listening");
    // Responses are single writes: no reason to let Nagle hold any back.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app(state.clone()))
        .with_graceful_shutdown(shutdown)
        .await?;
    state.stop().await;
    tracing::info!("posts-query stopped");
    Ok(())
}
