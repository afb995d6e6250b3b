//! `posts-query`: follows stream `POSTS` into the `post-view` (redb) and
//! `post-search` (tantivy) projections in-process and serves reads, with
//! read-your-writes through `min_seq` / `X-Min-Seq`.
//!
//! Entry points: [`serve`] binds and runs; [`start`] + [`run`] let tests run
//! it in-process; [`app`] is the router.

mod api;
mod comments_api;
mod live;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use eventstore::EventStore;

pub use api::app;

/// This service's public routes as an OpenAPI document (the gateway merges
/// them).
#[must_use]
pub fn openapi() -> utoipa::openapi::OpenApi {
    <api::ApiDoc as utoipa::OpenApi>::openapi()
}
pub use live::{AppState, DataDirLock, LOCK_FILE, SERVICE_FILE, admin_app};

/// Query-service configuration: flags with env fallbacks.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "posts-query",
    version,
    about = "Read models and HTTP reads for blog posts and their comments",
    after_help = "Examples:\n  posts-query\n  posts-query --data-dir /var/lib/posts-query --listen 0.0.0.0:4000"
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

/// Connects and checks NATS, waits until stream `POSTS` exists (the command
/// service creates it; this service never creates, changes or deletes a
/// stream), locks the data dir, opens both projections and starts following
/// the stream.
///
/// # Errors
/// A message naming the URL or the path and the cause.
pub async fn start(config: &Config, listen: SocketAddr) -> anyhow::Result<AppState> {
    let store = EventStore::connect_existing(
        &config.nats_urls(),
        "posts-query",
        &posts::context::stream(config.replicas),
    )
    .await?;
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", config.admin_listen))?;
    let lock = DataDirLock::acquire(&config.data_dir, listen, admin.local_addr()?)
        .with_context(|| format!("data dir {}", config.data_dir.display()))?;
    let state = AppState::open(store, lock, admin, &config.data_dir, &config.nats_urls())?;
    telemetry::on_scrape_of(&state.inner, |inner| async move {
        api::refresh_metrics(&AppState { inner }).await;
    });
    Ok(state)
}

/// Binds `config.listen` and serves until `shutdown` resolves. Until the
/// stream exists and the stores are open, the socket answers 503 (readyz
/// too), so that nothing hangs on a service that is up but not ready.
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
    let addr = listener.local_addr()?;
    serve_gated(listener, start(&config, addr), shutdown).await
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
    serve_gated(listener, async { Ok(state) }, shutdown).await
}

/// One server on `listener` from the start: it answers as
/// [`api::starting_app`] until `state` is ready, then as [`app`]. (Two
/// servers one after the other on the socket would close the first one's
/// connections at the handover, failing a request sent at that instant.)
async fn serve_gated(
    listener: tokio::net::TcpListener,
    state: impl Future<Output = anyhow::Result<AppState>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let ready: Arc<OnceLock<axum::Router>> = Arc::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let public = tokio::spawn(servicekit::serve(
        listener,
        gate(ready.clone()),
        servicekit::Limits::SERVICE,
        stopped(stop_rx.clone()),
    ));
    let mut shutdown = Box::pin(shutdown);
    let started = tokio::select! {
        s = state => Some(s),
        () = &mut shutdown => None,
    };
    let state = match started {
        Some(Ok(s)) => s,
        failed_or_stopped => {
            let _ = stop_tx.send(true);
            let _ = public.await;
            return match failed_or_stopped {
                Some(failed) => failed.map(drop),
                None => {
                    tracing::info!("posts-query stopped before it was ready");
                    Ok(())
                }
            };
        }
    };
    let admin = state
        .inner
        .admin_listener
        .lock()
        .ok()
        .and_then(|mut g| g.take())
        .context("the admin listener was taken already (run called twice?)")?;
    let admin_addr = admin.local_addr()?;
    let _ = ready.set(app(state.clone()));
    tracing::info!(%addr, admin = %admin_addr, "posts-query listening");
    let admin_server = tokio::spawn(servicekit::serve(
        admin,
        admin_app(state.clone()),
        servicekit::Limits::SERVICE,
        stopped(stop_rx),
    ));
    shutdown.await;
    // The admin listener stops with the public one (a swap in flight runs
    // to its end as a task of its own).
    let _ = stop_tx.send(true);
    let served = public.await;
    if let Ok(Err(e)) = admin_server.await {
        tracing::warn!(error = %e, "admin listener failed");
    }
    served??;
    state.stop().await;
    tracing::info!("posts-query stopped");
    Ok(())
}

/// The public router: [`api::starting_app`] until `ready` is set, then it.
fn gate(ready: Arc<OnceLock<axum::Router>>) -> axum::Router {
    servicekit::gated(ready, api::starting_app())
}
