//! The write side of post-search: `SearchProjection`, held posts, and the
//! delete-by-id query that upserts use.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Instant;

use posts::Event;
use projection::{Incoming, Parked, Projection, ProjectionError};
use tantivy::index::{SegmentId, SegmentMeta};
use tantivy::merge_policy::NoMergePolicy;
use tantivy::query::{ConstScorer, EmptyQuery, EmptyScorer, EnableScoring, Query, Scorer, Weight};
use tantivy::schema::{IndexRecordOption, Value};
use tantivy::{Index, IndexWriter, TantivyDocument, Term};

use super::document::PostDoc;
use crate::{CATCH_UP_COMMIT_INTERVAL, PARKED_RECENT_MAX, POST_SEARCH, decode, micros};

use super::*;

/// The writer side.
pub struct SearchProjection {
    pub(super) reader: SearchReader,
    pub(super) writer: IndexWriter<PostDoc>,
    /// Durable: in the last commit's payload.
    pub(super) checkpoint: u64,
    /// Applied to the writer, not yet committed.
    pub(super) applied: u64,
    pub(super) parked_total: u64,
    pub(super) parked_recent: Vec<Parked>,
    /// The latest documents changed since the last commit (invisible to the
    /// searcher), in two generations of up to `PENDING_DOCS_MAX / 2`: an
    /// update of a post changed since the last commit reads it from here.
    /// Bounded because holding every document of a commit interval was
    /// ~45 MB at catch-up speed. foldhash: SipHash over these ids and
    /// `known` showed in catch-up profiles, and the keys are our own post
    /// ids, not attacker-chosen lookups.
    pub(super) pending: foldhash::HashMap<String, Arc<Doc>>,
    pub(super) pending_old: foldhash::HashMap<String, Arc<Doc>>,
    /// Text bytes put in `pending` since its generation began (an upper
    /// bound: a replaced document is counted twice).
    pub(super) pending_bytes: usize,
    /// Text bytes handed to the writer since the last commit: tantivy
    /// queues up to 10k documents for its indexing threads, whatever their
    /// size, so a batch boundary past [`WRITTEN_BYTES_MAX`] commits.
    pub(super) written_bytes: usize,
    /// Fingerprints of every id changed since the last commit: one that is
    /// no longer in `pending` makes the next change of it commit first, so
    /// that the index has its document.
    pub(super) touched: foldhash::HashSet<u64>,
    /// When the index was opened empty (a catch-up from scratch, a replay),
    /// every post it holds went through this process. An id whose
    /// fingerprint is not in here does not exist, so a create needs neither
    /// an index lookup nor a delete term; a fingerprint that is in here may
    /// be a collision, so it only sends the lookup to the index. 64-bit
    /// fingerprints instead of the ids: ~10-20 B a post instead of ~90.
    /// `None` once that knowledge is lost (recover, cap).
    pub(super) known: Option<foldhash::HashSet<u64>>,
    /// Per-process seed of the fingerprints.
    pub(super) fingerprint: foldhash::quality::RandomState,
    pub(super) last_commit: Instant,
    /// The segments of the searcher, by generation (see [`Where`]).
    pub(super) seen: (u64, Arc<[SegmentId]>),
    /// Everything but the content of each post this process wrote, as of
    /// its last applied event. An update that sets the content (every one
    /// in `just bench`) or a delete needs nothing else of the current
    /// document, so it skips reading it from the index (a doc-store block
    /// and a decode; with the id lookups, 6% of a catch-up's CPU). Exact
    /// ids, not fingerprints: a wrong hit would be a wrong document.
    /// Bounded by `HEADERS_MAX`; forgotten on rollback. Boxed, as `held`.
    pub(super) headers: foldhash::HashMap<Box<str>, Box<Header>>,
    /// Posts changed while far behind, as of their last applied event, not
    /// yet given to the writer: a later event of the same post changes the
    /// held document instead of indexing another version and deleting the
    /// one before (a catch-up of `just bench`'s stream, every post created
    /// and later edited, then indexes each post once, and its index holds
    /// no replaced versions). Written to the index before every commit (the
    /// checkpoint covers them), and when they reach [`HELD_BYTES_MAX`];
    /// dropped on rollback. Kafka Streams' record cache does the same for
    /// its state stores. A post here is looked up nowhere else. Boxed: the
    /// table then moves 32-byte entries when it grows, not whole documents
    /// (its resizes were 2% of a catch-up's CPU, mostly faulting in the new
    /// tables).
    pub(super) held: foldhash::HashMap<String, Box<Held>>,
    pub(super) held_bytes: usize,
    /// [`HELD_BYTES_MAX`]; smaller in tests.
    pub(super) held_bytes_max: usize,
    /// Whether far behind (see [`crate::Backlog`]).
    pub(super) backlog: crate::Backlog,
    /// Built for a rebuild: no merges until [`Projection::compact`].
    pub(super) rebuild: bool,
}

/// A post's document now, and where the version it replaces is, for the
/// writer: at once, or held back (see [`SearchProjection::held`]) until the
/// next commit, which writes it first (the `Where` was found when the post
/// was first held, and holds until then).
pub(super) struct Held {
    pub(super) doc: Doc,
    pub(super) replaces: Where,
    pub(super) fp: u64,
}

impl Held {
    pub(super) fn bytes(&self) -> usize {
        let d = &self.doc;
        HELD_ENTRY_BYTES
            + 2 * d.post_id.len()
            + d.title.len()
            + d.content.len()
            + d.author_name.len()
    }
}

/// A post's document without its content.
#[derive(Debug, Clone)]
pub(super) struct Header {
    pub(super) title: Box<str>,
    pub(super) author_name: Box<str>,
    pub(super) created_at_us: i64,
    pub(super) version: u64,
    pub(super) deleted: bool,
    /// The searcher generation this version was written in: if it is still
    /// the current one, the version is not committed yet.
    pub(super) written_in: u64,
}

impl Header {
    pub(super) fn of(doc: &Doc, written_in: u64) -> Self {
        Self {
            title: doc.title.as_str().into(),
            author_name: doc.author_name.as_str().into(),
            created_at_us: doc.created_at_us,
            version: doc.version,
            deleted: doc.deleted,
            written_in,
        }
    }

    /// The document with an empty content, for a change that replaces or
    /// drops the content.
    pub(super) fn doc(&self, post_id: &str) -> Doc {
        Doc {
            post_id: post_id.to_string(),
            title: self.title.to_string(),
            content: String::new(),
            author_name: self.author_name.to_string(),
            created_at_us: self.created_at_us,
            updated_at_us: self.created_at_us,
            version: self.version,
            deleted: self.deleted,
        }
    }
}

/// Where the document an upsert replaces is, as far as the deletes go.
pub(super) enum Where {
    /// Not found: nothing to delete.
    Nowhere,
    /// In the committed segment `holder`; none of the other `seen` segments
    /// (the searcher's) has a live document of the post.
    Committed {
        holder: SegmentId,
        seen: Arc<[SegmentId]>,
    },
    /// Changed since the last commit, whose searcher holds the `seen`
    /// segments: earlier versions in them were deleted by the changes since,
    /// so only segments written since (flushed or merged) can hold it.
    Uncommitted { seen: Arc<[SegmentId]> },
    /// Kept in `headers` but not found in the index (which should not
    /// happen): any segment may hold it.
    Anywhere,
}

impl SearchProjection {
    /// The post's document now, and where the one to delete is. Without
    /// `content`, the document's content may come back empty.
    pub(super) fn current(
        &mut self,
        id: &str,
        fp: u64,
        content: bool,
    ) -> Result<(Option<Doc>, Where), ProjectionError> {
        if let Some(d) = self.pending.get(id).or_else(|| self.pending_old.get(id)) {
            let d = Doc::clone(d);
            let searcher = self.reader.reader.searcher();
            return Ok((Some(d), self.uncommitted(&searcher)));
        }
        if !content && let Some(h) = self.headers.get(id) {
            let doc = h.doc(id);
            let written_in = h.written_in;
            let searcher = self.reader.reader.searcher();
            if written_in == searcher.generation().generation_id() {
                return Ok((Some(doc), self.uncommitted(&searcher)));
            }
            // Committed since: the id's postings say in which segment; the
            // document itself is not read.
            let found = self
                .reader
                .find(&searcher, id)
                .map_err(ProjectionError::new)?;
            let replaces = match found {
                Some((_, holder)) => self.committed(&searcher, holder),
                None => Where::Anywhere,
            };
            return Ok((Some(doc), replaces));
        }
        if self.touched.contains(&fp) {
            // Changed since the last commit, and its document let go (or a
            // fingerprint collision): commit, so the index has it.
            self.commit()?;
        }
        if self.known.as_ref().is_some_and(|k| !k.contains(&fp)) {
            return Ok((None, Where::Nowhere));
        }
        let searcher = self.reader.reader.searcher();
        let found = self
            .reader
            .locate(&searcher, id)
            .map_err(ProjectionError::new)?;
        Ok(match found {
            Some((holder, doc)) => (Some(doc), self.committed(&searcher, holder)),
            None => (None, Where::Nowhere),
        })
    }

    pub(super) fn committed(&mut self, searcher: &tantivy::Searcher, holder: SegmentId) -> Where {
        Where::Committed {
            holder,
            seen: self.seen_by(searcher),
        }
    }

    pub(super) fn uncommitted(&mut self, searcher: &tantivy::Searcher) -> Where {
        Where::Uncommitted {
            seen: self.seen_by(searcher),
        }
    }

    /// The segments of `searcher`, computed once per generation.
    pub(super) fn seen_by(&mut self, searcher: &tantivy::Searcher) -> Arc<[SegmentId]> {
        let generation = searcher.generation().generation_id();
        if self.seen.0 != generation {
            let ids = searcher
                .segment_readers()
                .iter()
                .map(tantivy::SegmentReader::segment_id)
                .collect();
            self.seen = (generation, ids);
        }
        self.seen.1.clone()
    }

    /// Everything known about changes since the last commit: after a commit
    /// the index has them; after a rollback they never happened.
    pub(super) fn forget_pending(&mut self) {
        self.pending.clear();
        self.pending_old.clear();
        self.pending_bytes = 0;
        self.touched.clear();
    }

    pub(super) fn apply_one(
        &mut self,
        incoming: &Incoming,
    ) -> Result<Result<(), String>, ProjectionError> {
        let (env, event) = match decode(incoming) {
            Ok(v) => v,
            Err(reason) => return Ok(Err(reason)),
        };
        let id = env.aggregate_id.clone();
        let at = micros(env.occurred_at);
        let fp = self.fingerprint.hash_one(&id);
        // Only an update that keeps the content needs the current one.
        let content = matches!(event, Event::Updated { content: None, .. });
        let held = self.held.remove(&id);
        let from_held = held.is_some();
        let (current, replaces) = match held {
            Some(h) => {
                let h = *h;
                self.held_bytes -= h.bytes();
                (Some(h.doc), h.replaces)
            }
            None => self.current(&id, fp, content)?,
        };
        let doc = match (current, event) {
            (
                None,
                Event::Created {
                    title,
                    content,
                    author_name,
                },
            ) => Doc {
                post_id: id.clone(),
                title,
                content,
                author_name,
                created_at_us: at,
                updated_at_us: at,
                version: 1,
                deleted: false,
            },
            (
                Some(mut d),
                Event::Updated {
                    title,
                    content,
                    author_name,
                },
            ) if !d.deleted => {
                if let Some(t) = title {
                    d.title = t;
                }
                if let Some(c) = content {
                    d.content = c;
                }
                if let Some(a) = author_name {
                    d.author_name = a;
                }
                d.version += 1;
                d.updated_at_us = at;
                d
            }
            (Some(mut d), Event::Deleted) if !d.deleted => {
                d.deleted = true;
                d.version += 1;
                d.updated_at_us = at;
                d
            }
            (state, event) => {
                let reason = crate::cannot_follow(&event, state.as_ref().map(|d| d.deleted));
                if from_held && let Some(doc) = state {
                    // Refused: the held post stays as it was.
                    self.hold(id, Held { doc, replaces, fp })?;
                }
                return Ok(Err(reason));
            }
        };
        let change = Held { doc, replaces, fp };
        if self.backlog.far_behind() {
            self.hold(id, change)?;
        } else {
            self.write(id, change, false)?;
        }
        Ok(Ok(()))
    }

    /// Holds the post's document back from the writer (see [`Self::held`]);
    /// writes every held post once they take too much memory.
    pub(super) fn hold(&mut self, id: String, held: Held) -> Result<(), ProjectionError> {
        self.held_bytes += held.bytes();
        self.held.insert(id, Box::new(held));
        if self.held_bytes > self.held_bytes_max {
            self.write_held(false)?;
        }
        Ok(())
    }

    /// Gives every held post to the writer; `committing` when a commit
    /// follows at once (see [`Self::write`]).
    pub(super) fn write_held(&mut self, committing: bool) -> Result<(), ProjectionError> {
        if self.held.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let held = std::mem::take(&mut self.held);
        let posts = held.len();
        self.held_bytes = 0;
        // Room for every post at once: grown by doubling, these tables
        // rehashed ~100k entries several times at the end of a catch-up.
        if let Some(known) = &mut self.known {
            known.reserve(posts.min(KNOWN_IDS_MAX.saturating_sub(known.len())));
        }
        self.headers
            .reserve(posts.min(HEADERS_MAX.saturating_sub(self.headers.len())));
        for (id, h) in held {
            self.write(id, *h, committing)?;
        }
        tracing::debug!(
            posts,
            secs = started.elapsed().as_secs_f64(),
            "wrote held posts to the search index"
        );
        Ok(())
    }

    /// Gives the post's document to the writer, deleting the version it
    /// replaces. Unless `committing` (a commit follows before any other
    /// event is applied, and forgets them), the post is also remembered as
    /// changed since the last commit, with its document: a catch-up's last
    /// write of held posts then skips ~100k map inserts that the commit
    /// throws away (3% of its CPU).
    pub(super) fn write(
        &mut self,
        id: String,
        change: Held,
        committing: bool,
    ) -> Result<(), ProjectionError> {
        let Held { doc, replaces, fp } = change;
        let f = self.reader.fields;
        if !matches!(replaces, Where::Nowhere) {
            let delete = DeleteById {
                term: Term::from_field_text(f.post_id, &id),
                replaces: Arc::new(replaces),
            };
            self.writer
                .delete_query(Box::new(delete))
                .map_err(ProjectionError::new)?;
        }
        let doc = Arc::new(doc);
        self.writer
            .add_document(PostDoc::new(doc.clone(), f))
            .map_err(ProjectionError::new)?;
        self.written_bytes += doc.title.len() + doc.content.len() + doc.author_name.len();
        if let Some(known) = &mut self.known {
            if known.len() < KNOWN_IDS_MAX {
                known.insert(fp);
            } else {
                self.known = None;
            }
        }
        let written_in = self.reader.reader.searcher().generation().generation_id();
        let header = Header::of(&doc, written_in);
        if let Some(h) = self.headers.get_mut(id.as_str()) {
            **h = header;
        } else {
            if self.headers.len() >= HEADERS_MAX {
                self.headers.clear();
            }
            self.headers.insert(id.as_str().into(), Box::new(header));
        }
        if committing {
            return Ok(());
        }
        self.touched.insert(fp);
        if self.pending.len() >= PENDING_DOCS_MAX / 2 || self.pending_bytes >= PENDING_BYTES_MAX / 2
        {
            // The older generation goes; both tables keep their capacity.
            std::mem::swap(&mut self.pending, &mut self.pending_old);
            self.pending.clear();
            self.pending_bytes = 0;
        }
        self.pending_bytes += doc.title.len() + doc.content.len() + doc.author_name.len();
        self.pending.insert(id, doc);
        Ok(())
    }

    pub(super) fn commit(&mut self) -> Result<(), ProjectionError> {
        // The checkpoint covers the held posts' events: they go in first.
        self.write_held(true)?;
        if self.applied == self.checkpoint {
            return Ok(());
        }
        let payload = CommitPayload {
            checkpoint: self.applied,
            parked_total: self.parked_total,
            parked_recent: self.parked_recent.clone(),
        };
        let text = serde_json::to_string(&payload).map_err(ProjectionError::new)?;
        let mut prepared = self.writer.prepare_commit().map_err(ProjectionError::new)?;
        prepared.set_payload(&text);
        crate::failpoint("search-before-commit");
        prepared.commit().map_err(ProjectionError::new)?;
        crate::failpoint("search-after-commit");
        self.reader.reader.reload().map_err(ProjectionError::new)?;
        self.checkpoint = self.applied;
        self.forget_pending();
        self.last_commit = Instant::now();
        self.written_bytes = 0;
        Ok(())
    }
}

/// Sets up a new writer (opened, or made by a rollback, which comes with
/// tantivy's default merge policy).
pub(super) fn prepare_writer(writer: &IndexWriter<PostDoc>, rebuild: bool) -> tantivy::Result<()> {
    if rebuild {
        // Intermediate merges would rewrite documents that the final merge
        // into one segment rewrites again.
        writer.set_merge_policy(Box::new(NoMergePolicy));
    }
    past_committed_opstamp(writer)
}

/// Spends the opstamp a new writer (opened, or made by a rollback) would
/// give its first operation on a delete that matches nothing.
///
/// tantivy starts a new writer's opstamps at the last commit's, which is
/// also the delete opstamp of every segment that commit deleted from. A
/// merge started before the next commit treats such a segment's deletes as
/// up to date and does not run the first delete on it, yet may take the
/// merged segment's delete cursor from another source, already past that
/// delete: the delete is lost, and the document an upsert replaced stays
/// alive in the merged segment (tantivy 0.27; the consumer-kill chaos test
/// found it, and a unit test below forces it). With this spent, no real
/// delete shares an opstamp with a segment's deletes.
pub(super) fn past_committed_opstamp(writer: &IndexWriter<PostDoc>) -> tantivy::Result<()> {
    writer.delete_query(Box::new(EmptyQuery)).map(drop)
}

/// Tokenizers are not stored with the index: the same one for every writer
/// and reader of it, under the name the `text` field records ([`super::TEXT_TOKENIZER`]). The highlighter's
/// ASCII path cuts words as this tokenizer does (its test registers the
/// tokenizers through here).
pub(crate) fn register_tokenizers(index: &Index) {
    index.tokenizers().register(
        super::TEXT_TOKENIZER,
        crate::tokenizer::PostTokenizer::default(),
    );
}

/// What an upsert deletes: the documents of one post id, unscored, in the
/// segments that can hold it. `IndexWriter::delete_term` built a scored
/// `TermQuery` weight per delete (a 256-entry BM25 cache and an
/// explanation, about a microsecond), and tantivy looked the id up in every
/// segment, at every commit, on one thread: most of the time the final
/// commit of a catch-up left a core idle.
#[derive(Clone)]
pub(super) struct DeleteById {
    pub(super) term: Term,
    pub(super) replaces: Arc<Where>,
}

impl std::fmt::Debug for DeleteById {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeleteById({:?})", self.term)
    }
}

impl DeleteById {
    /// Whether the segment cannot hold a live document of the post.
    pub(super) fn passes_over(&self, segment: SegmentId) -> bool {
        match &*self.replaces {
            Where::Committed { holder, seen } => segment != *holder && seen.contains(&segment),
            Where::Uncommitted { seen } => seen.contains(&segment),
            Where::Nowhere | Where::Anywhere => false,
        }
    }
}

impl Query for DeleteById {
    fn weight(&self, _: EnableScoring<'_>) -> tantivy::Result<Box<dyn Weight>> {
        Ok(Box::new(self.clone()))
    }
}

impl Weight for DeleteById {
    fn scorer(
        &self,
        reader: &tantivy::SegmentReader,
        boost: tantivy::Score,
    ) -> tantivy::Result<Box<dyn Scorer>> {
        if self.passes_over(reader.segment_id()) {
            return Ok(Box::new(EmptyScorer));
        }
        let postings = reader
            .inverted_index(self.term.field())?
            .read_postings(&self.term, IndexRecordOption::Basic)?;
        Ok(match postings {
            Some(p) => Box::new(ConstScorer::new(p, boost)),
            None => Box::new(EmptyScorer),
        })
    }

    fn explain(
        &self,
        _: &tantivy::SegmentReader,
        _: tantivy::DocId,
    ) -> tantivy::Result<tantivy::query::Explanation> {
        Err(tantivy::TantivyError::InvalidArgument(
            "a delete by id has no score to explain".into(),
        ))
    }
}

/// The `TantivyDocument` a [`PostDoc`] of `doc` stands for (tests write
/// with tantivy's own document type).
#[cfg(test)]
pub(super) fn to_tantivy(doc: &Doc, f: Fields) -> TantivyDocument {
    tantivy::Document::into_tantivy_document(PostDoc::new(Arc::new(doc.clone()), f))
}

pub(super) fn from_tantivy(t: &TantivyDocument, f: Fields) -> Doc {
    let text = |field| {
        t.get_first(field)
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    };
    Doc {
        post_id: text(f.post_id),
        title: text(f.title),
        content: text(f.content),
        author_name: text(f.author_name),
        created_at_us: t
            .get_first(f.created_at)
            .and_then(|v| v.as_i64())
            .unwrap_or(0),
        updated_at_us: t
            .get_first(f.updated_at)
            .and_then(|v| v.as_i64())
            .unwrap_or(0),
        version: t.get_first(f.version).and_then(|v| v.as_u64()).unwrap_or(0),
        deleted: t.get_first(f.deleted).and_then(|v| v.as_u64()).unwrap_or(0) == 1,
    }
}

impl Projection for SearchProjection {
    fn name(&self) -> &str {
        POST_SEARCH
    }

    fn checkpoint(&self) -> u64 {
        self.checkpoint
    }

    fn visible(&self) -> u64 {
        self.checkpoint
    }

    fn apply_batch(&mut self, batch: &[&Incoming]) -> Result<Vec<Parked>, ProjectionError> {
        let mut parked = Vec::new();
        for incoming in batch {
            assert!(
                incoming.seq > self.applied,
                "event {} at or below applied {}",
                incoming.seq,
                self.applied
            );
            if let Err(reason) = self.apply_one(incoming)? {
                let p = Parked {
                    seq: incoming.seq,
                    reason,
                };
                // Recorded at once: `apply_one` may commit mid-batch, and a
                // commit's payload must hold every parked event it covers.
                self.parked_total += 1;
                self.parked_recent.push(p.clone());
                let excess = self.parked_recent.len().saturating_sub(PARKED_RECENT_MAX);
                self.parked_recent.drain(..excess);
                parked.push(p);
            }
            self.applied = incoming.seq;
        }
        let interval = if self.backlog.far_behind() {
            CATCH_UP_COMMIT_INTERVAL
        } else {
            COMMIT_INTERVAL
        };
        if self.last_commit.elapsed() >= interval || self.written_bytes >= WRITTEN_BYTES_MAX {
            self.commit()?;
        }
        Ok(parked)
    }

    fn set_backlog(&mut self, events: u64) {
        self.backlog.update(events);
    }

    fn flush(&mut self) -> Result<(), ProjectionError> {
        self.commit()
    }

    fn flush_due(&self) -> bool {
        // With nothing to commit (a batch's own commit covered it all) the
        // flush is free, and lets the runner see at once that it caught up.
        self.applied == self.checkpoint || self.last_commit.elapsed() >= FLUSH_GAP_MIN
    }

    /// Commits, then merges every segment into one, without the versions
    /// that updates replaced: the index that `just bench`'s stream (creates,
    /// then edits) leaves after a catch-up had six segments, a sixth to a
    /// third of its documents replaced versions, and a search over it took
    /// 2.4 times the CPU it takes over the same index merged. The merge
    /// keeps the commit's payload, so the checkpoint is unchanged.
    fn compact(&mut self) -> Result<(), ProjectionError> {
        self.commit()?;
        let metas = self
            .reader
            .index
            .searchable_segment_metas()
            .map_err(ProjectionError::new)?;
        if metas.len() < 2 && metas.iter().all(|m| !m.has_deletes()) {
            return Ok(());
        }
        let started = Instant::now();
        let ids: Vec<SegmentId> = metas.iter().map(SegmentMeta::id).collect();
        let deleted: u32 = metas.iter().map(SegmentMeta::num_deleted_docs).sum();
        self.writer
            .merge(&ids)
            .wait()
            .map_err(ProjectionError::new)?;
        self.reader.reader.reload().map_err(ProjectionError::new)?;
        tracing::info!(
            segments = ids.len(),
            replaced_versions = deleted,
            secs = started.elapsed().as_secs_f64(),
            "merged the rebuilt search index into one segment"
        );
        Ok(())
    }

    fn recover(&mut self) -> Result<(), ProjectionError> {
        self.writer.rollback().map_err(ProjectionError::new)?;
        self.written_bytes = 0;
        prepare_writer(&self.writer, self.rebuild).map_err(ProjectionError::new)?;
        // A commit whose reload failed left the searcher behind the index.
        self.reader.reader.reload().map_err(ProjectionError::new)?;
        // Rolled-back ids may be in `known`: stop trusting it; rolled-back
        // changes are in `headers`.
        self.known = None;
        self.headers.clear();
        self.held.clear();
        self.held_bytes = 0;
        let payload: CommitPayload = self
            .reader
            .index
            .load_metas()
            .map_err(ProjectionError::new)?
            .payload
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(ProjectionError::new)?
            .unwrap_or_default();
        self.checkpoint = payload.checkpoint;
        self.applied = payload.checkpoint;
        self.parked_total = payload.parked_total;
        self.parked_recent = payload.parked_recent;
        self.forget_pending();
        Ok(())
    }

    fn parked_total(&self) -> u64 {
        self.parked_total
    }

    fn parked_recent(&self) -> Vec<Parked> {
        let mut v = self.parked_recent.clone();
        v.reverse();
        v
    }
}
