use projection::{Incoming, Projection};
use tantivy::collector::Count;
use tantivy::index::{SegmentId, SegmentMeta};
use tantivy::{Index, IndexWriter, Term};

use super::*;
use crate::{FAR_BEHIND_EVENTS, NEAR_HEAD_EVENTS};

/// The bitmap count agrees with tantivy's own count over several
/// segments, with deleted documents and an author filter.
#[test]
fn conjunction_count_matches_tantivy_count() {
    let dir = tempfile::tempdir().unwrap();
    let (p, reader) = open(dir.path(), WRITER_HEAP_LIVE_BYTES).unwrap();
    let f = reader.fields;
    drop((p, reader));
    // One indexing thread: three segments of exactly 200 documents, so
    // which words are dense in which segment does not vary.
    let index = Index::open_in_dir(dir.path()).unwrap();
    super::write::register_tokenizers(&index);
    let mut writer: IndexWriter = index.writer_with_num_threads(1, 15_000_000).unwrap();
    let words = ["amber", "birch", "cedar", "dune", "elm"];
    for i in 0..600u32 {
        let mut content: Vec<&str> = words
            .iter()
            .enumerate()
            .filter(|(w, _)| i % (*w as u32 + 2) == 0)
            .map(|(_, w)| *w)
            .collect();
        // Rare words: once in a segment, so sparse there, where the
        // common ones are dense (cached bitmaps).
        for (word, every) in [("fig", 211), ("gum", 257)] {
            if i % every == 0 {
                content.push(word);
            }
        }
        let doc = Doc {
            post_id: format!("p{i}"),
            title: "t".into(),
            content: content.join(" "),
            author_name: if i % 3 == 0 { "ann" } else { "bob" }.into(),
            created_at_us: 0,
            updated_at_us: 0,
            version: 1,
            deleted: false,
        };
        writer.add_document(to_tantivy(&doc, f)).unwrap();
        if i % 200 == 199 {
            writer.commit().unwrap();
        }
    }
    drop(writer);
    drop(index);
    let (mut p, reader) = open(dir.path(), WRITER_HEAP_LIVE_BYTES).unwrap();
    let check = |deletes: bool| {
        reader.reader.reload().unwrap();
        let searcher = reader.reader.searcher();
        assert_eq!(searcher.segment_readers().len(), 3);
        assert_eq!(
            searcher
                .segment_readers()
                .iter()
                .any(|s| s.alive_bitset().is_some()),
            deletes
        );
        for (q, author) in [
            ("amber birch", None),
            ("cedar", None),
            ("amber cedar dune", Some("ann")),
            ("birch elm", Some("bob")),
            ("amber zed", None),
            ("amber fig", None),
            ("fig", None),
            ("fig gum", None),
            ("birch fig", Some("ann")),
            ("fig cedar dune", None),
            ("gum", Some("bob")),
        ] {
            let parsed = reader.build_query(&searcher, q, author).unwrap();
            let terms = parsed.conjunction.expect("a plain conjunction");
            let want = searcher.search(&*parsed.query, &Count).unwrap();
            // With bitmaps built for this count, then taken from the
            // cache, and the reader's own cache.
            let fresh = DenseBitmaps::default();
            assert_eq!(
                count_conjunction(&searcher, &terms, &fresh).unwrap(),
                want,
                "{q}"
            );
            assert_eq!(
                count_conjunction(&searcher, &terms, &fresh).unwrap(),
                want,
                "{q}"
            );
            assert!(
                fresh.lock().map.iter().all(|((_, t), _)| t
                    .value()
                    .as_str()
                    .is_some_and(|w| !["fig", "gum"].contains(&w))),
                "rare words are not cached"
            );
            assert_eq!(reader.search(q, author, 5, 0).unwrap().total, want, "{q}");
        }
    };
    check(false);
    for i in (0..600).step_by(7) {
        p.writer
            .delete_term(Term::from_field_text(f.post_id, &format!("p{i}")));
    }
    p.writer.commit().unwrap();
    check(true);
    let searcher = reader.reader.searcher();
    assert!(
        reader
            .build_query(&searcher, "\"amber birch\"", None)
            .unwrap()
            .conjunction
            .is_none(),
        "a phrase is counted by tantivy"
    );
}

pub(super) fn incoming(seq: u64, id: &str, event: &posts::Event) -> Incoming {
    crate::incoming_at(seq, id, 1_700_000_000, event)
}

/// A post by ann.
pub(super) fn created(title: &str, content: &str) -> posts::Event {
    posts::Event::Created {
        title: title.into(),
        content: content.into(),
        author_name: "ann".into(),
    }
}

/// An edit of the content alone.
pub(super) fn edited(content: &str) -> posts::Event {
    posts::Event::Updated {
        title: None,
        content: Some(content.into()),
        author_name: None,
    }
}

/// The segments the reader's current searcher holds.
pub(super) fn segment_ids(reader: &SearchReader) -> Vec<SegmentId> {
    reader
        .reader
        .searcher()
        .segment_readers()
        .iter()
        .map(tantivy::SegmentReader::segment_id)
        .collect()
}

/// New indexes store documents uncompressed, written by the indexing
/// threads. One created with LZ4 and tantivy's defaults (by an earlier
/// version) takes the same settings for what it writes next: its old
/// documents still read, update, and survive a merge with new segments.
#[test]
fn an_index_created_with_lz4_takes_the_new_store_settings() {
    let uncompressed = |index: &Index| {
        let s = index.settings();
        s.docstore_compression == tantivy::store::Compressor::None
            && !s.docstore_compress_dedicated_thread
            && s.docstore_blocksize == DOCSTORE_BLOCK_BYTES
    };
    let fresh = tempfile::tempdir().unwrap();
    let (_, reader) = open(fresh.path(), WRITER_HEAP_LIVE_BYTES).unwrap();
    assert!(uncompressed(&reader.index));

    let dir = tempfile::tempdir().unwrap();
    let (schema, fields) = schema();
    let index = Index::builder()
        .schema(schema)
        .settings(tantivy::IndexSettings {
            docstore_compression: tantivy::store::Compressor::Lz4,
            ..tantivy::IndexSettings::default()
        })
        .create_in_dir(dir.path())
        .unwrap();
    super::write::register_tokenizers(&index);
    let old = |n: usize| Doc {
        post_id: format!("old{n}"),
        title: format!("written before {n}"),
        content: format!("compressed words {n}"),
        author_name: "ann".into(),
        created_at_us: 1,
        updated_at_us: 1,
        version: 1,
        deleted: false,
    };
    let mut writer: IndexWriter = index.writer_with_num_threads(1, 15_000_000).unwrap();
    for n in 0..50 {
        writer.add_document(to_tantivy(&old(n), fields)).unwrap();
    }
    writer.commit().unwrap();
    drop(writer);
    drop(index);

    let (mut p, reader) = open(dir.path(), WRITER_HEAP_LIVE_BYTES).unwrap();
    assert!(uncompressed(&reader.index));
    assert_eq!(reader.get("old7").unwrap().unwrap(), old(7));
    let events = [
        incoming(
            1,
            "old0",
            &posts::Event::Updated {
                title: Some("written after".into()),
                content: None,
                author_name: None,
            },
        ),
        incoming(
            2,
            "new",
            &posts::Event::Created {
                title: "another".into(),
                content: "more words".into(),
                author_name: "bob".into(),
            },
        ),
    ];
    let batch: Vec<&Incoming> = events.iter().collect();
    assert!(p.apply_batch(&batch).unwrap().is_empty());
    p.flush().unwrap();
    let ids = segment_ids(&reader);
    assert!(ids.len() >= 2, "an LZ4 segment and a new one: {ids:?}");
    p.writer.merge(&ids).wait().unwrap();
    p.writer.commit().unwrap();
    reader.reader.reload().unwrap();
    assert_eq!(reader.reader.searcher().segment_readers().len(), 1);
    let updated = reader.get("old0").unwrap().unwrap();
    assert_eq!(
        (
            updated.title.as_str(),
            updated.content.as_str(),
            updated.version
        ),
        ("written after", "compressed words 0", 2)
    );
    for n in 1..50 {
        assert_eq!(reader.get(&format!("old{n}")).unwrap().unwrap(), old(n));
    }
    assert_eq!(reader.get("new").unwrap().unwrap().content, "more words");
    assert_eq!(reader.reader.searcher().num_docs(), 51);
    // The settings were saved with the commits.
    drop(p);
    let reopened = Index::open_in_dir(dir.path()).unwrap();
    assert!(uncompressed(&reopened));
}

/// Far behind, a post's events fold into one held document, indexed at
/// the commit that covers them: the index then holds each post once,
/// with no replaced versions; refused events leave a held post as it
/// was; a post committed before is replaced, not duplicated. Near the
/// head, changes go to the writer at once again.
#[test]
fn far_behind_a_posts_events_fold_into_one_indexed_document() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, reader) = open(dir.path(), WRITER_HEAP_LIVE_BYTES).unwrap();
    let retitled = |title: &str| posts::Event::Updated {
        title: Some(title.into()),
        content: None,
        author_name: None,
    };
    // Committed before falling behind.
    let first = [
        incoming(1, "keep", &created("kept", "keepword")),
        incoming(2, "old", &created("old title", "oldword start")),
    ];
    p.apply_batch(&first.iter().collect::<Vec<_>>()).unwrap();
    p.flush().unwrap();

    p.set_backlog(FAR_BEHIND_EVENTS);
    let events = [
        incoming(3, "a", &created("alpha title", "draftword one")),
        incoming(4, "a", &edited("secondword two")),
        incoming(5, "a", &retitled("final title")),
        incoming(6, "a", &created("again", "dupword")), // refused: live
        incoming(7, "b", &created("beta", "betaword")),
        incoming(8, "b", &posts::Event::Deleted),
        incoming(9, "b", &edited("ghostword")), // refused: deleted
        incoming(10, "old", &edited("newword")),
        incoming(11, "old", &edited("newerword")),
        incoming(12, "c", &edited("nobody")), // refused: absent
    ];
    let parked = p.apply_batch(&events.iter().collect::<Vec<_>>()).unwrap();
    assert_eq!(parked.iter().map(|x| x.seq).collect::<Vec<_>>(), [6, 9, 12]);
    let mut held: Vec<(&str, u64)> = p
        .held
        .iter()
        .map(|(id, h)| (id.as_str(), h.doc.version))
        .collect();
    held.sort_unstable();
    assert_eq!(held, [("a", 3), ("b", 2), ("old", 3)]);
    // Nothing went to the writer yet; the flush gives it these three
    // documents, once each: the versions before them are never indexed.
    assert!(p.touched.is_empty() && p.pending.is_empty());
    assert_eq!(reader.checkpoint().unwrap(), 2, "nothing committed yet");
    assert_eq!(reader.search("secondword", None, 5, 0).unwrap().total, 0);

    p.flush().unwrap();
    assert!(p.held.is_empty());

    assert_eq!(reader.checkpoint().unwrap(), 12);
    assert_eq!(p.parked_total(), 3);
    assert_eq!(reader.reader.searcher().num_docs(), 4);
    let a = reader.get("a").unwrap().unwrap();
    assert_eq!(
        (a.title.as_str(), a.content.as_str(), a.version),
        ("final title", "secondword two", 3)
    );
    let b = reader.get("b").unwrap().unwrap();
    assert!(b.deleted && b.version == 2);
    let old = reader.get("old").unwrap().unwrap();
    assert_eq!((old.content.as_str(), old.version), ("newerword", 3));
    for (word, total) in [
        ("secondword", 1),
        ("final", 1),
        ("draftword", 0),
        ("dupword", 0),
        ("betaword", 0),
        ("ghostword", 0),
        ("oldword", 0),
        ("newword", 0),
        ("newerword", 1),
    ] {
        assert_eq!(
            reader.search(word, None, 5, 0).unwrap().total,
            total,
            "{word}"
        );
    }

    // At the head: straight to the writer, nothing held.
    p.set_backlog(0);
    let near = [incoming(13, "a", &edited("liveword"))];
    p.apply_batch(&near.iter().collect::<Vec<_>>()).unwrap();
    assert!(p.held.is_empty());
    p.flush().unwrap();
    assert_eq!(reader.get("a").unwrap().unwrap().version, 4);
    assert_eq!(reader.search("liveword", None, 5, 0).unwrap().total, 1);
    assert_eq!(reader.search("secondword", None, 5, 0).unwrap().total, 0);
    assert_eq!(reader.reader.searcher().num_docs(), 4);
}

/// Far behind starts at [`FAR_BEHIND_EVENTS`] to come and lasts until
/// the head, or two batches in a row under [`NEAR_HEAD_EVENTS`]: a
/// catch-up's last events still fold into the held documents, while a
/// projection that only ever was a little behind writes at once.
#[test]
fn far_behind_lasts_until_near_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, _reader) = open(dir.path(), WRITER_HEAP_LIVE_BYTES).unwrap();
    let created = created("t", "some words");
    let mut seq = 0;
    // Whether the post the batch created is held.
    let mut held = |p: &mut SearchProjection, backlog: u64| {
        seq += 1;
        let id = format!("p{seq}");
        p.set_backlog(backlog);
        let batch = [incoming(seq, &id, &created)];
        p.apply_batch(&batch.iter().collect::<Vec<_>>()).unwrap();
        p.held.contains_key(&id)
    };
    assert!(!held(&mut p, FAR_BEHIND_EVENTS - 1), "never far behind");
    assert!(held(&mut p, FAR_BEHIND_EVENTS));
    assert!(held(&mut p, FAR_BEHIND_EVENTS - 1), "still far behind");
    assert!(held(&mut p, NEAR_HEAD_EVENTS));
    assert!(
        held(&mut p, NEAR_HEAD_EVENTS - 1),
        "one batch near the head"
    );
    assert!(!held(&mut p, NEAR_HEAD_EVENTS - 1), "a second one");
    p.flush().unwrap();
    assert!(p.held.is_empty());
    assert!(!held(&mut p, NEAR_HEAD_EVENTS), "not far behind again");
    assert!(held(&mut p, FAR_BEHIND_EVENTS));
    assert!(!held(&mut p, 0), "at the head");
    assert!(held(&mut p, FAR_BEHIND_EVENTS), "far behind again");
    assert!(held(&mut p, NEAR_HEAD_EVENTS - 1));
    assert!(
        held(&mut p, NEAR_HEAD_EVENTS),
        "two batches near the head, not in a row"
    );
    assert!(held(&mut p, NEAR_HEAD_EVENTS - 1));
    assert!(!held(&mut p, NEAR_HEAD_EVENTS - 1));
}

/// Held posts that reach the memory cap go to the writer mid-batch; a
/// later event of one of them is then an upsert of an uncommitted
/// version, as near the head, and leaves one live document.
#[test]
fn held_posts_over_the_cap_go_to_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, reader) = open(dir.path(), WRITER_HEAP_LIVE_BYTES).unwrap();
    p.set_backlog(FAR_BEHIND_EVENTS);
    // Room for one post: the second one's hold writes both.
    p.held_bytes_max = HELD_ENTRY_BYTES + 200;
    // Words no typo apart: a word the index no longer holds is searched
    // with typo tolerance, and "aword" found "bword" in runs where the
    // segment of the replaced version was dropped (CI, 0a7f466).
    let events = [
        incoming(1, "a", &created("t", "apple")),
        incoming(2, "b", &created("t", "zebra")),
        incoming(3, "a", &edited("quartz")),
    ];
    let batch: Vec<&Incoming> = events.iter().collect();
    assert!(p.apply_batch(&batch[..2]).unwrap().is_empty());
    assert!(p.held.is_empty(), "both written at the cap");
    assert_eq!(p.pending.len(), 2);
    assert!(p.apply_batch(&batch[2..]).unwrap().is_empty());
    assert_eq!(p.held.len(), 1, "the edit is held again");
    p.flush().unwrap();
    assert_eq!(reader.checkpoint().unwrap(), 3);
    assert_eq!(reader.reader.searcher().num_docs(), 2);
    let a = reader.get("a").unwrap().unwrap();
    assert_eq!((a.content.as_str(), a.version), ("quartz", 2));
    assert_eq!(reader.search("apple", None, 5, 0).unwrap().total, 0);
    assert_eq!(reader.search("quartz", None, 5, 0).unwrap().total, 1);
    assert_eq!(reader.search("zebra", None, 5, 0).unwrap().total, 1);
}

/// Held posts are not durable: a rollback drops them with the rest, and
/// the same events applied again from the checkpoint give the same index.
#[test]
fn held_posts_are_dropped_on_recover_and_applied_again() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, reader) = open(dir.path(), WRITER_HEAP_LIVE_BYTES).unwrap();
    p.set_backlog(FAR_BEHIND_EVENTS);
    let events = [
        incoming(1, "a", &created("t", "heldword")),
        incoming(2, "a", &edited("laterword")),
    ];
    let batch: Vec<&Incoming> = events.iter().collect();
    assert!(p.apply_batch(&batch[..1]).unwrap().is_empty());
    assert_eq!(p.held.len(), 1);
    p.recover().unwrap();
    assert!(p.held.is_empty() && p.held_bytes == 0);
    assert_eq!(p.checkpoint(), 0);
    // From checkpoint + 1 again: the create is not refused as a repeat.
    assert!(p.apply_batch(&batch).unwrap().is_empty());
    p.flush().unwrap();
    assert_eq!(reader.checkpoint().unwrap(), 2);
    let a = reader.get("a").unwrap().unwrap();
    assert_eq!((a.content.as_str(), a.version), ("laterword", 2));
    assert_eq!(reader.reader.searcher().num_docs(), 1);
}

/// A rebuild's index does not merge while it is built; `compact` then
/// leaves one segment without the replaced versions, the same documents
/// and checkpoint, and an index that goes on taking upserts.
#[test]
fn compact_merges_a_rebuilt_index_into_one_segment_without_replaced_versions() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, reader) = open_for_rebuild(dir.path()).unwrap();
    let created = |n: u64| posts::Event::Created {
        title: format!("title {n}"),
        content: format!("first words {n}"),
        author_name: "ann".to_string(),
    };
    let edited = |n: u64| posts::Event::Updated {
        title: None,
        content: Some(format!("edited words {n}")),
        author_name: None,
    };
    // Creates, then edits of half the same posts, each batch its own
    // commit: the edits delete first versions from earlier segments
    // (a segment whose every document is replaced is dropped whole).
    let mut seq = 0;
    for round in 0..12 {
        let events: Vec<Incoming> = (0..if round < 6 { 40 } else { 20 })
            .map(|i| {
                seq += 1;
                let n = (round % 6) * 40 + i;
                let e = if round < 6 { created(n) } else { edited(n) };
                incoming(seq, &format!("p{n}"), &e)
            })
            .collect();
        let batch: Vec<&Incoming> = events.iter().collect();
        assert!(p.apply_batch(&batch).unwrap().is_empty());
        p.flush().unwrap();
    }
    let metas = reader.index.searchable_segment_metas().unwrap();
    // At least one segment per edit commit and one per create commit
    // (its unedited half): a merge would have left fewer.
    assert!(
        metas.len() >= 12,
        "no merges while building: {}",
        metas.len()
    );
    let replaced: u32 = metas.iter().map(SegmentMeta::num_deleted_docs).sum();
    // Two indexing threads split each batch at random, so a segment of
    // edited posts only may have gone whole.
    assert!((1..=120).contains(&replaced), "{replaced}");
    let digest = reader.digest().unwrap();

    p.compact().unwrap();
    let metas = reader.index.searchable_segment_metas().unwrap();
    assert_eq!(metas.len(), 1);
    assert_eq!(metas[0].num_deleted_docs(), 0);
    assert_eq!(metas[0].max_doc(), 240);
    assert_eq!(reader.reader.searcher().segment_readers().len(), 1);
    assert_eq!(reader.digest().unwrap(), digest);
    assert_eq!(reader.checkpoint().unwrap(), seq);
    assert_eq!(reader.search("edited", None, 5, 0).unwrap().total, 120);
    assert_eq!(reader.search("first", None, 5, 0).unwrap().total, 120);

    // Still an upsert index: an edit after the merge replaces the post.
    let events = [incoming(seq + 1, "p7", &edited(1007))];
    let batch: Vec<&Incoming> = events.iter().collect();
    assert!(p.apply_batch(&batch).unwrap().is_empty());
    p.flush().unwrap();
    assert_eq!(
        reader.get("p7").unwrap().unwrap().content,
        "edited words 1007"
    );
    assert_eq!(reader.search("1007", None, 5, 0).unwrap().total, 1);
    assert_eq!(reader.search("edited", None, 5, 0).unwrap().total, 120);
    // And the checkpoint survives a reopen.
    drop(p);
    drop(reader);
    let (_, reader) = open(dir.path(), WRITER_HEAP_LIVE_BYTES).unwrap();
    assert_eq!(reader.checkpoint().unwrap(), seq + 1);
    assert_eq!(reader.reader.searcher().num_docs(), 240);
}

/// A post changed earlier in the same commit interval, whose document
/// has since left the bounded `pending` set, is still updated (the
/// update commits first and reads it from the index), not parked as
/// absent.
#[test]
fn an_update_after_pending_let_the_document_go_still_applies() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, reader) = open(dir.path(), WRITER_HEAP_LIVE_BYTES).unwrap();
    let created = |n: usize| posts::Event::Created {
        title: format!("title {n}"),
        content: format!("content number {n}"),
        author_name: "ann".to_string(),
    };
    let mut events = vec![incoming(1, "first", &created(0))];
    for n in 1..=PENDING_DOCS_MAX {
        let seq = events.len() as u64 + 1;
        events.push(incoming(seq, &format!("p{n}"), &created(n)));
    }
    let seq = events.len() as u64 + 1;
    events.push(incoming(
        seq,
        "first",
        &posts::Event::Updated {
            title: Some("retitled".to_string()),
            content: None,
            author_name: None,
        },
    ));
    let batch: Vec<&Incoming> = events.iter().collect();
    let parked = p.apply_batch(&batch).unwrap();
    assert!(parked.is_empty(), "parked: {parked:?}");
    p.flush().unwrap();
    let doc = reader.get("first").unwrap().unwrap();
    assert_eq!(doc.title, "retitled");
    assert_eq!(doc.content, "content number 0");
    assert_eq!(doc.version, 2);
    assert_eq!(reader.checkpoint().unwrap(), seq);
    // The upsert deleted the first version: one document per post.
    let live = PENDING_DOCS_MAX as u64 + 1;
    assert_eq!(reader.reader.searcher().num_docs(), live);
}

/// Upserts delete the replaced document wherever it is: in a committed
/// segment, in one written since the last commit, and in a segment a
/// merge made out of the one it was found in after the delete was
/// decided.
#[test]
fn no_page_offers_a_cursor_deeper_than_the_cursors_accepted() {
    assert_eq!(next_offset(0, 20, 50), Some(20));
    assert_eq!(next_offset(40, 10, 50), None);
    assert_eq!(next_offset(0, 0, 50), None);
    let max = SEARCH_OFFSET_MAX;
    assert_eq!(next_offset(max - 20, 20, max * 2), Some(max));
    assert_eq!(next_offset(max, 20, max * 2), None);
    assert_eq!(next_offset(max - 10, 20, max * 2), None);
}

/// Finding 5: terms were counted before the analyzer split them, so
/// hyphen-joined typos passed as one term each part.
#[test]
fn terms_are_counted_after_tokenizing_and_typos_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let (_p, reader) = open(dir.path(), WRITER_HEAP_LIVE_BYTES).unwrap();
    let words: Vec<String> = (0..46).map(|i| format!("qwert{i:02}x")).collect();
    let joined = words.join("-");
    assert!(joined.len() <= QUERY_BYTES_MAX);
    assert!(matches!(
        reader.search(&joined, None, 10, 0),
        Err(SearchError::TooManyTerms)
    ));
    let q = words[..QUERY_TERMS_MAX].join(" ");
    let parsed = reader
        .build_query(&reader.reader.searcher(), &q, None)
        .unwrap();
    assert_eq!(
        parsed.typos.len(),
        FUZZY_TERMS_MAX,
        "the rest match as typed"
    );
    let q = words[..QUERY_TERMS_MAX + 1].join("-");
    assert!(matches!(
        reader.search(&q, None, 10, 0),
        Err(SearchError::TooManyTerms)
    ));
}

// Fuzz target (hardening finding 11): any query text is a result or one
// of the query errors, never a panic or an index error, on an index
// holding a few posts.
proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1_500))]
    #[test]
    fn any_query_text_searches_or_is_refused(
        q in proptest::prelude::prop_oneof![
            "\\PC{0,80}",
            "[a-z\" -]{0,120}",
            "[a-zé東\"()*:~^-]{0,40}",
        ],
        author in proptest::option::of("[a-z]{0,5}"),
        offset in 0usize..50,
    ) {
        let reader = fuzz_reader();
        match reader.search(&q, author.as_deref(), 10, offset) {
            Ok(r) => proptest::prop_assert!(r.hits.len() <= 10),
            Err(SearchError::Index(e)) => proptest::prop_assert!(false, "{q:?}: {e}"),
            Err(_) => {}
        }
    }
}

/// One small index for every fuzz case, built once.
fn fuzz_reader() -> &'static SearchReader {
    static READER: std::sync::OnceLock<(tempfile::TempDir, SearchReader)> =
        std::sync::OnceLock::new();
    &READER
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let (mut p, reader) = open(dir.path(), WRITER_HEAP_LIVE_BYTES).unwrap();
            let texts = [
                (
                    "Event sourcing on JetStream",
                    "the stream is the source of truth",
                ),
                ("Café au lait", "résumé of a long day"),
                ("東京", "quoted \"phrases\" and typos: jetstrem"),
            ];
            let events: Vec<Incoming> = texts
                .iter()
                .enumerate()
                .map(|(i, (title, content))| {
                    crate::incoming_at(
                        i as u64 + 1,
                        &format!("p{i}"),
                        1_700_000_000,
                        &posts::Event::Created {
                            title: (*title).into(),
                            content: (*content).into(),
                            author_name: "ann".into(),
                        },
                    )
                })
                .collect();
            let batch: Vec<&Incoming> = events.iter().collect();
            p.apply_batch(&batch).unwrap();
            p.flush().unwrap();
            drop(p);
            (dir, reader)
        })
        .1
}

#[test]
fn typo_budget_follows_word_length() {
    assert_eq!(typo_budget("rust"), 0);
    assert_eq!(typo_budget("tokio"), 1);
    assert_eq!(typo_budget("jetstream"), 2);
}

#[test]
fn unclosed_quotes_and_symbols_never_fail_to_split() {
    assert_eq!(
        split_query("a \"b c"),
        vec![(false, "a".into()), (true, "b c".into())]
    );
    assert_eq!(split_query("\"\"\""), Vec::<(bool, String)>::new());
    assert_eq!(
        split_query("AND OR ( ) :"),
        vec![
            (false, "AND".into()),
            (false, "OR".into()),
            (false, "(".into()),
            (false, ")".into()),
            (false, ":".into())
        ]
    );
}
