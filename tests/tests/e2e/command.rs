//! The `posts-command` HTTP contract of docs/api.md, over real sockets against a
//! real nats-server, with the stream inspected directly through async-nats.

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::stream::{RetentionPolicy, StorageType};
use e2e_tests::{
    CommandEnv, Reply, StreamReader, assert_contiguous, assert_increasing, create_body,
    decode_event, event_content, http_client, http_client_with_timeout, msg_header, restart_nats,
    spawn_command_process, start_nats, testkit, wait_for,
};
use futures::future::join_all;
use posts::Event;
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type TestResult = anyhow::Result<()>;

/// A start-up check that fails must say so well inside this; the system this
/// grew from hung forever on a port that accepted TCP but never spoke NATS.
const STARTUP_FAILURE_DEADLINE: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_update_delete_round_trip_writes_well_formed_events() -> TestResult {
    let env = CommandEnv::start().await?;
    let test_started = OffsetDateTime::now_utc();

    let created = Reply::of(
        env.http
            .post(env.url("/posts"))
            .header("X-Correlation-Id", "corr-e2e-round-trip")
            .json(&create_body("Hello", "World", "ann")),
    )
    .await?;
    let c = created.ack(201);
    let post_id = c.post_id.clone();
    let uuid = uuid::Uuid::parse_str(&post_id)?;
    assert_eq!(uuid.get_version_num(), 7, "post ids are UUIDv7");
    assert_eq!(uuid.hyphenated().to_string(), post_id, "canonical form");
    assert_eq!(c.version, 1);
    assert!(c.seq >= 1);
    assert_eq!(
        created.header("location"),
        Some(format!("/posts/{post_id}").as_str())
    );
    assert_eq!(created.header("etag"), Some("\"1\""));
    assert_eq!(
        created.header("x-correlation-id"),
        Some("corr-e2e-round-trip")
    );

    let patched = env
        .patch(&post_id, &json!({"title": "Hello again"}), None)
        .await?;
    let p = patched.ack(200);
    assert_eq!((p.post_id.as_str(), p.version), (post_id.as_str(), 2));
    assert!(p.seq > c.seq);
    assert_eq!(patched.header("etag"), Some("\"2\""));

    let pinned = env
        .patch(&post_id, &json!({"content": "World, v3"}), Some("\"2\""))
        .await?;
    let p3 = pinned.ack(200);
    assert_eq!(p3.version, 3);
    assert_eq!(pinned.header("etag"), Some("\"3\""));

    let deleted = env.delete(&post_id).await?;
    let d = deleted.ack(200);
    assert_eq!((d.post_id.as_str(), d.version), (post_id.as_str(), 4));
    assert!(d.seq > p3.seq);

    env.patch(&post_id, &json!({"title": "zombie"}), None)
        .await?
        .assert_problem(409, "deleted");
    env.delete(&post_id).await?.assert_problem(409, "deleted");

    // The stream, read with our own client.
    let info = env.reader.info().await?;
    let cfg = &info.config;
    assert_eq!(cfg.name, "POSTS");
    assert_eq!(cfg.subjects, vec!["posts.>".to_string()]);
    assert_eq!(cfg.storage, StorageType::File);
    assert_eq!(cfg.retention, RetentionPolicy::Limits);
    assert_eq!(cfg.max_messages, -1, "no message limit");
    // A byte budget that refuses new events when full, never one that drops old ones.
    assert_eq!(
        cfg.max_bytes,
        10 * 1024 * 1024 * 1024,
        "the default byte budget"
    );
    assert_eq!(
        cfg.discard,
        async_nats::jetstream::stream::DiscardPolicy::New
    );
    assert_eq!(cfg.max_age, Duration::ZERO, "no age limit");
    assert_eq!(cfg.max_messages_per_subject, -1, "no per-subject limit");
    assert!(cfg.deny_delete, "deny_delete");
    assert!(cfg.deny_purge, "deny_purge");
    assert!(!cfg.allow_rollup, "no rollups");
    assert!(cfg.allow_direct, "allow_direct");
    assert_eq!(cfg.duplicate_window, Duration::from_secs(120));
    assert_eq!(cfg.num_replicas, 1);

    let all = env.reader.all_messages().await?;
    assert_eq!(all.len(), 4, "only this post's four events are stored");
    let msgs = env.reader.post_messages(&post_id).await?;
    assert_eq!(msgs.len(), 4);
    assert_increasing(&msgs);
    let seqs: Vec<u64> = msgs.iter().map(|m| m.sequence).collect();
    assert_eq!(
        seqs,
        [c.seq, p.seq, p3.seq, d.seq],
        "acks carry stream seqs"
    );

    let types: Vec<&str> = msgs
        .iter()
        .map(|m| msg_header(m, "Event-Type").unwrap_or(""))
        .collect();
    assert_eq!(
        types,
        ["PostCreated", "PostUpdated", "PostUpdated", "PostDeleted"]
    );
    let mut msg_ids = HashSet::new();
    let mut causation_ids = HashSet::new();
    let mut last_at = None;
    for m in &msgs {
        let id = msg_header(m, "Nats-Msg-Id").expect("Nats-Msg-Id");
        assert!(uuid::Uuid::parse_str(id).is_ok(), "Nats-Msg-Id {id:?}");
        assert!(msg_ids.insert(id.to_string()), "event ids are unique");
        let schema = msg_header(m, "Event-Schema").expect("Event-Schema");
        assert!(schema.parse::<u32>().is_ok_and(|s| s >= 1), "{schema:?}");
        let at_text = msg_header(m, "Occurred-At").expect("Occurred-At");
        let at = OffsetDateTime::parse(at_text, &Rfc3339)
            .unwrap_or_else(|e| panic!("Occurred-At {at_text:?} is not RFC 3339: {e}"));
        assert!(at.offset().is_utc(), "Occurred-At {at_text:?} is UTC");
        assert!(
            at >= test_started - Duration::from_secs(5)
                && at <= OffsetDateTime::now_utc() + Duration::from_secs(5),
            "Occurred-At {at_text:?} is the command's time"
        );
        assert!(last_at.is_none_or(|prev| prev <= at), "times move forward");
        last_at = Some(at);
        let corr = msg_header(m, "Correlation-Id").expect("Correlation-Id");
        assert!(!corr.is_empty());
        let cause = msg_header(m, "Causation-Id").expect("Causation-Id");
        assert!(!cause.is_empty());
        assert!(
            causation_ids.insert(cause.to_string()),
            "one cause per command"
        );
    }
    assert_eq!(
        msg_header(&msgs[0], "Correlation-Id"),
        Some("corr-e2e-round-trip"),
        "the client's correlation id rides on the event"
    );

    assert_eq!(
        decode_event(&msgs[0]),
        Event::Created {
            title: "Hello".into(),
            content: "World".into(),
            author_name: "ann".into()
        }
    );
    assert_eq!(
        decode_event(&msgs[1]),
        Event::Updated {
            title: Some("Hello again".into()),
            content: None,
            author_name: None
        }
    );
    assert_eq!(event_content(&decode_event(&msgs[2])), Some("World, v3"));
    assert_eq!(decode_event(&msgs[3]), Event::Deleted);

    // History is immutable: the server itself refuses deletes and purges.
    let stream = env.reader.stream().await?;
    assert!(
        stream.delete_message(c.seq).await.is_err(),
        "delete refused"
    );
    assert!(stream.purge().await.is_err(), "purge refused");
    assert_eq!(env.reader.all_messages().await?.len(), 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn field_bounds_are_inclusive() -> TestResult {
    let env = CommandEnv::start().await?;
    // Characters, not bytes, for title and author; bytes for content.
    let title = "é".repeat(200);
    let author = "ß".repeat(100);
    let content = "x".repeat(100_000);
    let ack = env.create_post(&title, &content, &author).await?.ack(201);
    let msgs = env.reader.post_messages(&ack.post_id).await?;
    assert_eq!(msgs.len(), 1);
    assert_eq!(
        decode_event(&msgs[0]),
        Event::Created {
            title,
            content,
            author_name: author
        }
    );
    // Surrounding whitespace of title and author is trimmed, content is kept.
    let ack = env
        .create_post("  spaced  ", "  body  ", "\tann ")
        .await?
        .ack(201);
    let msgs = env.reader.post_messages(&ack.post_id).await?;
    assert_eq!(
        decode_event(&msgs[0]),
        Event::Created {
            title: "spaced".into(),
            content: "  body  ".into(),
            author_name: "ann".into()
        }
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pinned_updates_let_exactly_one_win() -> TestResult {
    let env = CommandEnv::start().await?;
    let post = env.new_post("pinned race").await?;
    let bodies: Vec<_> = (0..16)
        .map(|i| json!({"content": format!("pinned-{i}")}))
        .collect();
    let replies = join_all(
        bodies
            .iter()
            .map(|b| env.patch(&post.post_id, b, Some("\"1\""))),
    )
    .await;
    let mut winners = Vec::new();
    let mut n_412 = 0;
    for (i, reply) in replies.into_iter().enumerate() {
        let reply = reply?;
        match reply.status {
            200 => winners.push((i, reply.ack(200), reply.header("etag").map(str::to_string))),
            412 => {
                let doc = reply.assert_problem(412, "version 2");
                assert_eq!(
                    doc["current_version"], 2,
                    "412 names the current version: {doc}"
                );
                n_412 += 1;
            }
            other => panic!("unexpected {other}: {reply:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one pinned update wins");
    assert_eq!(n_412, 15);
    let (i, ack, etag) = &winners[0];
    assert_eq!(ack.version, 2);
    assert_eq!(etag.as_deref(), Some("\"2\""));

    let msgs = env.reader.post_messages(&post.post_id).await?;
    assert_eq!(msgs.len(), 2, "one create and one update");
    assert_eq!(msgs[1].sequence, ack.seq);
    let want = format!("pinned-{i}");
    assert_eq!(
        event_content(&decode_event(&msgs[1])),
        Some(want.as_str()),
        "the stored update is the winner's"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_unpinned_updates_all_apply_in_order() -> TestResult {
    let env = CommandEnv::start().await?;
    let post = env.new_post("unpinned race").await?;
    let contents: Vec<String> = (0..16).map(|i| format!("unpinned-{i}")).collect();
    let bodies: Vec<_> = contents.iter().map(|c| json!({"content": c})).collect();
    let replies = join_all(bodies.iter().map(|b| env.patch(&post.post_id, b, None))).await;
    let mut acks = Vec::new();
    for reply in replies {
        let reply = reply?;
        let ack = reply.ack(200);
        assert_eq!(
            reply.header("etag"),
            Some(format!("\"{}\"", ack.version).as_str())
        );
        acks.push(ack);
    }
    let versions: Vec<u64> = acks.iter().map(|a| a.version).collect();
    assert_contiguous(&versions, 2);

    let msgs = env.reader.post_messages(&post.post_id).await?;
    assert_eq!(msgs.len(), 17);
    assert_increasing(&msgs);
    for (content, ack) in contents.iter().zip(&acks) {
        let stored = &msgs[usize::try_from(ack.version - 1)?];
        assert_eq!(stored.sequence, ack.seq, "version {} seq", ack.version);
        assert_eq!(
            event_content(&decode_event(stored)),
            Some(content.as_str()),
            "version {} holds the update that was acked with it",
            ack.version
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_key_creates_one_post() -> TestResult {
    let env = CommandEnv::start().await?;
    let body = create_body("idempotent", "once only", "ann");
    let create_with_key = |key: &str, body: &serde_json::Value| {
        Reply::of(
            env.http
                .post(env.url("/posts"))
                .header("Idempotency-Key", key)
                .json(body),
        )
    };

    // Sequential repeats.
    let before = env.reader.last_seq().await?;
    let first = create_with_key("key-sequential", &body).await?;
    let a = first.ack(201);
    for _ in 0..3 {
        let again = create_with_key("key-sequential", &body).await?;
        assert_eq!(again.ack(201), a, "a repeat answers as the first time");
        assert_eq!(again.header("location"), first.header("location"));
        assert_eq!(again.header("etag"), Some("\"1\""));
    }
    assert_eq!(env.reader.post_messages(&a.post_id).await?.len(), 1);
    assert_eq!(env.reader.last_seq().await?, before + 1, "one event in all");

    // The same key with another body is refused and appends nothing.
    create_with_key(
        "key-sequential",
        &create_body("idempotent", "another body", "ann"),
    )
    .await?
    .assert_problem(422, "Idempotency-Key");
    assert_eq!(env.reader.last_seq().await?, before + 1);

    // Another key with the same body is another post.
    let other = create_with_key("key-other", &body).await?.ack(201);
    assert_ne!(other.post_id, a.post_id);

    // Eight concurrent requests with one key.
    let before = env.reader.last_seq().await?;
    let replies = join_all((0..8).map(|_| create_with_key("key-concurrent", &body))).await;
    let mut ids = HashSet::new();
    let mut seqs = HashSet::new();
    for reply in replies {
        let ack = reply?.ack(201);
        assert_eq!(ack.version, 1);
        ids.insert(ack.post_id);
        seqs.insert(ack.seq);
    }
    assert_eq!(ids.len(), 1, "one post id for every request: {ids:?}");
    assert_eq!(seqs.len(), 1, "one stream sequence for every request");
    let id = ids.into_iter().next().unwrap_or_default();
    let msgs = env.reader.post_messages(&id).await?;
    assert_eq!(msgs.len(), 1, "exactly one PostCreated");
    assert_eq!(seqs.into_iter().next(), Some(msgs[0].sequence));
    assert_eq!(env.reader.last_seq().await?, before + 1);
    Ok(())
}

/// Two service processes race unpinned updates on the same aggregates: the
/// store's optimistic concurrency (not an in-process lock) must keep every
/// acknowledged update, in a contiguous version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_lose_no_update() -> TestResult {
    const POSTS: usize = 4;
    const UPDATES_PER_POST: usize = 20;
    let nats = start_nats().await?;
    let (_a, base_a) = spawn_command_process(&nats.url()).await?;
    let (_b, base_b) = spawn_command_process(&nats.url()).await?;
    let http = http_client();
    let reader = StreamReader::connect(&nats.url()).await?;

    let mut post_ids = Vec::new();
    for i in 0..POSTS {
        let base = if i % 2 == 0 { &base_a } else { &base_b };
        let reply = Reply::of(http.post(format!("{base}/posts")).json(&create_body(
            &format!("race {i}"),
            "v1",
            "racer",
        )))
        .await?;
        post_ids.push(reply.ack(201).post_id);
    }

    let mut tasks = Vec::new();
    for (p, post_id) in post_ids.iter().enumerate() {
        for u in 0..UPDATES_PER_POST {
            let base = if u % 2 == 0 { &base_a } else { &base_b };
            let url = format!("{base}/posts/{post_id}");
            let content = format!("post{p}-update{u}");
            let req = http.patch(url).json(&json!({ "content": content }));
            let instance = u % 2;
            tasks.push(tokio::spawn(async move {
                (p, instance, content, Reply::of(req).await)
            }));
        }
    }
    // Per post: (content, ack) of every 200.
    let mut applied: HashMap<usize, Vec<(String, e2e_tests::Ack)>> = HashMap::new();
    let mut n_ok_by_instance = [0_u32; 2];
    let mut n_conflicts = 0_u32;
    for task in tasks {
        let (p, instance, content, reply) = task.await?;
        let reply = reply?;
        match reply.status {
            200 => {
                let ack = reply.ack(200);
                assert_eq!(ack.post_id, post_ids[p]);
                applied.entry(p).or_default().push((content, ack));
                n_ok_by_instance[instance] += 1;
            }
            // Allowed by the contract when retries run out; never silently lost.
            409 => {
                reply.assert_problem(409, "");
                n_conflicts += 1;
            }
            other => panic!("unexpected {other}: {reply:?}"),
        }
    }
    assert!(
        n_ok_by_instance.iter().all(|n| *n > 0),
        "both instances applied updates: {n_ok_by_instance:?}, {n_conflicts} conflicts"
    );

    for (p, post_id) in post_ids.iter().enumerate() {
        let oks = applied.remove(&p).unwrap_or_default();
        assert!(!oks.is_empty(), "post {p} got no update through");
        let msgs = reader.post_messages(post_id).await?;
        assert_eq!(
            msgs.len(),
            1 + oks.len(),
            "post {p}: events = 1 create + one per 200"
        );
        assert_increasing(&msgs);
        let versions: Vec<u64> = oks.iter().map(|(_, a)| a.version).collect();
        assert_contiguous(&versions, 2);
        for (content, ack) in &oks {
            let stored = &msgs[usize::try_from(ack.version - 1)?];
            assert_eq!(stored.sequence, ack.seq, "post {p} v{}", ack.version);
            assert_eq!(
                event_content(&decode_event(stored)),
                Some(content.as_str()),
                "post {p} v{} holds the update acked with it",
                ack.version
            );
        }
        let stored: HashSet<String> = msgs[1..]
            .iter()
            .filter_map(|m| event_content(&decode_event(m)).map(str::to_string))
            .collect();
        let acked: HashSet<String> = oks.into_iter().map(|(c, _)| c).collect();
        assert_eq!(stored, acked, "post {p}: stored updates are the acked ones");
    }

    // One Idempotency-Key sent to both instances at once creates one post.
    let before = reader.last_seq().await?;
    let body = create_body("keyed across instances", "once", "racer");
    let replies = join_all((0..8).map(|i| {
        let base = if i % 2 == 0 { &base_a } else { &base_b };
        Reply::of(
            http.post(format!("{base}/posts"))
                .header("Idempotency-Key", "key-two-instances")
                .json(&body),
        )
    }))
    .await;
    let mut ids = HashSet::new();
    for reply in replies {
        ids.insert(reply?.ack(201).post_id);
    }
    assert_eq!(ids.len(), 1, "one post for one key: {ids:?}");
    let id = ids.into_iter().next().unwrap_or_default();
    assert_eq!(reader.post_messages(&id).await?.len(), 1);
    assert_eq!(reader.last_seq().await?, before + 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_a_precise_problem_and_appends_nothing() -> TestResult {
    let env = CommandEnv::start().await?;
    let live = env.new_post("target of bad input").await?;
    let id = live.post_id.as_str();
    let before = env.reader.last_seq().await?;
    let posts_url = env.url("/posts");
    let post_url = env.url(&format!("/posts/{id}"));

    let raw_post = |body: String, content_type: Option<&str>| {
        let mut req = env.http.post(&posts_url).body(body);
        if let Some(ct) = content_type {
            req = req.header("Content-Type", ct);
        }
        Reply::of(req)
    };
    let raw_patch = |body: String| {
        Reply::of(
            env.http
                .patch(&post_url)
                .header("Content-Type", "application/json")
                .body(body),
        )
    };
    let json_ct = Some("application/json");

    // Body syntax and shape: 400.
    raw_post(r#"{"title": "t", "content": "#.into(), json_ct)
        .await?
        .assert_problem(400, "malformed JSON");
    raw_post("not json at all".into(), json_ct)
        .await?
        .assert_problem(400, "malformed JSON");
    raw_post(
        r#"{"title": 5, "content": "c", "author_name": "a"}"#.into(),
        json_ct,
    )
    .await?
    .assert_problem(400, "invalid type");
    raw_post(r#"{"title": "t", "content": "c"}"#.into(), json_ct)
        .await?
        .assert_problem(400, "missing field `author_name`");
    raw_post(
        r#"{"title": "t", "content": "c", "author_name": "a", "likes": 3}"#.into(),
        json_ct,
    )
    .await?
    .assert_problem(400, "unknown field `likes`");
    // serde would read a struct from an array of its fields in order.
    raw_post(r#" ["t", "c", "a"]"#.into(), json_ct)
        .await?
        .assert_problem(400, "array");
    raw_patch(r#"["t", null, null]"#.into())
        .await?
        .assert_problem(400, "array");

    // Field bounds: 422 naming the field.
    let cases = [
        (create_body("", "c", "a"), "title"),
        (create_body(" \t  ", "c", "a"), "title"),
        (create_body(&"t".repeat(201), "c", "a"), "title"),
        (create_body("t", "c", &"a".repeat(101)), "author_name"),
        (create_body("t", "c", "   "), "author_name"),
        (create_body("t", &"c".repeat(100_001), "a"), "content"),
        (create_body("t", " \n ", "a"), "content"),
    ];
    for (body, field) in &cases {
        let doc = env.create(body).await?.assert_problem(422, field);
        assert_eq!(doc["field"], *field, "422 names the field: {doc}");
    }

    // Size and media type. The unread body makes the server drop the
    // connection: it must say so, or the client's next pooled request fails.
    let huge = serde_json::to_string(&create_body("t", &"c".repeat(600 * 1024), "a"))?;
    let too_large = raw_post(huge.clone(), json_ct).await?;
    too_large.assert_problem(413, "limit");
    assert_eq!(too_large.header("connection"), Some("close"));
    let too_large = raw_patch(serde_json::to_string(
        &json!({"content": "c".repeat(600 * 1024)}),
    )?)
    .await?;
    too_large.assert_problem(413, "limit");
    assert_eq!(too_large.header("connection"), Some("close"));
    // Chunked, so no Content-Length to refuse it early: the limit is met
    // while reading. A chunk size that is not hex cannot be read at all.
    let chunked = |chunks: String| {
        let addr = posts_url
            .trim_start_matches("http://")
            .trim_end_matches("/posts")
            .to_string();
        async move {
            let (mut from, mut to) = tokio::net::TcpStream::connect(addr).await?.into_split();
            let head = "POST /posts HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
                        Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
            // Written while the answer is read: the server may answer and
            // close before it has read it all (its unread bytes then reset
            // the connection, after the answer).
            let writer = tokio::spawn(async move {
                let _ = to.write_all(format!("{head}{chunks}").as_bytes()).await;
            });
            let mut answer = Vec::new();
            let _ = from.read_to_end(&mut answer).await;
            writer.abort();
            anyhow::Ok(String::from_utf8_lossy(&answer).into_owned())
        }
    };
    let piece = "c".repeat(64 * 1024);
    let over: String = (0..10)
        .map(|_| format!("{:x}\r\n{piece}\r\n", piece.len()))
        .chain(["0\r\n\r\n".to_string()])
        .collect();
    let answer = chunked(over).await?;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    let answer = chunked("zz\r\n{}\r\n0\r\n\r\n".to_string()).await?;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("could not be read"), "{answer}");
    let valid = serde_json::to_string(&create_body("t", "c", "a"))?;
    let refused = raw_post(valid.clone(), Some("text/plain")).await?;
    refused.assert_problem(415, "application/json");
    // Hardening finding 10: the unread body ends the connection, and the
    // answer says so, so that no client reuses it.
    assert_eq!(refused.header("connection"), Some("close"), "{refused:?}");
    raw_post(valid.clone(), None)
        .await?
        .assert_problem(415, "application/json");
    raw_post(valid.clone(), Some("application/x-www-form-urlencoded"))
        .await?
        .assert_problem(415, "application/json");
    Reply::of(
        env.http
            .post(&posts_url)
            .header("Content-Type", "application/json")
            .header("Content-Encoding", "gzip")
            .body(valid.clone()),
    )
    .await?
    .assert_problem(415, "Content-Encoding");

    // Headers.
    for key in ["k".repeat(256), String::new()] {
        Reply::of(
            env.http
                .post(&posts_url)
                .header("Idempotency-Key", key)
                .json(&create_body("t", "c", "a")),
        )
        .await?
        .assert_problem(400, "Idempotency-Key");
    }
    Reply::of(
        env.http
            .post(&posts_url)
            .header("X-Correlation-Id", "c".repeat(129))
            .json(&create_body("t", "c", "a")),
    )
    .await?
    .assert_problem(400, "X-Correlation-Id");

    // PATCH bodies on a live post.
    raw_patch("{}".into())
        .await?
        .assert_problem(400, "at least one");
    raw_patch(r#"{"title": null}"#.into())
        .await?
        .assert_problem(400, "at least one");
    raw_patch(r#"{"titel": "typo"}"#.into())
        .await?
        .assert_problem(400, "unknown field `titel`");
    raw_patch(r#"{"content": ["x"]}"#.into())
        .await?
        .assert_problem(400, "invalid type");
    raw_patch(r#"{"content": "#.into())
        .await?
        .assert_problem(400, "malformed JSON");
    for (body, field) in [
        (json!({"title": ""}), "title"),
        (json!({"title": "   "}), "title"),
        (json!({"title": "t".repeat(201)}), "title"),
        (json!({"author_name": "a".repeat(101)}), "author_name"),
        (json!({"content": "c".repeat(100_001)}), "content"),
    ] {
        env.patch(id, &body, None).await?.assert_problem(422, field);
    }
    Reply::of(
        env.http
            .patch(&post_url)
            .header("Content-Type", "text/plain")
            .body(r#"{"title": "x"}"#),
    )
    .await?
    .assert_problem(415, "application/json");
    for garbage in ["banana", "1", "\"\"", "\"0\"", "\"-1\"", "W/\"1\"", "\"1"] {
        env.patch(id, &json!({"title": "x"}), Some(garbage))
            .await?
            .assert_problem(400, "If-Match");
    }

    // Unknown and malformed ids.
    let unknown = uuid::Uuid::now_v7().to_string();
    env.patch(&unknown, &json!({"title": "x"}), None)
        .await?
        .assert_problem(404, &unknown);
    env.delete(&unknown).await?.assert_problem(404, &unknown);
    for bad in ["a.b.%3E", "*", "..%2F..%2Fetc", "not-a-uuid", "posts.%3E"] {
        env.patch(bad, &json!({"title": "x"}), None)
            .await?
            .assert_problem(400, "not a UUID");
        env.delete(bad).await?.assert_problem(400, "not a UUID");
    }
    // An id that is not UTF-8 once decoded.
    env.patch("%FF", &json!({"title": "x"}), None)
        .await?
        .assert_problem(400, "UTF-8");
    env.delete("%FF").await?.assert_problem(400, "UTF-8");

    // Routes.
    env.get("/no-such-route")
        .await?
        .assert_problem(404, "no such route");
    env.get(&format!("/posts/{id}/events"))
        .await?
        .assert_problem(404, "no such route");
    Reply::of(env.http.put(&post_url).json(&json!({"title": "x"})))
        .await?
        .assert_problem(405, "method");

    assert_eq!(
        env.reader.last_seq().await?,
        before,
        "bad input must never append"
    );
    assert_eq!(env.get("/livez").await?.status, 200);
    assert_eq!(env.get("/readyz").await?.status, 200);
    // The post did not move: a pin on version 1 still holds.
    let ack = env
        .patch(id, &json!({"title": "still fine"}), Some("\"1\""))
        .await?
        .ack(200);
    assert_eq!(ack.version, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_outage_is_503_then_recovers_by_itself() -> TestResult {
    let mut env = CommandEnv::start().await?;
    let survivor = env.new_post("before the outage").await?;
    let events_before = env.reader.last_seq().await?;

    tokio::task::block_in_place(|| env.nats.kill());

    // Never hang: a short client timeout turns a hang into a failure.
    let quick = http_client_with_timeout(Duration::from_secs(8));
    let reply = Reply::of(quick.post(env.url("/posts")).json(&create_body(
        "during",
        "the outage",
        "ann",
    )))
    .await?;
    reply.assert_problem(503, "unavailable");
    let retry_after = reply.header("retry-after").expect("Retry-After on 503");
    assert!(retry_after.parse::<u64>().is_ok_and(|s| s >= 1));
    Reply::of(
        quick
            .patch(env.url(&format!("/posts/{}", survivor.post_id)))
            .json(&json!({"title": "during the outage"})),
    )
    .await?
    .assert_problem(503, "unavailable");
    let ready = Reply::of(quick.get(env.url("/readyz"))).await?;
    ready.assert_problem(503, "");
    assert!(ready.header("retry-after").is_some());
    assert_eq!(Reply::of(quick.get(env.url("/livez"))).await?.status, 200);

    restart_nats(&mut env.nats).await?;

    wait_for(
        "readyz 200 after NATS came back",
        e2e_tests::CONDITION_DEADLINE,
        || {
            let req = quick.get(env.url("/readyz"));
            async move { Reply::of(req).await.ok().filter(|r| r.status == 200) }
        },
    )
    .await?;
    // Ready means ready: the next commands succeed without a retry.
    let after = env
        .create_post("after", "the outage", "ann")
        .await?
        .ack(201);
    let patched = env
        .patch(
            &survivor.post_id,
            &json!({"title": "after the outage"}),
            None,
        )
        .await?
        .ack(200);
    assert_eq!(patched.version, 2, "the refused update was not applied");

    // The 503s appended nothing, not even later from a client-side buffer.
    let all = env.reader.all_messages().await?;
    let seqs: Vec<u64> = all.iter().map(|m| m.sequence).collect();
    assert_eq!(seqs, [events_before, after.seq, patched.seq]);
    Ok(())
}

fn assert_failed_naming(
    process: &mut testkit::ServiceProcess,
    needles: &[&str],
) -> anyhow::Result<String> {
    let status = process.wait_exit(STARTUP_FAILURE_DEADLINE)?;
    let log = process.log();
    assert!(!status.success(), "exited {status}; log:\n{log}");
    for needle in needles {
        assert!(
            log.to_lowercase().contains(&needle.to_lowercase()),
            "log should mention {needle:?}:\n{log}"
        );
    }
    Ok(log)
}

fn spawn_pointed_at(url: &str) -> anyhow::Result<testkit::ServiceProcess> {
    let listen_port = testkit::free_port();
    testkit::ServiceProcess::spawn(
        "posts-command",
        &e2e_tests::command_args(url, listen_port),
        &[],
        0,
    )
}

#[test]
fn startup_fails_fast_when_nothing_listens() -> TestResult {
    let url = format!("nats://127.0.0.1:{}", testkit::free_port());
    let mut process = spawn_pointed_at(&url)?;
    assert_failed_naming(&mut process, &[&url])?;
    Ok(())
}

#[test]
fn startup_fails_fast_on_a_silent_tcp_port() -> TestResult {
    // Accepts TCP (the kernel completes the handshake) and never says a word.
    let silent = TcpListener::bind("127.0.0.1:0")?;
    let url = format!("nats://127.0.0.1:{}", silent.local_addr()?.port());
    let mut process = spawn_pointed_at(&url)?;
    assert_failed_naming(&mut process, &[&url])?;
    drop(silent);
    Ok(())
}

/// A plain nats-server without JetStream, killed on drop.
struct PlainNats(Child);

impl Drop for PlainNats {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn startup_fails_without_jetstream() -> TestResult {
    let mut started = None;
    for attempt in 0..3 {
        let port = testkit::free_port();
        // Our server's own log, not "something answers on the port", says it
        // is up: a parallel test may have drawn the same free port.
        let log_path = testkit::logs_dir().join(format!(
            "plain-nats-{}-{port}-{attempt}.log",
            std::process::id()
        ));
        let log = std::fs::File::create(&log_path)?;
        let mut child =
            Command::new(std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into()))
                .args(["-p", &port.to_string(), "-a", "127.0.0.1"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?;
        let up = testkit::wait_until("plain nats-server log", Duration::from_secs(10), || {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            text.contains("Server is ready")
                || text.contains("[FTL]")
                || matches!(child.try_wait(), Ok(Some(_)))
        });
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if up.is_ok() && text.contains("Server is ready") && matches!(child.try_wait(), Ok(None)) {
            started = Some((PlainNats(child), port));
            break;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    let (_server, port) = started.ok_or_else(|| anyhow::anyhow!("plain nats-server"))?;
    let url = format!("nats://127.0.0.1:{port}");
    let mut process = spawn_pointed_at(&url)?;
    assert_failed_naming(&mut process, &[&url, "jetstream is not enabled"])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_shuts_down_gracefully() -> TestResult {
    let nats = start_nats().await?;
    let (mut process, base) = spawn_command_process(&nats.url()).await?;
    let http = http_client();
    let before = Reply::of(
        http.post(format!("{base}/posts"))
            .json(&create_body("before", "SIGTERM", "ann")),
    )
    .await?;
    assert_eq!(before.ack(201).version, 1);
    let status = tokio::task::block_in_place(|| process.terminate(Duration::from_secs(10)))?;
    assert!(
        status.success(),
        "exit {status} after SIGTERM; log:\n{}",
        process.log()
    );
    assert!(
        Reply::of(http.get(format!("{base}/livez"))).await.is_err(),
        "nothing listens after exit"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_process_service_stops_on_shutdown_signal() -> TestResult {
    let env = CommandEnv::start().await?;
    env.new_post("before stop").await?;
    let CommandEnv {
        nats: _nats,
        service,
        http,
        ..
    } = env;
    let base = service.base_url.clone();
    service.stop().await?;
    assert!(Reply::of(http.get(format!("{base}/livez"))).await.is_err());
    Ok(())
}

#[test]
fn help_names_each_setting_with_its_env_var_and_default() -> TestResult {
    let expected: [(&str, &[&str]); 2] = [
        (
            "posts-command",
            &[
                "--nats-url",
                "NATS_URL",
                "nats://127.0.0.1:4222",
                "--listen",
                "COMMAND_LISTEN",
                "127.0.0.1:3000",
            ],
        ),
        (
            "posts-query",
            &[
                "--nats-url",
                "NATS_URL",
                "nats://127.0.0.1:4222",
                "--listen",
                "QUERY_LISTEN",
                "127.0.0.1:4000",
                "--data-dir",
                "QUERY_DATA_DIR",
                "./data/query",
            ],
        ),
    ];
    for (bin, needles) in expected {
        let out = Command::new(testkit::bin_path(bin))
            .arg("--help")
            .env_clear()
            .output()?;
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{bin} --help: {}", out.status);
        for needle in needles {
            assert!(
                help.contains(needle),
                "{bin} --help lacks {needle}:\n{help}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn services_take_their_settings_from_the_environment() -> TestResult {
    let nats = start_nats().await?;
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("from-env");
    let command_port = testkit::free_port();
    let query_port = testkit::free_port();
    let command_env = vec![
        ("NATS_URL".to_string(), nats.url()),
        (
            "COMMAND_LISTEN".to_string(),
            format!("127.0.0.1:{command_port}"),
        ),
    ];
    let query_env = vec![
        ("NATS_URL".to_string(), nats.url()),
        (
            "QUERY_LISTEN".to_string(),
            format!("127.0.0.1:{query_port}"),
        ),
        ("QUERY_DATA_DIR".to_string(), data_dir.display().to_string()),
    ];
    // No flags at all: everything comes from the environment.
    let command = tokio::task::spawn_blocking(move || {
        testkit::ServiceProcess::spawn("posts-command", &[], &command_env, command_port)
    })
    .await??;
    let query = tokio::task::spawn_blocking(move || {
        testkit::ServiceProcess::spawn("posts-query", &[], &query_env, query_port)
    })
    .await??;
    // Listening where the environment said (and not some other test's
    // service that took the port first).
    for (process, port) in [(&command, command_port), (&query, query_port)] {
        e2e_tests::wait_listening(process, port).await?;
    }

    let http = http_client();
    let created = Reply::of(
        http.post(format!("http://127.0.0.1:{command_port}/posts"))
            .json(&create_body(
                "From env",
                "settings from the environment",
                "ann",
            )),
    )
    .await?;
    assert_eq!(created.status, 201, "{}", created.body);
    let ack = created.json();
    let (id, seq) = (ack["post_id"].as_str().unwrap_or_default(), &ack["seq"]);
    let url = format!("http://127.0.0.1:{query_port}/posts/{id}?min_seq={seq}");
    let read = wait_for(
        "the post on the query side",
        Duration::from_secs(30),
        || {
            let req = http.get(&url);
            async move { Reply::of(req).await.ok().filter(|r| r.status == 200) }
        },
    )
    .await?;
    assert_eq!(read.json()["data"]["title"], "From env", "{}", read.body);
    assert!(
        data_dir.join("post-view.redb").is_file(),
        "post-view in QUERY_DATA_DIR"
    );
    assert!(
        data_dir.join("post-search").is_dir(),
        "post-search in QUERY_DATA_DIR"
    );
    Ok(())
}
