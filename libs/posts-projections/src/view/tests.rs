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

fn updated(title: Option<&str>, author: Option<&str>) -> Event {
    Event::Updated {
        title: title.map(str::to_string),
        content: Some(format!("edited {title:?}")),
        author_name: author.map(str::to_string),
    }
}

/// A stream touching posts that are stored (live and deleted), held,
/// and refused: creates, edits with author moves, deletes, a second
/// create, an edit of an absent post, an edit after a delete.
fn mixed_stream() -> Vec<Incoming> {
    let mut seq = 0;
    let mut at = |id: &str, t: i64, e: Event| {
        seq += 1;
        incoming_at(seq, id, t, &e)
    };
    vec![
        at("a", 1, created("a", "ann")),
        at("b", 2, created("b", "bob")),
        at("c", 3, created("c", "cid")),
        at("a", 4, updated(Some("a2"), Some("anna"))),
        at("b", 5, Event::Deleted),
        at("d", 6, created("d", "ann")),
        at("a", 7, created("again", "ann")),
        at("x", 8, updated(None, None)),
        at("b", 9, updated(None, None)),
        at("c", 10, updated(None, Some("ann"))),
        at("d", 11, Event::Deleted),
        at("e", 12, created("e", "bob")),
        at("c", 13, updated(Some("c3"), None)),
    ]
}

/// Applies `events` in batches of `size`: the first `live` events live,
/// the rest far behind; then flushes. Returns the reader and what was parked.
fn build(dir: &Path, events: &[Incoming], live: usize, size: usize) -> (ViewReader, Vec<Parked>) {
    let (mut p, r) = open(&dir.join("v.redb")).unwrap();
    let mut parked = Vec::new();
    for (i, chunk) in events.chunks(size).enumerate() {
        let behind = i * size >= live;
        p.set_backlog(if behind { crate::FAR_BEHIND_EVENTS } else { 0 });
        parked.extend(apply(&mut p, chunk));
    }
    p.flush().unwrap();
    assert_eq!(p.checkpoint(), events.len() as u64);
    (r, parked)
}

/// Far behind, a post's events fold into one held row and a commit
/// writes it: the store ends up exactly as when every event is applied
/// live (digests equal), whatever was stored before the hold began,
/// and the same events are parked for the same reasons.
#[test]
fn held_posts_give_the_store_live_applying_gives() {
    let events = mixed_stream();
    let live_dir = tempfile::tempdir().unwrap();
    let (live, live_parked) = build(live_dir.path(), &events, events.len(), 1);
    assert_eq!(live_parked.len(), 3, "{live_parked:?}");
    for (held_from, size) in [(0, 4), (0, 13), (3, 2), (6, 5)] {
        let dir = tempfile::tempdir().unwrap();
        let (held, parked) = build(dir.path(), &events, held_from, size);
        assert_eq!(
            parked, live_parked,
            "held from {held_from}, batches of {size}"
        );
        assert_eq!(
            held.digest().unwrap(),
            live.digest().unwrap(),
            "held from {held_from}, batches of {size}"
        );
        // The digest covers rows; the listings are compared here.
        for author in [None, Some("ann"), Some("anna"), Some("bob"), Some("cid")] {
            assert_eq!(list_all(&held, author, 2), list_all(&live, author, 2));
        }
        assert_eq!(
            held.live_by_author().unwrap(),
            live.live_by_author().unwrap()
        );
    }
    assert_eq!(list_all(&live, None, 10), ["e", "c", "a"]);
    assert_eq!(list_all(&live, Some("ann"), 10), ["c"]);
    assert_eq!(list_all(&live, Some("anna"), 10), ["a"]);
    assert_eq!(list_all(&live, Some("bob"), 10), ["e"]);
    assert!(list_all(&live, Some("cid"), 10).is_empty());
    let c = live.get("c").unwrap().unwrap();
    assert_eq!(
        (c.title.as_str(), c.version, c.updated_at_us),
        ("c3", 3, 13_000_000)
    );
}

/// While far behind nothing is visible until a commit: readers keep
/// the last committed checkpoint and rows; the commit comes when the
/// held posts reach their memory bound, or when no longer far behind.
#[test]
fn held_posts_are_invisible_until_their_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, r) = open(&dir.path().join("v.redb")).unwrap();
    apply(&mut p, &[incoming_at(1, "a", 1, &created("a", "ann"))]);
    p.set_backlog(crate::FAR_BEHIND_EVENTS);
    apply(
        &mut p,
        &[
            incoming_at(2, "a", 2, &updated(Some("a2"), None)),
            incoming_at(3, "b", 3, &created("b", "bob")),
        ],
    );
    assert_eq!(
        (p.checkpoint(), p.visible(), r.checkpoint().unwrap()),
        (1, 1, 1)
    );
    assert_eq!(r.get("a").unwrap().unwrap().title, "a");
    assert!(r.get("b").unwrap().is_none());
    // Over the memory bound: committed with the batch that crossed it.
    p.held_bytes_max = p.held_bytes + 1;
    apply(&mut p, &[incoming_at(4, "c", 4, &created("c", "cid"))]);
    assert_eq!((p.checkpoint(), r.checkpoint().unwrap()), (4, 4));
    assert_eq!(r.get("a").unwrap().unwrap().title, "a2");
    assert_eq!(list_all(&r, None, 10), ["c", "b", "a"]);
    // Near the head again: every batch commits.
    p.held_bytes_max = HELD_BYTES_MAX;
    apply(&mut p, &[incoming_at(5, "d", 5, &created("d", "dee"))]);
    assert_eq!(r.checkpoint().unwrap(), 4, "still far behind");
    p.set_backlog(0);
    apply(&mut p, &[incoming_at(6, "d", 6, &Event::Deleted)]);
    assert_eq!(r.checkpoint().unwrap(), 6);
    assert!(r.get("d").unwrap().unwrap().deleted);
    assert_eq!(list_all(&r, None, 10), ["c", "b", "a"]);
}

/// A fault drops what was held: `recover` goes back to the committed
/// checkpoint, and applying the same events again gives the same store.
#[test]
fn recover_drops_held_posts() {
    let events = mixed_stream();
    let dir = tempfile::tempdir().unwrap();
    let (mut p, r) = open(&dir.path().join("v.redb")).unwrap();
    apply(&mut p, &events[..3]);
    p.set_backlog(crate::FAR_BEHIND_EVENTS);
    apply(&mut p, &events[3..9]);
    p.recover().unwrap();
    assert_eq!((p.checkpoint(), r.checkpoint().unwrap()), (3, 3));
    assert_eq!(r.parked_total().unwrap(), 0);
    apply(&mut p, &events[3..]);
    p.flush().unwrap();
    let live_dir = tempfile::tempdir().unwrap();
    let (live, _) = build(live_dir.path(), &events, events.len(), 1);
    assert_eq!(r.digest().unwrap(), live.digest().unwrap());
    assert_eq!(r.parked_total().unwrap(), 3);
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
    assert_eq!(stored_format(&r.file.db().unwrap()).unwrap(), Some(FORMAT));
}

// Fuzz target (hardening finding 11): any cursor text pages on or is
// refused as a bad cursor, never a panic.
proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4_000))]
    #[test]
    fn any_cursor_pages_or_is_refused(
        cursor in proptest::prelude::prop_oneof![
            "\\PC{0,40}",
            "[0-9a-f]{0,80}",
            "(2d)?[0-9a-f]{0,30}2f[0-9a-f]{0,40}",
        ],
    ) {
        match decode_cursor(&cursor) {
            Ok((_, id)) => proptest::prop_assert!(id.len() <= 256),
            Err(e) => proptest::prop_assert!(matches!(e, ViewError::BadCursor)),
        }
    }
}
