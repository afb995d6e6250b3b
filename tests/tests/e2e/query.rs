//! The `posts-query` HTTP contract of docs/api.md ("Query service",
//! "Projections"), over real sockets against a real nats-server: reads,
//! listings, search, history, bad input, read-your-writes, restarts on the
//! same data dir, poison events and the agreement of the two read models.
//! Writes go through a real `posts-command` (or, for poison, straight onto
//! the stream with async-nats); the stream is read back directly.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use e2e_tests::{
    InProcessService, QueryEnv, Reply, Written, event_headers, http_client, ids_of, list_all,
    msg_header, projection, publish_event, search_all, spawn_query_process, start_nats,
    subject_for, wait_checkpoints, wait_for,
};
use futures::future::join_all;
use posts::Event;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

type TestResult = anyhow::Result<()>;

/// The fields of a post as `GET /posts/{id}` shows it, sorted.
const POST_FIELDS: [&str; 8] = [
    "author_name",
    "content",
    "created_at",
    "deleted",
    "post_id",
    "title",
    "updated_at",
    "version",
];

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort_unstable();
    k
}

/// `GET /posts/{id}` at `min_seq` (and with `include_deleted` when asked).
async fn get_post(env: &QueryEnv, id: &str, min_seq: u64, include_deleted: bool) -> Reply {
    let mut req = env
        .http
        .get(env.q(&format!("/posts/{id}")))
        .query(&[("min_seq", min_seq)]);
    if include_deleted {
        req = req.query(&[("include_deleted", "true")]);
    }
    Reply::of(req).await.expect("GET /posts/{id}")
}

/// One search page at `min_seq`, asserted 200.
async fn search(env: &QueryEnv, q: &str, extra: &[(&str, &str)], min_seq: u64) -> Value {
    let reply = Reply::of(
        env.http
            .get(env.q("/posts/search"))
            .query(&[("q", q)])
            .query(extra)
            .query(&[("min_seq", min_seq)]),
    )
    .await
    .expect("GET /posts/search");
    assert_eq!(reply.status, 200, "search {q:?}: {reply:?}");
    let v = reply.json();
    let mut top: Vec<String> = keys(&v);
    top.sort_unstable();
    assert_eq!(top, ["data", "next_cursor", "total"], "{v}");
    v
}

fn hit_ids(v: &Value) -> Vec<String> {
    ids_of(v["data"].as_array().expect("data array"))
}

/// Occurred-At of the stored events of one post, in stream order.
async fn occurred_at(env: &QueryEnv, post_id: &str) -> anyhow::Result<Vec<String>> {
    Ok(env
        .reader
        .post_messages(post_id)
        .await?
        .iter()
        .map(|m| {
            msg_header(m, "Occurred-At")
                .expect("Occurred-At")
                .to_string()
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_and_history_show_the_post_as_its_events_made_it() -> TestResult {
    let env = QueryEnv::start().await?;
    let a = env.create("First title", "first body", "ann").await?;
    let b = env.create("Doomed", "to be deleted", "bob").await?;
    let b2 = env
        .update(
            &b.post_id,
            &json!({"title": "Doomed, updated", "author_name": "bo"}),
        )
        .await?;
    let b3 = env.delete(&b.post_id).await?;
    assert_eq!(b3.version, 3);

    // A live post, exactly.
    let reply = get_post(&env, &a.post_id, a.seq, false).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(
        reply
            .header("content-type")
            .is_some_and(|ct| ct.starts_with("application/json")),
        "{reply:?}"
    );
    let v = reply.json();
    assert_eq!(keys(&v), ["data"], "{v}");
    assert_eq!(keys(&v["data"]), POST_FIELDS, "{v}");
    let a_at = occurred_at(&env, &a.post_id).await?;
    assert_eq!(
        v["data"],
        json!({
            "post_id": a.post_id,
            "title": "First title",
            "content": "first body",
            "author_name": "ann",
            "created_at": a_at[0],
            "updated_at": a_at[0],
            "version": 1,
            "deleted": false,
        }),
        "timestamps are the event's Occurred-At, not the apply time"
    );
    let created = v["data"]["created_at"].as_str().unwrap_or_default();
    let parsed = OffsetDateTime::parse(created, &Rfc3339)
        .unwrap_or_else(|e| panic!("created_at {created:?} is not RFC 3339: {e}"));
    assert!(parsed.offset().is_utc(), "{created:?} is UTC");

    // An update moves updated_at and version, not created_at.
    let a2 = env
        .update(&a.post_id, &json!({"content": "second body"}))
        .await?;
    let v = get_post(&env, &a.post_id, a2.seq, false).await.json();
    let a_at = occurred_at(&env, &a.post_id).await?;
    assert_eq!(v["data"]["version"], 2, "{v}");
    assert_eq!(v["data"]["content"], "second body", "{v}");
    assert_eq!(v["data"]["title"], "First title", "{v}");
    assert_eq!(v["data"]["created_at"], a_at[0].as_str(), "{v}");
    assert_eq!(v["data"]["updated_at"], a_at[1].as_str(), "{v}");
    assert_ne!(a_at[0], a_at[1]);

    // A deleted post is gone, unless asked for.
    get_post(&env, &b.post_id, b3.seq, false)
        .await
        .assert_problem(404, &b.post_id);
    for flag in ["true", "1"] {
        let reply = Reply::of(
            env.http
                .get(env.q(&format!("/posts/{}", b.post_id)))
                .query(&[("include_deleted", flag), ("min_seq", &b3.seq.to_string())]),
        )
        .await?;
        assert_eq!(reply.status, 200, "include_deleted={flag}: {reply:?}");
        let b_at = occurred_at(&env, &b.post_id).await?;
        assert_eq!(
            reply.json()["data"],
            json!({
                "post_id": b.post_id,
                "title": "Doomed, updated",
                "content": "to be deleted",
                "author_name": "bo",
                "created_at": b_at[0],
                "updated_at": b_at[2],
                "version": 3,
                "deleted": true,
            })
        );
    }
    let reply = Reply::of(
        env.http
            .get(env.q(&format!("/posts/{}", b.post_id)))
            .query(&[("include_deleted", "false")]),
    )
    .await?;
    reply.assert_problem(404, &b.post_id);

    // The history, straight from the stream, decoded.
    let reply = env.get(&format!("/posts/{}/events", b.post_id)).await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    let v = reply.json();
    let events = v["data"].as_array().expect("data array");
    let msgs = env.reader.post_messages(&b.post_id).await?;
    assert_eq!(events.len(), 3, "{v}");
    assert_eq!(msgs.len(), 3);
    let want_data = [
        json!({"title": "Doomed", "content": "to be deleted", "author_name": "bob"}),
        json!({"title": "Doomed, updated", "author_name": "bo"}),
        json!({}),
    ];
    let want_types = ["PostCreated", "PostUpdated", "PostDeleted"];
    let want_seqs = [b.seq, b2.seq, b3.seq];
    for (i, (e, m)) in events.iter().zip(&msgs).enumerate() {
        assert_eq!(e["seq"], want_seqs[i], "event {i}: {e}");
        assert_eq!(e["seq"], m.sequence, "event {i}: {e}");
        assert_eq!(e["type"], want_types[i], "event {i}: {e}");
        let schema: u64 = msg_header(m, "Event-Schema").unwrap_or("x").parse()?;
        assert_eq!(e["schema"], schema, "event {i}: {e}");
        assert_eq!(
            e["occurred_at"],
            msg_header(m, "Occurred-At").unwrap_or_default(),
            "event {i}: {e}"
        );
        assert_eq!(
            e["event_id"],
            msg_header(m, "Nats-Msg-Id").unwrap_or_default(),
            "event {i}: {e}"
        );
        assert_eq!(e["data"], want_data[i], "event {i}: {e}");
    }
    let history = env
        .get(&format!("/posts/{}/events", a.post_id))
        .await?
        .json();
    let seqs: Vec<u64> = history["data"]
        .as_array()
        .expect("data array")
        .iter()
        .map(|e| e["seq"].as_u64().unwrap_or_default())
        .collect();
    assert_eq!(seqs, [a.seq, a2.seq], "only this post's events");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_is_newest_first_filtered_by_author_and_cursor_paged() -> TestResult {
    let env = QueryEnv::start().await?;
    let mut w = Written::default();
    let base = env.command.base_url.clone();
    // Created one after the other, so creation order is Occurred-At order.
    for i in 0..25 {
        let author = if i % 3 == 0 { "cy" } else { "di" };
        w.create(
            &env.http,
            &base,
            &format!("list post {i}"),
            &format!("lorem {i}"),
            author,
        )
        .await?;
        if i == 10 {
            let gone = w.create(&env.http, &base, "gone", "lorem", "cy").await?;
            w.delete(&env.http, &base, &gone.post_id).await?;
        }
    }
    let live: Vec<(String, String)> = w
        .order
        .iter()
        .filter(|id| !w.posts[*id].deleted)
        .map(|id| (id.clone(), w.posts[id].author_name.clone()))
        .collect();
    assert_eq!(live.len(), 25);
    let newest_first = |author: Option<&str>| -> Vec<String> {
        live.iter()
            .rev()
            .filter(|(_, a)| author.is_none_or(|x| x == a))
            .map(|(id, _)| id.clone())
            .collect()
    };

    let rows = list_all(&env.http, &env.query.base_url, &[], 10, w.last_seq).await?;
    assert_eq!(ids_of(&rows), newest_first(None), "every live post once");
    let mut previous: Option<OffsetDateTime> = None;
    for r in &rows {
        assert_eq!(keys(r), POST_FIELDS, "{r}");
        assert_eq!(r["deleted"], false, "{r}");
        let want = &w.posts[r["post_id"].as_str().unwrap_or_default()];
        assert_eq!(r["title"], want.title.as_str());
        assert_eq!(r["author_name"], want.author_name.as_str());
        let at = OffsetDateTime::parse(r["created_at"].as_str().unwrap_or_default(), &Rfc3339)?;
        assert!(previous.is_none_or(|p| p >= at), "newest first: {rows:?}");
        previous = Some(at);
    }
    // Page sizes: 10, 10, 5.
    let first = Reply::of(
        env.http
            .get(env.q("/posts"))
            .query(&[("limit", "10"), ("min_seq", &w.last_seq.to_string())]),
    )
    .await?
    .json();
    assert_eq!(first["data"].as_array().map(Vec::len), Some(10));
    let cursor = first["next_cursor"].as_str().expect("a cursor").to_string();

    // Keyset paging: a post created after page one does not shift page two.
    let newer = env.create("newer than the cursor", "lorem", "cy").await?;
    let mut rest = Vec::new();
    let mut next = Some(cursor);
    while let Some(c) = next {
        let v = Reply::of(env.http.get(env.q("/posts")).query(&[
            ("limit", "10"),
            ("cursor", c.as_str()),
            ("min_seq", &newer.seq.to_string()),
        ]))
        .await?
        .json();
        rest.extend(ids_of(v["data"].as_array().expect("data")));
        next = v["next_cursor"].as_str().map(str::to_string);
    }
    let mut walked = ids_of(first["data"].as_array().expect("data"));
    walked.extend(rest);
    assert_eq!(walked, newest_first(None), "no skip, no repeat");

    // The newest post now leads the listing.
    let top = Reply::of(env.http.get(env.q("/posts")).query(&[("limit", "1")]))
        .await?
        .json();
    assert_eq!(hit_ids(&top), std::slice::from_ref(&newer.post_id));

    // Author filter, paged in odd sizes.
    for (author, limit) in [("cy", 3), ("di", 4)] {
        let rows = list_all(
            &env.http,
            &env.query.base_url,
            &[("author_name", author)],
            limit,
            newer.seq,
        )
        .await?;
        let mut want = newest_first(Some(author));
        if author == "cy" {
            want.insert(0, newer.post_id.clone());
        }
        assert_eq!(ids_of(&rows), want, "author {author}");
        assert!(rows.iter().all(|r| r["author_name"] == author));
    }
    let none = Reply::of(
        env.http
            .get(env.q("/posts"))
            .query(&[("author_name", "nobody")]),
    )
    .await?
    .json();
    assert_eq!(none, json!({"data": [], "next_cursor": null}));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn search_ranks_phrases_tolerates_typos_highlights_and_pages() -> TestResult {
    let env = QueryEnv::start().await?;
    let title_hit = env
        .create("zephyr winds", "a quiet afternoon", "ann")
        .await?;
    let content_hit = env
        .create(
            "mountain weather",
            "a cold zephyr crossed the valley",
            "bob",
        )
        .await?;
    let tf_high = env
        .create("bird notes", "kestrel kestrel kestrel hovering", "ann")
        .await?;
    let tf_low = env
        .create("bird notes", "kestrel owl falcon hovering", "ann")
        .await?;
    let phrase = env
        .create("phrases", "the exact phrase appears here", "cy")
        .await?;
    let scrambled = env
        .create("phrases", "phrase first then exact after", "cy")
        .await?;
    let quokka = env
        .create("island animals", "a quokka smiles", "di")
        .await?;
    let marmalade = env
        .create("breakfast", "orange marmalade on toast", "di")
        .await?;
    let _yurt = env.create("dwellings", "a felt yurt", "di").await?;
    let deleted = env
        .create("obsidian shards", "obsidian everywhere", "ann")
        .await?;
    env.delete(&deleted.post_id).await?;
    let renamed = env.create("tangerine dream", "music", "ann").await?;
    env.update(&renamed.post_id, &json!({"title": "clementine dream"}))
        .await?;
    let mut lorem: HashMap<String, &str> = HashMap::new();
    for i in 0..12 {
        let author = if i < 7 { "ann" } else { "eve" };
        let ack = env
            .create(&format!("paged {i}"), &format!("lorem ipsum {i}"), author)
            .await?;
        lorem.insert(ack.post_id, author);
    }
    // One more lorem post, deleted: never returned.
    let lorem_gone = env.create("paged gone", "lorem ipsum", "eve").await?;
    let last = env.delete(&lorem_gone.post_id).await?.seq;

    // BM25 with the title boosted: a title match ranks above a content match.
    let v = search(&env, "zephyr", &[], last).await;
    assert_eq!(
        hit_ids(&v),
        [title_hit.post_id.clone(), content_hit.post_id.clone()],
        "{v}"
    );
    assert_eq!(v["total"], 2);
    assert!(v["next_cursor"].is_null(), "{v}");
    let hits = v["data"].as_array().expect("data");
    for h in hits {
        assert_eq!(
            keys(h),
            ["author_name", "highlights", "post_id", "score", "title"],
            "{h}"
        );
    }
    assert!(hits[0]["score"].as_f64() > hits[1]["score"].as_f64(), "{v}");
    assert_eq!(hits[0]["title"], "zephyr winds");
    assert_eq!(hits[0]["author_name"], "ann");
    assert!(
        hits[0]["highlights"]["title"]
            .as_str()
            .is_some_and(|s| s.contains("<b>zephyr</b>")),
        "title highlight: {v}"
    );
    assert!(
        hits[1]["highlights"]["content"]
            .as_str()
            .is_some_and(|s| s.contains("<b>zephyr</b>")),
        "content highlight: {v}"
    );
    // BM25 term frequency: same lengths, more occurrences rank higher.
    let v = search(&env, "kestrel", &[], last).await;
    assert_eq!(
        hit_ids(&v),
        [tf_high.post_id.clone(), tf_low.post_id.clone()],
        "{v}"
    );

    // Phrases: in order and adjacent; the same words unquoted match both.
    let v = search(&env, "\"exact phrase\"", &[], last).await;
    assert_eq!(hit_ids(&v), std::slice::from_ref(&phrase.post_id), "{v}");
    assert!(
        v["data"][0]["highlights"]["content"]
            .as_str()
            .is_some_and(|s| s.contains("<b>")),
        "{v}"
    );
    let v = search(&env, "exact phrase", &[], last).await;
    let got: HashSet<String> = hit_ids(&v).into_iter().collect();
    let want: HashSet<String> = [phrase.post_id.clone(), scrambled.post_id.clone()].into();
    assert_eq!(got, want, "{v}");

    // Typo tolerance: one typo from 5 letters, two from 9, none under 5.
    let v = search(&env, "qokka", &[], last).await;
    assert_eq!(
        hit_ids(&v),
        std::slice::from_ref(&quokka.post_id),
        "one typo: {v}"
    );
    assert_eq!(
        v["data"][0]["highlights"]["content"], "a <b>quokka</b> smiles",
        "what the typo matched is highlighted: {v}"
    );
    let v = search(&env, "marmelode toast", &[], last).await;
    assert_eq!(
        hit_ids(&v),
        std::slice::from_ref(&marmalade.post_id),
        "two typos: {v}"
    );
    assert_eq!(
        v["data"][0]["highlights"]["content"], "orange <b>marmalade</b> on <b>toast</b>",
        "{v}"
    );
    for q in ["yort", "qokkz"] {
        let v = search(&env, q, &[], last).await;
        assert_eq!(v["total"], 0, "{q:?} is over its typo budget: {v}");
        assert_eq!(v["data"], json!([]), "{v}");
    }

    // Deleted posts are never found; an update replaces the old text.
    for (q, n) in [("obsidian", 0), ("tangerine", 0), ("clementine", 1)] {
        let v = search(&env, q, &[], last).await;
        assert_eq!(v["total"], n, "{q}: {v}");
    }

    // Paging: total on every page, each hit once, no cursor after the last.
    let (hits, total) = search_all(&env.http, &env.query.base_url, "lorem", &[], 5, last).await?;
    assert_eq!(total, 12);
    let got: Vec<String> = ids_of(&hits);
    let distinct: HashSet<&String> = got.iter().collect();
    assert_eq!(distinct.len(), got.len(), "a hit repeats: {got:?}");
    let want: HashSet<&String> = lorem.keys().collect();
    assert_eq!(distinct, want);
    let scores: Vec<f64> = hits.iter().filter_map(|h| h["score"].as_f64()).collect();
    assert!(
        scores.windows(2).all(|p| p[0] >= p[1]),
        "ranked across pages: {scores:?}"
    );

    // Author filter.
    for (author, n) in [("ann", 7), ("eve", 5), ("nobody", 0)] {
        let (hits, total) = search_all(
            &env.http,
            &env.query.base_url,
            "lorem",
            &[("author_name", author)],
            4,
            last,
        )
        .await?;
        assert_eq!(total, n, "{author}");
        for h in &hits {
            assert_eq!(h["author_name"], author, "{h}");
            assert_eq!(
                lorem.get(h["post_id"].as_str().unwrap_or_default()),
                Some(&author)
            );
        }
    }
    Ok(())
}

/// Unknown query parameters are refused, naming the parameter, on every
/// read and command route, as unknown body fields are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_query_parameters_are_a_400_naming_them() -> TestResult {
    let env = QueryEnv::start().await?;
    let ack = env.create("t", "c", "ann").await?;
    let id = &ack.post_id;
    for (path, name) in [
        (
            format!("/posts/{id}?min_seq=1&includ_deleted=true"),
            "includ_deleted",
        ),
        ("/posts?limit=5&autor=ann".to_string(), "autor"),
        ("/posts/search?q=t&page=2".to_string(), "page"),
        (format!("/posts/{id}/events?offset=3"), "offset"),
        (format!("/posts/{id}/comments?sort=asc"), "sort"),
    ] {
        let r = env.get(&path).await?;
        r.assert_problem(400, &format!("unknown query parameter \"{name}\""));
    }
    let r = Reply::of(
        env.http
            .patch(env.cmd(&format!("/posts/{id}?dry_run=1")))
            .json(&serde_json::json!({"title": "x"})),
    )
    .await?;
    r.assert_problem(
        400,
        "unknown query parameter \"dry_run\"; this route takes none",
    );
    Ok(())
}

/// Accents and case fold on both sides (as Meilisearch and Typesense do),
/// and the highlights keep the original text.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn search_folds_accents_and_case_on_both_sides() -> TestResult {
    let env = QueryEnv::start().await?;
    let cafe = env
        .create("Café society", "a résumé of the Crème brûlée night", "zoé")
        .await?;
    let plain = env.create("cafe hours", "resume at nine", "ann").await?;
    let seq = plain.seq;
    for q in ["cafe", "Cafe", "CAFÉ", "café"] {
        let v = search(&env, q, &[], seq).await;
        let mut ids = hit_ids(&v);
        ids.sort();
        let mut want = vec![cafe.post_id.clone(), plain.post_id.clone()];
        want.sort();
        assert_eq!(ids, want, "{q}: {v}");
    }
    for q in ["resume", "résumé", "RESUMÉ", "creme brulee"] {
        let v = search(&env, q, &[], seq).await;
        assert!(hit_ids(&v).contains(&cafe.post_id), "{q}: {v}");
    }
    let v = search(&env, "cafe", &[("author_name", "zoé")], seq).await;
    let hit = &v["data"][0];
    assert_eq!(hit["post_id"], cafe.post_id.as_str(), "{v}");
    assert_eq!(hit["highlights"]["title"], "<b>Café</b> society", "{v}");
    let v = search(&env, "resume", &[("author_name", "zoé")], seq).await;
    let content = v["data"][0]["highlights"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(content.contains("<b>résumé</b>"), "{v}");
    // A quoted phrase matches exactly: folded, but no typo tolerance in it.
    assert_eq!(
        hit_ids(&search(&env, "\"cafe society\"", &[], seq).await),
        std::slice::from_ref(&cafe.post_id)
    );
    assert!(hit_ids(&search(&env, "\"cafe societi\"", &[], seq).await).is_empty());
    assert_eq!(
        hit_ids(&search(&env, "cafe societi", &[("author_name", "zoé")], seq).await),
        std::slice::from_ref(&cafe.post_id)
    );
    // Tags of the client's choosing, around the same escaped text.
    let tagged = search(
        &env,
        "cafe",
        &[
            ("author_name", "zoé"),
            ("highlight_pre_tag", "<mark class=\"hit\">"),
            ("highlight_post_tag", "</mark>"),
        ],
        seq,
    )
    .await;
    assert_eq!(
        tagged["data"][0]["highlights"]["title"], "<mark class=\"hit\">Café</mark> society",
        "{tagged}"
    );
    let long = "x".repeat(65);
    let r = Reply::of(
        env.http
            .get(env.q("/posts/search"))
            .query(&[("q", "cafe"), ("highlight_pre_tag", long.as_str())]),
    )
    .await?;
    r.assert_problem(400, "highlight_pre_tag must be at most 64 bytes");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_a_precise_problem_never_a_500() -> TestResult {
    let env = QueryEnv::start().await?;
    let post = env.create("target", "lorem", "ann").await?;
    let get = |path: &str, query: Vec<(&'static str, String)>| {
        Reply::of(env.http.get(env.q(path)).query(&query))
    };

    let unknown = uuid::Uuid::now_v7().to_string();
    get(&format!("/posts/{unknown}"), vec![])
        .await?
        .assert_problem(404, &unknown);
    get(&format!("/posts/{unknown}/events"), vec![])
        .await?
        .assert_problem(404, &unknown);
    let simple = post.post_id.replace('-', "");
    let too_long = format!("{}0", post.post_id);
    for bad in ["not-a-uuid", "1234", simple.as_str(), too_long.as_str()] {
        get(&format!("/posts/{bad}"), vec![])
            .await?
            .assert_problem(400, "not a UUID");
        get(&format!("/posts/{bad}/events"), vec![])
            .await?
            .assert_problem(400, "not a UUID");
    }
    // A path parameter that is not UTF-8 once decoded.
    for path in ["/posts/%FF", "/posts/%FF/events"] {
        get(path, vec![]).await?.assert_problem(400, "UTF-8");
    }
    get(
        &format!("/posts/{}", post.post_id),
        vec![("include_deleted", "maybe".into())],
    )
    .await?
    .assert_problem(400, "include_deleted");

    // Cursors this service did not make.
    let no_slash: String = "no-slash".bytes().map(|b| format!("{b:02x}")).collect();
    let not_a_time: String = "abc/def".bytes().map(|b| format!("{b:02x}")).collect();
    for c in ["zz", "abc", "xyz!", no_slash.as_str(), not_a_time.as_str()] {
        get("/posts", vec![("cursor", c.into())])
            .await?
            .assert_problem(400, "cursor");
    }
    for c in ["abc", "o", "o-1", "oabc", "o99999999999"] {
        get(
            "/posts/search",
            vec![("q", "lorem".into()), ("cursor", c.into())],
        )
        .await?
        .assert_problem(400, "cursor");
    }

    // Limits: 1..=1000.
    for v in ["0", "1001", "abc", "-1", "", "1.5"] {
        get("/posts", vec![("limit", v.into())])
            .await?
            .assert_problem(400, "limit");
        get(
            "/posts/search",
            vec![("q", "lorem".into()), ("limit", v.into())],
        )
        .await?
        .assert_problem(400, "limit");
    }
    for v in ["1", "1000"] {
        assert_eq!(get("/posts", vec![("limit", v.into())]).await?.status, 200);
        let r = get(
            "/posts/search",
            vec![("q", "lorem".into()), ("limit", v.into())],
        )
        .await?;
        assert_eq!(r.status, 200, "{r:?}");
    }

    // Query text.
    get("/posts/search", vec![]).await?.assert_problem(400, "q");
    for q in ["", "   ", "***"] {
        get("/posts/search", vec![("q", q.into())])
            .await?
            .assert_problem(400, "no searchable words");
    }
    get("/posts/search", vec![("q", "x".repeat(513))])
        .await?
        .assert_problem(400, "512");
    // A word the tokenizer would drop: refused, not silently left out.
    for q in [
        format!("marmoset {}", "m".repeat(40)),
        format!("\"a phrase with {}\"", "y".repeat(45)),
        "東京でイベントソーシングを学ぶ".to_string(),
    ] {
        get("/posts/search", vec![("q", q.clone())])
            .await?
            .assert_problem(400, "not indexed");
    }
    let r = get(
        "/posts/search",
        vec![("q", format!("marmoset {}", "m".repeat(39)))],
    )
    .await?;
    assert_eq!(r.status, 200, "39 bytes are searchable: {r:?}");
    // 16 words of 31 letters and their spaces: 512 bytes, 16 terms, both
    // at the limit (words stay under the tokenizer's 40-byte cut-off).
    let widest: String = (0..16)
        .map(|i| format!("{:x<31} ", format!("w{i:02}")))
        .collect();
    assert_eq!(widest.len(), 512);
    let r = get("/posts/search", vec![("q", widest.clone())]).await?;
    assert_eq!(
        r.status, 200,
        "512 bytes and 16 terms are within the limits: {r:?}"
    );
    get("/posts/search", vec![("q", format!("{widest}y"))])
        .await?
        .assert_problem(400, "512");
    let terms = |n: usize| {
        (0..n)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    get("/posts/search", vec![("q", terms(17))])
        .await?
        .assert_problem(400, "terms");
    assert_eq!(
        get("/posts/search", vec![("q", terms(16))]).await?.status,
        200
    );
    for q in [
        "\"unclosed",
        "AND OR (",
        "title:",
        "***",
        "\"\"",
        "content:lorem",
        "-lorem",
        "lorem~2",
        "(((",
        "\\",
        "%",
        "lorem*",
        "[a TO z]",
        "\u{1F600}",
        "a\u{0}b",
        "\"a\" \"",
    ] {
        let r = get("/posts/search", vec![("q", q.into())]).await?;
        match r.status {
            200 => {
                let v = r.json();
                assert!(v["data"].is_array() && v["total"].is_u64(), "{q:?}: {v}");
            }
            400 => {
                r.assert_problem(400, "");
            }
            other => panic!("query {q:?} answered {other}: {r:?}"),
        }
    }

    // min_seq must be a stream sequence, as a parameter or a header.
    let paths = [
        format!("/posts/{}", post.post_id),
        "/posts".to_string(),
        "/posts/search?q=lorem".to_string(),
        format!("/posts/{}/events", post.post_id),
    ];
    let not_utf8 = reqwest::header::HeaderValue::from_bytes(b"1\xff").expect("obs-text");
    for path in &paths {
        for bad in ["abc", "-1", "1.5", "18446744073709551616", ""] {
            let sep = if path.contains('?') { '&' } else { '?' };
            let r = Reply::of(env.http.get(env.q(&format!("{path}{sep}min_seq={bad}")))).await?;
            r.assert_problem(400, "min_seq");
            if !bad.is_empty() {
                let r = Reply::of(env.http.get(env.q(path)).header("X-Min-Seq", bad)).await?;
                r.assert_problem(400, "min_seq");
            }
        }
        let r = Reply::of(
            env.http
                .get(env.q(path))
                .header("X-Min-Seq", not_utf8.clone()),
        )
        .await?;
        r.assert_problem(400, "min_seq");
    }
    // History is read from the stream: a sequence it holds is there at once,
    // one it has not reached yet is a 503 to retry.
    let history = format!("/posts/{}/events", post.post_id);
    let r = get(&history, vec![("min_seq", post.seq.to_string())]).await?;
    assert_eq!(r.status, 200, "{r:?}");
    let r = get(
        &history,
        vec![("min_seq", (post.seq + 1_000_000).to_string())],
    )
    .await?;
    let doc = r.assert_problem(503, "not yet");
    assert!(r.header("retry-after").is_some(), "{r:?}");
    let secs: u64 = r.header("retry-after").unwrap_or("0").parse()?;
    assert_eq!(doc["retry_after_ms"], secs * 1000, "{doc}");

    get("/no/such/route", vec![])
        .await?
        .assert_problem(404, "route");
    // The admin routes live on the admin listener only.
    let reply = Reply::of(env.http.post(env.q("/admin/projections/post-view/swap"))).await?;
    reply.assert_problem(404, "route");
    for path in ["/posts", "/posts/search", "/projections"] {
        let reply = Reply::of(env.http.delete(env.q(path))).await?;
        reply.assert_problem(405, "method");
        assert!(reply.header("allow").is_some(), "{path}: {reply:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_read_sees_its_own_write() -> TestResult {
    const ITERATIONS: usize = 200;
    let env = QueryEnv::start().await?;
    let mut written: Vec<String> = Vec::new();
    for i in 0..ITERATIONS {
        let title = format!("ryw {i}");
        let is_create = i % 2 == 0 || written.is_empty();
        let ack = if is_create {
            let ack = env.create(&title, &format!("mark{i}x"), "ryw").await?;
            written.push(ack.post_id.clone());
            ack
        } else {
            let id = written[(i / 2) % written.len()].clone();
            env.update(
                &id,
                &json!({"title": title, "content": format!("mark{i}x")}),
            )
            .await?
        };
        // Alternate the two ways of asking, right after the ack.
        let url = env.q(&format!("/posts/{}", ack.post_id));
        let req = if i % 4 < 2 {
            env.http.get(url).query(&[("min_seq", ack.seq)])
        } else {
            env.http.get(url).header("X-Min-Seq", ack.seq.to_string())
        };
        let reply = Reply::of(req).await?;
        assert_eq!(reply.status, 200, "iteration {i}: {reply:?}");
        let d = &reply.json()["data"];
        assert_eq!(d["version"], ack.version, "iteration {i}: {d}");
        assert_eq!(d["title"], title.as_str(), "iteration {i}: {d}");
        if is_create {
            // The listing too: the new post leads it.
            let v = Reply::of(
                env.http
                    .get(env.q("/posts"))
                    .query(&[("limit", "1")])
                    .header("X-Min-Seq", ack.seq.to_string()),
            )
            .await?
            .json();
            assert_eq!(
                hit_ids(&v),
                std::slice::from_ref(&ack.post_id),
                "iteration {i}: {v}"
            );
        }
        if i % 5 == 0 {
            // And the search index.
            let v = search(&env, &format!("mark{i}x"), &[("limit", "50")], ack.seq).await;
            assert!(
                hit_ids(&v).contains(&ack.post_id),
                "iteration {i}: search misses its own write: {v}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn min_seq_beyond_the_stream_is_a_bounded_503() -> TestResult {
    /// The service waits about 3 s; anything near this is a hang.
    const ANSWER_DEADLINE: Duration = Duration::from_secs(10);
    let env = QueryEnv::start().await?;
    let post = env.create("head", "lorem", "ann").await?;
    let far = post.seq + 1_000_000;
    let paths = [
        format!("/posts/{}", post.post_id),
        "/posts".to_string(),
        "/posts/search?q=lorem".to_string(),
    ];
    let mut asks = Vec::new();
    for path in &paths {
        let sep = if path.contains('?') { '&' } else { '?' };
        asks.push(env.http.get(env.q(&format!("{path}{sep}min_seq={far}"))));
        asks.push(
            env.http
                .get(env.q(path))
                .header("X-Min-Seq", far.to_string()),
        );
    }
    // A hang guard, not a timing check: the wait is bounded, so each of
    // these is answered, a 503 long before this.
    let replies = tokio::time::timeout(ANSWER_DEADLINE, join_all(asks.into_iter().map(Reply::of)))
        .await
        .map_err(|_| {
            anyhow::anyhow!("no answer within {ANSWER_DEADLINE:?}: the wait is unbounded")
        })?;
    for reply in replies {
        let reply = reply?;
        reply.assert_problem(503, &far.to_string());
        let retry = reply.header("retry-after").expect("Retry-After on 503");
        assert!(retry.parse::<u64>().is_ok_and(|s| s >= 1), "{retry:?}");
    }

    // A read waiting for the next sequence is answered once it is applied.
    let next = post.seq + 1;
    let waiting = Reply::of(
        env.http
            .get(env.q("/posts"))
            .query(&[("limit", "1"), ("min_seq", &next.to_string())]),
    );
    let (reply, newer) = tokio::join!(waiting, env.create("next", "lorem", "ann"));
    let (reply, newer) = (reply?, newer?);
    assert_eq!(newer.seq, next);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(hit_ids(&reply.json()), [newer.post_id]);
    Ok(())
}

/// Writes a round of creates, updates and deletes through `command`.
async fn write_round(
    w: &mut Written,
    http: &reqwest::Client,
    command: &str,
    round: usize,
    (creates, updates, deletes): (usize, usize, usize),
) -> TestResult {
    w.create_many(http, command, creates, |i| {
        (
            format!("round {round} post {i}"),
            format!("lorem round {round} {i}"),
            format!("author{}", i % 3),
        )
    })
    .await?;
    let ids: Vec<String> = w.live_ids().into_iter().collect();
    for u in 0..updates {
        let id = &ids[(u * 7 + round) % ids.len()];
        let body = json!({"title": format!("round {round} update {u}")});
        w.update(http, command, id, &body).await?;
    }
    let ids: Vec<String> = w.live_ids().into_iter().collect();
    for d in 0..deletes {
        w.delete(http, command, &ids[(d * 5 + round) % ids.len()])
            .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_resumes_from_the_checkpoint_applying_each_event_once() -> TestResult {
    let nats = start_nats().await?;
    let command = InProcessService::start_command(&nats.url()).await?;
    let http = http_client();
    let data = tempfile::Builder::new().prefix("query-restart").tempdir()?;
    let mut w = Written::default();

    let (mut query, base) = spawn_query_process(&nats.url(), data.path()).await?;
    write_round(&mut w, &http, &command.base_url, 1, (20, 15, 3)).await?;
    wait_checkpoints(&http, &base, w.last_seq).await?;
    w.assert_served(&http, &base).await?;
    let status = tokio::task::block_in_place(|| query.terminate(Duration::from_secs(15)))?;
    assert!(status.success(), "SIGTERM exit {status}:\n{}", query.log());

    // Written while the service is down: picked up from the checkpoint.
    write_round(&mut w, &http, &command.base_url, 2, (10, 15, 3)).await?;
    let (mut query, base) = spawn_query_process(&nats.url(), data.path()).await?;
    wait_checkpoints(&http, &base, w.last_seq).await?;
    w.assert_served(&http, &base).await?;

    // The same after SIGKILL: no flush, no goodbye.
    tokio::task::block_in_place(|| query.kill());
    write_round(&mut w, &http, &command.base_url, 3, (5, 10, 2)).await?;
    let (mut query, base) = spawn_query_process(&nats.url(), data.path()).await?;
    let entries = wait_checkpoints(&http, &base, w.last_seq).await?;
    for name in e2e_tests::PROJECTION_NAMES {
        let e = projection(&entries, name);
        assert_eq!(e["state"], "running", "{e}");
        assert_eq!(e["parked"], 0, "{e}");
        assert_eq!(e["lag"], 0, "{e}");
    }
    w.assert_served(&http, &base).await?;
    let status = tokio::task::block_in_place(|| query.terminate(Duration::from_secs(15)))?;
    assert!(status.success(), "SIGTERM exit {status}:\n{}", query.log());

    // The files themselves, with the service stopped.
    let dir = data.path().to_path_buf();
    let want = w.clone();
    tokio::task::spawn_blocking(move || -> TestResult {
        let (_view, view) = posts_projections::view::open(&dir.join("post-view.redb"))?;
        assert_eq!(view.checkpoint()?, want.last_seq);
        assert_eq!(view.count()?, u64::try_from(want.posts.len())?);
        let (_search, search) = posts_projections::search::open(
            &dir.join("post-search"),
            posts_projections::search::WRITER_HEAP_LIVE_BYTES,
        )?;
        assert_eq!(search.checkpoint()?, want.last_seq);
        assert_eq!(search.all_docs()?.len(), want.posts.len());
        for (id, p) in &want.posts {
            let row = view.get(id)?.unwrap_or_else(|| panic!("{id} not in view"));
            assert_eq!(
                (row.version, row.deleted, row.title.as_str()),
                (p.version, p.deleted, p.title.as_str()),
                "view row {id}"
            );
            let doc = search
                .get(id)?
                .unwrap_or_else(|| panic!("{id} not indexed"));
            assert_eq!(
                (doc.version, doc.deleted),
                (p.version, p.deleted),
                "doc {id}"
            );
        }
        Ok(())
    })
    .await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_events_are_parked_dead_lettered_and_passed_over() -> TestResult {
    let env = QueryEnv::start().await?;
    let js = &env.reader.js;
    env.create("before poison", "lorem", "ann").await?;
    let created = posts::encode(&Event::Created {
        title: "t".into(),
        content: "c".into(),
        author_name: "a".into(),
    });
    let publish = |id: String, headers: Option<async_nats::HeaderMap>, payload: Vec<u8>| async move {
        let ack = match headers {
            Some(h) => {
                js.publish_with_headers(subject_for(&id), h, payload.into())
                    .await?
                    .await?
            }
            None => js.publish(subject_for(&id), payload.into()).await?.await?,
        };
        anyhow::Ok((ack.sequence, id))
    };
    let new_id = || uuid::Uuid::now_v7().to_string();
    // (expected reason, seq, subject id, payload)
    let mut poison: Vec<(&str, u64, String, Vec<u8>)> = Vec::new();
    let garbage = vec![0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x02];
    let (seq, id) = publish(
        new_id(),
        Some(event_headers("PostCreated", 1)),
        garbage.clone(),
    )
    .await?;
    poison.push(("undecodable payload", seq, id, garbage));
    let (seq, id) = publish(new_id(), None, b"no envelope".to_vec()).await?;
    poison.push(("Event-Type", seq, id, b"no envelope".to_vec()));
    let ghost_id = new_id();
    let ghost = Event::Updated {
        title: Some("ghost".into()),
        content: None,
        author_name: None,
    };
    let seq = publish_event(js, &ghost_id, &ghost).await?;
    poison.push(("absent", seq, ghost_id.clone(), posts::encode(&ghost).2));
    let (seq, id) = publish(
        new_id(),
        Some(event_headers("PostLiked", 1)),
        created.2.clone(),
    )
    .await?;
    poison.push(("PostLiked", seq, id, created.2.clone()));
    let (seq, id) = publish(
        new_id(),
        Some(event_headers("PostCreated", 9)),
        created.2.clone(),
    )
    .await?;
    poison.push(("schema 9", seq, id, created.2.clone()));
    let after = env.create("after poison", "survivor lorem", "ann").await?;

    // The later post is readable and searchable.
    let reply = get_post(&env, &after.post_id, after.seq, false).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let v = search(&env, "survivor", &[], after.seq).await;
    assert_eq!(hit_ids(&v), std::slice::from_ref(&after.post_id), "{v}");
    // The poison made no post.
    for id in [&poison[0].2, &ghost_id, &poison[4].2] {
        get_post(&env, id, after.seq, true)
            .await
            .assert_problem(404, id);
    }

    // Their histories show them, each in its place with what is wrong: an
    // undecodable payload, and a message with no envelope at all.
    for ((_, seq, id, _), error) in poison[..2].iter().zip([
        "payload is malformed",
        "broken envelope: header Event-Type is missing",
    ]) {
        let reply = env.get(&format!("/posts/{id}/events")).await?;
        assert_eq!(reply.status, 200, "{reply:?}");
        let v = reply.json();
        let shown = v["data"].as_array().expect("data array");
        assert_eq!(shown.len(), 1, "{v}");
        assert_eq!(shown[0]["seq"], *seq, "{v}");
        assert!(shown[0]["data"].is_null(), "{v}");
        let said = shown[0]["error"].as_str().unwrap_or_default();
        assert!(said.contains(error), "{error:?}: {v}");
    }

    // Parked, counted and shown, per projection.
    let entries = wait_checkpoints(&env.http, &env.query.base_url, after.seq).await?;
    let want_seqs: BTreeSet<u64> = poison.iter().map(|p| p.1).collect();
    for name in e2e_tests::PROJECTION_NAMES {
        let e = projection(&entries, name);
        assert_eq!(e["parked"], 5, "{e}");
        assert_eq!(e["state"], "running", "{e}");
        let recent: BTreeMap<u64, String> = e["parked_recent"]
            .as_array()
            .expect("parked_recent")
            .iter()
            .map(|p| {
                (
                    p["seq"].as_u64().unwrap_or_default(),
                    p["reason"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        assert_eq!(
            recent.keys().copied().collect::<BTreeSet<_>>(),
            want_seqs,
            "{e}"
        );
        for (why, seq, _, _) in &poison {
            assert!(
                recent[seq].contains(why),
                "{name} parked {seq} for {:?}, expected a reason naming {why:?}",
                recent[seq]
            );
        }
    }
    assert_eq!(env.get("/readyz").await?.status, 200);

    // Dead-lettered once per projection, with the original payload.
    let dlq = js.get_stream("DLQ").await?;
    for name in e2e_tests::PROJECTION_NAMES {
        for (_, seq, id, payload) in &poison {
            let subject = format!("dlq.{name}.POSTS.{seq}");
            let msg = wait_for(&subject, Duration::from_secs(15), || {
                let dlq = dlq.clone();
                let subject = subject.clone();
                async move { dlq.get_last_raw_message_by_subject(&subject).await.ok() }
            })
            .await?;
            assert_eq!(msg.payload.as_ref(), payload.as_slice(), "{subject}");
            let header = |k: &str| msg.headers.get(k).map(|v| v.as_str().to_string());
            assert_eq!(
                header("Original-Subject"),
                Some(subject_for(id)),
                "{subject}"
            );
            assert_eq!(header("Parked-By").as_deref(), Some(name), "{subject}");
            assert_eq!(header("Parked-Seq"), Some(seq.to_string()), "{subject}");
        }
    }
    let n_dlq = dlq.clone().info().await?.state.messages;
    assert_eq!(n_dlq, 10, "five poison events, once per projection");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn view_and_search_agree_after_a_mixed_workload() -> TestResult {
    const AUTHORS: [&str; 4] = ["ann", "bob", "cy", "di"];
    let env = QueryEnv::start().await?;
    let command = env.command.base_url.clone();
    let mut w = Written::default();
    w.create_many(&env.http, &command, 60, |i| {
        (
            format!("mixed {i}"),
            format!("lorem mixed {i}"),
            AUTHORS[i % 4].to_string(),
        )
    })
    .await?;
    let ids = w.order.clone();
    // 40 updates on 40 posts, every third one moving the post to another author.
    let bodies: Vec<(String, Value)> = (0..40)
        .map(|j| {
            let mut body = json!({"content": format!("lorem updated {j}")});
            if j % 3 == 0 {
                body["author_name"] = json!(AUTHORS[(j + 1) % 4]);
            }
            (ids[j].clone(), body)
        })
        .collect();
    for chunk in bodies.chunks(8) {
        let acks = join_all(
            chunk
                .iter()
                .map(|(id, b)| e2e_tests::update_post(&env.http, &command, id, b)),
        )
        .await;
        for ((_, body), ack) in chunk.iter().zip(acks) {
            w.record_update(&ack?, body);
        }
    }
    // 15 deletes, updated posts and untouched ones alike.
    let doomed: Vec<String> = (0..60).step_by(4).map(|j| ids[j].clone()).collect();
    let acks = join_all(
        doomed
            .iter()
            .map(|id| e2e_tests::delete_post(&env.http, &command, id)),
    )
    .await;
    for ack in acks {
        w.record_delete(&ack?);
    }
    assert_eq!(w.live_ids().len(), 45);

    let base = env.query.base_url.clone();
    let mut by_author: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (id, p) in &w.posts {
        if !p.deleted {
            let author = AUTHORS
                .iter()
                .find(|a| **a == p.author_name)
                .expect("known author");
            by_author.entry(author).or_default().insert(id.clone());
        }
    }
    for author in AUTHORS {
        let listed: BTreeSet<String> =
            ids_of(&list_all(&env.http, &base, &[("author_name", author)], 7, w.last_seq).await?)
                .into_iter()
                .collect();
        let (hits, total) = search_all(
            &env.http,
            &base,
            "lorem",
            &[("author_name", author)],
            7,
            w.last_seq,
        )
        .await?;
        let found: BTreeSet<String> = ids_of(&hits).into_iter().collect();
        let want = by_author.get(author).cloned().unwrap_or_default();
        assert_eq!(listed, want, "view, author {author}");
        assert_eq!(found, want, "search, author {author}");
        assert_eq!(total, u64::try_from(want.len())?, "search total, {author}");
    }
    let listed: BTreeSet<String> = ids_of(&list_all(&env.http, &base, &[], 10, w.last_seq).await?)
        .into_iter()
        .collect();
    let (hits, _) = search_all(&env.http, &base, "lorem", &[], 10, w.last_seq).await?;
    let found: BTreeSet<String> = ids_of(&hits).into_iter().collect();
    assert_eq!(listed, w.live_ids());
    assert_eq!(found, w.live_ids());
    w.assert_served(&env.http, &base).await?;
    let entries = wait_checkpoints(&env.http, &base, w.last_seq).await?;
    for name in e2e_tests::PROJECTION_NAMES {
        assert_eq!(projection(&entries, name)["parked"], 0);
    }
    Ok(())
}

/// A dead letter is stored once per (projection, sequence), however late a
/// second park of the same event comes (after a crash lost a non-durable
/// tail, past the duplicate window): the publish expects an empty subject.
/// Here the subjects already hold a message, as a first park would have
/// left them; the park of the event must leave that message alone and the
/// projection must move on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_is_stored_once_per_projection_and_sequence() -> TestResult {
    let env = QueryEnv::start().await?;
    let js = &env.reader.js;
    env.create("before", "lorem", "ann").await?;
    let next_seq = js
        .get_stream("POSTS")
        .await?
        .info()
        .await?
        .state
        .last_sequence
        + 1;
    for name in e2e_tests::PROJECTION_NAMES {
        js.publish(format!("dlq.{name}.POSTS.{next_seq}"), "first park".into())
            .await?
            .await?;
    }
    let id = uuid::Uuid::now_v7().to_string();
    let ack = js
        .publish_with_headers(
            subject_for(&id),
            event_headers("PostCreated", 1),
            vec![0xff, 0xff, 0xff].into(),
        )
        .await?
        .await?;
    assert_eq!(ack.sequence, next_seq, "nothing else writes in this test");
    let after = env.create("after", "survivor", "ann").await?;
    let entries = wait_checkpoints(&env.http, &env.query.base_url, after.seq).await?;
    let dlq = js.get_stream("DLQ").await?;
    for name in e2e_tests::PROJECTION_NAMES {
        let e = projection(&entries, name);
        assert_eq!(e["parked"], 1, "{e}");
        assert_eq!(e["state"], "running", "{e}");
        let subject = format!("dlq.{name}.POSTS.{next_seq}");
        let msg = dlq.get_last_raw_message_by_subject(&subject).await?;
        assert_eq!(msg.payload.as_ref(), b"first park", "{subject}");
    }
    assert_eq!(
        dlq.clone().info().await?.state.messages,
        2,
        "one message per projection, the first park's"
    );
    Ok(())
}

/// With NATS gone, `/projections` says the stream is unreachable, reads
/// keep being served from the local stores, and once NATS is back the
/// projections go on by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn projections_show_an_unreachable_stream_and_recover() -> TestResult {
    let mut env = QueryEnv::start().await?;
    let before = env.create("before the outage", "lorem", "ann").await?;
    wait_checkpoints(&env.http, &env.query.base_url, before.seq).await?;
    let entries = e2e_tests::projections(&env.http, &env.query.base_url).await?;
    for name in e2e_tests::PROJECTION_NAMES {
        assert!(
            projection(&entries, name)["stream_error"].is_null(),
            "{entries:?}"
        );
    }

    tokio::task::block_in_place(|| env.nats.kill());
    let entries = stream_errors_are(&env, true).await?;
    let view = projection(&entries, "post-view");
    assert_eq!(
        view["state"], "running",
        "a stream outage is no fault of the projection: {view}"
    );
    assert!(view["last_error"].is_null(), "{view}");
    // Reads are served from the local copy meanwhile.
    let read = Reply::of(env.http.get(env.q(&format!("/posts/{}", before.post_id)))).await?;
    assert_eq!(read.status, 200, "{read:?}");

    e2e_tests::restart_nats(&mut env.nats).await?;
    // The command service answers 503 until it has reconnected.
    let after = wait_for(
        "a create after the restart",
        Duration::from_secs(60),
        || {
            let req = env.http.post(env.cmd("/posts")).json(
                &json!({"title": "after the outage", "content": "lorem", "author_name": "ann"}),
            );
            async move {
                let reply = Reply::of(req).await.ok().filter(|r| r.status == 201)?;
                reply.json()["seq"].as_u64()
            }
        },
    )
    .await?;
    wait_checkpoints(&env.http, &env.query.base_url, after).await?;
    let entries = stream_errors_are(&env, false).await?;
    assert_eq!(projection(&entries, "post-search")["checkpoint"], after);
    Ok(())
}

/// Waits until every projection's `stream_error` is set (or clear); returns
/// the `/projections` entries.
async fn stream_errors_are(env: &QueryEnv, set: bool) -> anyhow::Result<Vec<Value>> {
    let what = if set { "set" } else { "clear" };
    wait_for(
        &format!("every stream_error {what}"),
        Duration::from_secs(60),
        || {
            let http = env.http.clone();
            let base = env.query.base_url.clone();
            async move {
                let entries = e2e_tests::projections(&http, &base).await.ok()?;
                e2e_tests::PROJECTION_NAMES
                    .iter()
                    .all(|n| projection(&entries, n)["stream_error"].is_string() == set)
                    .then_some(entries)
            }
        },
    )
    .await
}
