//! Rebuilding a projection into a shadow store and installing it atomically.
//! Shared by the `replay` tool (offline, on the files) and by `posts-query`
//! (online, on request of the tool), so both swap the same way.
//!
//! Layout: shadows live in `<data-dir>/.rebuild/<name>-<pid>-<nanos>/`, next to
//! the live stores on the same file system so renames are atomic.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use eventstore::EventStore;
use projection::{Projection, RunnerOptions, Status, drain_to};

use crate::search::{self, SearchReader};
use crate::view::{self, ViewReader};
use crate::{POST_SEARCH, POST_VIEW};

pub const REBUILD_DIR: &str = ".rebuild";

/// The read handle of either projection.
#[derive(Clone)]
pub enum Reader {
    View(ViewReader),
    Search(SearchReader),
}

impl Reader {
    /// Content digest of the store (see each reader's `digest`).
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn digest(&self) -> anyhow::Result<String> {
        Ok(match self {
            Reader::View(r) => r.digest()?,
            Reader::Search(r) => r.digest()?,
        })
    }
}

/// Where the live store of `name` lives under `data_dir`.
#[must_use]
pub fn live_path(data_dir: &Path, name: &str) -> PathBuf {
    match name {
        POST_VIEW => data_dir.join(format!("{POST_VIEW}.redb")),
        _ => data_dir.join(POST_SEARCH),
    }
}

/// A fresh shadow directory for `name`; the store goes at [`store_in`].
///
/// # Errors
/// When the directory cannot be created.
pub fn new_shadow_dir(data_dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = data_dir
        .join(REBUILD_DIR)
        .join(format!("{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The store path of `name` inside a shadow directory.
#[must_use]
pub fn store_in(shadow_dir: &Path, name: &str) -> PathBuf {
    live_path(shadow_dir, name)
}

/// Removes shadows left by crashed replays. Call only while holding the
/// data dir's replay lock.
pub fn remove_stale_shadows(data_dir: &Path) {
    let _ = std::fs::remove_dir_all(data_dir.join(REBUILD_DIR));
}

/// Opens projection `name` at `path`.
///
/// # Errors
/// When the store cannot be opened.
pub fn open(
    name: &str,
    path: &Path,
    for_replay: bool,
) -> anyhow::Result<(Box<dyn Projection>, Reader)> {
    match name {
        POST_VIEW => {
            let (p, r) = view::open(path)?;
            Ok((Box::new(p), Reader::View(r)))
        }
        POST_SEARCH => {
            let (p, r) = if for_replay {
                search::open_for_rebuild(path)?
            } else {
                search::open(path, search::WRITER_HEAP_LIVE_BYTES)?
            };
            Ok((Box::new(p), Reader::Search(r)))
        }
        other => anyhow::bail!("unknown projection {other:?}"),
    }
}

/// Brings the store that is behind up to the other's checkpoint, so both can
/// be compared, and returns them in the same order.
///
/// # Errors
/// When a runner dies on the way.
pub async fn align(
    a: Box<dyn Projection>,
    b: Box<dyn Projection>,
    store: &EventStore,
) -> anyhow::Result<(Box<dyn Projection>, Box<dyn Projection>)> {
    let (ca, cb) = (a.checkpoint(), b.checkpoint());
    let catch_up = |p: Box<dyn Projection>, target: u64| {
        let status = Status::new(p.name(), p.visible(), p.parked_total());
        drain_to(p, store.clone(), status, RunnerOptions::replay(), target)
    };
    let (a, b) = if ca < cb {
        (catch_up(a, cb).await.map_err(anyhow::Error::msg)?, b)
    } else {
        (a, catch_up(b, ca).await.map_err(anyhow::Error::msg)?)
    };
    anyhow::ensure!(
        a.checkpoint() == b.checkpoint(),
        "stores did not align: {} vs {}",
        a.checkpoint(),
        b.checkpoint()
    );
    Ok((a, b))
}

/// Rebuilds `name` from sequence 1 into a fresh shadow under `data_dir` up to
/// `target_seq`; `status` shows progress. Then [`compact`] it.
///
/// # Errors
/// When the shadow cannot be created or the runner dies.
pub async fn build_shadow(
    name: &str,
    data_dir: &Path,
    store: &EventStore,
    target_seq: u64,
    status: Arc<Status>,
) -> anyhow::Result<(PathBuf, Box<dyn Projection>, Reader)> {
    let dir = new_shadow_dir(data_dir, name)?;
    let path = store_in(&dir, name);
    let (p, reader) = open(name, &path, true)?;
    anyhow::ensure!(
        p.checkpoint() == 0,
        "shadow {} is not empty",
        path.display()
    );
    let p = drain_to(
        p,
        store.clone(),
        status,
        RunnerOptions::replay(),
        target_seq,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    Ok((path, p, reader))
}

/// Makes a built shadow durable and ready for reads ([`Projection::compact`]:
/// post-search merges into one segment, which takes a while on a big index).
///
/// # Errors
/// When the store fails to flush or merge.
pub async fn compact(mut p: Box<dyn Projection>) -> anyhow::Result<Box<dyn Projection>> {
    tokio::task::spawn_blocking(move || p.compact().map(|()| p))
        .await?
        .map_err(anyhow::Error::msg)
}

/// Puts the shadow store at `shadow_path` in place of the live one,
/// atomically: a redb file is renamed over the live file; a tantivy directory
/// is exchanged with the live directory in one `renameat2(RENAME_EXCHANGE)`,
/// then the old one is removed. A crash at any point leaves either the old or
/// the new store live, never neither. Writers on both stores must be closed
/// for the tantivy exchange (a tantivy writer writes by path).
///
/// # Errors
/// When the rename fails (the live store is then unchanged).
pub fn install(name: &str, shadow_path: &Path, data_dir: &Path) -> std::io::Result<()> {
    let live = live_path(data_dir, name);
    crate::failpoint("swap-before-rename");
    match name {
        POST_VIEW => std::fs::rename(shadow_path, &live)?,
        _ => {
            if live.exists() {
                exchange(shadow_path, &live)?;
                crate::failpoint("swap-after-exchange");
                std::fs::remove_dir_all(shadow_path)?;
            } else {
                std::fs::rename(shadow_path, &live)?;
            }
        }
    }
    if let Some(dir) = shadow_path.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    sync_dir(data_dir);
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Atomically exchanges two paths (Linux `renameat2` with `RENAME_EXCHANGE`).
#[allow(
    unsafe_code,
    reason = "std has no atomic exchange of two directories; this is one libc call"
)]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both pointers are valid NUL-terminated strings for the call's duration.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
