//! `posts-query`: follows stream `POSTS` into the `post-view` (redb) and
//! `post-search` (tantivy) projections in-process and serves reads, with
//! read-your-writes through `min_seq` / `X-Min-Seq`.
//!
//! Entry points: [`serve`] binds and runs; [`start`] + [`run`] let tests run
//! it in-process; [`app`] is the router.

mod api;
mod live;

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use eventstore::{EventStore, StreamSpec};

pub use api::app;
pub use live::{AppState, DataDirLock, LOCK_FILE, SERVICE_FILE, admin_app};

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
    /// Address of the admin listener (the replay tool's swap protocol);
    /// port 0 takes a free one, recorded in the data dir's service file.
    /// Keep it on loopback: it is not authenticated.
    #[arg(long, env = "QUERY_ADMIN_LISTEN", default_value = "127.0.0.1:0")]
    pub admin_listen: SocketAddr,
    /// Where the projections' files live.
    #[arg(long, env = "QUERY_DATA_DIR", default_value = "./data/query")]
    pub data_dir: PathBuf,
    /// Stream replicas when a stream is created: 1 locally, 3 on a cluster.
    #[arg(long, env = "STREAM_REPLICAS", default_value_t = 1)]
    pub replicas: usize,
}

/// Connects and checks NATS, waits until stream `POSTS` exists (the command
/// service creates it; this service never creates, changes or deletes a
/// stream), locks the data dir, opens both projections and starts following
/// the stream.
///
/// # Errors
/// A message naming the URL or the path and the cause.
pub async fn start(config: &Config, listen: SocketAddr) -> anyhow::Result<AppState> {
    let store = EventStore::connect_existing(
        &config.nats_url,
        "posts-query",
        &StreamSpec::posts(config.replicas),
    )
    .await?;
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", config.admin_listen))?;
    let lock = DataDirLock::acquire(&config.data_dir, listen, admin.local_addr()?)
        .with_context(|| format!("data dir {}", config.data_dir.display()))?;
    AppState::open(store, lock, admin, &config.data_dir)
}

/// Binds `config.listen` and serves until `shutdown` resolves.
///
/// # Errors
/// When start-up checks fail or the address cannot be bound.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let bound = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    bound.set_nonblocking(true)?;
    let addr = bound.local_addr()?;
    // Until the stream exists and the stores are open, the same socket
    // answers 503 (readyz too), so that nothing hangs on a service that is
    // up but not yet ready.
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let starting = tokio::spawn(
        axum::serve(
            tokio::net::TcpListener::from_std(bound.try_clone()?)?,
            api::starting_app(),
        )
        .with_graceful_shutdown(async {
            let _ = started_rx.await;
        })
        .into_future(),
    );
    let mut shutdown = Box::pin(shutdown);
    let started = tokio::select! {
        s = start(&config, addr) => s,
        () = &mut shutdown => {
            let _ = started_tx.send(());
            let _ = starting.await;
            tracing::info!("posts-query stopped before it was ready");
            return Ok(());
        }
    };
    let _ = started_tx.send(());
    let _ = starting.await;
    run(
        started?,
        tokio::net::TcpListener::from_std(bound)?,
        shutdown,
    )
    .await
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
    let admin = state
        .inner
        .admin_listener
        .lock()
        .ok()
        .and_then(|mut g| g.take())
        .context("the admin listener was taken already (run called twice?)")?;
    let admin_addr = admin.local_addr()?;
    tracing::info!(%addr, admin = %admin_addr, "posts-query listening");
    // Responses are single writes: no reason to let Nagle hold any back.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin_stop = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let admin_server = tokio::spawn(
        axum::serve(admin, admin_app(state.clone()))
            .with_graceful_shutdown(admin_stop)
            .into_future(),
    );
    let served = axum::serve(listener, app(state.clone()))
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await;
    // The admin listener stops with the public one (a swap in flight runs
    // to its end as a task of its own).
    let _ = stop_rx;
    if let Ok(Err(e)) = admin_server.await {
        tracing::warn!(error = %e, "admin listener failed");
    }
    served?;
    state.stop().await;
    tracing::info!("posts-query stopped");
    Ok(())
}
