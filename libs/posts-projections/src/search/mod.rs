//! `post-search`: a tantivy index. Documents are upserted by post id (delete
//! term + add), so re-applying is harmless; the checkpoint and parked events
//! ride in the commit payload, atomically with the documents. Deleted posts
//! stay as text-less tombstones so the projection can tell "deleted" from
//! "never existed" exactly as `post-view` does, and are never returned.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use projection::Parked;
use serde::{Deserialize, Serialize};
use tantivy::schema::{
    Field, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing, TextOptions,
};

/// The analyzer of the `text` field, by the name the schema records: a new
/// name for a new analysis (accents folded since this one), so that an
/// index built by an older one is rebuilt from the stream on open.
pub(crate) const TEXT_TOKENIZER: &str = "post_folded";
use tantivy::{Index, ReloadPolicy};

/// Longest accepted query text, in bytes.
pub const QUERY_BYTES_MAX: usize = 512;
/// Most terms and phrases in one query: more is a 400, not a slow search.
pub const QUERY_TERMS_MAX: usize = 16;
/// Words of one query matched with typo tolerance, at most; the others
/// match as typed. Bounds the CPU one query can cost.
pub const FUZZY_TERMS_MAX: usize = 4;
/// Commit at most this often while catching up; when idle the runner flushes
/// at once, so live visibility does not wait for it. Fewer commits mean
/// fewer small segments to merge.
const COMMIT_INTERVAL: Duration = Duration::from_millis(1000);
/// What the held posts may take (their text plus a fixed overhead each)
/// before they are all written to the index. 96 MiB holds the 100k posts
/// of `just bench`'s catch-up until its last batch, as 128 did (post-search
/// applied them in the same time); with 100 KB posts every byte of it is
/// held, and posts-query's memory target is 512 MB.
const HELD_BYTES_MAX: usize = 96 * 1024 * 1024;
/// Per held post, besides its text: the map entry, the `Doc` and `Where`.
const HELD_ENTRY_BYTES: usize = 256;
/// Least time between two commits when following live: events trickling in
/// one by one share a commit instead of each writing and fsyncing a segment
/// (~3 ms of CPU per event in `just bench` profiles). Bounds how much later
/// than `post-view` a search sees a write.
const FLUSH_GAP_MIN: Duration = Duration::from_millis(50);
/// Ids remembered when the index started empty (see `SearchProjection::known`);
/// past this, about 40 MB, fall back to index lookups.
const KNOWN_IDS_MAX: usize = 2_000_000;
/// Post headers kept (see `SearchProjection::headers`): about 200 B each,
/// so at most ~40 MB; when full the set starts over.
const HEADERS_MAX: usize = 200_000;
/// Documents changed since the last commit kept for re-reading (see
/// `SearchProjection::pending`): the last 8-16k, which re-edits of a post
/// within a commit interval hit.
const PENDING_DOCS_MAX: usize = 16_384;
/// ... and at most this many bytes of their text: 16k documents of 100 KB
/// were 1.6 GB.
const PENDING_BYTES_MAX: usize = 32 * 1024 * 1024;
/// Text handed to the writer between two commits, at most (plus a batch):
/// tantivy's indexing queue holds 10k documents, which were 1 GB and more
/// of 100 KB posts (`bench --content-bytes 100000`: 2.4 GB anonymous
/// memory in a catch-up). Ordinary posts never reach it between the
/// timed commits.
const WRITTEN_BYTES_MAX: usize = 32 * 1024 * 1024;
/// Tantivy indexing threads, sharing the writer heap. Indexing is most of
/// `post-search`'s CPU, and a commit makes the writer finish, serialise and
/// fsync every thread's segment while the runner waits: with one thread,
/// catch-up profiles showed a core idle through each commit (~0.3 s a
/// second) and the indexing thread as the critical path. Two segments per
/// commit cost more CPU per event (index lookups per update, merging: 29 to
/// 30-32 us in `posts-query`), less than the idle core gave back (catch-up
/// 0.39-0.42 to 0.45-0.48 of the raw drain in `bench --only catchup`).
const INDEXING_THREADS: usize = 2;
/// Indexing heap for live following: small, the memory target is 512 MB.
pub const WRITER_HEAP_LIVE_BYTES: usize = 64 * 1024 * 1024;
/// Indexing heap for a replay: bigger segments, fewer merges.
pub const WRITER_HEAP_REPLAY_BYTES: usize = 256 * 1024 * 1024;
/// Doc store block: a hit's stored fields are read by copying (formerly
/// decompressing) its whole block, so small blocks (a few posts) keep
/// result pages and update lookups cheap; tantivy's 16 KiB default made LZ4
/// decompression an eighth of a search's CPU in `just bench`.
const DOCSTORE_BLOCK_BYTES: usize = 4096;
/// The doc store is not compressed. LZ4 (tantivy's default) spent 2 us of
/// CPU per event in catch-up, on a compressor thread per indexing thread,
/// and again in merges: without it `bench --only catchup` went from 0.460
/// to 0.506 of the raw drain (7 alternating pairs) and `--full` from 0.426
/// to 0.454, for about half again the index's size on disk (96 to 146 MB
/// at 100k posts). Peak RSS did not move: catch-up reads no stored
/// document when a post's header is kept.
const DOCSTORE_COMPRESSION: tantivy::store::Compressor = tantivy::store::Compressor::None;
/// The title's weight: it is indexed this many times in `text`, so a title
/// word has this many times the term frequency of a content word (BM25
/// saturates it, as it does any repeated word).
const TITLE_REPEAT: usize = 2;
/// A typo match counts less than an exact one.
const FUZZY_WEIGHT: f32 = 0.3;
const SNIPPET_CHARS_MAX: usize = 160;
/// The deepest a search pages: ranking a page at offset `n` keeps the top
/// `n + limit` hits, so deeper pages cost more; a cursor past this is
/// refused and no page offers one.
pub const SEARCH_OFFSET_MAX: usize = 100_000;

#[derive(Clone, Copy)]
struct Fields {
    post_id: Field,
    title: Field,
    content: Field,
    /// What every word and phrase must match: the title
    /// [`TITLE_REPEAT`] times, then the content, with positions (values are
    /// a position apart, so no phrase spans two). One posting list per
    /// word makes a query a plain term intersection, which tantivy ranks
    /// with block-max WAND, skipping blocks that cannot reach the top;
    /// title and content as separate fields made each word a union whose
    /// every posting was scored (most of a search's CPU in `just bench`).
    text: Field,
    author_name: Field,
    created_at: Field,
    updated_at: Field,
    version: Field,
    deleted: Field,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let fields = Fields {
        post_id: b.add_text_field("post_id", STRING | STORED),
        title: b.add_text_field("title", STORED),
        content: b.add_text_field("content", STORED),
        text: b.add_text_field(
            "text",
            TextOptions::default().set_indexing_options(
                TextFieldIndexing::default()
                    .set_tokenizer(TEXT_TOKENIZER)
                    .set_index_option(IndexRecordOption::WithFreqsAndPositions),
            ),
        ),
        // Raw, untokenised: an exact filter.
        author_name: b.add_text_field("author_name", STRING | STORED),
        created_at: b.add_i64_field("created_at", STORED),
        updated_at: b.add_i64_field("updated_at", STORED),
        version: b.add_u64_field("version", STORED),
        // Tombstones hold no text, so no query can match them.
        deleted: b.add_u64_field("deleted", STORED),
    };
    (b.build(), fields)
}

/// One post as the index stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    pub post_id: String,
    pub title: String,
    pub content: String,
    pub author_name: String,
    pub created_at_us: i64,
    pub updated_at_us: i64,
    pub version: u64,
    pub deleted: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CommitPayload {
    checkpoint: u64,
    parked_total: u64,
    parked_recent: Vec<Parked>,
}

/// Opens (or creates) the index in `dir`; returns the writer and a reader.
///
/// # Errors
/// When the directory cannot be opened or is locked by another writer.
pub fn open(
    dir: &Path,
    writer_heap_bytes: usize,
) -> anyhow::Result<(SearchProjection, SearchReader)> {
    open_with(dir, writer_heap_bytes, false)
}

/// Opens (or creates) the index in `dir` for a rebuild: a bigger indexing
/// heap, and no merges while it is built; [`Projection::compact`] then
/// merges it into one segment.
///
/// # Errors
/// When the directory cannot be opened or is locked by another writer.
pub fn open_for_rebuild(dir: &Path) -> anyhow::Result<(SearchProjection, SearchReader)> {
    open_with(dir, WRITER_HEAP_REPLAY_BYTES, true)
}

fn open_with(
    dir: &Path,
    writer_heap_bytes: usize,
    rebuild: bool,
) -> anyhow::Result<(SearchProjection, SearchReader)> {
    std::fs::create_dir_all(dir)?;
    let (schema, fields) = schema();
    let mut existing = None;
    if dir.join("meta.json").exists() {
        let index = Index::open_in_dir(dir)?;
        if index.schema() == schema {
            existing = Some(index);
        } else {
            // An index from an older layout: it is only a projection, so
            // start it over; the runner rebuilds it from sequence 1.
            tracing::warn!(
                dir = %dir.display(),
                "search index has an older schema; rebuilding it from the stream"
            );
            drop(index);
            std::fs::remove_dir_all(dir)?;
            std::fs::create_dir_all(dir)?;
        }
    }
    let mut index = match existing {
        Some(index) => index,
        None => Index::builder().schema(schema).create_in_dir(dir)?,
    };
    // The doc store settings, for new indexes and for the segments an
    // existing one writes from now on (saved with its next commit). Each
    // segment records its own compressor, and a merge re-stores documents
    // whose segment was compressed otherwise, so an index written with
    // LZ4 reads and merges as before.
    let settings = index.settings_mut();
    settings.docstore_blocksize = DOCSTORE_BLOCK_BYTES;
    settings.docstore_compression = DOCSTORE_COMPRESSION;
    // Blocks are written by the indexing thread, not handed to a thread of
    // their own (tantivy's default, one per segment writer, fed through a
    // channel): with nothing to compress that was a wake-up and a context
    // switch per 4 KiB block. Inline, catch-up went from 0.478 to 0.502 of
    // the raw drain and posts-query from 32.5 to 29.5 us of CPU per event
    // (8 alternating pairs of `bench --only catchup`).
    settings.docstore_compress_dedicated_thread = false;
    register_tokenizers(&index);
    let payload: CommitPayload = index
        .load_metas()?
        .payload
        .as_deref()
        .map(serde_json::from_str)
        .transpose()?
        .unwrap_or_default();
    let reader = index
        .reader_builder()
        .reload_policy(ReloadPolicy::Manual)
        .try_into()?;
    let writer = index.writer_with_num_threads(INDEXING_THREADS, writer_heap_bytes)?;
    prepare_writer(&writer, rebuild)?;
    let search_reader = SearchReader {
        index: index.clone(),
        reader,
        fields,
        dense_bitmaps: Arc::default(),
    };
    Ok((
        SearchProjection {
            reader: search_reader.clone(),
            writer,
            checkpoint: payload.checkpoint,
            applied: payload.checkpoint,
            parked_total: payload.parked_total,
            parked_recent: payload.parked_recent,
            pending: foldhash::HashMap::default(),
            pending_old: foldhash::HashMap::default(),
            pending_bytes: 0,
            written_bytes: 0,
            touched: foldhash::HashSet::default(),
            known: (payload.checkpoint == 0 && search_reader.reader.searcher().num_docs() == 0)
                .then(foldhash::HashSet::default),
            fingerprint: foldhash::quality::RandomState::default(),
            last_commit: Instant::now(),
            seen: (u64::MAX, Arc::from(Vec::new())),
            headers: foldhash::HashMap::default(),
            held: foldhash::HashMap::default(),
            held_bytes: 0,
            held_bytes_max: HELD_BYTES_MAX,
            backlog: crate::Backlog::default(),
            rebuild,
        },
        search_reader,
    ))
}

mod count;
mod document;
mod read;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod upsert_tests;
mod write;

use count::*;
pub use read::*;
pub use write::*;
