//! The findings of the hardening review, each as the attack or the fault a
//! user would meet, over real processes.

use std::path::Path;

use e2e_tests::{
    CONDITION_DEADLINE, InProcessService, Reply, StreamReader, Written, admin_url, http_client,
    replay_args, run_replay, spawn_command_process, spawn_query_process,
    spawn_service_process_with_env, start_nats, start_nats_with, testkit, wait_checkpoints,
    wait_for,
};
use serde_json::json;

type TestResult = anyhow::Result<()>;

/// The files a running `posts-query` keeps at the top of its data dir.
const DATA_DIR_FILES: [&str; 4] = [
    "post-view.redb",
    "post-search",
    "posts-query.lock",
    "posts-query.json",
];

fn assert_data_dir_intact(data_dir: &Path, when: &str) {
    for f in DATA_DIR_FILES {
        assert!(
            data_dir.join(f).exists(),
            "{when}: {f} is gone from the data dir"
        );
    }
}

/// Finding 1: the swap endpoint was on the public listener and took any path
/// under `<data>/.rebuild`, `.rebuild` itself included; swapping post-search
/// with it removed the data dir under the running service.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swap_never_takes_a_client_path_and_admin_is_off_the_public_listener() -> TestResult {
    let nats = start_nats().await?;
    let command = InProcessService::start_command(&nats.url()).await?;
    let http = http_client();
    let data = tempfile::Builder::new().prefix("swap-attack").tempdir()?;
    let (query, base) = spawn_query_process(&nats.url(), data.path()).await?;
    let mut w = Written::default();
    w.create_many(&http, &command.base_url, 5, |i| {
        (format!("attack {i}"), format!("lorem {i}"), "ann".into())
    })
    .await?;
    wait_checkpoints(&http, &base, w.last_seq).await?;
    // As in the report: one replay, which leaves `.rebuild` behind.
    let run = run_replay(&replay_args("post-search", &nats.url(), data.path(), &[])).await?;
    assert!(run.status.success(), "{run:?}");
    let rebuild_root = data.path().join(".rebuild");
    assert!(
        rebuild_root.is_dir(),
        "the replay made {}",
        rebuild_root.display()
    );
    let data_dir_text = data.path().canonicalize()?.display().to_string();

    // The public listener has no admin route at all.
    for path in ["swap", "progress", "shadows"] {
        let r = Reply::of(
            http.post(format!("{base}/admin/projections/post-search/{path}"))
                .json(&json!({"path": rebuild_root, "verify": false})),
        )
        .await?;
        r.assert_problem(404, "route");
    }
    assert_data_dir_intact(data.path(), "after the public swap");

    // The admin listener takes only shadows it handed out, by id.
    let admin = admin_url(data.path())?;
    assert!(admin.starts_with("http://127.0.0.1:"), "loopback: {admin}");
    let swap = |body: serde_json::Value| {
        Reply::of(
            http.post(format!("{admin}/admin/projections/post-search/swap"))
                .json(&body),
        )
    };
    let r = swap(json!({"path": rebuild_root, "verify": false})).await?;
    assert_eq!(r.status, 400, "a path is not a field of the swap: {r:?}");
    assert!(!r.body.contains(&data_dir_text), "no path in errors: {r:?}");
    for id in [
        ".rebuild".to_string(),
        "..".to_string(),
        rebuild_root.display().to_string(),
        "0".repeat(32),
    ] {
        let r = swap(json!({"shadow": id, "verify": false})).await?;
        r.assert_problem(404, "no shadow");
        assert!(!r.body.contains(&data_dir_text), "no path in errors: {r:?}");
    }
    // A handed-out id is single use and bound to its projection.
    let handed =
        Reply::of(http.post(format!("{admin}/admin/projections/post-view/shadows"))).await?;
    assert_eq!(handed.status, 201, "{handed:?}");
    let id = handed.json()["shadow"].as_str().expect("an id").to_string();
    swap(json!({"shadow": id, "verify": false}))
        .await?
        .assert_problem(404, "no shadow");
    assert_data_dir_intact(data.path(), "after the admin swaps");

    // The service goes on, and so does the protocol.
    w.create(&http, &command.base_url, "after the attack", "lorem", "ann")
        .await?;
    wait_checkpoints(&http, &base, w.last_seq).await?;
    w.assert_served(&http, &base).await?;
    let run = run_replay(&replay_args("all", &nats.url(), data.path(), &["--verify"])).await?;
    assert!(run.status.success(), "{run:?}");
    assert_data_dir_intact(data.path(), "after a real replay");

    // Finding 10: a store wiped under the running service makes it unready.
    let view = data.path().join("post-view.redb");
    let aside = data.path().join("post-view.redb.aside");
    std::fs::rename(&view, &aside)?;
    Reply::of(http.get(format!("{base}/readyz")))
        .await?
        .assert_problem(503, "post-view is gone");
    std::fs::rename(&aside, &view)?;
    assert_eq!(
        Reply::of(http.get(format!("{base}/readyz"))).await?.status,
        200
    );
    drop(query);
    Ok(())
}

/// Finding 6: the query side provisioned `POSTS` and `DLQ` itself. It must
/// only wait for them (readyz 503), as replay does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_query_side_never_creates_a_stream_and_waits_for_one() -> TestResult {
    let nats = start_nats().await?;
    let http = http_client();
    let data = tempfile::Builder::new().prefix("no-stream").tempdir()?;
    // Replay first: it needs the stream and creates none.
    let run = run_replay(&replay_args("all", &nats.url(), data.path(), &[])).await?;
    assert!(!run.status.success(), "{run:?}");
    let port = testkit::free_port();
    let args = e2e_tests::query_args(&nats.url(), port, data.path());
    let _query = tokio::task::spawn_blocking(move || {
        testkit::ServiceProcess::spawn("posts-query", &args, &[], port)
    })
    .await??;
    let base = format!("http://127.0.0.1:{port}");
    let waiting = wait_for(
        "posts-query answering 503 while it waits",
        CONDITION_DEADLINE,
        || {
            let req = http.get(format!("{base}/readyz"));
            async move { Reply::of(req).await.ok().filter(|r| r.status == 503) }
        },
    )
    .await?;
    waiting.assert_problem(503, "waiting for stream POSTS");
    assert!(waiting.header("retry-after").is_some(), "{waiting:?}");
    let r = Reply::of(http.get(format!("{base}/posts"))).await?;
    r.assert_problem(503, "starting");
    assert_eq!(
        Reply::of(http.get(format!("{base}/livez"))).await?.status,
        200
    );
    let js = StreamReader::connect(&nats.url()).await?.js;
    let names: Vec<String> = futures::TryStreamExt::try_collect(js.stream_names()).await?;
    assert!(names.is_empty(), "the query side created {names:?}");

    // The command service creates them; the waiting service then follows.
    let command = InProcessService::start_command(&nats.url()).await?;
    let mut w = Written::default();
    w.create(&http, &command.base_url, "first", "lorem", "ann")
        .await?;
    e2e_tests::wait_ready(&http, &base).await?;
    wait_checkpoints(&http, &base, w.last_seq).await?;
    w.assert_served(&http, &base).await?;
    let mut names: Vec<String> = futures::TryStreamExt::try_collect(js.stream_names()).await?;
    names.sort();
    assert_eq!(
        names,
        ["DLQ", "KV_POSTS_IDEMPOTENCY", "POSTS"],
        "all made by posts-command"
    );
    Ok(())
}

/// Finding 6: streams had no byte budget, so unauthenticated writes could
/// fill the disk. A full budget answers 507 and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_byte_budget_is_507_and_loses_nothing() -> TestResult {
    const BUDGET_BYTES: i64 = 64 * 1024;
    let nats = start_nats().await?;
    let http = http_client();
    let command = InProcessService::start_command_with_budget(&nats.url(), BUDGET_BYTES).await?;
    let reader = StreamReader::connect(&nats.url()).await?;
    let content = "x".repeat(4_000);
    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 0..100 {
        let body =
            json!({"title": format!("filler {i}"), "content": content, "author_name": "ann"});
        let r = Reply::of(http.post(format!("{}/posts", command.base_url)).json(&body)).await?;
        match r.status {
            201 => accepted.push(r.ack(201)),
            _ => {
                refused = Some(r);
                break;
            }
        }
    }
    let refused = refused.expect("a 64 KiB budget fills within 100 creates of 4 KB");
    refused.assert_problem(507, "byte budget is full");
    assert!(!accepted.is_empty());
    // Updates are refused alike, and nothing was stored for either.
    let first = &accepted[0];
    let r = Reply::of(
        http.patch(format!("{}/posts/{}", command.base_url, first.post_id))
            .json(&json!({"content": "y".repeat(4_000)})),
    )
    .await?;
    r.assert_problem(507, "byte budget");
    let messages = reader.all_messages().await?;
    assert_eq!(messages.len(), accepted.len(), "one event per 201, no more");
    for (ack, msg) in accepted.iter().zip(&messages) {
        assert_eq!(msg.sequence, ack.seq);
        assert_eq!(msg.subject.as_str(), format!("posts.{}", ack.post_id));
    }
    let info = reader.info().await?;
    assert_eq!(info.config.max_bytes, BUDGET_BYTES);

    // An operator raises the budget (the flag, on the next start): writes go on.
    command.stop().await?;
    let command =
        InProcessService::start_command_with_budget(&nats.url(), BUDGET_BYTES * 4).await?;
    let r = Reply::of(
        http.post(format!("{}/posts", command.base_url))
            .json(&json!({"title": "after", "content": content, "author_name": "ann"})),
    )
    .await?;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(reader.all_messages().await?.len(), accepted.len() + 1);
    Ok(())
}

/// Finding 9: keys were global, the event id was fresh per attempt, and the
/// body was hashed as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_keys_are_scoped_by_caller_and_backed_by_the_stream() -> TestResult {
    let nats = start_nats().await?;
    let http = http_client();
    let command = InProcessService::start_command(&nats.url()).await?;
    let reader = StreamReader::connect(&nats.url()).await?;
    let create = |actor: Option<&str>, key: &str, title: &str| {
        let mut req = http
            .post(format!("{}/posts", command.base_url))
            .header("Idempotency-Key", key)
            .json(&json!({"title": title, "content": "same", "author_name": "ann"}));
        if let Some(a) = actor {
            req = req.header("Actor", a);
        }
        Reply::of(req)
    };
    let alice = create(Some("alice"), "k-1", "shared key").await?.ack(201);
    let bob = create(Some("bob"), "k-1", "shared key").await?;
    assert_eq!(bob.status, 201, "another caller's key is not ours: {bob:?}");
    assert_ne!(bob.ack(201).post_id, alice.post_id);
    // Bob's key with another body is his own business, not a 422 about Alice's.
    let carol = create(Some("carol"), "k-1", "another body").await?;
    assert_eq!(carol.status, 201, "{carol:?}");
    // The same create, normalised alike (the title is trimmed): a replay.
    let again = create(Some("alice"), "k-1", "  shared key ").await?;
    assert_eq!(again.ack(201), alice, "{again:?}");
    assert_eq!(again.header("idempotent-replayed"), Some("true"));

    // The event id is a name-based UUID of the scoped key: the same for the
    // same key and caller, so the stream's duplicate window backs the bucket.
    let messages = reader.all_messages().await?;
    assert_eq!(messages.len(), 3, "alice, bob, carol");
    let ids: Vec<uuid::Uuid> = messages
        .iter()
        .map(|m| {
            e2e_tests::msg_header(m, "Nats-Msg-Id")
                .and_then(|v| uuid::Uuid::parse_str(v).ok())
                .expect("a UUID Nats-Msg-Id")
        })
        .collect();
    for id in &ids {
        assert_eq!(id.get_version_num(), 5, "name-based: {id}");
    }
    assert_ne!(ids[0], ids[1]);
    Ok(())
}

/// Finding 4: history had no pagination and lists capped only the count, so
/// one request could make the service hold 100k events of 100 KB. Every
/// page now stops before 4 MiB, and `next_cursor` carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pages_stop_before_four_mib_and_cursors_carry_on() -> TestResult {
    const BIG_POSTS: usize = 50;
    let nats = start_nats_with(&testkit::NatsOptions {
        sync_always: false,
        ..Default::default()
    })
    .await?;
    let command = InProcessService::start_command(&nats.url()).await?;
    let http = http_client();
    let data = tempfile::Builder::new().prefix("pages").tempdir()?;
    let (_query, base) = spawn_query_process(&nats.url(), data.path()).await?;
    // 100 KB each, with escapes: a control character is 6 bytes as JSON.
    let big = |i: usize| format!("{i} {}", "\u{1}bytes ".repeat(14_000));
    let mut w = Written::default();
    w.create_many(&http, &command.base_url, BIG_POSTS, |i| {
        (format!("big {i}"), big(i), "ann".into())
    })
    .await?;
    let id = w.order[0].clone();
    for i in 0..BIG_POSTS {
        w.update(
            &http,
            &command.base_url,
            &id,
            &json!({"content": big(i + 1000)}),
        )
        .await?;
    }
    wait_checkpoints(&http, &base, w.last_seq).await?;

    // The listing: 1000 asked for, cut by bytes, every post exactly once.
    let (rows, pages) = every_page(&http, &format!("{base}/posts"), &[("limit", "1000")]).await?;
    let seen: Vec<String> = rows
        .iter()
        .map(|p| p["post_id"].as_str().expect("id").to_string())
        .collect();
    assert!(pages > 1, "50 posts of ~130 KB of JSON do not fit one page");
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    let mut want = w.order.clone();
    want.sort();
    assert_eq!(seen.len(), BIG_POSTS, "each post once: {seen:?}");
    assert_eq!(sorted, want, "every post");

    // The history: 51 events of one post, default page size 100, cut by bytes.
    let (events, pages) = every_page(&http, &format!("{base}/posts/{id}/events"), &[]).await?;
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert!(pages > 1, "51 events of ~130 KB do not fit one page");
    assert_eq!(seqs.len(), BIG_POSTS + 1, "every event once: {seqs:?}");
    assert!(seqs.windows(2).all(|p| p[0] < p[1]), "in order: {seqs:?}");
    // `limit` pages by count too, and a bad cursor is a 400.
    let r = Reply::of(
        http.get(format!("{base}/posts/{id}/events"))
            .query(&[("limit", "2")]),
    )
    .await?;
    let v = r.json();
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(v["next_cursor"], format!("s{}", seqs[1]));
    Reply::of(
        http.get(format!("{base}/posts/{id}/events"))
            .query(&[("cursor", "x")]),
    )
    .await?
    .assert_problem(400, "cursor");
    Ok(())
}

/// Every item of a paged list at `url`, following `next_cursor`, and the
/// number of pages; each page must be a 200 under 4 MiB.
async fn every_page(
    http: &reqwest::Client,
    url: &str,
    query: &[(&str, &str)],
) -> anyhow::Result<(Vec<serde_json::Value>, usize)> {
    const PAGE_BYTES_MAX: usize = 4 * 1024 * 1024;
    let (mut items, mut pages) = (Vec::new(), 0);
    let mut cursor: Option<String> = None;
    loop {
        let mut req = http.get(url).query(query);
        if let Some(c) = &cursor {
            req = req.query(&[("cursor", c)]);
        }
        let r = Reply::of(req).await?;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            r.body.len() < PAGE_BYTES_MAX,
            "a page of {} bytes",
            r.body.len()
        );
        let v = r.json();
        items.extend(v["data"].as_array().expect("data").iter().cloned());
        pages += 1;
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return Ok((items, pages)),
        }
    }
}

/// Finding 8: an aggregate load on a cache miss used direct gets, which any
/// replica may answer, and counted as fresh. So a PATCH right after a create
/// made through another instance could be a 404, or a 412 saying "version 0".
/// Instance B here answers its direct gets as a replica that has received
/// nothing yet (`EVENTSTORE_FAULT=stale-replica`, debug builds): every
/// rejection, mismatch and no-op must be checked with the leader first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_lags_never_makes_a_rejection_final() -> TestResult {
    let nats = start_nats().await?;
    let http = http_client();
    let (_a, a) = spawn_command_process(&nats.url()).await?;
    let (b_process, b) = spawn_service_process_with_env(
        "posts-command",
        &nats.url(),
        &[("EVENTSTORE_FAULT", "stale-replica")],
    )
    .await?;
    let create = |title: &'static str| {
        Reply::of(
            http.post(format!("{a}/posts"))
                .json(&json!({"title": title, "content": "v1", "author_name": "ann"})),
        )
    };

    // An update on B right after A's create: B's replica has not seen it.
    let first = create("lagging update").await?.ack(201);
    let r = Reply::of(
        http.patch(format!("{b}/posts/{}", first.post_id))
            .json(&json!({"content": "v2"})),
    )
    .await?;
    let updated = r.ack(200);
    assert_eq!(
        (updated.version, updated.post_id),
        (2, first.post_id.clone())
    );

    // Pinned to the version A answered: B's replica says 0, the leader 1.
    let second = create("lagging pinned update").await?.ack(201);
    let r = Reply::of(
        http.patch(format!("{b}/posts/{}", second.post_id))
            .header("If-Match", "\"1\"")
            .json(&json!({"content": "v2"})),
    )
    .await?;
    assert_eq!(r.ack(200).version, 2);

    // A delete on B, and a pin that is wrong on the leader too: the 412
    // names the leader's version, not the replica's 0.
    let third = create("lagging delete").await?.ack(201);
    let r = Reply::of(http.delete(format!("{b}/posts/{}", third.post_id))).await?;
    assert_eq!(r.ack(200).version, 2);
    let r = Reply::of(
        http.patch(format!("{b}/posts/{}", first.post_id))
            .header("If-Match", "\"7\"")
            .json(&json!({"content": "v3"})),
    )
    .await?;
    let doc = r.assert_problem(412, "version 2");
    assert_eq!(doc["current_version"], 2, "{doc}");

    // What the leader rejects stays rejected: an unknown post is a 404.
    let unknown = uuid::Uuid::now_v7().to_string();
    Reply::of(
        http.patch(format!("{b}/posts/{unknown}"))
            .json(&json!({"content": "v2"})),
    )
    .await?
    .assert_problem(404, &unknown);

    // The fault was armed in B: the answers above went through the leader.
    assert!(
        b_process
            .log()
            .contains("fault stale-replica: direct gets answer as a replica that has nothing"),
        "B never armed the fault; see {}",
        b_process.log_path().display()
    );
    let reader = StreamReader::connect(&nats.url()).await?;
    assert_eq!(
        reader.all_messages().await?.len(),
        6,
        "3 creates, 3 writes on B"
    );
    Ok(())
}
