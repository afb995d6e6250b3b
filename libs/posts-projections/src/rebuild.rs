//! Rebuilding a projection into a shadow store and installing it atomically.
//! Shared by the `replay` tool (offline, on the files) and by `posts-query`
//! (online, on request of the tool), so both swap the same way.
//!
//! Layout: shadows live in `<data-dir>/.rebuild/<name>-<id>/` ([`Shadow`]),
//! next to the live stores on the same file system so renames are atomic.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use eventstore::EventStore;
use projection::{Projection, RunnerOptions, Status, drain_to};

use crate::comment_view::{self, COMMENT_VIEW, CommentReader};
use crate::search::{self, SearchReader};
use crate::view::{self, ViewReader};
use crate::{POST_SEARCH, POST_VIEW, PROJECTIONS};

pub const REBUILD_DIR: &str = ".rebuild";
/// Held with an exclusive lock while a `posts-query` runs on a data dir:
/// `replay` works on the files itself when it can take it.
pub const LOCK_FILE: &str = "posts-query.lock";
/// Where a running `posts-query` says how to reach it (pid, listen address,
/// admin address).
pub const SERVICE_FILE: &str = "posts-query.json";

/// The read handle of either projection.
#[derive(Clone)]
pub enum Reader {
    View(ViewReader),
    Search(SearchReader),
    Comments(CommentReader),
}

impl Reader {
    /// The store was renamed to `path` while open (see [`install`]): a redb
    /// store reopened after a storage fault opens it there.
    pub fn moved_to(&self, path: &Path) {
        match self {
            Reader::View(r) => r.moved_to(path),
            Reader::Comments(r) => r.moved_to(path),
            // tantivy opens files by the directory it was given, and the
            // exchange puts the new index at the live path.
            Reader::Search(_) => {}
        }
    }

    /// Content digest of the store (see each reader's `digest`).
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn digest(&self) -> anyhow::Result<String> {
        Ok(match self {
            Reader::View(r) => r.digest()?,
            Reader::Search(r) => r.digest()?,
            Reader::Comments(r) => r.digest()?,
        })
    }
}

/// Where the live store of `name` lives under `data_dir`.
#[must_use]
pub fn live_path(data_dir: &Path, name: &str) -> PathBuf {
    match name {
        POST_SEARCH => data_dir.join(POST_SEARCH),
        other => data_dir.join(format!("{other}.redb")),
    }
}

/// A shadow store's own directory, `<data-dir>/.rebuild/<name>-<id>/`.
///
/// Only [`Shadow::create`] makes one, with a fresh random id, so every
/// shadow the protocol opens, installs or removes is a directory it made
/// itself: never a path a client named. A running `posts-query` hands the
/// id out (admin listener) and takes it back in the swap; the id is all
/// that crosses the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shadow {
    name: String,
    id: String,
    dir: PathBuf,
}

/// Characters of a shadow id: 32 lowercase hex digits (a UUIDv7, simple form).
const SHADOW_ID_CHARS: usize = 32;

/// Why a shadow id does not name a shadow.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShadowError {
    #[error("a shadow id is {SHADOW_ID_CHARS} lowercase hex digits")]
    Malformed,
    #[error("no shadow with that id exists")]
    Missing,
}

impl Shadow {
    /// Makes a fresh, empty shadow directory for projection `name`.
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn create(data_dir: &Path, name: &str) -> std::io::Result<Self> {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let root = data_dir.join(REBUILD_DIR);
        std::fs::create_dir_all(&root)?;
        let dir = root.join(format!("{name}-{id}"));
        // `create_dir`, not `_all`: a shadow is never an existing directory.
        std::fs::create_dir(&dir)?;
        Ok(Self {
            name: name.to_string(),
            id,
            dir,
        })
    }

    /// The shadow `id` of projection `name` that a service made under
    /// `data_dir` and handed out: the tool that builds into it finds it here.
    ///
    /// # Errors
    /// When `id` is not a shadow id, or no such shadow directory exists.
    pub fn handed_out(data_dir: &Path, name: &str, id: &str) -> Result<Self, ShadowError> {
        if id.len() != SHADOW_ID_CHARS
            || !id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ShadowError::Malformed);
        }
        let dir = data_dir.join(REBUILD_DIR).join(format!("{name}-{id}"));
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => Ok(Self {
                name: name.to_string(),
                id: id.to_string(),
                dir,
            }),
            _ => Err(ShadowError::Missing),
        }
    }

    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the projection's store goes inside the shadow directory.
    #[must_use]
    pub fn store_path(&self) -> PathBuf {
        live_path(&self.dir, &self.name)
    }

    /// Removes the shadow directory and whatever is in it.
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `file_name`, an entry of `<data-dir>/.rebuild`, is a shadow this
/// protocol made: `<projection>-<id>`, the id being hex digits and hyphens
/// (the hyphens are the pid-and-time ids of earlier versions).
fn is_shadow_name(file_name: &str) -> bool {
    PROJECTIONS.iter().any(|p| {
        file_name
            .strip_prefix(p)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|id| {
                !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
            })
    })
}

/// Removes shadows left by crashed replays, and nothing else that may be in
/// `<data-dir>/.rebuild`. Call only while holding the data dir's replay lock.
pub fn remove_stale_shadows(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir.join(REBUILD_DIR)) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && entry.file_name().to_str().is_some_and(is_shadow_name) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
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
        COMMENT_VIEW => {
            let (p, r) = comment_view::open(path)?;
            Ok((Box::new(p), Reader::Comments(r)))
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

/// Rebuilds the projection of `shadow` from sequence 1 into it, up to
/// `target_seq`; `status` shows progress. Then [`compact`] it.
///
/// # Errors
/// When the shadow's store cannot be opened or the runner dies.
pub async fn build_shadow(
    shadow: &Shadow,
    store: &EventStore,
    target_seq: u64,
    status: Arc<Status>,
) -> anyhow::Result<(Box<dyn Projection>, Reader)> {
    let path = shadow.store_path();
    let (p, reader) = open(shadow.name(), &path, true)?;
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
    Ok((p, reader))
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

/// Puts the store of `shadow` in place of the live one, atomically: a redb
/// file is renamed over the live file; a tantivy directory is exchanged with
/// the live directory in one `renameat2(RENAME_EXCHANGE)`. Then the shadow
/// directory (holding the old index, if any) is removed: only it, the one
/// directory the protocol made. A crash at any point leaves either the old
/// or the new store live, never neither. Writers on both stores must be
/// closed for the tantivy exchange (a tantivy writer writes by path).
///
/// # Errors
/// When the rename fails (the live store is then unchanged).
pub fn install(shadow: &Shadow, data_dir: &Path) -> std::io::Result<()> {
    let name = shadow.name();
    let live = live_path(data_dir, name);
    let shadow_path = shadow.store_path();
    crate::failpoint("swap-before-rename");
    match name {
        POST_VIEW | COMMENT_VIEW => std::fs::rename(&shadow_path, &live)?,
        _ => {
            if live.exists() {
                exchange(&shadow_path, &live)?;
                crate::failpoint("swap-after-exchange");
                if crate::failing("swap-after-exchange") {
                    return Err(std::io::Error::other(
                        "fault point swap-after-exchange: the old index stays in the shadow",
                    ));
                }
            } else {
                std::fs::rename(&shadow_path, &live)?;
            }
        }
    }
    shadow.remove();
    sync_dir(data_dir);
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Atomically exchanges two paths (Linux `renameat2` with `RENAME_EXCHANGE`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_directories_the_protocol_made_are_opened_and_removed() {
        let data = tempfile::tempdir().unwrap();
        let live = data.path().join("post-view.redb");
        std::fs::write(&live, b"live").unwrap();
        let root = data.path().join(REBUILD_DIR);
        std::fs::create_dir_all(root.join("keep-me")).unwrap();
        // Named like a shadow, but a file: not the protocol's.
        std::fs::write(root.join("post-view-abc"), b"x").unwrap();
        let stale = Shadow::create(data.path(), POST_VIEW).unwrap();
        std::fs::write(stale.store_path(), b"old").unwrap();

        remove_stale_shadows(data.path());
        assert!(!stale.store_path().exists());
        assert!(root.join("keep-me").is_dir());
        assert!(root.join("post-view-abc").is_file());

        for bad in ["", "..", ".rebuild", "../../etc", &"A".repeat(32)] {
            assert_eq!(
                Shadow::handed_out(data.path(), POST_VIEW, bad),
                Err(ShadowError::Malformed),
                "{bad:?}"
            );
        }
        assert_eq!(
            Shadow::handed_out(data.path(), POST_VIEW, stale.id()),
            Err(ShadowError::Missing)
        );
        let fresh = Shadow::create(data.path(), POST_VIEW).unwrap();
        assert_eq!(
            Shadow::handed_out(data.path(), POST_VIEW, fresh.id()).as_ref(),
            Ok(&fresh)
        );
        assert_eq!(
            Shadow::handed_out(data.path(), POST_SEARCH, fresh.id()),
            Err(ShadowError::Missing),
            "an id is bound to its projection"
        );
        std::fs::write(fresh.store_path(), b"new").unwrap();
        install(&fresh, data.path()).unwrap();
        assert_eq!(std::fs::read(&live).unwrap(), b"new");
        assert!(
            root.join("keep-me").is_dir(),
            "install removes its shadow only"
        );
        assert_eq!(
            Shadow::handed_out(data.path(), POST_VIEW, fresh.id()),
            Err(ShadowError::Missing)
        );
    }
}
