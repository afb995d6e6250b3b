//! `post-view`: one redb file. View rows, listing indexes, parked events and
//! the checkpoint are written in one write transaction per commit (per batch
//! when live; see [`ViewProjection`]'s `held` for far behind), so a crash
//! leaves view and checkpoint consistent: exactly-once effect.

use std::path::Path;
use std::sync::Arc;

use posts::Event;
use projection::redb_file::{Fault, RedbFile};
use projection::{Incoming, Parked, Projection, ProjectionError};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{PARKED_RECENT_MAX, POST_VIEW, decode, hex, micros};

// Keys are plain bytes compared with `memcmp`: `&str` keys and tuples of
// them were decoded, UTF-8 validated and compared field by field on every
// step of every B-tree search (a tenth of post-view's CPU in `just bench`).
/// Post id (UTF-8) → [`Row`] (postcard).
const POSTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("posts");
/// Live posts, newest first by iterating backwards: [`created_key`].
const BY_CREATED: TableDefinition<&[u8], ()> = TableDefinition::new("by_created");
/// Live posts of one author, newest first backwards: [`author_key`].
const BY_AUTHOR: TableDefinition<&[u8], ()> = TableDefinition::new("by_author");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const PARKED: TableDefinition<u64, &str> = TableDefinition::new("parked");

const META_CHECKPOINT: &str = "checkpoint";
const META_PARKED_TOTAL: &str = "parked_total";
/// The layout of the tables above. A file of another layout (or of none: the
/// first layout had `&str` and tuple keys) is only a projection: it is
/// deleted and rebuilt from the stream, as the search index is.
const META_FORMAT: &str = "format";
const FORMAT: u64 = 2;
/// Page cache for the view file. The kernel's page cache holds the rest;
/// 64 MiB put posts-query at 500 MiB peak with a 1M-event backlog (budget
/// 512), 32 MiB at 462 MiB with the same catch-up rate (`bench --full`).
const CACHE_BYTES: usize = 32 * 1024 * 1024;
/// Batches commit without fsync (`Durability::None`: visible to readers at
/// once, durable with the next durable commit); at least this often, and
/// at every flush, a commit is made durable. A crash loses at most this much
/// projection work, never consistency: the checkpoint is in the same
/// transactions, so the lost tail is re-applied from the stream.
const DURABLE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(1000);
/// Least time between two durable flushes when following live: a trickle of
/// events shares an fsync. Visibility does not wait for it.
const FLUSH_GAP_MIN: std::time::Duration = std::time::Duration::from_millis(100);

/// One row of the view, as stored (postcard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub title: String,
    pub content: String,
    pub author_name: String,
    pub created_at_us: i64,
    pub updated_at_us: i64,
    pub version: u64,
    pub deleted: bool,
}

impl Row {
    /// What the row takes as JSON, with its id and field names: the text
    /// with its escapes (a control character is 6 bytes) and ~250 bytes for
    /// the rest.
    #[must_use]
    pub fn json_bytes(&self) -> usize {
        const FIXED_BYTES: usize = 250;
        FIXED_BYTES
            + json_text_bytes(&self.title)
            + json_text_bytes(&self.content)
            + json_text_bytes(&self.author_name)
    }
}

/// Bytes of `s` as a JSON string's contents, escapes included.
fn json_text_bytes(s: &str) -> usize {
    s.len()
        + s.bytes()
            .map(|b| match b {
                b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0C => 1,
                0..0x20 => 5,
                _ => 0,
            })
            .sum::<usize>()
}

/// A page of listing results.
#[derive(Debug, Clone)]
pub struct Page {
    pub rows: Vec<(String, Row)>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("view store: {0}")]
    Store(String),
    #[error("cursor is malformed")]
    BadCursor,
}

fn store_err(e: impl std::fmt::Display) -> ViewError {
    ViewError::Store(e.to_string())
}

/// The test fault `POSTS_FAILPOINT=view-io@/a/file`: once the view is open,
/// writes to its file fail with `ENOSPC` while that file exists, as when
/// the disk fills up under a running service. Debug builds only. The flag
/// turns it on once `open` is done.
fn io_fault() -> Option<(Fault, Arc<std::sync::atomic::AtomicBool>)> {
    const POINT: &str = "view-io";
    let armed = cfg!(debug_assertions)
        && std::env::var("POSTS_FAILPOINT").is_ok_and(|v| v.starts_with(&format!("{POINT}@")));
    armed.then(|| {
        let opened = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let on = opened.clone();
        let fault: Fault = Arc::new(move || {
            on.load(std::sync::atomic::Ordering::Relaxed) && crate::failing(POINT)
        });
        (fault, opened)
    })
}

/// Opens (or creates) the view file; returns the writer and a reader sharing it.
///
/// # Errors
/// When the file cannot be opened (locked by another process, corrupt).
pub fn open(path: &Path) -> anyhow::Result<(ViewProjection, ViewReader)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let (fault, opened) = io_fault().unzip();
    let create = || RedbFile::create_database(path, CACHE_BYTES, fault.as_ref());
    let mut db = create()?;
    if let Some(found) = stored_format(&db)?
        && found != FORMAT
    {
        tracing::warn!(
            path = %path.display(),
            found,
            expected = FORMAT,
            "view store has another layout; rebuilding it from the stream"
        );
        drop(db);
        std::fs::remove_file(path)?;
        db = create()?;
    }
    let txn = db.begin_write()?;
    {
        txn.open_table(POSTS)?;
        txn.open_table(BY_CREATED)?;
        txn.open_table(BY_AUTHOR)?;
        txn.open_table(META)?.insert(META_FORMAT, FORMAT)?;
        txn.open_table(PARKED)?;
    }
    txn.commit()?;
    if let Some(opened) = opened {
        opened.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let reader = ViewReader {
        file: RedbFile::new(path, CACHE_BYTES, fault, db),
    };
    Ok((writer_for(&reader)?, reader))
}

/// The layout of an existing store: `None` for a new, empty file; 1 for a
/// store of the first layout, which wrote no format.
fn stored_format(db: &Database) -> anyhow::Result<Option<u64>> {
    let txn = db.begin_read()?;
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(Some(meta.get(META_FORMAT)?.map_or(1, |g| g.value())))
}

/// `created_at_us` as 8 bytes that sort as the signed number does.
fn time_bytes(at: i64) -> [u8; 8] {
    (at.cast_unsigned() ^ (1 << 63)).to_be_bytes()
}

fn time_from(bytes: &[u8]) -> Option<i64> {
    let b: [u8; 8] = bytes.try_into().ok()?;
    Some((u64::from_be_bytes(b) ^ (1 << 63)).cast_signed())
}

/// A [`BY_CREATED`] key: the time, then the id; sorts as (time, id).
fn created_key(at: i64, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + id.len());
    k.extend_from_slice(&time_bytes(at));
    k.extend_from_slice(id.as_bytes());
    k
}

/// The (time, id) of a [`created_key`].
fn split_created(key: &[u8]) -> Option<(i64, &str)> {
    let (at, id) = key.split_at_checked(8)?;
    Some((time_from(at)?, std::str::from_utf8(id).ok()?))
}

/// The start of every [`BY_AUTHOR`] key of one author: the name's length
/// (4 bytes) and the name, so no author's keys start with another's.
fn author_prefix(author: &str) -> Vec<u8> {
    let len = u32::try_from(author.len()).unwrap_or(u32::MAX);
    let mut k = Vec::with_capacity(4 + author.len() + 8 + 36);
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(author.as_bytes());
    k
}

/// A [`BY_AUTHOR`] key: [`author_prefix`], then as [`created_key`].
fn author_key(author: &str, at: i64, id: &str) -> Vec<u8> {
    let mut k = author_prefix(author);
    k.extend_from_slice(&time_bytes(at));
    k.extend_from_slice(id.as_bytes());
    k
}

/// The author of an [`author_key`].
fn split_author(key: &[u8]) -> Option<(&str, &[u8])> {
    let (len, rest) = key.split_at_checked(4)?;
    let len = usize::try_from(u32::from_be_bytes(len.try_into().ok()?)).ok()?;
    let (author, rest) = rest.split_at_checked(len)?;
    Some((std::str::from_utf8(author).ok()?, rest))
}

fn bad_key() -> ViewError {
    ViewError::Store("a listing key is malformed".into())
}

/// A writer on the store a reader already has open (redb allows one open
/// handle per file and process).
///
/// # Errors
/// When the store cannot be read.
pub fn writer_for(reader: &ViewReader) -> anyhow::Result<ViewProjection> {
    let checkpoint = reader.checkpoint()?;
    Ok(ViewProjection {
        file: reader.file.clone(),
        checkpoint,
        applied: checkpoint,
        durable: checkpoint,
        durable_at: std::time::Instant::now(),
        parked_total: reader.parked_total()?,
        held: foldhash::HashMap::default(),
        held_bytes: 0,
        held_bytes_max: HELD_BYTES_MAX,
        held_parked: Vec::new(),
        held_since: None,
        backlog: crate::Backlog::default(),
    })
}

/// The writer side: applies batches.
pub struct ViewProjection {
    file: Arc<RedbFile>,
    /// Last sequence committed (what readers see; what this process resumes
    /// from: a failed transaction leaves earlier commits in place).
    checkpoint: u64,
    /// Last sequence applied: past `checkpoint` while changes are held.
    applied: u64,
    /// Last sequence committed durably (what a restart resumes from).
    durable: u64,
    durable_at: std::time::Instant,
    /// Events parked so far, those of held batches included.
    parked_total: u64,
    /// Posts changed since the last commit, as of their last applied event.
    /// Every batch is applied here first, reading posts from the store once;
    /// while live, its commit writes them at once. While far behind
    /// ([`crate::FAR_BEHIND_EVENTS`] still to come), commits come every
    /// [`crate::CATCH_UP_COMMIT_INTERVAL`] or at [`HELD_BYTES_MAX`]: a
    /// post's later events change its held row, and the commit writes each
    /// post once, in key order. In `just bench`'s stream (every post
    /// created, then edited) this skips a B-tree read and write for every
    /// edit: they were a third of post-view's time in a catch-up.
    /// post-search holds its documents the same way.
    held: foldhash::HashMap<String, Box<HeldRow>>,
    held_bytes: usize,
    /// [`HELD_BYTES_MAX`]; smaller in tests.
    held_bytes_max: usize,
    /// Parked since the last commit, recorded with it.
    held_parked: Vec<Parked>,
    /// When the first change since the last commit was applied.
    held_since: Option<std::time::Instant>,
    backlog: crate::Backlog,
}

/// What the held posts may take (their text plus a fixed overhead each)
/// before a commit writes them: with post-search's 128 MiB, under half of
/// posts-query's 512 MB memory target.
const HELD_BYTES_MAX: usize = 96 * 1024 * 1024;
/// Per held post, besides its text: the map entry, the key, the boxed row.
const HELD_ENTRY_BYTES: usize = 256;

/// A post changed since the last commit.
struct HeldRow {
    row: Row,
    /// The post's listing keys in the store: the author it is listed under
    /// there, if it is stored and live (its creation time never changes).
    listed_as: Option<String>,
}

impl HeldRow {
    fn bytes(&self, id: &str) -> usize {
        let r = &self.row;
        HELD_ENTRY_BYTES
            + id.len()
            + r.title.len()
            + r.content.len()
            + r.author_name.len()
            + self.listed_as.as_ref().map_or(0, String::len)
    }
}

/// The read side, cheap to clone.
#[derive(Clone)]
pub struct ViewReader {
    file: Arc<RedbFile>,
}

/// Encodes `row` into `buf`, reusing its allocation.
fn encode_row(row: &Row, mut buf: Vec<u8>) -> Result<Vec<u8>, ProjectionError> {
    buf.clear();
    postcard::to_extend(row, buf).map_err(ProjectionError::new)
}

fn decode_row(bytes: &[u8]) -> Result<Row, ViewError> {
    postcard::from_bytes(bytes).map_err(store_err)
}

impl ViewProjection {
    /// Applies one event to the held posts, reading the post from the store
    /// (`posts`, as of the last commit) if it is not held yet.
    fn apply_one(
        &mut self,
        posts: &redb::ReadOnlyTable<&[u8], &[u8]>,
        incoming: &Incoming,
    ) -> Result<Result<(), String>, ProjectionError> {
        let (env, event) = match decode(incoming) {
            Ok(v) => v,
            Err(reason) => return Ok(Err(reason)),
        };
        let id = env.aggregate_id.as_str();
        let at = micros(env.occurred_at);
        let (key, current, from_held) = match self.held.remove_entry(id) {
            Some((key, h)) => {
                self.held_bytes -= h.bytes(&key);
                (key, Some(h), true)
            }
            None => {
                let stored = match posts.get(id.as_bytes()).map_err(ProjectionError::new)? {
                    Some(g) => Some(decode_row(g.value()).map_err(ProjectionError::new)?),
                    None => None,
                };
                let current = stored.map(|row| {
                    Box::new(HeldRow {
                        listed_as: (!row.deleted).then(|| row.author_name.clone()),
                        row,
                    })
                });
                (id.to_string(), current, false)
            }
        };
        let (next, outcome) = match (current, event) {
            (
                None,
                Event::Created {
                    title,
                    content,
                    author_name,
                },
            ) => {
                let row = Row {
                    title,
                    content,
                    author_name,
                    created_at_us: at,
                    updated_at_us: at,
                    version: 1,
                    deleted: false,
                };
                (
                    Some(Box::new(HeldRow {
                        row,
                        listed_as: None,
                    })),
                    Ok(()),
                )
            }
            (
                Some(mut h),
                Event::Updated {
                    title,
                    content,
                    author_name,
                },
            ) if !h.row.deleted => {
                let row = &mut h.row;
                if let Some(t) = title {
                    row.title = t;
                }
                if let Some(c) = content {
                    row.content = c;
                }
                if let Some(a) = author_name {
                    row.author_name = a;
                }
                row.version += 1;
                row.updated_at_us = at;
                (Some(h), Ok(()))
            }
            (Some(mut h), Event::Deleted) if !h.row.deleted => {
                h.row.deleted = true;
                h.row.version += 1;
                h.row.updated_at_us = at;
                (Some(h), Ok(()))
            }
            (state, event) => {
                let reason = crate::cannot_follow(&event, state.as_ref().map(|h| h.row.deleted));
                // Refused: a held post stays as it was; a stored one is
                // not held, since nothing changed.
                (state.filter(|_| from_held), Err(reason))
            }
        };
        if let Some(h) = next {
            self.held_bytes += h.bytes(&key);
            self.held.insert(key, h);
        }
        Ok(outcome)
    }

    /// Writes the held posts, the parked events and the checkpoint in one
    /// transaction; durable when `durable` or at least every
    /// [`DURABLE_INTERVAL`].
    fn commit(&mut self, durable: bool) -> Result<(), ProjectionError> {
        if self.applied == self.checkpoint {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let posts_held = self.held.len();
        let db = self.file.db().map_err(ProjectionError::new)?;
        let mut txn = db.begin_write().map_err(ProjectionError::new)?;
        let durable = durable || self.durable_at.elapsed() >= DURABLE_INTERVAL;
        if !durable {
            txn.set_durability(redb::Durability::None)
                .map_err(ProjectionError::new)?;
        }
        {
            let mut posts = txn.open_table(POSTS).map_err(ProjectionError::new)?;
            let mut by_created = txn.open_table(BY_CREATED).map_err(ProjectionError::new)?;
            let mut by_author = txn.open_table(BY_AUTHOR).map_err(ProjectionError::new)?;
            let mut parked_table = txn.open_table(PARKED).map_err(ProjectionError::new)?;
            let mut meta = txn.open_table(META).map_err(ProjectionError::new)?;
            // In key order, each table in turn: B-tree inserts then walk
            // the same few pages.
            let mut held: Vec<_> = self.held.iter().collect();
            held.sort_unstable_by(|a, b| a.0.cmp(b.0));
            let mut created_out = Vec::new();
            let mut created_in = Vec::new();
            let mut author_out = Vec::new();
            let mut author_in = Vec::new();
            let mut encoded = Vec::with_capacity(1024);
            for (id, h) in held {
                let row = &h.row;
                encoded = encode_row(row, encoded)?;
                posts
                    .insert(id.as_bytes(), encoded.as_slice())
                    .map_err(ProjectionError::new)?;
                // Listed under `before` in the store, `now` after this commit.
                let before = h.listed_as.as_deref();
                let now = (!row.deleted).then_some(row.author_name.as_str());
                if before != now {
                    let at = row.created_at_us;
                    match (before, now) {
                        (None, Some(_)) => created_in.push(created_key(at, id)),
                        (Some(_), None) => created_out.push(created_key(at, id)),
                        _ => {}
                    }
                    author_out.extend(before.map(|a| author_key(a, at, id)));
                    author_in.extend(now.map(|a| author_key(a, at, id)));
                }
            }
            for (table, mut out, mut into) in [
                (&mut by_created, created_out, created_in),
                (&mut by_author, author_out, author_in),
            ] {
                out.sort_unstable();
                into.sort_unstable();
                for k in out {
                    table.remove(k.as_slice()).map_err(ProjectionError::new)?;
                }
                for k in into {
                    table
                        .insert(k.as_slice(), ())
                        .map_err(ProjectionError::new)?;
                }
            }
            for p in &self.held_parked {
                parked_table
                    .insert(p.seq, p.reason.as_str())
                    .map_err(ProjectionError::new)?;
            }
            meta.insert(META_CHECKPOINT, self.applied)
                .map_err(ProjectionError::new)?;
            meta.insert(META_PARKED_TOTAL, self.parked_total)
                .map_err(ProjectionError::new)?;
        }
        let write_secs = started.elapsed().as_secs_f64();
        txn.commit().map_err(ProjectionError::new)?;
        crate::failpoint("view-after-commit");
        if posts_held >= 1000 {
            tracing::debug!(
                posts = posts_held,
                write_secs,
                durable,
                secs = started.elapsed().as_secs_f64(),
                "wrote held posts to the view"
            );
        }
        self.checkpoint = self.applied;
        if durable {
            self.durable = self.checkpoint;
            self.durable_at = std::time::Instant::now();
        }
        self.drop_held();
        Ok(())
    }

    fn drop_held(&mut self) {
        self.held.clear();
        self.held_bytes = 0;
        self.held_parked.clear();
        self.held_since = None;
    }
}

impl Projection for ViewProjection {
    fn name(&self) -> &str {
        POST_VIEW
    }

    fn checkpoint(&self) -> u64 {
        self.checkpoint
    }

    fn visible(&self) -> u64 {
        self.checkpoint
    }

    fn apply_batch(&mut self, batch: &[&Incoming]) -> Result<Vec<Parked>, ProjectionError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        if crate::failing("view-apply") {
            return Err(ProjectionError::new(
                "failpoint view-apply: simulated storage fault",
            ));
        }
        let mut parked = Vec::new();
        {
            let db = self.file.db().map_err(ProjectionError::new)?;
            let txn = db.begin_read().map_err(ProjectionError::new)?;
            let posts = txn.open_table(POSTS).map_err(ProjectionError::new)?;
            for incoming in batch {
                // The runner hands events in order, above what was applied.
                assert!(
                    incoming.seq > self.applied,
                    "event {} at or below applied {}",
                    incoming.seq,
                    self.applied
                );
                if let Err(reason) = self.apply_one(&posts, incoming)? {
                    parked.push(Parked {
                        seq: incoming.seq,
                        reason,
                    });
                }
                self.applied = incoming.seq;
            }
        }
        self.parked_total += parked.len() as u64;
        self.held_parked.extend(parked.iter().cloned());
        let since = *self.held_since.get_or_insert_with(std::time::Instant::now);
        if !self.backlog.far_behind()
            || self.held_bytes >= self.held_bytes_max
            || since.elapsed() >= crate::CATCH_UP_COMMIT_INTERVAL
        {
            self.commit(false)?;
        }
        Ok(parked)
    }

    fn set_backlog(&mut self, events: u64) {
        self.backlog.update(events);
    }

    fn flush(&mut self) -> Result<(), ProjectionError> {
        if self.applied != self.checkpoint {
            return self.commit(true);
        }
        if self.durable == self.checkpoint {
            return Ok(());
        }
        // An empty durable commit makes the non-durable ones before it durable.
        let db = self.file.db().map_err(ProjectionError::new)?;
        let txn = db.begin_write().map_err(ProjectionError::new)?;
        txn.commit().map_err(ProjectionError::new)?;
        self.durable = self.checkpoint;
        self.durable_at = std::time::Instant::now();
        Ok(())
    }

    fn flush_due(&self) -> bool {
        self.durable_at.elapsed() >= FLUSH_GAP_MIN
    }

    fn recover(&mut self) -> Result<(), ProjectionError> {
        // An aborted write transaction left nothing behind, and what was
        // held is dropped: re-read the truth. After an I/O error redb
        // refuses every transaction until the file is opened again.
        self.file.check_or_reopen().map_err(ProjectionError::new)?;
        let reader = ViewReader {
            file: self.file.clone(),
        };
        self.drop_held();
        self.checkpoint = reader.checkpoint().map_err(ProjectionError::new)?;
        self.applied = self.checkpoint;
        self.parked_total = reader.parked_total().map_err(ProjectionError::new)?;
        Ok(())
    }

    fn parked_total(&self) -> u64 {
        self.parked_total
    }

    fn parked_recent(&self) -> Vec<Parked> {
        ViewReader {
            file: self.file.clone(),
        }
        .parked_recent()
        .unwrap_or_default()
    }
}

fn encode_cursor(created_at_us: i64, id: &str) -> String {
    hex(format!("{created_at_us}/{id}").as_bytes())
}

fn decode_cursor(cursor: &str) -> Result<(i64, String), ViewError> {
    if !cursor.len().is_multiple_of(2) || cursor.len() > 256 {
        return Err(ViewError::BadCursor);
    }
    let bytes: Vec<u8> = (0..cursor.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(cursor.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<_, _>>()
        .map_err(|_| ViewError::BadCursor)?;
    let text = String::from_utf8(bytes).map_err(|_| ViewError::BadCursor)?;
    let (at, id) = text.split_once('/').ok_or(ViewError::BadCursor)?;
    Ok((
        at.parse().map_err(|_| ViewError::BadCursor)?,
        id.to_string(),
    ))
}

impl ViewReader {
    /// The file was renamed to `path` while open (an installed rebuild).
    pub fn moved_to(&self, path: &Path) {
        self.file.moved_to(path);
    }
    /// Last applied stream sequence.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn checkpoint(&self) -> Result<u64, ViewError> {
        self.meta(META_CHECKPOINT)
    }

    /// Total events ever parked.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn parked_total(&self) -> Result<u64, ViewError> {
        self.meta(META_PARKED_TOTAL)
    }

    fn meta(&self, key: &str) -> Result<u64, ViewError> {
        let db = self.file.db().map_err(store_err)?;
        let txn = db.begin_read().map_err(store_err)?;
        let t = txn.open_table(META).map_err(store_err)?;
        Ok(t.get(key).map_err(store_err)?.map_or(0, |g| g.value()))
    }

    /// The most recent parked events, newest first.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn parked_recent(&self) -> Result<Vec<Parked>, ViewError> {
        let db = self.file.db().map_err(store_err)?;
        let txn = db.begin_read().map_err(store_err)?;
        let t = txn.open_table(PARKED).map_err(store_err)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(store_err)?.rev().take(PARKED_RECENT_MAX) {
            let (k, v) = entry.map_err(store_err)?;
            out.push(Parked {
                seq: k.value(),
                reason: v.value().to_string(),
            });
        }
        Ok(out)
    }

    /// One post, deleted or not.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn get(&self, id: &str) -> Result<Option<Row>, ViewError> {
        let db = self.file.db().map_err(store_err)?;
        let txn = db.begin_read().map_err(store_err)?;
        let t = txn.open_table(POSTS).map_err(store_err)?;
        t.get(id.as_bytes())
            .map_err(store_err)?
            .map(|g| decode_row(g.value()))
            .transpose()
    }

    /// Live posts newest first, optionally of one author, after `cursor`.
    ///
    /// # Errors
    /// [`ViewError::BadCursor`] for a cursor this reader did not make.
    pub fn list(
        &self,
        author: Option<&str>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page, ViewError> {
        self.list_within(author, limit, cursor, usize::MAX)
    }

    /// [`ViewReader::list`], stopping before the rows' JSON passes
    /// `json_bytes_max` (at least one row; see [`Row::json_bytes`]):
    /// `next_cursor` then carries on from the last row given.
    ///
    /// # Errors
    /// As for [`ViewReader::list`].
    pub fn list_within(
        &self,
        author: Option<&str>,
        limit: usize,
        cursor: Option<&str>,
        json_bytes_max: usize,
    ) -> Result<Page, ViewError> {
        let after = cursor.map(decode_cursor).transpose()?;
        let db = self.file.db().map_err(store_err)?;
        let txn = db.begin_read().map_err(store_err)?;
        let posts = txn.open_table(POSTS).map_err(store_err)?;
        let mut ids: Vec<(i64, String)> = Vec::with_capacity(limit + 1);
        // Both listings are (time, id) keys, an author's behind its prefix.
        let (table, prefix) = match author {
            Some(a) => (BY_AUTHOR, author_prefix(a)),
            None => (BY_CREATED, Vec::new()),
        };
        let t = txn.open_table(table).map_err(store_err)?;
        let end = match &after {
            Some((at, id)) => [prefix.as_slice(), &time_bytes(*at), id.as_bytes()].concat(),
            // Above every key of the prefix: a key's time is at most eight
            // 0xFF bytes, and 0xFF never occurs in UTF-8 (the id).
            None => [prefix.as_slice(), &[0xFF; 9]].concat(),
        };
        let iter = t
            .range(prefix.as_slice()..end.as_slice())
            .map_err(store_err)?;
        for entry in iter.rev().take(limit + 1) {
            let k = entry.map_err(store_err)?.0;
            let rest = k.value().get(prefix.len()..).ok_or_else(bad_key)?;
            let (at, id) = split_created(rest).ok_or_else(bad_key)?;
            ids.push((at, id.to_string()));
        }
        let mut more = ids.len() > limit;
        ids.truncate(limit);
        let mut rows = Vec::with_capacity(ids.len());
        let mut last = None;
        let mut bytes = 0usize;
        for (at, id) in ids {
            if let Some(g) = posts.get(id.as_bytes()).map_err(store_err)? {
                let row = decode_row(g.value())?;
                let size = row.json_bytes();
                if !rows.is_empty() && bytes.saturating_add(size) > json_bytes_max {
                    more = true;
                    break;
                }
                bytes += size;
                rows.push((id.clone(), row));
            }
            last = Some((at, id));
        }
        let next_cursor = more
            .then(|| last.map(|(at, id)| encode_cursor(at, &id)))
            .flatten();
        Ok(Page { rows, next_cursor })
    }

    /// Number of posts (live and deleted) in the view.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn count(&self) -> Result<u64, ViewError> {
        let db = self.file.db().map_err(store_err)?;
        let txn = db.begin_read().map_err(store_err)?;
        let t = txn.open_table(POSTS).map_err(store_err)?;
        t.len().map_err(store_err)
    }

    /// Live posts by author name, for cross-checks against the search index.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn live_by_author(&self) -> Result<std::collections::BTreeMap<String, u64>, ViewError> {
        let db = self.file.db().map_err(store_err)?;
        let txn = db.begin_read().map_err(store_err)?;
        let t = txn.open_table(BY_AUTHOR).map_err(store_err)?;
        let mut out = std::collections::BTreeMap::new();
        for entry in t.iter().map_err(store_err)? {
            let k = entry.map_err(store_err)?.0;
            let (author, _) = split_author(k.value()).ok_or_else(bad_key)?;
            *out.entry(author.to_string()).or_insert(0) += 1;
        }
        Ok(out)
    }

    /// SHA-256 over every row in post id order, the parked events and the
    /// checkpoint: equal digests mean equal views.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn digest(&self) -> Result<String, ViewError> {
        let db = self.file.db().map_err(store_err)?;
        let txn = db.begin_read().map_err(store_err)?;
        let mut h = Sha256::new();
        let posts = txn.open_table(POSTS).map_err(store_err)?;
        for entry in posts.iter().map_err(store_err)? {
            let (k, v) = entry.map_err(store_err)?;
            h.update(k.value());
            h.update([0]);
            h.update(v.value());
        }
        let parked = txn.open_table(PARKED).map_err(store_err)?;
        for entry in parked.iter().map_err(store_err)? {
            let (k, v) = entry.map_err(store_err)?;
            h.update(k.value().to_le_bytes());
            h.update(v.value().as_bytes());
        }
        let meta = txn.open_table(META).map_err(store_err)?;
        h.update(
            meta.get(META_CHECKPOINT)
                .map_err(store_err)?
                .map_or(0, |g| g.value())
                .to_le_bytes(),
        );
        Ok(hex(&h.finalize()))
    }
}

#[cfg(test)]
mod tests;
