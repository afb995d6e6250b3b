//! `reports-query`: the reports context's read side. It runs `author-stats`,
//! one projection following two streams (`POSTS` and `COMMENTS`, one
//! checkpoint each), and serves it.
//!
//! Entry points: [`serve`] binds and runs; [`start`] + [`run`] let tests run
//! it in-process.

mod api;

/// This service's public routes as an OpenAPI document (the gateway merges
/// them).
#[must_use]
pub fn openapi() -> utoipa::openapi::OpenApi {
    <api::ApiDoc as utoipa::OpenApi>::openapi()
}

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use eventstore::EventStore;
use projection::{Feed, Projection, Runner, RunnerOptions, Status};
use reports::author_stats::{self, AUTHOR_STATS, StatsReader};

/// Held with an exclusive lock while a reports-query runs on a data dir.
pub const LOCK_FILE: &str = "reports-query.lock";

/// Query-service configuration: flags with env fallbacks.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "reports-query",
    version,
    about = "Reports over several contexts: author-stats over stream POSTS and COMMENTS",
    after_help = "Examples:\n  reports-query\n  reports-query --data-dir /var/lib/reports --listen 0.0.0.0:4001"
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
    #[arg(long, env = "REPORTS_QUERY_LISTEN", default_value = "127.0.0.1:4001")]
    pub listen: SocketAddr,
    /// Where the projection's file lives.
    #[arg(long, env = "REPORTS_DATA_DIR", default_value = "./data/reports")]
    pub data_dir: PathBuf,
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

/// One source stream of author-stats as it runs.
pub(crate) struct Source {
    pub store: EventStore,
    pub status: Arc<Status>,
    _feed: Feed,
}

pub(crate) struct Inner {
    pub reader: StatsReader,
    /// In the order of [`author_stats::STREAMS`].
    pub sources: Vec<Source>,
    runners: tokio::sync::Mutex<Vec<Runner>>,
    _lock: std::fs::File,
}

#[derive(Clone)]
pub struct AppState {
    pub(crate) inner: Arc<Inner>,
}

impl AppState {
    /// Stops both runners; each commits what it applied.
    pub async fn stop(&self) {
        let mut runners = self.inner.runners.lock().await;
        for r in runners.drain(..) {
            let _ = r.stop().await;
        }
    }
}

/// Waits until streams `POSTS` and `COMMENTS` exist (their command services
/// create them; this service never creates, changes or deletes a stream),
/// locks the data dir, opens author-stats and follows both streams.
///
/// # Errors
/// A message naming the URL or the path and the cause.
pub async fn start(config: &Config) -> anyhow::Result<AppState> {
    let posts = EventStore::connect_existing(
        &config.nats_urls(),
        "reports-query",
        &posts::context::stream(1),
    )
    .await?;
    let comments = EventStore::connect_existing(
        &config.nats_urls(),
        "reports-query-comments",
        &comments::context::stream(1),
    )
    .await?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(config.data_dir.join(LOCK_FILE))?;
    lock.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "another process (reports-query or replay) is using {}",
            config.data_dir.display()
        )
    })?;
    let path = config.data_dir.join(format!("{AUTHOR_STATS}.redb"));
    let (slots, reader) =
        author_stats::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut sources = Vec::new();
    let mut runners = Vec::new();
    for (slot, store) in slots.into_iter().zip([posts, comments]) {
        let feed = Feed::start(store.clone(), &RunnerOptions::live(), "reports-query");
        let status = Status::new(slot.name(), slot.visible(), slot.parked_total());
        runners.push(Runner::start_on(
            Box::new(slot),
            &feed,
            status.clone(),
            RunnerOptions::live(),
        ));
        sources.push(Source {
            store,
            status,
            _feed: feed,
        });
    }
    let state = AppState {
        inner: Arc::new(Inner {
            reader,
            sources,
            runners: tokio::sync::Mutex::new(runners),
            _lock: lock,
        }),
    };
    telemetry::on_scrape_of(&state.inner, |inner| async move {
        api::refresh_metrics(&AppState { inner }).await;
    });
    Ok(state)
}

/// Binds `config.listen` and serves until `shutdown` resolves. Until both
/// streams exist and the store is open, every route but `/livez` is 503.
///
/// # Errors
/// When the start-up checks fail or the address cannot be bound.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let ready: Arc<OnceLock<axum::Router>> = Arc::default();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let addr = listener.local_addr()?;
    let server = tokio::spawn(servicekit::serve(
        listener,
        servicekit::gated(ready.clone(), api::starting_app()),
        servicekit::Limits::SERVICE,
        async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        },
    ));
    let mut shutdown = Box::pin(shutdown);
    let state = tokio::select! {
        s = start(&config) => Some(s),
        () = &mut shutdown => None,
    };
    let state = match state {
        Some(Ok(s)) => s,
        other => {
            let _ = stop_tx.send(true);
            let _ = server.await;
            return other.map_or(Ok(()), |r| r.map(drop));
        }
    };
    let _ = ready.set(api::app(state.clone()));
    tracing::info!(%addr, "reports-query listening");
    shutdown.await;
    let _ = stop_tx.send(true);
    server.await??;
    state.stop().await;
    tracing::info!("reports-query stopped");
    Ok(())
}

/// Serves `state` on `listener` until `shutdown`.
///
/// # Errors
/// When the server fails.
pub async fn run(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "reports-query listening");
    servicekit::serve(
        listener,
        api::app(state.clone()),
        servicekit::Limits::SERVICE,
        shutdown,
    )
    .await?;
    state.stop().await;
    tracing::info!("reports-query stopped");
    Ok(())
}
