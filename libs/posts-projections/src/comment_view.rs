//! `comment-view`: the comments of each post, on redb, following stream
//! `COMMENTS`. Rows, the listing index, parked events and the checkpoint are
//! written in one write transaction per batch, so a crash leaves view and
//! checkpoint consistent. Every timestamp comes from the events.

use std::path::Path;
use std::sync::Arc;

use comments::Event;
use projection::redb_file::RedbFile;
use projection::{Incoming, Parked, Projection, ProjectionError};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{PARKED_RECENT_MAX, hex, micros};

pub const COMMENT_VIEW: &str = "comment-view";

/// Comment aggregate id (`<post_id>.<comment_id>`) → [`CommentRow`] (postcard).
const ROWS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("comments");
/// Live comments of a post, oldest first: [`live_key`].
const LIVE: TableDefinition<&[u8], ()> = TableDefinition::new("live");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const PARKED: TableDefinition<u64, &str> = TableDefinition::new("parked");
const META_CHECKPOINT: &str = "checkpoint";
const META_PARKED_TOTAL: &str = "parked_total";
const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// One comment as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommentRow {
    pub post_id: String,
    pub body: String,
    pub author_name: String,
    pub created_at_us: i64,
    pub updated_at_us: i64,
    pub version: u64,
    pub removed: bool,
}

impl CommentRow {
    /// About what the row takes as JSON.
    #[must_use]
    pub fn json_bytes(&self) -> usize {
        300 + self.body.len() * 2 + self.author_name.len() * 2
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommentViewError {
    #[error("comment view store: {0}")]
    Store(String),
    #[error("cursor is malformed")]
    BadCursor,
}

fn store_err(e: impl std::fmt::Display) -> CommentViewError {
    CommentViewError::Store(e.to_string())
}

/// A page of one post's comments.
#[derive(Debug, Clone)]
pub struct CommentPage {
    /// (comment id, row), oldest first.
    pub rows: Vec<(String, CommentRow)>,
    pub next_cursor: Option<String>,
}

/// Opens (or creates) the file; returns the writer and a reader sharing it.
///
/// # Errors
/// When the file cannot be opened.
pub fn open(path: &Path) -> anyhow::Result<(CommentViewProjection, CommentReader)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let db = RedbFile::create_database(path, CACHE_BYTES, None)?;
    let txn = db.begin_write()?;
    txn.open_table(ROWS)?;
    txn.open_table(LIVE)?;
    txn.open_table(META)?;
    txn.open_table(PARKED)?;
    txn.commit()?;
    let reader = CommentReader {
        file: RedbFile::new(path, CACHE_BYTES, None, db),
    };
    let checkpoint = reader.meta(META_CHECKPOINT)?;
    let parked_total = reader.meta(META_PARKED_TOTAL)?;
    Ok((
        CommentViewProjection {
            file: reader.file.clone(),
            checkpoint,
            parked_total,
        },
        reader,
    ))
}

/// A writer over the same file as `reader` (a rebuild's shadow).
///
/// # Errors
/// When the store cannot be read.
pub fn writer_for(reader: &CommentReader) -> anyhow::Result<CommentViewProjection> {
    Ok(CommentViewProjection {
        file: reader.file.clone(),
        checkpoint: reader.meta(META_CHECKPOINT)?,
        parked_total: reader.meta(META_PARKED_TOTAL)?,
    })
}

/// The listing key: post id, creation time (big-endian, sign flipped so it
/// sorts as the number does), comment id.
fn live_key(post_id: &str, created_at_us: i64, comment_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(post_id.len() + 9 + comment_id.len());
    k.extend_from_slice(post_id.as_bytes());
    k.push(b'/');
    k.extend_from_slice(&((created_at_us as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(comment_id.as_bytes());
    k
}

pub struct CommentViewProjection {
    file: Arc<RedbFile>,
    checkpoint: u64,
    parked_total: u64,
}

fn decode(incoming: &Incoming) -> Result<(&eventstore::RecordedEvent, Event), String> {
    let env = incoming
        .envelope
        .as_ref()
        .map_err(|e| format!("bad envelope: {e}"))?;
    let event = comments::decode(&env.event_type, env.schema, &env.payload)
        .map_err(|e| format!("undecodable payload: {e}"))?;
    Ok((env, event))
}

fn state_of(row: Option<&CommentRow>) -> &'static str {
    match row {
        None => "absent",
        Some(r) if r.removed => "removed",
        Some(_) => "live",
    }
}

impl CommentViewProjection {
    /// Applies one event in `txn`: `Ok(Err(reason))` parks it.
    fn apply_one(
        txn: &redb::WriteTransaction,
        incoming: &Incoming,
    ) -> Result<Result<(), String>, ProjectionError> {
        let (env, event) = match decode(incoming) {
            Ok(v) => v,
            Err(reason) => return Ok(Err(reason)),
        };
        let Some((post_id, comment_id)) = comments::context::split_id(&env.aggregate_id) else {
            return Ok(Err(format!("subject {} names no comment", env.subject)));
        };
        let mut rows = txn.open_table(ROWS).map_err(ProjectionError::new)?;
        let mut live = txn.open_table(LIVE).map_err(ProjectionError::new)?;
        let key = env.aggregate_id.as_bytes();
        let current: Option<CommentRow> = match rows.get(key).map_err(ProjectionError::new)? {
            Some(g) => Some(postcard::from_bytes(g.value()).map_err(ProjectionError::new)?),
            None => None,
        };
        let at = micros(env.occurred_at);
        let next = match (current, &event) {
            (
                None,
                Event::Added {
                    post_id: of,
                    body,
                    author_name,
                },
            ) => {
                if of != post_id {
                    return Ok(Err(format!(
                        "CommentAdded for post {of} on the subject of post {post_id}"
                    )));
                }
                live.insert(live_key(post_id, at, comment_id).as_slice(), ())
                    .map_err(ProjectionError::new)?;
                CommentRow {
                    post_id: post_id.to_string(),
                    body: body.clone(),
                    author_name: author_name.clone(),
                    created_at_us: at,
                    updated_at_us: at,
                    version: 1,
                    removed: false,
                }
            }
            (Some(mut row), Event::Edited { body }) if !row.removed => {
                row.body.clone_from(body);
                row.updated_at_us = at;
                row.version += 1;
                row
            }
            (Some(mut row), Event::Removed { .. }) if !row.removed => {
                live.remove(live_key(post_id, row.created_at_us, comment_id).as_slice())
                    .map_err(ProjectionError::new)?;
                row.removed = true;
                row.updated_at_us = at;
                row.version += 1;
                row
            }
            (current, event) => {
                return Ok(Err(format!(
                    "{} cannot follow a comment that is {}",
                    event.name(),
                    state_of(current.as_ref())
                )));
            }
        };
        let bytes = postcard::to_stdvec(&next).map_err(ProjectionError::new)?;
        rows.insert(key, bytes.as_slice())
            .map_err(ProjectionError::new)?;
        Ok(Ok(()))
    }
}

impl Projection for CommentViewProjection {
    fn name(&self) -> &str {
        COMMENT_VIEW
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
        let db = self.file.db().map_err(ProjectionError::new)?;
        let txn = db.begin_write().map_err(ProjectionError::new)?;
        let mut parked = Vec::new();
        for incoming in batch {
            assert!(
                incoming.seq > self.checkpoint,
                "event {} at or below the checkpoint {}",
                incoming.seq,
                self.checkpoint
            );
            if let Err(reason) = Self::apply_one(&txn, incoming)? {
                parked.push(Parked {
                    seq: incoming.seq,
                    reason,
                });
            }
        }
        {
            let mut p = txn.open_table(PARKED).map_err(ProjectionError::new)?;
            for one in &parked {
                p.insert(one.seq, one.reason.as_str())
                    .map_err(ProjectionError::new)?;
            }
            let mut meta = txn.open_table(META).map_err(ProjectionError::new)?;
            meta.insert(META_CHECKPOINT, last.seq)
                .map_err(ProjectionError::new)?;
            meta.insert(META_PARKED_TOTAL, self.parked_total + parked.len() as u64)
                .map_err(ProjectionError::new)?;
        }
        txn.commit().map_err(ProjectionError::new)?;
        self.checkpoint = last.seq;
        self.parked_total += parked.len() as u64;
        Ok(parked)
    }

    fn flush(&mut self) -> Result<(), ProjectionError> {
        Ok(())
    }

    fn recover(&mut self) -> Result<(), ProjectionError> {
        // After an I/O error redb refuses every transaction until the file
        // is opened again.
        self.file.check_or_reopen().map_err(ProjectionError::new)?;
        let reader = CommentReader {
            file: self.file.clone(),
        };
        self.checkpoint = reader.meta(META_CHECKPOINT).map_err(ProjectionError::new)?;
        self.parked_total = reader
            .meta(META_PARKED_TOTAL)
            .map_err(ProjectionError::new)?;
        Ok(())
    }

    fn parked_total(&self) -> u64 {
        self.parked_total
    }

    fn parked_recent(&self) -> Vec<Parked> {
        CommentReader {
            file: self.file.clone(),
        }
        .parked_recent()
        .unwrap_or_default()
    }
}

/// Reads the comment view; cheap to clone.
#[derive(Clone)]
pub struct CommentReader {
    file: Arc<RedbFile>,
}

impl CommentReader {
    /// The file was renamed to `path` while open (an installed rebuild).
    pub fn moved_to(&self, path: &Path) {
        self.file.moved_to(path);
    }
    fn meta(&self, key: &str) -> Result<u64, CommentViewError> {
        let db = self.file.db().map_err(store_err)?;
        let txn = db.begin_read().map_err(store_err)?;
        let t = txn.open_table(META).map_err(store_err)?;
        Ok(t.get(key).map_err(store_err)?.map_or(0, |g| g.value()))
    }

    /// Last applied sequence of stream `COMMENTS`.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn checkpoint(&self) -> Result<u64, CommentViewError> {
        self.meta(META_CHECKPOINT)
    }

    /// The most recent parked events, newest first.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn parked_recent(&self) -> Result<Vec<Parked>, CommentViewError> {
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

    /// One comment, removed or not.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn get(
        &self,
        post_id: &str,
        comment_id: &str,
    ) -> Result<Option<CommentRow>, CommentViewError> {
        let db = self.file.db().map_err(store_err)?;
        let txn = db.begin_read().map_err(store_err)?;
        let t = txn.open_table(ROWS).map_err(store_err)?;
        let key = comments::context::aggregate_id(post_id, comment_id);
        t.get(key.as_bytes())
            .map_err(store_err)?
            .map(|g| postcard::from_bytes(g.value()).map_err(store_err))
            .transpose()
    }

    /// The live comments of `post_id`, oldest first, after `cursor`: at
    /// most `limit`, stopping before `bytes_max` of JSON (always one).
    ///
    /// # Errors
    /// [`CommentViewError::BadCursor`] for a cursor this reader did not make.
    pub fn list(
        &self,
        post_id: &str,
        cursor: Option<&str>,
        limit: usize,
        bytes_max: usize,
    ) -> Result<CommentPage, CommentViewError> {
        let mut prefix = post_id.as_bytes().to_vec();
        prefix.push(b'/');
        let start = match cursor {
            None => prefix.clone(),
            Some(c) => {
                let raw = unhex(c).ok_or(CommentViewError::BadCursor)?;
                if raw.len() < 8 || raw.len() > 64 {
                    return Err(CommentViewError::BadCursor);
                }
                let mut k = prefix.clone();
                k.extend_from_slice(&raw);
                // Strictly after the cursor's key.
                k.push(0);
                k
            }
        };
        let db = self.file.db().map_err(store_err)?;
        let txn = db.begin_read().map_err(store_err)?;
        let live = txn.open_table(LIVE).map_err(store_err)?;
        let rows = txn.open_table(ROWS).map_err(store_err)?;
        let mut page = CommentPage {
            rows: Vec::new(),
            next_cursor: None,
        };
        let mut bytes = 0usize;
        let mut last_key: Option<Vec<u8>> = None;
        for entry in live.range(start.as_slice()..).map_err(store_err)? {
            let (k, ()) = entry.map(|(k, v)| (k, v.value())).map_err(store_err)?;
            let key = k.value();
            if !key.starts_with(&prefix) {
                break;
            }
            let comment_id = std::str::from_utf8(&key[prefix.len() + 8..])
                .map_err(store_err)?
                .to_string();
            let id = comments::context::aggregate_id(post_id, &comment_id);
            let Some(row) = rows.get(id.as_bytes()).map_err(store_err)? else {
                continue;
            };
            let row: CommentRow = postcard::from_bytes(row.value()).map_err(store_err)?;
            let size = row.json_bytes();
            if page.rows.len() >= limit || (!page.rows.is_empty() && bytes + size > bytes_max) {
                page.next_cursor = last_key.map(|k| hex(&k[prefix.len()..]));
                break;
            }
            bytes += size;
            last_key = Some(key.to_vec());
            page.rows.push((comment_id, row));
        }
        Ok(page)
    }

    /// SHA-256 over every row and the checkpoint: equal for two stores that
    /// hold the same comments at the same position.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn digest(&self) -> Result<String, CommentViewError> {
        let db = self.file.db().map_err(store_err)?;
        let txn = db.begin_read().map_err(store_err)?;
        let mut h = Sha256::new();
        for table in [ROWS] {
            let t = txn.open_table(table).map_err(store_err)?;
            for entry in t.iter().map_err(store_err)? {
                let (k, v) = entry.map_err(store_err)?;
                h.update((k.value().len() as u64).to_le_bytes());
                h.update(k.value());
                h.update((v.value().len() as u64).to_le_bytes());
                h.update(v.value());
            }
        }
        let t = txn.open_table(LIVE).map_err(store_err)?;
        for entry in t.iter().map_err(store_err)? {
            let (k, _) = entry.map_err(store_err)?;
            h.update(k.value());
        }
        let meta = txn.open_table(META).map_err(store_err)?;
        let checkpoint = meta
            .get(META_CHECKPOINT)
            .map_err(store_err)?
            .map_or(0, |g| g.value());
        h.update(checkpoint.to_le_bytes());
        Ok(hex(&h.finalize()))
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

    fn incoming(seq: u64, post: &str, comment: &str, at_s: i64, event: &Event) -> Incoming {
        let (event_type, schema, payload) = comments::encode(event);
        Incoming {
            seq,
            envelope: Ok(eventstore::RecordedEvent {
                seq,
                subject: format!("comments.{post}.{comment}"),
                aggregate_id: format!("{post}.{comment}"),
                event_id: format!("e{seq}"),
                event_type: event_type.to_string(),
                schema,
                occurred_at: time::OffsetDateTime::from_unix_timestamp(at_s).expect("a time"),
                correlation_id: format!("c{seq}"),
                causation_id: format!("c{seq}"),
                actor: None,
                traceparent: None,
                payload: bytes::Bytes::from(payload),
            }),
        }
    }

    fn added(post: &str, body: &str) -> Event {
        Event::Added {
            post_id: post.into(),
            body: body.into(),
            author_name: "bo".into(),
        }
    }

    #[test]
    fn comments_list_oldest_first_page_by_cursor_and_leave_out_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut p, r) = open(&dir.path().join("c.redb")).expect("open");
        let events = [
            incoming(1, "p1", "c3", 30, &added("p1", "third")),
            incoming(2, "p1", "c1", 10, &added("p1", "first")),
            incoming(3, "p2", "c9", 5, &added("p2", "other post")),
            incoming(4, "p1", "c2", 20, &added("p1", "second")),
            incoming(
                5,
                "p1",
                "c1",
                40,
                &Event::Edited {
                    body: "first, edited".into(),
                },
            ),
            incoming(
                6,
                "p1",
                "c2",
                50,
                &Event::Removed {
                    reason: comments::RemovalReason::Author,
                },
            ),
            // Edited after its removal: parked, changes nothing.
            incoming(7, "p1", "c2", 60, &Event::Edited { body: "x".into() }),
        ];
        let batch: Vec<&Incoming> = events.iter().collect();
        let parked = p.apply_batch(&batch).expect("apply");
        assert_eq!(parked.len(), 1);
        assert_eq!(parked[0].seq, 7);
        assert_eq!(r.checkpoint().expect("checkpoint"), 7);
        let page = r.list("p1", None, 1, usize::MAX).expect("list");
        assert_eq!(page.rows[0].0, "c1");
        assert_eq!(page.rows[0].1.body, "first, edited");
        assert_eq!(page.rows[0].1.version, 2);
        let rest = r
            .list("p1", page.next_cursor.as_deref(), 10, usize::MAX)
            .expect("list");
        let ids: Vec<&str> = rest.rows.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["c3"]);
        assert!(rest.next_cursor.is_none());
        let removed = r.get("p1", "c2").expect("get").expect("a row");
        assert!(removed.removed);
        assert_eq!(removed.version, 2);
        assert!(
            r.list("nope", None, 10, usize::MAX)
                .expect("list")
                .rows
                .is_empty()
        );
        assert!(matches!(
            r.list("p1", Some("zz"), 10, usize::MAX),
            Err(CommentViewError::BadCursor)
        ));
    }

    #[test]
    fn the_digest_is_the_same_for_any_batching() {
        let dir = tempfile::tempdir().expect("tempdir");
        let events: Vec<Incoming> = (0..40u64)
            .map(|i| {
                let c = format!("c{}", i % 7);
                let e = if i < 7 {
                    added("p", &format!("b{i}"))
                } else if i % 5 == 0 {
                    Event::Removed {
                        reason: comments::RemovalReason::PostDeleted,
                    }
                } else {
                    Event::Edited {
                        body: format!("e{i}"),
                    }
                };
                incoming(i + 1, "p", &c, i as i64, &e)
            })
            .collect();
        let mut digests = Vec::new();
        for size in [1usize, 3, 40] {
            let (mut p, r) = open(&dir.path().join(format!("{size}.redb"))).expect("open");
            for chunk in events.chunks(size) {
                let batch: Vec<&Incoming> = chunk.iter().collect();
                p.apply_batch(&batch).expect("apply");
            }
            digests.push(r.digest().expect("digest"));
        }
        assert_eq!(digests[0], digests[1]);
        assert_eq!(digests[1], digests[2]);
    }
}
