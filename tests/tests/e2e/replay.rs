//! The `replay` tool of docs/api.md ("Replay tool") as a real process: offline
//! on a stopped service's files, online against a running `posts-query`
//! under read load, killed mid-rebuild, and its usage and connection errors.

use std::collections::{BTreeSet, HashMap};
use std::future::IntoFuture;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use e2e_tests::{
    InProcessService, PROJECTION_NAMES, Reply, StreamReader, Written, event_headers, file_digests,
    http_client, ids_of, list_all, projection, projections, publish_event, replay_args, run_replay,
    search_all, spawn_query_process, start_nats, start_nats_with, subject_for, testkit,
    wait_checkpoints, wait_for, wait_ready,
};
use posts::Event;
use serde_json::{Value, json};

type TestResult = anyhow::Result<()>;

/// What a service answers for every written post, by id (deleted included).
async fn snapshot_posts(
    http: &reqwest::Client,
    base: &str,
    w: &Written,
) -> anyhow::Result<HashMap<String, Value>> {
    let mut out = HashMap::new();
    for id in w.posts.keys() {
        let reply = Reply::of(
            http.get(format!("{base}/posts/{id}"))
                .query(&[("include_deleted", "true")]),
        )
        .await?;
        assert_eq!(reply.status, 200, "{id}: {reply:?}");
        out.insert(id.clone(), reply.json());
    }
    Ok(out)
}

/// Entries of `<data-dir>/.rebuild`, if it exists.
fn rebuild_entries(data_dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(data_dir.join(".rebuild"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offline_replay_rebuilds_both_projections_to_the_same_digest() -> TestResult {
    let nats = start_nats().await?;
    let command = InProcessService::start_command(&nats.url()).await?;
    let cmd = command.base_url.clone();
    let http = http_client();
    let data = tempfile::Builder::new()
        .prefix("replay-offline")
        .tempdir()?;
    let (mut query, base) = spawn_query_process(&nats.url(), data.path()).await?;

    let mut w = Written::default();
    w.create_many(&http, &cmd, 30, |i| {
        (
            format!("offline {i}"),
            format!("lorem offline {i}"),
            format!("author{}", i % 3),
        )
    })
    .await?;
    let ids = w.order.clone();
    for (j, id) in ids.iter().enumerate().take(20) {
        let mut body = json!({"title": format!("offline {j} edited")});
        if j % 4 == 0 {
            body["author_name"] = json!("mover");
        }
        w.update(&http, &cmd, id, &body).await?;
    }
    for id in ids.iter().skip(2).step_by(5) {
        w.delete(&http, &cmd, id).await?;
    }
    // A poison event: parked records are part of the view, rebuilt too.
    let js = StreamReader::connect(&nats.url()).await?.js;
    let ghost = Event::Updated {
        title: Some("ghost".into()),
        content: None,
        author_name: None,
    };
    let ghost_seq = publish_event(&js, &uuid::Uuid::now_v7().to_string(), &ghost).await?;
    w.create(&http, &cmd, "after the ghost", "lorem", "author0")
        .await?;
    assert!(w.last_seq > ghost_seq);

    wait_checkpoints(&http, &base, w.last_seq).await?;
    w.assert_served(&http, &base).await?;
    let posts_before = snapshot_posts(&http, &base, &w).await?;
    let list_before = list_all(&http, &base, &[], 7, w.last_seq).await?;
    let (search_before, _) = search_all(&http, &base, "lorem", &[], 100, w.last_seq).await?;
    let status = tokio::task::block_in_place(|| query.terminate(Duration::from_secs(15)))?;
    assert!(status.success(), "SIGTERM exit {status}:\n{}", query.log());

    let dir = data.path().to_path_buf();
    let before = tokio::task::spawn_blocking(move || file_digests(&dir)).await??;
    let run = run_replay(&replay_args(
        "all",
        &nats.url(),
        data.path(),
        &["--verify", "--json"],
    ))
    .await?;
    let outcomes = run.assert_verified(&PROJECTION_NAMES);
    for (name, digest) in [("post-view", &before.0), ("post-search", &before.1)] {
        let o = &outcomes[name];
        assert_eq!(o["checkpoint"], w.last_seq, "{o}");
        assert_eq!(o["events"], w.last_seq, "rebuilt from sequence 1: {o}");
        assert_eq!(o["live_digest"], digest.as_str(), "the live files: {o}");
    }
    let dir = data.path().to_path_buf();
    let after = tokio::task::spawn_blocking(move || file_digests(&dir)).await??;
    assert_eq!(after, before, "the installed stores equal the old ones");

    // Without --json, for people: plain lines on stderr (not a terminal here).
    let run = run_replay(&replay_args("all", &nats.url(), data.path(), &["--verify"])).await?;
    assert!(run.status.success(), "{run:?}");
    assert!(run.stdout.trim().is_empty(), "nothing on stdout: {run:?}");
    for name in PROJECTION_NAMES {
        for line in [
            format!("{name}: rebuilding from sequence 1 up to {}", w.last_seq),
            format!(
                "{name}: {0}/{0} events applied; compacting the store",
                w.last_seq
            ),
            format!("replay {name}: {} events in ", w.last_seq),
            format!("events/s), swapped in at checkpoint {}", w.last_seq),
        ] {
            assert!(run.stderr.contains(&line), "stderr lacks {line:?}: {run:?}");
        }
    }
    assert_eq!(run.stderr.matches("verified: equal").count(), 2, "{run:?}");
    assert!(
        rebuild_entries(data.path()).is_empty(),
        "no shadow left behind: {:?}",
        rebuild_entries(data.path())
    );

    // The service on the rebuilt files answers exactly as before.
    let (_query, base) = spawn_query_process(&nats.url(), data.path()).await?;
    let entries = wait_checkpoints(&http, &base, w.last_seq).await?;
    for name in PROJECTION_NAMES {
        let e = projection(&entries, name);
        assert_eq!(e["parked"], 1, "the ghost, parked again: {e}");
        assert_eq!(e["state"], "running", "{e}");
    }
    assert_eq!(snapshot_posts(&http, &base, &w).await?, posts_before);
    assert_eq!(
        list_all(&http, &base, &[], 7, w.last_seq).await?,
        list_before
    );
    let (search_after, _) = search_all(&http, &base, "lorem", &[], 100, w.last_seq).await?;
    let set = |hits: &[Value]| ids_of(hits).into_iter().collect::<BTreeSet<_>>();
    assert_eq!(set(&search_after), set(&search_before));
    assert_eq!(set(&search_after), w.live_ids());
    Ok(())
}

#[test]
fn unknown_projection_is_a_usage_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("never-created");
    let out = std::process::Command::new(testkit::bin_path("replay"))
        .args(replay_args(
            "post-views",
            "nats://127.0.0.1:1",
            &data_dir,
            &[],
        ))
        .stdin(std::process::Stdio::null())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit {}: {stderr}", out.status);
    for name in ["post-view", "post-search", "all"] {
        assert!(stderr.contains(name), "stderr should list {name}: {stderr}");
    }
    assert!(!data_dir.exists(), "nothing created");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_without_nats_or_stream_fails_and_touches_no_file() -> TestResult {
    /// The start-up check gives up after 8 s; anything near this is a hang.
    const FAILURE_DEADLINE: Duration = Duration::from_secs(20);
    let dir = tempfile::tempdir()?;

    // Nothing listens on the port.
    let url = format!("nats://127.0.0.1:{}", testkit::free_port());
    let data_dir = dir.path().join("no-nats");
    // A hang guard, not a timing check: the start-up check gives up.
    let run = tokio::time::timeout(
        FAILURE_DEADLINE,
        run_replay(&replay_args("all", &url, &data_dir, &["--json"])),
    )
    .await
    .map_err(|_| anyhow::anyhow!("replay still running after {FAILURE_DEADLINE:?}"))??;
    assert!(!run.status.success(), "{run:?}");
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    assert!(run.stderr.contains(&url), "names the URL: {run:?}");
    assert!(run.stderr.contains("NATS"), "{run:?}");
    let summary = run.summary();
    assert_eq!(summary["ok"], false, "{summary}");
    assert!(summary["error"].is_string(), "{summary}");
    assert!(!data_dir.exists(), "no file created");

    // NATS is up but has no stream POSTS: nothing to rebuild from.
    let nats = start_nats().await?;
    let data_dir = dir.path().join("no-stream");
    let run = run_replay(&replay_args("post-view", &nats.url(), &data_dir, &[])).await?;
    assert!(!run.status.success(), "{run:?}");
    assert!(run.stderr.contains("POSTS"), "names the stream: {run:?}");
    assert!(!data_dir.exists(), "no file created");
    Ok(())
}

/// One read made by a reader task while a replay runs.
struct Observation {
    at: Instant,
    read: Read,
    answer: Result<(u16, Value), String>,
}

#[derive(Debug, Clone, Copy)]
enum Read {
    Post(usize),
    Rare,
    Common,
}

/// xorshift64: reproducible per task, no dependency.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

async fn read_once(
    http: &reqwest::Client,
    base: &str,
    ids: &[String],
    read: Read,
) -> Result<(u16, Value), String> {
    let req = match read {
        Read::Post(i) => http.get(format!("{base}/posts/{}", ids[i])),
        Read::Rare => http
            .get(format!("{base}/posts/search"))
            .query(&[("q", "rarebird"), ("limit", "100")]),
        Read::Common => http
            .get(format!("{base}/posts/search"))
            .query(&[("q", "lorem"), ("limit", "5")]),
    };
    let reply = Reply::of(req).await.map_err(|e| format!("{e:#}"))?;
    let body = serde_json::from_str(&reply.body).unwrap_or(Value::String(reply.body.clone()));
    Ok((reply.status, body))
}

/// What a correct service answers to `read`, compared loosely where the
/// contract allows (search scores depend on index layout, totals do not).
fn summarize(read: Read, body: &Value) -> Value {
    match read {
        Read::Post(_) => body["data"].clone(),
        Read::Rare => {
            let ids: BTreeSet<String> = ids_of(body["data"].as_array().unwrap_or(&Vec::new()))
                .into_iter()
                .collect();
            json!({"total": body["total"], "ids": ids})
        }
        Read::Common => json!({"total": body["total"]}),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn online_replay_keeps_every_read_up_and_unchanged() -> TestResult {
    const N_POSTS: usize = 300;
    const READERS: u64 = 4;
    /// Reads each reader makes after the swap, so both stores were read.
    const READS_AFTER_SWAP_MIN: u64 = 40;
    let nats = start_nats().await?;
    let command = InProcessService::start_command(&nats.url()).await?;
    let http = http_client();
    let data = tempfile::Builder::new().prefix("replay-online").tempdir()?;
    let (_query, base) = spawn_query_process(&nats.url(), data.path()).await?;
    let mut w = Written::default();
    w.create_many(&http, &command.base_url, N_POSTS, |i| {
        let rare = if i % 10 == 0 { " rarebird" } else { "" };
        (
            format!("online {i}"),
            format!("lorem online {i}{rare}"),
            format!("author{}", i % 5),
        )
    })
    .await?;
    wait_checkpoints(&http, &base, w.last_seq).await?;
    let ids: Arc<Vec<String>> = Arc::new(w.order.clone());

    // What every read answers before the replay.
    let mut baseline: HashMap<String, Value> = HashMap::new();
    let reads = (0..N_POSTS)
        .map(Read::Post)
        .chain([Read::Rare, Read::Common]);
    for read in reads {
        let (status, body) = read_once(&http, &base, &ids, read)
            .await
            .map_err(anyhow::Error::msg)?;
        assert_eq!(status, 200, "{read:?}: {body}");
        baseline.insert(format!("{read:?}"), summarize(read, &body));
    }
    assert_eq!(baseline["Rare"]["total"], 30);
    assert_eq!(baseline["Common"]["total"], N_POSTS);

    let stop = Arc::new(AtomicBool::new(false));
    let swapped = Arc::new(AtomicBool::new(false));
    let reads_after_swap = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for r in 0..READERS {
        let (http, base, ids) = (http.clone(), base.clone(), ids.clone());
        let (stop, swapped, after) = (stop.clone(), swapped.clone(), reads_after_swap.clone());
        readers.push(tokio::spawn(async move {
            let mut seed = 0x9E37_79B9_7F4A_7C15_u64.wrapping_mul(r + 1);
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let roll = next_random(&mut seed);
                let read = match roll % 8 {
                    0 => Read::Rare,
                    1 => Read::Common,
                    _ => Read::Post(usize::try_from(roll >> 8).unwrap_or(0) % ids.len()),
                };
                let after_swap = swapped.load(Ordering::Relaxed);
                let answer = read_once(&http, &base, &ids, read).await;
                seen.push(Observation {
                    at: Instant::now(),
                    read,
                    answer,
                });
                if after_swap {
                    after.fetch_add(1, Ordering::Relaxed);
                }
            }
            seen
        }));
    }

    let replay_started = Instant::now();
    let run = run_replay(&replay_args(
        "all",
        &nats.url(),
        data.path(),
        &["--verify", "--json"],
    ))
    .await?;
    let replay_ended = Instant::now();
    swapped.store(true, Ordering::Relaxed);
    let outcomes = run.assert_verified(&PROJECTION_NAMES);
    for name in PROJECTION_NAMES {
        assert_eq!(outcomes[name]["checkpoint"], w.last_seq, "{run:?}");
    }
    wait_for("reads after the swap", Duration::from_secs(30), || {
        let n = reads_after_swap.load(Ordering::Relaxed);
        async move { (n >= READS_AFTER_SWAP_MIN * READERS).then_some(()) }
    })
    .await?;
    stop.store(true, Ordering::Relaxed);

    let mut n_during = 0;
    let mut n_total = 0;
    for reader in readers {
        for o in reader.await? {
            n_total += 1;
            if o.at > replay_started && o.at < replay_ended {
                n_during += 1;
            }
            let (status, body) = o
                .answer
                .unwrap_or_else(|e| panic!("{:?} failed during the replay: {e}", o.read));
            assert_eq!(status, 200, "{:?} during the replay: {body}", o.read);
            assert_eq!(
                summarize(o.read, &body),
                baseline[&format!("{:?}", o.read)],
                "{:?} changed its answer",
                o.read
            );
        }
    }
    assert!(
        n_during >= 10,
        "only {n_during} of {n_total} reads overlapped the replay"
    );

    let entries = wait_checkpoints(&http, &base, w.last_seq).await?;
    for name in PROJECTION_NAMES {
        let e = projection(&entries, name);
        assert_eq!(e["state"], "running", "{e}");
        assert!(e["rebuild"].is_null(), "{e}");
    }
    // The swapped-in stores keep following the stream.
    let later = e2e_tests::create_post(&http, &command.base_url, "later", "lorem", "a").await?;
    let reply = Reply::of(
        http.get(format!("{base}/posts/{}", later.post_id))
            .query(&[("min_seq", later.seq)]),
    )
    .await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    let (hits, _) = search_all(
        &http,
        &base,
        "lorem",
        &[("author_name", "a")],
        10,
        later.seq,
    )
    .await?;
    assert_eq!(ids_of(&hits), [later.post_id]);
    Ok(())
}

/// Publishes `n_posts` posts straight onto the stream, each created and
/// then updated `updates` times, pipelining the acks. Post `i` ends with
/// title `bulk {i} v{updates + 1}`. Returns the post ids and the last seq.
async fn publish_bulk(
    js: &async_nats::jetstream::Context,
    n_posts: usize,
    updates: usize,
) -> anyhow::Result<(Vec<String>, u64)> {
    /// Acks awaited together: the server keeps up, the client's buffers stay small.
    const IN_FLIGHT_MAX: usize = 1_000;
    let ids: Vec<String> = (0..n_posts)
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    let mut pending = Vec::with_capacity(IN_FLIGHT_MAX);
    let mut last = 0;
    for round in 0..=updates {
        for (i, id) in ids.iter().enumerate() {
            let event = if round == 0 {
                Event::Created {
                    title: format!("bulk {i} v1"),
                    content: format!("lorem bulk {i}"),
                    author_name: format!("author{}", i % 7),
                }
            } else {
                Event::Updated {
                    title: Some(format!("bulk {i} v{}", round + 1)),
                    content: None,
                    author_name: None,
                }
            };
            let (ty, schema, bytes) = posts::encode(&event);
            pending.push(
                js.publish_with_headers(subject_for(id), event_headers(ty, schema), bytes.into())
                    .await?,
            );
            if pending.len() >= IN_FLIGHT_MAX {
                for ack in
                    futures::future::join_all(pending.drain(..).map(IntoFuture::into_future)).await
                {
                    last = last.max(ack?.sequence);
                }
            }
        }
    }
    for ack in futures::future::join_all(pending.drain(..).map(IntoFuture::into_future)).await {
        last = last.max(ack?.sequence);
    }
    Ok((ids, last))
}

/// Asserts that a sample of bulk posts reads back in their final state.
async fn assert_bulk_served(
    http: &reqwest::Client,
    base: &str,
    ids: &[String],
    updates: usize,
) -> TestResult {
    let want_version = u64::try_from(updates + 1)?;
    for i in (0..ids.len()).step_by(97).chain([ids.len() - 1]) {
        let reply = Reply::of(http.get(format!("{base}/posts/{}", ids[i]))).await?;
        assert_eq!(reply.status, 200, "post {i}: {reply:?}");
        let d = &reply.json()["data"];
        assert_eq!(d["version"], want_version, "post {i}: {d}");
        assert_eq!(d["title"], format!("bulk {i} v{want_version}"), "{d}");
    }
    let v = Reply::of(
        http.get(format!("{base}/posts/search"))
            .query(&[("q", "lorem"), ("limit", "1")]),
    )
    .await?
    .json();
    assert_eq!(v["total"], ids.len(), "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_replay_leaves_the_service_serving_and_a_rerun_succeeds() -> TestResult {
    const N_POSTS: usize = 4_000;
    const UPDATES: usize = 4;
    // Durability is not under test here: skip the per-message fsync so the
    // 20k-event stream is written in seconds.
    let nats = start_nats_with(&testkit::NatsOptions {
        sync_always: false,
        ..Default::default()
    })
    .await?;
    let http = http_client();
    let data = tempfile::Builder::new().prefix("replay-killed").tempdir()?;
    let (_query, base) = spawn_query_process(&nats.url(), data.path()).await?;
    let js = StreamReader::connect(&nats.url()).await?.js;
    let (ids, last_seq) = publish_bulk(&js, N_POSTS, UPDATES).await?;
    assert_eq!(last_seq, u64::try_from(N_POSTS * (UPDATES + 1))?);
    wait_checkpoints(&http, &base, last_seq).await?;
    assert_bulk_served(&http, &base, &ids, UPDATES).await?;

    let args = replay_args("all", &nats.url(), data.path(), &["--verify", "--json"]);
    let mut replay = tokio::process::Command::new(testkit::bin_path("replay"))
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    // Mid-rebuild: the service shows the rebuild, or the shadow has files.
    let data_dir = data.path().to_path_buf();
    let seen = wait_for("the replay mid-rebuild", Duration::from_secs(60), || {
        let fetched = projections(&http, &base);
        let data_dir = data_dir.clone();
        async move {
            let entries = fetched.await.ok()?;
            let shown = entries.iter().find(|e| {
                e["state"] == "rebuilding" && e["rebuild"]["target_seq"].as_u64() == Some(last_seq)
            });
            if let Some(e) = shown {
                return Some(format!("/projections: {e}"));
            }
            let shadows = rebuild_entries(&data_dir);
            let busy = shadows.iter().any(|s| {
                std::fs::read_dir(data_dir.join(".rebuild").join(s))
                    .is_ok_and(|mut d| d.next().is_some())
            });
            busy.then(|| format!("shadows {shadows:?}"))
        }
    })
    .await?;
    assert!(
        replay.try_wait()?.is_none(),
        "the replay finished before it could be killed (seen {seen}); make the stream bigger"
    );
    replay.start_kill()?;
    let status = replay.wait().await?;
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status}");
    let leftovers = rebuild_entries(data.path());

    // The service never noticed: ready, same answers, and the stale
    // rebuild report expires by itself.
    let ready = Reply::of(http.get(format!("{base}/readyz"))).await?;
    assert_eq!(ready.status, 200, "{ready:?}");
    assert_bulk_served(&http, &base, &ids, UPDATES).await?;
    wait_for("state back to running", Duration::from_secs(20), || {
        let fetched = projections(&http, &base);
        async move {
            let entries = fetched.await.ok()?;
            entries
                .iter()
                .all(|e| e["state"] == "running" && e["rebuild"].is_null())
                .then_some(())
        }
    })
    .await?;

    // A second replay cleans up after the first and succeeds.
    let run = run_replay(&args).await?;
    let outcomes = run.assert_verified(&PROJECTION_NAMES);
    for name in PROJECTION_NAMES {
        assert_eq!(outcomes[name]["checkpoint"], last_seq, "{run:?}");
    }
    let now = rebuild_entries(data.path());
    assert!(
        leftovers.is_disjoint(&now) && now.is_empty(),
        "shadows of the killed replay {leftovers:?} are gone, none new left: {now:?}"
    );
    wait_ready(&http, &base).await?;
    let entries = wait_checkpoints(&http, &base, last_seq).await?;
    for name in PROJECTION_NAMES {
        let e = projection(&entries, name);
        assert_eq!(e["state"], "running", "{e}");
        assert_eq!(e["parked"], 0, "{e}");
    }
    assert_bulk_served(&http, &base, &ids, UPDATES).await?;
    Ok(())
}

/// The replay tool can die while it waits for the service's swap answer
/// (SIGKILL, or its own timeout). The service must not be left half-swapped:
/// whether the swap completes or is rolled back, the projection goes on
/// following the stream and serving reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swap_abandoned_by_its_client_leaves_the_projection_following() -> TestResult {
    const N_POSTS: usize = 2_000;
    const UPDATES: usize = 4;
    let nats = start_nats_with(&testkit::NatsOptions {
        sync_always: false,
        ..Default::default()
    })
    .await?;
    let http = http_client();
    let data = tempfile::Builder::new()
        .prefix("swap-abandoned")
        .tempdir()?;
    let (_query, base) = spawn_query_process(&nats.url(), data.path()).await?;
    let reader = StreamReader::connect(&nats.url()).await?;
    let (ids, last_seq) = publish_bulk(&reader.js, N_POSTS, UPDATES).await?;
    wait_checkpoints(&http, &base, last_seq).await?;

    // An empty shadow: the service must align it from sequence 1 to the live
    // checkpoint before installing it, which takes a while and reads the
    // stream through a consumer of its own.
    let admin = e2e_tests::admin_url(data.path())?;
    let handed =
        Reply::of(http.post(format!("{admin}/admin/projections/post-view/shadows"))).await?;
    assert_eq!(handed.status, 201, "{handed:?}");
    let id = handed.json()["shadow"]
        .as_str()
        .expect("a shadow id")
        .to_string();
    let shadow = posts_projections::rebuild::Shadow::handed_out(data.path(), "post-view", &id)?;
    let path = shadow.store_path();
    tokio::task::spawn_blocking(move || posts_projections::view::open(&path).map(drop)).await??;
    let stream = reader.stream().await?;
    let consumers = || async {
        use futures::TryStreamExt;
        stream
            .consumer_names()
            .try_collect::<BTreeSet<String>>()
            .await
            .ok()
    };
    let before = consumers().await.expect("consumer names");
    let swap = tokio::spawn(
        http.post(format!("{admin}/admin/projections/post-view/swap"))
            .json(&json!({"shadow": id, "verify": true}))
            .send(),
    );
    wait_for(
        "the service aligning the shadow",
        Duration::from_secs(20),
        || async { consumers().await.filter(|now| !now.is_subset(&before)) },
    )
    .await?;
    assert!(
        !swap.is_finished(),
        "the swap finished before its client could leave; make the stream bigger"
    );
    // The client goes away mid-swap: its connection closes.
    swap.abort();
    let _ = swap.await;

    // The projection still follows: a new event becomes readable.
    let id = uuid::Uuid::now_v7().to_string();
    let seq = publish_event(
        &reader.js,
        &id,
        &Event::Created {
            title: "after the abandoned swap".into(),
            content: "later".into(),
            author_name: "a".into(),
        },
    )
    .await?;
    // The swap itself may still be finishing: allow for it, not forever.
    let url = format!("{base}/posts/{id}");
    wait_for(
        "post-view to follow the stream again",
        Duration::from_secs(30),
        || {
            let req = http.get(&url).query(&[("min_seq", seq)]);
            async move { Reply::of(req).await.ok().filter(|r| r.status == 200) }
        },
    )
    .await?;
    let entries = wait_checkpoints(&http, &base, seq).await?;
    for name in PROJECTION_NAMES {
        assert_eq!(projection(&entries, name)["state"], "running");
    }
    assert_bulk_served(&http, &base, &ids, UPDATES).await?;
    Ok(())
}
