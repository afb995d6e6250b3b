//! A redb file that a projection can close and open again while the process
//! runs. After an I/O error (a full disk, a failed fsync), redb refuses
//! every later transaction with `PreviousIo` until the `Database` is dropped
//! and opened again, which also repairs the file. A projection's store keeps
//! its `Database` here, readers take it for one request at a time, and the
//! projection's `recover` calls [`RedbFile::check_or_reopen`]: the service
//! gets over a full disk without a restart once space is freed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redb::Database;

/// How long a reopen waits for the reads in flight to let go of the old
/// `Database` before it gives up and lets the projection retry later.
const RELEASE_WAIT: Duration = Duration::from_secs(2);
/// Pause between two looks at whether the reads in flight are done.
const RELEASE_POLL: Duration = Duration::from_millis(1);

/// Says whether writes to the file fail now: a test fault (see
/// [`RedbFile::create_database`]).
pub type Fault = Arc<dyn Fn() -> bool + Send + Sync>;

/// Why the store cannot be used now.
#[derive(Debug, thiserror::Error)]
pub enum RedbFileError {
    /// Closed after a storage fault, and not open again yet.
    #[error("the store is being reopened after a storage fault")]
    Reopening,
    /// Reads in flight still held the old file when the wait ran out.
    #[error("the store was still in use {0:?} after a storage fault")]
    Busy(Duration),
    /// Opening the file again failed (the disk is still full, say).
    #[error("cannot reopen the store: {0}")]
    Open(#[from] redb::DatabaseError),
}

/// The file, and the `Database` on it while open.
pub struct RedbFile {
    /// Where the file is now: a rebuild's shadow is renamed over the live
    /// file while open, and a later reopen must find it there.
    path: std::sync::Mutex<PathBuf>,
    cache_bytes: usize,
    fault: Option<Fault>,
    open: RwLock<Option<Arc<Database>>>,
    reopens: AtomicU64,
}

impl std::fmt::Debug for RedbFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbFile")
            .field("path", &self.path())
            .field("reopens", &self.reopens())
            .finish_non_exhaustive()
    }
}

impl RedbFile {
    /// Opens (or creates) the database at `path` with a cache of
    /// `cache_bytes`. With a `fault`, every write and sync of the file fails
    /// with `ENOSPC` while it says so, as on a full disk.
    ///
    /// # Errors
    /// As [`redb::Builder::create`].
    pub fn create_database(
        path: &Path,
        cache_bytes: usize,
        fault: Option<&Fault>,
    ) -> Result<Database, redb::DatabaseError> {
        let mut builder = Database::builder();
        builder.set_cache_size(cache_bytes);
        match fault {
            None => builder.create(path),
            Some(fault) => {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)?;
                builder.create_with_backend(Faulty {
                    file: redb::backends::FileBackend::new(file)?,
                    fault: fault.clone(),
                })
            }
        }
    }

    /// Keeps `db`, opened on `path` by [`RedbFile::create_database`] with
    /// the same `cache_bytes` and `fault`, for reopening.
    #[must_use]
    pub fn new(path: &Path, cache_bytes: usize, fault: Option<Fault>, db: Database) -> Arc<Self> {
        Arc::new(Self {
            path: std::sync::Mutex::new(path.to_path_buf()),
            cache_bytes,
            fault,
            open: RwLock::new(Some(Arc::new(db))),
            reopens: AtomicU64::new(0),
        })
    }

    #[must_use]
    pub fn path(&self) -> PathBuf {
        self.path
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Says that the open file was renamed to `path` (an installed
    /// rebuild): a reopen opens it there.
    pub fn moved_to(&self, path: &Path) {
        *self
            .path
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = path.to_path_buf();
    }

    /// The open database, for one read or one write: hold it no longer, so
    /// that a reopen does not wait.
    ///
    /// # Errors
    /// [`RedbFileError::Reopening`] between a close and the next open.
    pub fn db(&self) -> Result<Arc<Database>, RedbFileError> {
        self.open
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(RedbFileError::Reopening)
    }

    /// Times the file was opened again.
    #[must_use]
    pub fn reopens(&self) -> u64 {
        self.reopens.load(Ordering::Relaxed)
    }

    /// Checks that the file takes a write transaction, and opens it again
    /// when it does not (redb's `PreviousIo` after an I/O error), or when a
    /// reopen is due. `Ok(true)` when it reopened. Call it only from the
    /// one writer, while it writes nothing.
    ///
    /// # Errors
    /// [`RedbFileError`] when the reopen fails; the next call tries again.
    pub fn check_or_reopen(&self) -> Result<bool, RedbFileError> {
        let healthy = match self.db() {
            Ok(db) => match db.begin_write() {
                // Dropped at once: an aborted transaction writes nothing.
                Ok(_probe) => true,
                Err(e) => {
                    tracing::warn!(path = %self.path().display(), error = %e,
                        "the store refuses writes; opening it again");
                    false
                }
            },
            Err(_) => false,
        };
        if healthy {
            return Ok(false);
        }
        self.reopen()?;
        Ok(true)
    }

    /// Closes the database (readers get [`RedbFileError::Reopening`] in the
    /// meantime), waits for the reads in flight, and opens the file again.
    ///
    /// # Errors
    /// [`RedbFileError::Busy`] when reads held on past the wait (the
    /// database stays open as it was), [`RedbFileError::Open`] when the
    /// open fails (it stays closed until the next try).
    pub fn reopen(&self) -> Result<(), RedbFileError> {
        let taken = self
            .open
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(mut db) = taken {
            let deadline = Instant::now() + RELEASE_WAIT;
            loop {
                match Arc::try_unwrap(db) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(shared) if Instant::now() >= deadline => {
                        *self
                            .open
                            .write()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(shared);
                        return Err(RedbFileError::Busy(RELEASE_WAIT));
                    }
                    Err(shared) => {
                        db = shared;
                        std::thread::sleep(RELEASE_POLL);
                    }
                }
            }
        }
        let db = Self::create_database(&self.path(), self.cache_bytes, self.fault.as_ref())?;
        *self
            .open
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(db));
        self.reopens.fetch_add(1, Ordering::Relaxed);
        tracing::info!(path = %self.path().display(), "store opened again");
        Ok(())
    }
}

/// redb's file backend, with writes and syncs failing while `fault` says so.
struct Faulty {
    file: redb::backends::FileBackend,
    fault: Fault,
}

impl std::fmt::Debug for Faulty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faulty").finish_non_exhaustive()
    }
}

impl Faulty {
    fn check(&self) -> std::io::Result<()> {
        if (self.fault)() {
            return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
        }
        Ok(())
    }
}

type Range = std::ops::Bound<u64>;

impl redb::StorageBackend for Faulty {
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.file.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check()?;
        self.file.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.check()?;
        self.file.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        self.file.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.file.close()
    }
    fn try_lock_range(&self, start: Range, end: Range) -> Result<bool, redb::BackendError> {
        self.file.try_lock_range(start, end)
    }
    fn try_lock_shared_range(&self, start: Range, end: Range) -> Result<bool, redb::BackendError> {
        self.file.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Range, end: Range) -> Result<(), redb::BackendError> {
        self.file.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Range, end: Range) -> Result<(), redb::BackendError> {
        self.file.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Range, end: Range) -> Result<(), redb::BackendError> {
        self.file.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Range, end: Range) -> Result<bool, redb::BackendError> {
        self.file.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableDatabase;
    use std::sync::atomic::AtomicBool;

    const T: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("t");

    fn put(file: &RedbFile, k: u64) -> Result<(), String> {
        let db = file.db().map_err(|e| e.to_string())?;
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.open_table(T)
            .map_err(|e| e.to_string())?
            .insert(k, k)
            .map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())
    }

    fn count(file: &RedbFile) -> u64 {
        let db = file.db().unwrap();
        let txn = db.begin_read().unwrap();
        redb::ReadableTableMetadata::len(&txn.open_table(T).unwrap()).unwrap()
    }

    /// What redb does after an I/O error, and that a reopen gets over it.
    #[test]
    fn a_full_disk_is_over_once_space_is_freed_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let full = Arc::new(AtomicBool::new(false));
        let fault: Fault = {
            let full = full.clone();
            Arc::new(move || full.load(Ordering::SeqCst))
        };
        let db = RedbFile::create_database(&path, 1 << 20, Some(&fault)).unwrap();
        let file = RedbFile::new(&path, 1 << 20, Some(fault), db);
        put(&file, 1).unwrap();
        assert!(
            !file.check_or_reopen().unwrap(),
            "a healthy file stays open"
        );

        full.store(true, Ordering::SeqCst);
        let e = put(&file, 2).unwrap_err();
        assert!(e.contains("No space left"), "{e}");
        full.store(false, Ordering::SeqCst);
        // Space is back, but redb still refuses: this is what needs the reopen.
        let e = put(&file, 3).unwrap_err();
        assert!(e.to_lowercase().contains("previous i/o error"), "{e}");

        // A read in flight may hold the old database meanwhile (the reopen
        // waits for it to let go; the other test shows it giving up).
        let held = file.db().unwrap();
        let releaser = std::thread::spawn(move || drop(held));
        assert!(
            file.check_or_reopen().unwrap(),
            "a refusing file is reopened"
        );
        releaser.join().unwrap();
        assert_eq!(file.reopens(), 1);
        put(&file, 4).unwrap();
        assert_eq!(count(&file), 2, "1 and 4: the failed writes left nothing");
    }

    #[test]
    fn a_reopen_gives_up_while_reads_hold_on_and_keeps_the_file_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let db = RedbFile::create_database(&path, 1 << 20, None).unwrap();
        let file = RedbFile::new(&path, 1 << 20, None, db);
        put(&file, 1).unwrap();
        let held = file.db().unwrap();
        assert!(matches!(file.reopen(), Err(RedbFileError::Busy(_))));
        drop(held);
        assert_eq!(count(&file), 1, "still open as it was");
        file.reopen().unwrap();
        assert_eq!(count(&file), 1);

        // Renamed while open (a rebuild installed over the live file): the
        // next reopen opens it where it is now, not an empty file at the old path.
        let moved = dir.path().join("live.redb");
        std::fs::rename(&path, &moved).unwrap();
        file.moved_to(&moved);
        file.reopen().unwrap();
        assert_eq!(count(&file), 1);
        assert!(!path.exists(), "nothing was created at the old path");
    }
}
