//! `post-view`: one redb file. View rows, listing indexes, parked events and
//! the checkpoint are written in one write transaction per batch, so a crash
//! leaves view and checkpoint consistent: exactly-once effect.

use std::path::Path;
use std::sync::Arc;

use posts::Event;
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

/// Opens (or creates) the view file; returns the writer and a reader sharing it.
///
/// # Errors
/// When the file cannot be opened (locked by another process, corrupt).
pub fn open(path: &Path) -> anyhow::Result<(ViewProjection, ViewReader)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let create = || Database::builder().set_cache_size(CACHE_BYTES).create(path);
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
    let reader = ViewReader { db: Arc::new(db) };
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
        db: reader.db.clone(),
        checkpoint,
        durable: checkpoint,
        durable_at: std::time::Instant::now(),
        parked_total: reader.parked_total()?,
    })
}

/// The writer side: applies batches.
pub struct ViewProjection {
    db: Arc<Database>,
    /// Last sequence committed (what readers see; what this process resumes
    /// from: a failed transaction leaves earlier commits in place).
    checkpoint: u64,
    /// Last sequence committed durably (what a restart resumes from).
    durable: u64,
    durable_at: std::time::Instant,
    parked_total: u64,
}

/// The read side, cheap to clone.
#[derive(Clone)]
pub struct ViewReader {
    db: Arc<Database>,
}

fn encode_row(row: &Row) -> Vec<u8> {
    postcard::to_stdvec(row).unwrap_or_default()
}

fn decode_row(bytes: &[u8]) -> Result<Row, ViewError> {
    postcard::from_bytes(bytes).map_err(store_err)
}

impl ViewProjection {
    fn apply_one(
        posts: &mut redb::Table<&[u8], &[u8]>,
        by_created: &mut redb::Table<&[u8], ()>,
        by_author: &mut redb::Table<&[u8], ()>,
        incoming: &Incoming,
    ) -> Result<Result<(), String>, ProjectionError> {
        let (env, event) = match decode(incoming) {
            Ok(v) => v,
            Err(reason) => return Ok(Err(reason)),
        };
        let id = env.aggregate_id.as_str();
        let key = id.as_bytes();
        let at = micros(env.occurred_at);
        let name = event.name();
        let cannot_follow =
            |state: &str| Ok(Err(format!("{name} cannot follow a post that is {state}")));
        if let Event::Created {
            title,
            content,
            author_name,
        } = event
        {
            let row = Row {
                title,
                content,
                author_name,
                created_at_us: at,
                updated_at_us: at,
                version: 1,
                deleted: false,
            };
            // Written without a lookup first: creates are half the stream,
            // and a post that already exists is corrupt history, put back.
            let earlier = posts
                .insert(key, encode_row(&row).as_slice())
                .map_err(ProjectionError::new)?
                .map(|g| g.value().to_vec());
            if let Some(earlier) = earlier {
                posts
                    .insert(key, earlier.as_slice())
                    .map_err(ProjectionError::new)?;
                let deleted = decode_row(&earlier).map_err(ProjectionError::new)?.deleted;
                return cannot_follow(if deleted { "deleted" } else { "live" });
            }
            by_created
                .insert(created_key(at, id).as_slice(), ())
                .map_err(ProjectionError::new)?;
            by_author
                .insert(author_key(&row.author_name, at, id).as_slice(), ())
                .map_err(ProjectionError::new)?;
            return Ok(Ok(()));
        }
        let existing = match posts.get(key).map_err(ProjectionError::new)? {
            Some(g) => Some(decode_row(g.value()).map_err(ProjectionError::new)?),
            None => None,
        };
        let row = match (existing, event) {
            (
                Some(mut row),
                Event::Updated {
                    title,
                    content,
                    author_name,
                },
            ) if !row.deleted => {
                if let Some(t) = title {
                    row.title = t;
                }
                if let Some(c) = content {
                    row.content = c;
                }
                if let Some(a) = author_name
                    && a != row.author_name
                {
                    by_author
                        .remove(author_key(&row.author_name, row.created_at_us, id).as_slice())
                        .map_err(ProjectionError::new)?;
                    by_author
                        .insert(author_key(&a, row.created_at_us, id).as_slice(), ())
                        .map_err(ProjectionError::new)?;
                    row.author_name = a;
                }
                row.version += 1;
                row.updated_at_us = at;
                row
            }
            (Some(mut row), Event::Deleted) if !row.deleted => {
                by_created
                    .remove(created_key(row.created_at_us, id).as_slice())
                    .map_err(ProjectionError::new)?;
                by_author
                    .remove(author_key(&row.author_name, row.created_at_us, id).as_slice())
                    .map_err(ProjectionError::new)?;
                row.deleted = true;
                row.version += 1;
                row.updated_at_us = at;
                row
            }
            (state, _) => {
                return cannot_follow(match state {
                    None => "absent",
                    Some(r) if r.deleted => "deleted",
                    Some(_) => "live",
                });
            }
        };
        posts
            .insert(key, encode_row(&row).as_slice())
            .map_err(ProjectionError::new)?;
        Ok(Ok(()))
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
        let Some(last) = batch.last() else {
            return Ok(Vec::new());
        };
        if crate::failing("view-apply") {
            return Err(ProjectionError::new(
                "failpoint view-apply: simulated storage fault",
            ));
        }
        let mut parked = Vec::new();
        let mut txn = self.db.begin_write().map_err(ProjectionError::new)?;
        let durable = self.durable_at.elapsed() >= DURABLE_INTERVAL;
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
            for incoming in batch {
                // The runner hands events in order, above the checkpoint.
                assert!(
                    incoming.seq > self.checkpoint,
                    "event {} at or below checkpoint {}",
                    incoming.seq,
                    self.checkpoint
                );
                if let Err(reason) =
                    Self::apply_one(&mut posts, &mut by_created, &mut by_author, incoming)?
                {
                    parked_table
                        .insert(incoming.seq, reason.as_str())
                        .map_err(ProjectionError::new)?;
                    parked.push(Parked {
                        seq: incoming.seq,
                        reason,
                    });
                }
            }
            let parked_total = self.parked_total + parked.len() as u64;
            meta.insert(META_CHECKPOINT, last.seq)
                .map_err(ProjectionError::new)?;
            meta.insert(META_PARKED_TOTAL, parked_total)
                .map_err(ProjectionError::new)?;
        }
        txn.commit().map_err(ProjectionError::new)?;
        crate::failpoint("view-after-commit");
        self.checkpoint = last.seq;
        if durable {
            self.durable = last.seq;
            self.durable_at = std::time::Instant::now();
        }
        self.parked_total += parked.len() as u64;
        Ok(parked)
    }

    fn flush(&mut self) -> Result<(), ProjectionError> {
        if self.durable == self.checkpoint {
            return Ok(());
        }
        // An empty durable commit makes the non-durable ones before it durable.
        let txn = self.db.begin_write().map_err(ProjectionError::new)?;
        txn.commit().map_err(ProjectionError::new)?;
        self.durable = self.checkpoint;
        self.durable_at = std::time::Instant::now();
        Ok(())
    }

    fn flush_due(&self) -> bool {
        self.durable_at.elapsed() >= FLUSH_GAP_MIN
    }

    fn recover(&mut self) -> Result<(), ProjectionError> {
        // An aborted write transaction left nothing behind: re-read the truth.
        let reader = ViewReader {
            db: self.db.clone(),
        };
        self.checkpoint = reader.checkpoint().map_err(ProjectionError::new)?;
        self.parked_total = reader.parked_total().map_err(ProjectionError::new)?;
        Ok(())
    }

    fn parked_total(&self) -> u64 {
        self.parked_total
    }

    fn parked_recent(&self) -> Vec<Parked> {
        ViewReader {
            db: self.db.clone(),
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
        let txn = self.db.begin_read().map_err(store_err)?;
        let t = txn.open_table(META).map_err(store_err)?;
        Ok(t.get(key).map_err(store_err)?.map_or(0, |g| g.value()))
    }

    /// The most recent parked events, newest first.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn parked_recent(&self) -> Result<Vec<Parked>, ViewError> {
        let txn = self.db.begin_read().map_err(store_err)?;
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
        let txn = self.db.begin_read().map_err(store_err)?;
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
        let after = cursor.map(decode_cursor).transpose()?;
        let txn = self.db.begin_read().map_err(store_err)?;
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
        let next_cursor = if ids.len() > limit {
            ids.truncate(limit);
            ids.last().map(|(at, id)| encode_cursor(*at, id))
        } else {
            None
        };
        let mut rows = Vec::with_capacity(ids.len());
        for (_, id) in ids {
            if let Some(g) = posts.get(id.as_bytes()).map_err(store_err)? {
                rows.push((id, decode_row(g.value())?));
            }
        }
        Ok(Page { rows, next_cursor })
    }

    /// Number of posts (live and deleted) in the view.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn count(&self) -> Result<u64, ViewError> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let t = txn.open_table(POSTS).map_err(store_err)?;
        t.len().map_err(store_err)
    }

    /// Live posts by author name, for cross-checks against the search index.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn live_by_author(&self) -> Result<std::collections::BTreeMap<String, u64>, ViewError> {
        let txn = self.db.begin_read().map_err(store_err)?;
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
        let txn = self.db.begin_read().map_err(store_err)?;
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
mod tests {
    use super::*;
    use crate::incoming_at;

    fn created(title: &str, author: &str) -> Event {
        Event::Created {
            title: title.to_string(),
            content: format!("about {title}"),
            author_name: author.to_string(),
        }
    }

    fn apply(p: &mut ViewProjection, events: &[Incoming]) -> Vec<Parked> {
        p.apply_batch(&events.iter().collect::<Vec<_>>()).unwrap()
    }

    /// Every page of a listing, following the cursors.
    fn list_all(r: &ViewReader, author: Option<&str>, limit: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut cursor = None;
        loop {
            let page = r.list(author, limit, cursor.as_deref()).unwrap();
            out.extend(page.rows.into_iter().map(|(id, _)| id));
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return out,
            }
        }
    }

    #[test]
    fn time_keys_sort_as_the_numbers_do() {
        let times = [
            i64::MIN,
            -86_400_000_000,
            -1,
            0,
            1,
            1_700_000_000_000_000,
            i64::MAX,
        ];
        for pair in times.windows(2) {
            assert!(time_bytes(pair[0]) < time_bytes(pair[1]), "{pair:?}");
        }
        for t in times {
            assert_eq!(split_created(&created_key(t, "id")), Some((t, "id")));
        }
    }

    /// Listings are newest first (ties by id, descending), page through
    /// cursors without gaps or repeats, and an author's listing holds only
    /// that author even when another's name extends it ("ann", "anna").
    #[test]
    fn listings_page_newest_first_and_keep_authors_apart() {
        let dir = tempfile::tempdir().unwrap();
        let (mut p, r) = open(&dir.path().join("v.redb")).unwrap();
        let posts = [
            ("a", -100, "ann"),
            ("b", 0, "anna"),
            ("c", 0, "ann"),
            ("d", 5, "anna"),
            ("e", 7, "ann"),
            ("f", 9, "bob"),
        ];
        let mut events: Vec<Incoming> = posts
            .iter()
            .enumerate()
            .map(|(i, (id, at, author))| {
                incoming_at(i as u64 + 1, id, *at, &created(&format!("t{id}"), author))
            })
            .collect();
        // "e" moves to anna; "f" is deleted.
        events.push(incoming_at(
            7,
            "e",
            20,
            &Event::Updated {
                title: None,
                content: None,
                author_name: Some("anna".to_string()),
            },
        ));
        events.push(incoming_at(8, "f", 21, &Event::Deleted));
        assert!(apply(&mut p, &events).is_empty());

        assert_eq!(list_all(&r, None, 2), ["e", "d", "c", "b", "a"]);
        assert_eq!(list_all(&r, None, 10), ["e", "d", "c", "b", "a"]);
        assert_eq!(list_all(&r, Some("ann"), 1), ["c", "a"]);
        assert_eq!(list_all(&r, Some("anna"), 2), ["e", "d", "b"]);
        assert!(list_all(&r, Some("an"), 2).is_empty());
        assert!(list_all(&r, Some("bob"), 2).is_empty());
        let by_author = r.live_by_author().unwrap();
        assert_eq!(by_author.get("ann"), Some(&2));
        assert_eq!(by_author.get("anna"), Some(&3));
        assert_eq!(by_author.get("bob"), None);
        let e = r.get("e").unwrap().unwrap();
        assert_eq!((e.author_name.as_str(), e.version), ("anna", 2));
        assert!(r.get("f").unwrap().unwrap().deleted);
        assert_eq!(r.count().unwrap(), 6);
    }

    /// A create of a post that exists is parked and leaves the row, and
    /// the listings, as they were.
    #[test]
    fn a_second_create_is_parked_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut p, r) = open(&dir.path().join("v.redb")).unwrap();
        apply(&mut p, &[incoming_at(1, "a", 10, &created("first", "ann"))]);
        let before = r.digest().unwrap();
        let parked = apply(&mut p, &[incoming_at(2, "a", 11, &created("again", "bob"))]);
        assert_eq!(parked.len(), 1);
        assert_eq!(
            parked[0].reason,
            "PostCreated cannot follow a post that is live"
        );
        assert_eq!(r.get("a").unwrap().unwrap().title, "first");
        assert_eq!(list_all(&r, Some("bob"), 5), Vec::<String>::new());
        assert_eq!(list_all(&r, None, 5), ["a"]);
        // Only the checkpoint and the parked event differ.
        assert_ne!(r.digest().unwrap(), before);
        assert_eq!(r.parked_total().unwrap(), 1);
        assert_eq!(r.checkpoint().unwrap(), 2);
    }

    /// A store of the first layout (`&str` and tuple keys, no format) is
    /// deleted and rebuilt from sequence 1, not misread.
    #[test]
    fn a_store_of_the_first_layout_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let old_posts: TableDefinition<&str, &[u8]> = TableDefinition::new("posts");
                let old_by_created: TableDefinition<(i64, &str), ()> =
                    TableDefinition::new("by_created");
                txn.open_table(old_posts)
                    .unwrap()
                    .insert("a", [1u8].as_slice())
                    .unwrap();
                txn.open_table(old_by_created)
                    .unwrap()
                    .insert((1, "a"), ())
                    .unwrap();
                txn.open_table(META)
                    .unwrap()
                    .insert(META_CHECKPOINT, 7)
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let (mut p, r) = open(&path).unwrap();
        assert_eq!(r.checkpoint().unwrap(), 0);
        assert_eq!(r.count().unwrap(), 0);
        assert_eq!(p.checkpoint(), 0);
        assert!(apply(&mut p, &[incoming_at(1, "a", 10, &created("t", "ann"))]).is_empty());
        assert_eq!(list_all(&r, None, 5), ["a"]);
        drop((p, r));
        // Reopened, the new layout is kept.
        let (_, r) = open(&path).unwrap();
        assert_eq!(r.checkpoint().unwrap(), 1);
        assert_eq!(stored_format(&r.db).unwrap(), Some(FORMAT));
    }
}
