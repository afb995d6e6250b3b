//! The running projections and their readers, shared by the HTTP handlers.

use std::collections::HashMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use eventstore::EventStore;
use posts_projections::comment_view::{self, COMMENT_VIEW, CommentReader};
use posts_projections::rebuild::{self, Reader, Shadow};
use posts_projections::search::{self, SearchReader};
use posts_projections::view::{self, ViewReader};
use posts_projections::{POST_SEARCH, POST_VIEW, PROJECTIONS};
use projection::{Feed, Projection, RebuildProgress, Runner, RunnerOptions, Status};
use serde::{Deserialize, Serialize};
use servicekit::{PathParam, Problem};

type Path = std::path::Path;

pub use posts_projections::rebuild::{LOCK_FILE, SERVICE_FILE};

/// An exclusive lock on a data dir; released when the process dies, however.
pub struct DataDirLock {
    _file: File,
    dir: PathBuf,
}

impl DataDirLock {
    /// Takes the lock and records `listen` and the admin listener's `admin`
    /// address for the replay tool.
    ///
    /// # Errors
    /// When another process holds the lock or the dir is not writable.
    pub fn acquire(dir: &Path, listen: SocketAddr, admin: SocketAddr) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))?;
        file.try_lock().map_err(|_| {
            anyhow::anyhow!(
                "another process (posts-query or replay) is using {}",
                dir.display()
            )
        })?;
        let info = serde_json::json!({
            "pid": std::process::id(),
            "listen": listen.to_string(),
            "admin": admin.to_string(),
        });
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

/// `comment-view` and its stream. Stream `COMMENTS` is created by
/// comments-command, which may start after this service: until it exists
/// the view serves what its file holds (nothing, the first time) and does
/// not hold readiness back; once it exists the view follows it.
pub(crate) struct CommentSide {
    pub reader: RwLock<CommentReader>,
    pub status: Arc<Status>,
    /// Stream `COMMENTS` and its feed, once the stream exists.
    pub followed: std::sync::OnceLock<(EventStore, Feed)>,
}

pub(crate) struct Inner {
    pub store: EventStore,
    pub comments: CommentSide,
    /// One ordered consumer feeding both projections.
    pub feed: Feed,
    pub data_dir: PathBuf,
    pub view: RwLock<ViewReader>,
    pub search: RwLock<SearchReader>,
    /// Searches running at once: one per core. Searches are CPU-bound; more
    /// threads than cores only time-slice them, which stretches every
    /// search in flight and the tail most (`just bench`, 8 in flight on 2
    /// cores). Queued searches wait their turn in order instead.
    pub search_slots: Arc<tokio::sync::Semaphore>,
    /// History pages being read from the stream (see `HISTORY_READS_MAX`).
    pub history_slots: tokio::sync::Semaphore,
    pub statuses: Vec<Arc<Status>>,
    pub runners: tokio::sync::Mutex<HashMap<String, Runner>>,
    pub rebuilds: std::sync::Mutex<HashMap<String, RebuildProgress>>,
    /// Shadows handed out to replay tools and not yet swapped in, by id: the
    /// only shadows a swap accepts (at most [`SHADOWS_HANDED_OUT_MAX`]).
    shadows: std::sync::Mutex<Vec<Shadow>>,
    /// The admin listener, bound at start and taken by `run`.
    pub admin_listener: std::sync::Mutex<Option<tokio::net::TcpListener>>,
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
    pub fn open(
        store: EventStore,
        lock: DataDirLock,
        admin_listener: tokio::net::TcpListener,
        data_dir: &Path,
        nats_urls: &[String],
    ) -> anyhow::Result<Self> {
        let view_path = data_dir.join(format!("{POST_VIEW}.redb"));
        let (view_p, view_r) = view::open(&view_path)
            .with_context(|| format!("cannot open {}", view_path.display()))?;
        let search_path = data_dir.join(POST_SEARCH);
        let (search_p, search_r) = search::open(&search_path, search::WRITER_HEAP_LIVE_BYTES)
            .with_context(|| format!("cannot open {}", search_path.display()))?;
        let comments_path = data_dir.join(format!("{COMMENT_VIEW}.redb"));
        let (comments_p, comments_r) = comment_view::open(&comments_path)
            .with_context(|| format!("cannot open {}", comments_path.display()))?;
        let comments_status = Status::new(
            COMMENT_VIEW,
            comments_p.visible(),
            comments_p.parked_total(),
        );
        let mut runners = HashMap::new();
        let mut statuses = Vec::new();
        let feed = Feed::start(store.clone(), &RunnerOptions::live(), "posts-query");
        for p in [
            Box::new(view_p) as Box<dyn projection::Projection>,
            Box::new(search_p),
        ] {
            let status = Status::new(p.name(), p.visible(), p.parked_total());
            statuses.push(status.clone());
            let name = p.name().to_string();
            runners.insert(
                name,
                Runner::start_on(p, &feed, status, RunnerOptions::live()),
            );
        }
        let state = Self {
            inner: Arc::new(Inner {
                store,
                comments: CommentSide {
                    reader: RwLock::new(comments_r),
                    status: comments_status,
                    followed: std::sync::OnceLock::new(),
                },
                feed,
                data_dir: data_dir.to_path_buf(),
                view: RwLock::new(view_r),
                search: RwLock::new(search_r),
                search_slots: Arc::new(tokio::sync::Semaphore::new(
                    std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
                )),
                history_slots: tokio::sync::Semaphore::new(crate::api::HISTORY_READS_MAX),
                statuses,
                runners: tokio::sync::Mutex::new(runners),
                rebuilds: std::sync::Mutex::new(HashMap::new()),
                shadows: std::sync::Mutex::new(Vec::new()),
                admin_listener: std::sync::Mutex::new(Some(admin_listener)),
                _lock: lock,
            }),
        };
        state.follow_comments(comments_p, nats_urls.to_vec());
        Ok(state)
    }

    /// Waits (in the background) for stream `COMMENTS`, then runs
    /// `comment-view` on it.
    fn follow_comments(&self, projection: comment_view::CommentViewProjection, urls: Vec<String>) {
        let state = self.clone();
        tokio::spawn(async move {
            let spec = comments::context::stream(1);
            let store =
                match EventStore::connect_existing(&urls, "posts-query-comments", &spec).await {
                    Ok(store) => store,
                    Err(e) => {
                        tracing::error!(error = %e, "comment-view cannot follow stream COMMENTS");
                        state.inner.comments.status.set_error(Some(e.to_string()));
                        return;
                    }
                };
            let feed = Feed::start(
                store.clone(),
                &RunnerOptions::live(),
                "posts-query-comments",
            );
            let runner = Runner::start_on(
                Box::new(projection),
                &feed,
                state.inner.comments.status.clone(),
                RunnerOptions::live(),
            );
            state
                .inner
                .runners
                .lock()
                .await
                .insert(COMMENT_VIEW.to_string(), runner);
            let _ = state.inner.comments.followed.set((store, feed));
            tracing::info!("comment-view follows stream COMMENTS");
        });
    }

    /// The comment view's reader.
    pub(crate) fn comment_reader(&self) -> CommentReader {
        self.inner
            .comments
            .reader
            .read()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The stream and feed projection `name` follows: comment-view's once
    /// stream `COMMENTS` exists.
    fn stream_and_feed(&self, name: &str) -> Option<(EventStore, Feed)> {
        if name == COMMENT_VIEW {
            self.inner.comments.followed.get().cloned()
        } else {
            Some((self.inner.store.clone(), self.inner.feed.clone()))
        }
    }

    pub(crate) fn status(&self, name: &str) -> Option<Arc<Status>> {
        if name == COMMENT_VIEW {
            return Some(self.inner.comments.status.clone());
        }
        self.inner
            .statuses
            .iter()
            .find(|s| s.name() == name)
            .cloned()
    }

    pub(crate) fn view(&self) -> ViewReader {
        self.inner
            .view
            .read()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub(crate) fn search(&self) -> SearchReader {
        self.inner
            .search
            .read()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Stops every runner; each flushes what it applied.
    pub async fn stop(&self) {
        let mut runners = self.inner.runners.lock().await;
        for (_, r) in runners.drain() {
            let _ = r.stop().await;
        }
    }
}

/// How old a rebuild progress report may be and still show `rebuilding`:
/// a replay that died stops reporting and the state falls back by itself.
const REBUILD_REPORT_FRESH_MS: u64 = 5_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl AppState {
    /// The rebuild in progress for `name`, if one reported recently.
    pub(crate) fn rebuild(&self, name: &str) -> Option<RebuildProgress> {
        let g = self.inner.rebuilds.lock().ok()?;
        g.get(name)
            .filter(|p| now_ms().saturating_sub(p.at_unix_ms) < REBUILD_REPORT_FRESH_MS)
            .cloned()
    }
}

/// A writer for the live store of `name`, for when a swap failed midway.
async fn reopen_live(state: &AppState, name: &str) -> anyhow::Result<Box<dyn Projection>> {
    match name {
        // The readers hold the live redb file open; a second open would fail.
        POST_VIEW => Ok(Box::new(view::writer_for(&state.view())?)),
        COMMENT_VIEW => Ok(Box::new(comment_view::writer_for(&state.comment_reader())?)),
        _ => {
            let path = rebuild::live_path(&state.inner.data_dir, name);
            let n = name.to_string();
            let (p, reader) =
                tokio::task::spawn_blocking(move || rebuild::open(&n, &path, false)).await??;
            if let Reader::Search(r) = reader {
                *state
                    .inner
                    .search
                    .write()
                    .map_err(|_| anyhow::anyhow!("poisoned"))? = r;
            }
            Ok(p)
        }
    }
}

/// Shadows handed out and not yet swapped in, at most: a replay asks for
/// one per projection; the oldest is dropped (and its directory removed)
/// when a new one would pass this.
const SHADOWS_HANDED_OUT_MAX: usize = 8;

/// The admin listener's routes: the replay protocol (see ARCHITECTURE.md,
/// "Replay"). Never on the public listener.
pub fn admin_app(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/admin/projections/{name}/shadows", post(new_shadow))
        .route("/admin/projections/{name}/progress", post(progress))
        .route("/admin/projections/{name}/swap", post(swap))
        .fallback(servicekit::no_route)
        .method_not_allowed_fallback(servicekit::method_not_allowed)
        .layer(axum::middleware::map_response(
            servicekit::close_after_unread_body,
        ))
        .with_state(state)
}

#[derive(Serialize)]
struct ShadowResponse {
    /// The id to build into (`<data-dir>/.rebuild/<name>-<id>/`) and to swap.
    shadow: String,
}

/// Makes an empty shadow directory for `name` and hands out its id.
async fn new_shadow(
    State(state): State<AppState>,
    PathParam(name): PathParam,
) -> Result<(StatusCode, Json<ShadowResponse>), Problem> {
    known(&name)?;
    let shadow = Shadow::create(&state.inner.data_dir, &name).map_err(internal)?;
    let id = shadow.id().to_string();
    let mut shadows = state.inner.shadows.lock().map_err(internal)?;
    shadows.push(shadow);
    if shadows.len() > SHADOWS_HANDED_OUT_MAX {
        shadows.remove(0).remove();
    }
    Ok((StatusCode::CREATED, Json(ShadowResponse { shadow: id })))
}

/// Takes back the shadow `id` of `name`, if it was handed out.
fn take_shadow(state: &AppState, name: &str, id: &str) -> Result<Shadow, Problem> {
    let mut shadows = state.inner.shadows.lock().map_err(internal)?;
    let at = shadows
        .iter()
        .position(|s| s.id() == id && s.name() == name)
        .ok_or_else(|| {
            // The id is not echoed: whatever a client sends, no path comes back.
            Problem::new(
                StatusCode::NOT_FOUND,
                "unknown-shadow",
                format!(
                    "no shadow with that id was handed out for {name} (POST /admin/projections/{name}/shadows), or it was swapped in already"
                ),
            )
        })?;
    Ok(shadows.remove(at))
}

fn known(name: &str) -> Result<(), Problem> {
    if PROJECTIONS.contains(&name) {
        Ok(())
    } else {
        Err(Problem::new(
            StatusCode::NOT_FOUND,
            "unknown-projection",
            format!(
                "unknown projection {name:?}; known: {}",
                PROJECTIONS.join(", ")
            ),
        ))
    }
}

/// Admin bodies are small: a progress report, a shadow id.
const ADMIN_BODY_BYTES_MAX: usize = 4 * 1024;

async fn progress(
    State(state): State<AppState>,
    PathParam(name): PathParam,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<StatusCode, Problem> {
    known(&name)?;
    let report: RebuildProgress =
        servicekit::json_body(&headers, body, ADMIN_BODY_BYTES_MAX).await?;
    if let Ok(mut g) = state.inner.rebuilds.lock() {
        g.insert(name, report);
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SwapRequest {
    /// A shadow id this service handed out for the projection.
    shadow: String,
    verify: bool,
}

#[derive(Serialize)]
struct SwapResponse {
    checkpoint: u64,
    live_digest: Option<String>,
    rebuilt_digest: Option<String>,
}

fn internal(e: impl std::fmt::Display) -> Problem {
    Problem::internal(&e)
}

/// Runs the swap as a task of its own: hyper drops a handler's future when
/// the client's connection closes (a replay killed or timed out mid-swap),
/// and a swap cut off between stopping the live runner and restarting it
/// would leave the projection stopped for good.
async fn swap(
    State(state): State<AppState>,
    PathParam(name): PathParam,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Json<SwapResponse>, Problem> {
    let req: SwapRequest = servicekit::json_body(&headers, body, ADMIN_BODY_BYTES_MAX).await?;
    tokio::spawn(swap_to_completion(state, name, req))
        .await
        .map_err(internal)?
}

/// Takes a rebuilt shadow store: pauses this projection's runner (reads go on
/// from the old store), aligns old and new on one checkpoint, optionally
/// compares digests, installs the shadow atomically, swaps the readers, and
/// resumes following from the new store.
async fn swap_to_completion(
    state: AppState,
    name: String,
    req: SwapRequest,
) -> Result<Json<SwapResponse>, Problem> {
    known(&name)?;
    let data_dir = state.inner.data_dir.clone();
    let shadow = take_shadow(&state, &name, &req.shadow)?;
    let status = state.status(&name).ok_or_else(|| internal("no status"))?;
    let Some((store, feed)) = state.stream_and_feed(&name) else {
        return Err(Problem::unavailable(
            format!("{name} does not follow its stream yet (stream COMMENTS does not exist)"),
            1,
        ));
    };
    let mut runners = state.inner.runners.lock().await;
    let live = match runners.remove(&name) {
        Some(r) => r.stop().await.ok_or_else(|| internal("live runner died"))?,
        None => return Err(internal("projection is not running")),
    };
    let restart = |p: Box<dyn Projection>, runners: &mut HashMap<String, Runner>| {
        runners.insert(
            name.clone(),
            Runner::start_on(p, &feed, status.clone(), RunnerOptions::live()),
        );
    };
    let (new_p, new_reader) = {
        let (n, s) = (name.clone(), shadow.store_path());
        match tokio::task::spawn_blocking(move || rebuild::open(&n, &s, false)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                restart(live, &mut runners);
                // The cause names files: it goes to the log, not to the client.
                tracing::warn!(
                    projection = name,
                    error = format!("{e:#}"),
                    "cannot open a shadow"
                );
                return Err(Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid-shadow",
                    format!(
                        "the shadow of {name} holds no store this service can open; the cause is in the service log"
                    ),
                ));
            }
            Err(e) => {
                restart(live, &mut runners);
                return Err(internal(e));
            }
        }
    };
    let (live, new_p) = match rebuild::align(live, new_p, &store).await {
        Ok(v) => v,
        Err(e) => {
            // Both stores went down with the failed runner: reopen the live
            // one so the projection keeps following.
            if let Ok(p) = reopen_live(&state, &name).await {
                restart(p, &mut runners);
            }
            return Err(internal(e));
        }
    };
    let checkpoint = new_p.checkpoint();
    let (mut live_digest, mut rebuilt_digest) = (None, None);
    if req.verify {
        let old_reader = match name.as_str() {
            POST_VIEW => Reader::View(state.view()),
            COMMENT_VIEW => Reader::Comments(state.comment_reader()),
            _ => Reader::Search(state.search()),
        };
        let nr = new_reader.clone();
        let digests = tokio::task::spawn_blocking(move || {
            Ok::<_, anyhow::Error>((old_reader.digest()?, nr.digest()?))
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
        live_digest = Some(digests.0.clone());
        rebuilt_digest = Some(digests.1.clone());
        if digests.0 != digests.1 {
            restart(live, &mut runners);
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "digest-mismatch",
                format!(
                    "at checkpoint {checkpoint} live digest {} differs from rebuilt {}; live store kept",
                    digests.0, digests.1
                ),
            ));
        }
    }
    let installed = match name.as_str() {
        // redb works on its open file handle, which a rename does not
        // disturb: install first, keep the shadow's handles, then close the
        // old store (its readers finish on the unlinked file).
        POST_VIEW | COMMENT_VIEW => {
            let (s, d) = (shadow.clone(), data_dir.clone());
            match tokio::task::spawn_blocking(move || rebuild::install(&s, &d))
                .await
                .map_err(internal)?
            {
                Ok(()) => {
                    new_reader.moved_to(&rebuild::live_path(&data_dir, &name));
                    drop(live);
                    Ok((new_p, new_reader))
                }
                Err(e) => {
                    restart(live, &mut runners);
                    return Err(internal(e));
                }
            }
        }
        // A tantivy writer writes by path and the paths are about to trade
        // places: close both writers, exchange, reopen from the live path.
        // Readers keep serving from the old segments (mapped) meanwhile.
        _ => {
            drop(live);
            drop(new_p);
            drop(new_reader);
            let (n, s, d) = (name.clone(), shadow.clone(), data_dir.clone());
            let (installed, reopened) = tokio::task::spawn_blocking(move || {
                let installed = rebuild::install(&s, &d);
                // Installed or not, the live path holds a complete index.
                (
                    installed,
                    rebuild::open(&n, &rebuild::live_path(&d, &n), false),
                )
            })
            .await
            .map_err(internal)?;
            match (installed, reopened) {
                (Ok(()), Ok(v)) => Ok(v),
                (Err(e), Ok((p, reader))) => {
                    // The exchange may have happened: whichever index the
                    // live path holds now, reads and the runner both use it.
                    if let Reader::Search(r) = reader {
                        *state
                            .inner
                            .search
                            .write()
                            .map_err(|_| internal("poisoned"))? = r;
                    }
                    status.reset_visible(p.visible());
                    status.set_parked_total(p.parked_total());
                    restart(p, &mut runners);
                    return Err(internal(e));
                }
                (_, Err(e)) => {
                    tracing::error!(
                        projection = name,
                        error = format!("{e:#}"),
                        "cannot reopen the live index"
                    );
                    status.set_state(projection::ProjectionState::Halted);
                    status.set_error(Some(format!("cannot reopen the live index: {e:#}")));
                    Err(e)
                }
            }
        }
    };
    let (p, reader) = match installed {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(
                projection = name,
                error = format!("{e:#}"),
                "install failed; live store kept"
            );
            return Err(internal(e));
        }
    };
    match reader {
        Reader::View(r) => *state.inner.view.write().map_err(|_| internal("poisoned"))? = r,
        Reader::Comments(r) => {
            *state
                .inner
                .comments
                .reader
                .write()
                .map_err(|_| internal("poisoned"))? = r
        }
        Reader::Search(r) => {
            *state
                .inner
                .search
                .write()
                .map_err(|_| internal("poisoned"))? = r
        }
    }
    status.reset_visible(p.visible());
    status.set_parked_total(p.parked_total());
    restart(p, &mut runners);
    if let Ok(mut g) = state.inner.rebuilds.lock() {
        g.remove(&name);
    }
    tracing::info!(projection = name, checkpoint, "rebuilt store swapped in");
    Ok(Json(SwapResponse {
        checkpoint,
        live_digest,
        rebuilt_digest,
    }))
}
