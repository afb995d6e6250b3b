//! The running projections and their readers, shared by the HTTP handlers.

use std::collections::HashMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use eventstore::EventStore;
use posts_projections::search::{self, SearchReader};
use posts_projections::view::{self, ViewReader};
use posts_projections::{POST_SEARCH, POST_VIEW};
use projection::{Runner, RunnerOptions, Status};

/// Held with an exclusive lock while a `posts-query` runs on a data dir.
pub const LOCK_FILE: &str = "posts-query.lock";
/// Where a running `posts-query` says how to reach it (pid, listen address).
pub const SERVICE_FILE: &str = "posts-query.json";

/// An exclusive lock on a data dir; released when the process dies, however.
pub struct DataDirLock {
    _file: File,
    dir: PathBuf,
}

impl DataDirLock {
    /// Takes the lock and records `listen` for the replay tool.
    ///
    /// # Errors
    /// When another process holds the lock or the dir is not writable.
    pub fn acquire(dir: &Path, listen: SocketAddr) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))?;
        file.try_lock()
            .map_err(|_| anyhow::anyhow!("another process (posts-query or replay) is using {}", dir.display()))?;
        let info = serde_json::json!({ "pid": std::process::id(), "listen": listen.to_string() });
        std::fs::write(dir.join(SERVICE_FILE), info.to_string())?;
        Ok(Self {
            _file: file,
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for DataDirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join(SERVICE_FILE));
    }
}

pub(crate) struct Inner {
    pub store: EventStore,
    pub data_dir: PathBuf,
    pub view: RwLock<ViewReader>,
    pub search: RwLock<SearchReader>,
    pub statuses: Vec<Arc<Status>>,
    pub runners: tokio::sync::Mutex<HashMap<String, Runner>>,
    _lock: DataDirLock,
}

#[derive(Clone)]
pub struct AppState {
    pub(crate) inner: Arc<Inner>,
}

impl AppState {
    /// Opens both projections under `data_dir` and starts their runners.
    ///
    /// # Errors
    /// When a store cannot be opened.
    pub fn open(store: EventStore, lock: DataDirLock, data_dir: &Path) -> anyhow::Result<Self> {
        let view_path = data_dir.join(format!("{POST_VIEW}.redb"));
        let (view_p, view_r) = view::open(&view_path).with_context(|| format!("cannot open {}", view_path.display()))?;
        let search_path = data_dir.join(POST_SEARCH);
        let (search_p, search_r) = search::open(&search_path, search::WRITER_HEAP_LIVE_BYTES)
            .with_context(|| format!("cannot open {}", search_path.display()))?;
        let mut runners = HashMap::new();
        let mut statuses = Vec::new();
        for p in [Box::new(view_p) as Box<dyn projection::Projection>, Box::new(search_p)] {
            let status = Status::new(p.name(), p.visible(), p.parked_total());
            statuses.push(status.clone());
            let name = p.name().to_string();
            runners.insert(name, Runner::start(p, store.clone(), status, RunnerOptions::live()));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                data_dir: data_dir.to_path_buf(),
                view: RwLock::new(view_r),
                search: RwLock::new(search_r),
                statuses,
                runners: tokio::sync::Mutex::new(runners),
                _lock: lock,
            }),
        })
    }

    pub(crate) fn status(&self, name: &str) -> Option<Arc<Status>> {
        self.inner.statuses.iter().find(|s| s.name() == name).cloned()
    }

    pub(crate) fn view(&self) -> ViewReader {
        self.inner.view.read().map(|g| g.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    pub(crate) fn search(&self) -> SearchReader {
        self.inner.search.read().map(|g| g.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Stops every runner; each flushes what it applied.
    pub async fn stop(&self) {
        let mut runners = self.inner.runners.lock().await;
        for (_, r) in runners.drain() {
            let _ = r.stop().await;
        }
    }
}

/// Admin routes used by the replay tool; filled in with the swap protocol.
pub(crate) fn admin_routes() -> axum::Router<AppState> {
    axum::Router::new()
}
