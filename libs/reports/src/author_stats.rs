//! `author-stats`: per author, live posts, live comments written, live
//! comments received on live posts, and the last activity. One redb file
//! following two streams, `POSTS` and `COMMENTS`, with one checkpoint per
//! stream, each written in the same transaction as the rows its batch
//! changed.
//!
//! The figures do not depend on how the two streams interleave: the store
//! keeps each post's and each comment's latest state (author, live) and a
//! count of live comments per post id (known post or not), and every count
//! is adjusted when one of those states changes. A comment read before its
//! post is counted for the post's author when the post arrives; a removal
//! before or after its post's deletion lands on the same figures. The
//! timestamps come from the events' `Occurred-At`.
//!
//! [`open`] gives one [`Slot`] per stream: a [`Projection`] each, which the
//! runtime runs on that stream's feed like any other projection.

use std::path::Path;
use std::sync::{Arc, Mutex};

use projection::redb_file::RedbFile;
use projection::{Incoming, Parked, Projection, ProjectionError};
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const AUTHOR_STATS: &str = "author-stats";
/// The streams it follows, in the order `/projections` shows them.
pub const STREAMS: [&str; 2] = [posts::context::STREAM, comments::context::STREAM];

/// Post id → [`PostRec`].
const POSTS_T: TableDefinition<&str, &[u8]> = TableDefinition::new("posts");
/// Comment aggregate id → [`CommentRec`].
const COMMENTS_T: TableDefinition<&str, &[u8]> = TableDefinition::new("comments");
/// Post id → live comments on it (the post known or not yet).
const LIVE_COMMENTS: TableDefinition<&str, u64> = TableDefinition::new("live_comments");
/// Author → [`AuthorRow`].
const AUTHORS: TableDefinition<&str, &[u8]> = TableDefinition::new("authors");
/// [`rank_key`] → (): authors by posts descending, then name ascending.
const BY_POSTS: TableDefinition<&[u8], ()> = TableDefinition::new("by_posts");
/// `checkpoint:<STREAM>`, `parked:<STREAM>`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// (stream, seq) → reason.
const PARKED: TableDefinition<(&str, u64), &str> = TableDefinition::new("parked");
const CACHE_BYTES: usize = 16 * 1024 * 1024;
const PARKED_RECENT_MAX: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PostRec {
    author: String,
    live: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CommentRec {
    post_id: String,
    author: String,
    live: bool,
}

/// One author's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorRow {
    pub posts: u64,
    pub comments_written: u64,
    pub comments_received: u64,
    /// Microseconds since the epoch; `None` until an event of theirs counts.
    pub last_activity_us: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("author-stats store: {0}")]
    Store(String),
    #[error("cursor is malformed")]
    BadCursor,
}

fn store_err(e: impl std::fmt::Display) -> StatsError {
    StatsError::Store(e.to_string())
}

fn pe(e: impl std::fmt::Display) -> ProjectionError {
    ProjectionError::new(e)
}

fn checkpoint_key(stream: &str) -> String {
    format!("checkpoint:{stream}")
}

fn parked_key(stream: &str) -> String {
    format!("parked:{stream}")
}

fn rank_key(posts: u64, author: &str) -> Vec<u8> {
    let mut k = (u64::MAX - posts).to_be_bytes().to_vec();
    k.extend_from_slice(author.as_bytes());
    k
}

fn micros(at: time::OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
}

/// The store both slots write to.
struct Store {
    file: Arc<RedbFile>,
}

/// Opens (or creates) the file: one writing [`Slot`] per stream of
/// [`STREAMS`], and a reader.
///
/// # Errors
/// When the file cannot be opened.
pub fn open(path: &Path) -> anyhow::Result<(Vec<Slot>, StatsReader)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let db = RedbFile::create_database(path, CACHE_BYTES, None)?;
    let txn = db.begin_write()?;
    txn.open_table(POSTS_T)?;
    txn.open_table(COMMENTS_T)?;
    txn.open_table(LIVE_COMMENTS)?;
    txn.open_table(AUTHORS)?;
    txn.open_table(BY_POSTS)?;
    txn.open_table(META)?;
    txn.open_table(PARKED)?;
    txn.commit()?;
    let reader = StatsReader {
        file: RedbFile::new(path, CACHE_BYTES, None, db),
    };
    let store = Arc::new(Mutex::new(Store {
        file: reader.file.clone(),
    }));
    let mut slots = Vec::new();
    for stream in STREAMS {
        slots.push(Slot {
            store: store.clone(),
            stream,
            checkpoint: reader.checkpoint(stream)?,
            parked_total: reader.parked_total(stream)?,
        });
    }
    Ok((slots, reader))
}

/// author-stats as seen from one of its streams: a [`Projection`] whose
/// checkpoint is that stream's.
pub struct Slot {
    store: Arc<Mutex<Store>>,
    stream: &'static str,
    checkpoint: u64,
    parked_total: u64,
}

impl Slot {
    /// The stream this slot follows.
    #[must_use]
    pub fn stream(&self) -> &'static str {
        self.stream
    }
}

/// The author rows a batch changed, read once and written at the end.
struct Authors<'t> {
    table: redb::Table<'t, &'static str, &'static [u8]>,
    ranks: redb::Table<'t, &'static [u8], ()>,
}

impl Authors<'_> {
    fn change(
        &mut self,
        author: &str,
        f: impl FnOnce(&mut AuthorRow),
    ) -> Result<(), ProjectionError> {
        let before = self
            .table
            .get(author)
            .map_err(pe)?
            .map(|g| g.value().to_vec());
        let mut row = match &before {
            Some(b) => postcard::from_bytes(b).map_err(pe)?,
            None => AuthorRow::default(),
        };
        let old_posts = before.as_ref().map(|_| row.posts);
        f(&mut row);
        if old_posts != Some(row.posts) {
            if let Some(old) = old_posts {
                self.ranks
                    .remove(rank_key(old, author).as_slice())
                    .map_err(pe)?;
            }
            self.ranks
                .insert(rank_key(row.posts, author).as_slice(), ())
                .map_err(pe)?;
        }
        let bytes = postcard::to_stdvec(&row).map_err(pe)?;
        self.table.insert(author, bytes.as_slice()).map_err(pe)?;
        Ok(())
    }
}

fn active(row: &mut AuthorRow, at: i64) {
    row.last_activity_us = Some(row.last_activity_us.map_or(at, |t| t.max(at)));
}

fn get_rec<T: serde::de::DeserializeOwned>(
    t: &redb::Table<'_, &'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>, ProjectionError> {
    match t.get(key).map_err(pe)? {
        Some(g) => Ok(Some(postcard::from_bytes(g.value()).map_err(pe)?)),
        None => Ok(None),
    }
}

fn put_rec<T: Serialize>(
    t: &mut redb::Table<'_, &'static str, &'static [u8]>,
    key: &str,
    rec: &T,
) -> Result<(), ProjectionError> {
    let bytes = postcard::to_stdvec(rec).map_err(pe)?;
    t.insert(key, bytes.as_slice()).map_err(pe)?;
    Ok(())
}

/// The tables a batch writes, opened once for the whole batch.
struct Tables<'t> {
    posts: redb::Table<'t, &'static str, &'static [u8]>,
    comments: redb::Table<'t, &'static str, &'static [u8]>,
    live_comments: redb::Table<'t, &'static str, u64>,
    authors: Authors<'t>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, ProjectionError> {
        Ok(Self {
            posts: txn.open_table(POSTS_T).map_err(pe)?,
            comments: txn.open_table(COMMENTS_T).map_err(pe)?,
            live_comments: txn.open_table(LIVE_COMMENTS).map_err(pe)?,
            authors: Authors {
                table: txn.open_table(AUTHORS).map_err(pe)?,
                ranks: txn.open_table(BY_POSTS).map_err(pe)?,
            },
        })
    }
}

/// Applies one `POSTS` event; `Ok(Err(reason))` parks it.
fn apply_post(
    t: &mut Tables<'_>,
    incoming: &Incoming,
) -> Result<Result<(), String>, ProjectionError> {
    let env = match &incoming.envelope {
        Ok(env) => env,
        Err(e) => return Ok(Err(format!("bad envelope: {e}"))),
    };
    let event = match posts::decode(&env.event_type, env.schema, &env.payload) {
        Ok(e) => e,
        Err(e) => return Ok(Err(format!("undecodable payload: {e}"))),
    };
    let at = micros(env.occurred_at);
    let post_id = env.aggregate_id.as_str();
    let Tables {
        posts: posts_t,
        live_comments,
        authors,
        ..
    } = t;
    let n = live_comments
        .get(post_id)
        .map_err(pe)?
        .map_or(0, |g| g.value());
    let current: Option<PostRec> = get_rec(posts_t, post_id)?;
    match (current, event) {
        (None, posts::Event::Created { author_name, .. }) => {
            authors.change(&author_name, |r| {
                r.posts += 1;
                r.comments_received += n;
                active(r, at);
            })?;
            put_rec(
                posts_t,
                post_id,
                &PostRec {
                    author: author_name,
                    live: true,
                },
            )?;
        }
        (Some(mut rec), posts::Event::Updated { author_name, .. }) if rec.live => {
            if let Some(new) = author_name
                && new != rec.author
            {
                authors.change(&rec.author, |r| {
                    r.posts = r.posts.saturating_sub(1);
                    r.comments_received = r.comments_received.saturating_sub(n);
                })?;
                authors.change(&new, |r| {
                    r.posts += 1;
                    r.comments_received += n;
                })?;
                rec.author = new;
            }
            authors.change(&rec.author, |r| active(r, at))?;
            put_rec(posts_t, post_id, &rec)?;
        }
        (Some(mut rec), posts::Event::Deleted) if rec.live => {
            authors.change(&rec.author, |r| {
                r.posts = r.posts.saturating_sub(1);
                r.comments_received = r.comments_received.saturating_sub(n);
            })?;
            rec.live = false;
            put_rec(posts_t, post_id, &rec)?;
        }
        (current, event) => {
            let state = match current {
                None => "absent",
                Some(r) if r.live => "live",
                Some(_) => "deleted",
            };
            return Ok(Err(format!(
                "{} cannot follow a post that is {state}",
                event.name()
            )));
        }
    }
    Ok(Ok(()))
}

/// Applies one `COMMENTS` event; `Ok(Err(reason))` parks it.
fn apply_comment(
    t: &mut Tables<'_>,
    incoming: &Incoming,
) -> Result<Result<(), String>, ProjectionError> {
    let env = match &incoming.envelope {
        Ok(env) => env,
        Err(e) => return Ok(Err(format!("bad envelope: {e}"))),
    };
    let event = match comments::decode(&env.event_type, env.schema, &env.payload) {
        Ok(e) => e,
        Err(e) => return Ok(Err(format!("undecodable payload: {e}"))),
    };
    let at = micros(env.occurred_at);
    let id = env.aggregate_id.as_str();
    let Some((subject_post, _)) = comments::context::split_id(id) else {
        return Ok(Err(format!("subject {} names no comment", env.subject)));
    };
    let Tables {
        posts: posts_t,
        comments: comments_t,
        live_comments,
        authors,
    } = t;
    let current: Option<CommentRec> = get_rec(comments_t, id)?;
    match (current, event) {
        (
            None,
            comments::Event::Added {
                post_id,
                author_name,
                ..
            },
        ) => {
            if post_id != subject_post {
                return Ok(Err(format!(
                    "CommentAdded for post {post_id} on the subject of post {subject_post}"
                )));
            }
            shift(live_comments, posts_t, authors, &post_id, true)?;
            authors.change(&author_name, |r| {
                r.comments_written += 1;
                active(r, at);
            })?;
            put_rec(
                comments_t,
                id,
                &CommentRec {
                    post_id,
                    author: author_name,
                    live: true,
                },
            )?;
        }
        (Some(rec), comments::Event::Edited { .. }) if rec.live => {
            authors.change(&rec.author, |r| active(r, at))?;
        }
        (Some(mut rec), comments::Event::Removed { .. }) if rec.live => {
            shift(live_comments, posts_t, authors, &rec.post_id, false)?;
            authors.change(&rec.author, |r| {
                r.comments_written = r.comments_written.saturating_sub(1);
            })?;
            rec.live = false;
            put_rec(comments_t, id, &rec)?;
        }
        (current, event) => {
            let state = match current {
                None => "absent",
                Some(r) if r.live => "live",
                Some(_) => "removed",
            };
            return Ok(Err(format!(
                "{} cannot follow a comment that is {state}",
                event.name()
            )));
        }
    }
    Ok(Ok(()))
}

/// One live comment more (`up`) or fewer on `post_id`, and on its author's
/// figures if the post is known and live.
fn shift(
    live_comments: &mut redb::Table<'_, &'static str, u64>,
    posts_t: &redb::Table<'_, &'static str, &'static [u8]>,
    authors: &mut Authors<'_>,
    post_id: &str,
    up: bool,
) -> Result<(), ProjectionError> {
    let n = live_comments
        .get(post_id)
        .map_err(pe)?
        .map_or(0, |g| g.value());
    let n = if up { n + 1 } else { n.saturating_sub(1) };
    live_comments.insert(post_id, n).map_err(pe)?;
    if let Some(post) = get_rec::<PostRec>(posts_t, post_id)?
        && post.live
    {
        authors.change(&post.author, |r| {
            r.comments_received = if up {
                r.comments_received + 1
            } else {
                r.comments_received.saturating_sub(1)
            };
        })?;
    }
    Ok(())
}

impl Projection for Slot {
    fn name(&self) -> &str {
        AUTHOR_STATS
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
        let store = self
            .store
            .lock()
            .map_err(|_| ProjectionError::new("author-stats store lock poisoned"))?;
        let db = store.file.db().map_err(pe)?;
        let txn = db.begin_write().map_err(pe)?;
        let mut parked = Vec::new();
        let mut tables = Tables::open(&txn)?;
        for incoming in batch {
            assert!(
                incoming.seq > self.checkpoint,
                "event {} at or below the checkpoint {}",
                incoming.seq,
                self.checkpoint
            );
            let applied = if self.stream == posts::context::STREAM {
                apply_post(&mut tables, incoming)?
            } else {
                apply_comment(&mut tables, incoming)?
            };
            if let Err(reason) = applied {
                parked.push(Parked {
                    seq: incoming.seq,
                    reason,
                });
            }
        }
        drop(tables);
        {
            let mut p = txn.open_table(PARKED).map_err(pe)?;
            for one in &parked {
                p.insert((self.stream, one.seq), one.reason.as_str())
                    .map_err(pe)?;
            }
            let mut meta = txn.open_table(META).map_err(pe)?;
            meta.insert(checkpoint_key(self.stream).as_str(), last.seq)
                .map_err(pe)?;
            meta.insert(
                parked_key(self.stream).as_str(),
                self.parked_total + parked.len() as u64,
            )
            .map_err(pe)?;
        }
        txn.commit().map_err(pe)?;
        self.checkpoint = last.seq;
        self.parked_total += parked.len() as u64;
        Ok(parked)
    }

    fn flush(&mut self) -> Result<(), ProjectionError> {
        Ok(())
    }

    fn recover(&mut self) -> Result<(), ProjectionError> {
        let file = {
            let store = self
                .store
                .lock()
                .map_err(|_| ProjectionError::new("author-stats store lock poisoned"))?;
            // After an I/O error redb refuses every transaction until the
            // file is opened again; the lock keeps the other slot from
            // writing meanwhile.
            store.file.check_or_reopen().map_err(pe)?;
            store.file.clone()
        };
        let reader = StatsReader { file };
        self.checkpoint = reader.checkpoint(self.stream).map_err(pe)?;
        self.parked_total = reader.parked_total(self.stream).map_err(pe)?;
        Ok(())
    }

    fn parked_total(&self) -> u64 {
        self.parked_total
    }

    fn parked_recent(&self) -> Vec<Parked> {
        let Ok(store) = self.store.lock() else {
            return Vec::new();
        };
        StatsReader {
            file: store.file.clone(),
        }
        .parked_recent(self.stream)
        .unwrap_or_default()
    }
}

/// A page of authors.
#[derive(Debug, Clone)]
pub struct AuthorPage {
    pub rows: Vec<(String, AuthorRow)>,
    pub next_cursor: Option<String>,
}

/// Reads author-stats; cheap to clone.
#[derive(Clone)]
pub struct StatsReader {
    file: Arc<RedbFile>,
}

impl StatsReader {
    fn meta(&self, key: &str) -> Result<u64, StatsError> {
        let db = self.file.db().map_err(store_err)?;
        let txn = db.begin_read().map_err(store_err)?;
        let t = txn.open_table(META).map_err(store_err)?;
        Ok(t.get(key).map_err(store_err)?.map_or(0, |g| g.value()))
    }

    /// The last applied sequence of `stream`.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn checkpoint(&self, stream: &str) -> Result<u64, StatsError> {
        self.meta(&checkpoint_key(stream))
    }

    /// Events of `stream` ever parked.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn parked_total(&self, stream: &str) -> Result<u64, StatsError> {
        self.meta(&parked_key(stream))
    }

    /// The most recent parked events of `stream`, newest first.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn parked_recent(&self, stream: &str) -> Result<Vec<Parked>, StatsError> {
        let db = self.file.db().map_err(store_err)?;
        let txn = db.begin_read().map_err(store_err)?;
        let t = txn.open_table(PARKED).map_err(store_err)?;
        let mut out = Vec::new();
        for entry in t
            .range((stream, 0)..=(stream, u64::MAX))
            .map_err(store_err)?
            .rev()
            .take(PARKED_RECENT_MAX)
        {
            let (k, v) = entry.map_err(store_err)?;
            out.push(Parked {
                seq: k.value().1,
                reason: v.value().to_string(),
            });
        }
        Ok(out)
    }

    /// One author's figures; `None` for a name never seen.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn get(&self, author: &str) -> Result<Option<AuthorRow>, StatsError> {
        let db = self.file.db().map_err(store_err)?;
        let txn = db.begin_read().map_err(store_err)?;
        let t = txn.open_table(AUTHORS).map_err(store_err)?;
        t.get(author)
            .map_err(store_err)?
            .map(|g| postcard::from_bytes(g.value()).map_err(store_err))
            .transpose()
    }

    /// Authors by posts descending, then name ascending, after `cursor`.
    ///
    /// # Errors
    /// [`StatsError::BadCursor`] for a cursor this reader did not make.
    pub fn list(&self, cursor: Option<&str>, limit: usize) -> Result<AuthorPage, StatsError> {
        let start = match cursor {
            None => Vec::new(),
            Some(c) => {
                let mut k = unhex(c)
                    .filter(|k| k.len() >= 8 && k.len() <= 8 + 1024)
                    .ok_or(StatsError::BadCursor)?;
                k.push(0);
                k
            }
        };
        let db = self.file.db().map_err(store_err)?;
        let txn = db.begin_read().map_err(store_err)?;
        let ranks = txn.open_table(BY_POSTS).map_err(store_err)?;
        let authors = txn.open_table(AUTHORS).map_err(store_err)?;
        let mut page = AuthorPage {
            rows: Vec::new(),
            next_cursor: None,
        };
        let mut last: Option<Vec<u8>> = None;
        for entry in ranks.range(start.as_slice()..).map_err(store_err)? {
            let (k, _) = entry.map_err(store_err)?;
            let key = k.value();
            if page.rows.len() >= limit {
                page.next_cursor = last.map(|l| eventstore::hex(&l));
                break;
            }
            let author = std::str::from_utf8(&key[8..]).map_err(store_err)?;
            let Some(row) = authors.get(author).map_err(store_err)? else {
                continue;
            };
            page.rows.push((
                author.to_string(),
                postcard::from_bytes(row.value()).map_err(store_err)?,
            ));
            last = Some(key.to_vec());
        }
        Ok(page)
    }

    /// SHA-256 of every table but the parked events, and both checkpoints:
    /// equal for two stores built from the same stream positions, however
    /// the streams interleaved.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn digest(&self) -> Result<String, StatsError> {
        let db = self.file.db().map_err(store_err)?;
        let txn = db.begin_read().map_err(store_err)?;
        let mut h = Sha256::new();
        let mut feed = |k: &[u8], v: &[u8]| {
            h.update((k.len() as u64).to_le_bytes());
            h.update(k);
            h.update((v.len() as u64).to_le_bytes());
            h.update(v);
        };
        for table in [POSTS_T, COMMENTS_T, AUTHORS] {
            let t = txn.open_table(table).map_err(store_err)?;
            for entry in t.iter().map_err(store_err)? {
                let (k, v) = entry.map_err(store_err)?;
                feed(k.value().as_bytes(), v.value());
            }
        }
        let t = txn.open_table(LIVE_COMMENTS).map_err(store_err)?;
        for entry in t.iter().map_err(store_err)? {
            let (k, v) = entry.map_err(store_err)?;
            feed(k.value().as_bytes(), &v.value().to_le_bytes());
        }
        let t = txn.open_table(BY_POSTS).map_err(store_err)?;
        for entry in t.iter().map_err(store_err)? {
            let (k, _) = entry.map_err(store_err)?;
            feed(k.value(), &[]);
        }
        let meta = txn.open_table(META).map_err(store_err)?;
        for stream in STREAMS {
            let key = checkpoint_key(stream);
            let v = meta
                .get(key.as_str())
                .map_err(store_err)?
                .map_or(0, |g| g.value());
            feed(key.as_bytes(), &v.to_le_bytes());
        }
        Ok(eventstore::hex(&h.finalize()))
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(
        stream: &str,
        seq: u64,
        id: &str,
        at_s: i64,
        kind: &str,
        schema: u32,
        payload: Vec<u8>,
    ) -> Incoming {
        let subject = if stream == "POSTS" {
            format!("posts.{id}")
        } else {
            format!("comments.{id}")
        };
        Incoming {
            seq,
            envelope: Ok(eventstore::RecordedEvent {
                seq,
                subject,
                aggregate_id: id.to_string(),
                event_id: format!("{stream}-{seq}"),
                event_type: kind.to_string(),
                schema,
                occurred_at: time::OffsetDateTime::from_unix_timestamp(at_s).expect("time"),
                correlation_id: String::new(),
                causation_id: String::new(),
                actor: None,
                traceparent: None,
                payload: bytes::Bytes::from(payload),
            }),
        }
    }

    fn post(seq: u64, id: &str, at: i64, e: &posts::Event) -> Incoming {
        let (t, s, p) = posts::encode(e);
        incoming("POSTS", seq, id, at, t, s, p)
    }

    fn comment(seq: u64, id: &str, at: i64, e: &comments::Event) -> Incoming {
        let (t, s, p) = comments::encode(e);
        incoming("COMMENTS", seq, id, at, t, s, p)
    }

    fn created(author: &str) -> posts::Event {
        posts::Event::Created {
            title: "t".into(),
            content: "c".into(),
            author_name: author.into(),
        }
    }

    fn added(post: &str, author: &str) -> comments::Event {
        comments::Event::Added {
            post_id: post.into(),
            body: "b".into(),
            author_name: author.into(),
        }
    }

    /// A small world: ann writes p1 and p2, bo comments on both, cy on p1;
    /// p2 moves to cy, p1 is deleted, one comment is removed; di writes p3,
    /// on which bo comments (in an interleaving, before p3 is read).
    fn world() -> (Vec<Incoming>, Vec<Incoming>) {
        let posts = vec![
            post(1, "p1", 10, &created("ann")),
            post(2, "p2", 11, &created("ann")),
            post(
                3,
                "p2",
                30,
                &posts::Event::Updated {
                    title: None,
                    content: None,
                    author_name: Some("cy".into()),
                },
            ),
            post(4, "p1", 40, &posts::Event::Deleted),
            post(5, "p3", 70, &created("di")),
        ];
        let comments = vec![
            comment(1, "p1.c1", 12, &added("p1", "bo")),
            comment(2, "p2.c2", 13, &added("p2", "bo")),
            comment(3, "p1.c3", 14, &added("p1", "cy")),
            comment(4, "p2.c4", 15, &added("p2", "cy")),
            comment(
                5,
                "p2.c4",
                50,
                &comments::Event::Removed {
                    reason: comments::RemovalReason::Author,
                },
            ),
            comment(
                6,
                "p2.c2",
                60,
                &comments::Event::Edited { body: "e".into() },
            ),
            comment(7, "p3.c5", 65, &added("p3", "bo")),
        ];
        (posts, comments)
    }

    /// Applies the two streams, interleaved by `pick` (true: the next POSTS
    /// event), in batches of `batch`.
    fn build(dir: &Path, name: &str, batch: usize, mut pick: impl FnMut() -> bool) -> StatsReader {
        let (posts, comments) = world();
        let (mut slots, reader) = open(&dir.join(name)).expect("open");
        let (mut pi, mut ci) = (0, 0);
        while pi < posts.len() || ci < comments.len() {
            let take_post = ci >= comments.len() || (pi < posts.len() && pick());
            if take_post {
                let end = (pi + batch).min(posts.len());
                let b: Vec<&Incoming> = posts[pi..end].iter().collect();
                assert!(slots[0].apply_batch(&b).expect("apply").is_empty());
                pi = end;
            } else {
                let end = (ci + batch).min(comments.len());
                let b: Vec<&Incoming> = comments[ci..end].iter().collect();
                assert!(slots[1].apply_batch(&b).expect("apply").is_empty());
                ci = end;
            }
        }
        reader
    }

    #[test]
    fn the_figures_follow_the_definitions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = build(dir.path(), "a.redb", 1, || true);
        let ann = r.get("ann").expect("get").expect("ann");
        // p1 deleted, p2 moved to cy: no live posts; still listed.
        assert_eq!(
            (ann.posts, ann.comments_written, ann.comments_received),
            (0, 0, 0)
        );
        assert_eq!(ann.last_activity_us, Some(11_000_000));
        let cy = r.get("cy").expect("get").expect("cy");
        // p2 is cy's, with bo's live c2 (cy's own c4 was removed).
        assert_eq!(
            (cy.posts, cy.comments_written, cy.comments_received),
            (1, 1, 1)
        );
        assert_eq!(cy.last_activity_us, Some(30_000_000));
        let bo = r.get("bo").expect("get").expect("bo");
        // c1 is on a deleted post but not removed: still live, and written.
        assert_eq!(
            (bo.posts, bo.comments_written, bo.comments_received),
            (0, 3, 0)
        );
        assert_eq!(bo.last_activity_us, Some(65_000_000));
        let di = r.get("di").expect("get").expect("di");
        assert_eq!(
            (di.posts, di.comments_written, di.comments_received),
            (1, 0, 1)
        );
        assert!(r.get("nobody").expect("get").is_none());
        let page = r.list(None, 2).expect("list");
        let names: Vec<&str> = page.rows.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(names, ["cy", "di"]);
        let rest = r.list(page.next_cursor.as_deref(), 10).expect("list");
        let names: Vec<&str> = rest.rows.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(names, ["ann", "bo"]);
        assert!(rest.next_cursor.is_none());
        assert!(matches!(r.list(Some("xyz"), 1), Err(StatsError::BadCursor)));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn any_interleaving_and_batching_gives_the_same_store(
            picks in proptest::collection::vec(proptest::prelude::any::<bool>(), 0..20),
            batch in 1usize..4,
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let posts_first = build(dir.path(), "ref.redb", 10, || true).digest().expect("digest");
            let mut it = picks.into_iter();
            let mixed = build(dir.path(), "mixed.redb", batch, || it.next().unwrap_or(false))
                .digest()
                .expect("digest");
            proptest::prop_assert_eq!(posts_first, mixed);
        }
    }
}
