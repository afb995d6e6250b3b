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

const POSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("posts");
/// Live posts, newest first by iterating backwards: (created_at_us, post_id).
const BY_CREATED: TableDefinition<(i64, &str), ()> = TableDefinition::new("by_created");
/// Live posts of one author: (author_name, created_at_us, post_id).
const BY_AUTHOR: TableDefinition<(&str, i64, &str), ()> = TableDefinition::new("by_author");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const PARKED: TableDefinition<u64, &str> = TableDefinition::new("parked");

const META_CHECKPOINT: &str = "checkpoint";
const META_PARKED_TOTAL: &str = "parked_total";
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
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(path)?;
    let txn = db.begin_write()?;
    {
        txn.open_table(POSTS)?;
        txn.open_table(BY_CREATED)?;
        txn.open_table(BY_AUTHOR)?;
        txn.open_table(META)?;
        txn.open_table(PARKED)?;
    }
    txn.commit()?;
    let reader = ViewReader { db: Arc::new(db) };
    Ok((writer_for(&reader)?, reader))
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
        posts: &mut redb::Table<&str, &[u8]>,
        by_created: &mut redb::Table<(i64, &str), ()>,
        by_author: &mut redb::Table<(&str, i64, &str), ()>,
        incoming: &Incoming,
    ) -> Result<Result<(), String>, ProjectionError> {
        let (env, event) = match decode(incoming) {
            Ok(v) => v,
            Err(reason) => return Ok(Err(reason)),
        };
        let id = env.aggregate_id.as_str();
        let at = micros(env.occurred_at);
        let existing = match posts.get(id).map_err(ProjectionError::new)? {
            Some(g) => Some(decode_row(g.value()).map_err(ProjectionError::new)?),
            None => None,
        };
        let row = match (existing, event) {
            (
                None,
                Event::Created {
                    title,
                    content,
                    author_name,
                },
            ) => {
                by_created
                    .insert((at, id), ())
                    .map_err(ProjectionError::new)?;
                by_author
                    .insert((author_name.as_str(), at, id), ())
                    .map_err(ProjectionError::new)?;
                Row {
                    title,
                    content,
                    author_name,
                    created_at_us: at,
                    updated_at_us: at,
                    version: 1,
                    deleted: false,
                }
            }
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
                        .remove((row.author_name.as_str(), row.created_at_us, id))
                        .map_err(ProjectionError::new)?;
                    by_author
                        .insert((a.as_str(), row.created_at_us, id), ())
                        .map_err(ProjectionError::new)?;
                    row.author_name = a;
                }
                row.version += 1;
                row.updated_at_us = at;
                row
            }
            (Some(mut row), Event::Deleted) if !row.deleted => {
                by_created
                    .remove((row.created_at_us, id))
                    .map_err(ProjectionError::new)?;
                by_author
                    .remove((row.author_name.as_str(), row.created_at_us, id))
                    .map_err(ProjectionError::new)?;
                row.deleted = true;
                row.version += 1;
                row.updated_at_us = at;
                row
            }
            (state, event) => {
                let state = match state {
                    None => "absent",
                    Some(r) if r.deleted => "deleted",
                    Some(_) => "live",
                };
                return Ok(Err(format!(
                    "{} cannot follow a post that is {state}",
                    event.name()
                )));
            }
        };
        posts
            .insert(id, encode_row(&row).as_slice())
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
        t.get(id)
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
        match author {
            Some(a) => {
                let t = txn.open_table(BY_AUTHOR).map_err(store_err)?;
                let iter = match &after {
                    Some((at, id)) => t.range((a, i64::MIN, "")..(a, *at, id.as_str())),
                    None => t.range((a, i64::MIN, "")..=(a, i64::MAX, "\u{10FFFF}")),
                }
                .map_err(store_err)?;
                for entry in iter.rev().take(limit + 1) {
                    let k = entry.map_err(store_err)?.0;
                    let (_, at, id) = k.value();
                    ids.push((at, id.to_string()));
                }
            }
            None => {
                let t = txn.open_table(BY_CREATED).map_err(store_err)?;
                let iter = match &after {
                    Some((at, id)) => t.range(..(*at, id.as_str())),
                    None => t.range::<(i64, &str)>(..),
                }
                .map_err(store_err)?;
                for entry in iter.rev().take(limit + 1) {
                    let k = entry.map_err(store_err)?.0;
                    let (at, id) = k.value();
                    ids.push((at, id.to_string()));
                }
            }
        }
        let next_cursor = if ids.len() > limit {
            ids.truncate(limit);
            ids.last().map(|(at, id)| encode_cursor(*at, id))
        } else {
            None
        };
        let mut rows = Vec::with_capacity(ids.len());
        for (_, id) in ids {
            if let Some(g) = posts.get(id.as_str()).map_err(store_err)? {
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
            let (author, _, _) = k.value();
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
            h.update(k.value().as_bytes());
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
