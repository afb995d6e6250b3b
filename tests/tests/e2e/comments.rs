//! The comments context over real HTTP and a real nats-server: the
//! comments-command contract with its bad inputs, the post checked against
//! stream `POSTS`, and the `post-deleted-cascade` process manager.

use std::time::Duration;

use e2e_tests::{
    InProcessService, Reply, StreamReader, http_client, msg_header, start_nats, wait_for,
};
use serde_json::{Value, json};

/// How long the cascade may take to react in these small tests.
const CASCADE_DEADLINE: Duration = Duration::from_secs(30);

struct Env {
    _nats: testkit::NatsServer,
    posts: InProcessService,
    comments: InProcessService,
    http: reqwest::Client,
    stream: StreamReader,
    nats_url: String,
}

impl Env {
    async fn start() -> anyhow::Result<Self> {
        let nats = start_nats().await?;
        let posts = InProcessService::start_command(&nats.url()).await?;
        let comments = InProcessService::start_comments(&nats.url()).await?;
        let stream = StreamReader::connect_to(&nats.url(), "COMMENTS").await?;
        Ok(Self {
            nats_url: nats.url(),
            _nats: nats,
            posts,
            comments,
            http: http_client(),
            stream,
        })
    }

    async fn new_post(&self) -> anyhow::Result<String> {
        let reply = Reply::of(
            self.http
                .post(format!("{}/posts", self.posts.base_url))
                .json(&json!({"title": "t", "content": "c", "author_name": "ann"})),
        )
        .await?;
        Ok(reply.ack(201).post_id)
    }

    async fn delete_post(&self, post_id: &str) -> anyhow::Result<Reply> {
        Reply::of(
            self.http
                .delete(format!("{}/posts/{post_id}", self.posts.base_url)),
        )
        .await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.comments.base_url)
    }

    async fn add(&self, post_id: &str, body: &Value) -> anyhow::Result<Reply> {
        Reply::of(
            self.http
                .post(self.url(&format!("/posts/{post_id}/comments")))
                .json(body),
        )
        .await
    }

    async fn new_comment(&self, post_id: &str, author: &str) -> anyhow::Result<String> {
        let reply = self
            .add(post_id, &json!({"body": "nice", "author_name": author}))
            .await?;
        assert_eq!(reply.status, 201, "{reply:?}");
        Ok(reply.json()["comment_id"]
            .as_str()
            .expect("comment_id")
            .to_string())
    }

    async fn comments_last_seq(&self) -> anyhow::Result<u64> {
        self.stream.last_seq().await
    }

    /// The `CommentRemoved` events of one comment.
    async fn removals(
        &self,
        post_id: &str,
        comment_id: &str,
    ) -> anyhow::Result<Vec<async_nats::jetstream::message::StreamMessage>> {
        let subject = format!("comments.{post_id}.{comment_id}");
        Ok(self
            .stream
            .all_messages()
            .await?
            .into_iter()
            .filter(|m| {
                m.subject.as_str() == subject
                    && msg_header(m, "Event-Type") == Some("CommentRemoved")
            })
            .collect())
    }
}

fn decoded(msg: &async_nats::jetstream::message::StreamMessage) -> comments::Event {
    comments::decode(
        msg_header(msg, "Event-Type").expect("Event-Type"),
        msg_header(msg, "Event-Schema")
            .expect("Event-Schema")
            .parse()
            .expect("a schema number"),
        &msg.payload,
    )
    .expect("a comment event")
}

#[tokio::test]
async fn comments_follow_the_contract_and_refuse_bad_input_without_appending() -> anyhow::Result<()>
{
    let env = Env::start().await?;
    let post_id = env.new_post().await?;

    // Add: 201, the ack, Location, ETag, and one event on the comment's subject.
    let reply = env
        .add(
            &post_id,
            &json!({"body": "  first!  ", "author_name": "  bo "}),
        )
        .await?;
    assert_eq!(reply.status, 201, "{reply:?}");
    let ack = reply.json();
    let comment_id = ack["comment_id"].as_str().expect("comment_id").to_string();
    assert_eq!(ack["post_id"], json!(post_id));
    assert_eq!(ack["version"], json!(1));
    let mut keys: Vec<&str> = ack
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["comment_id", "post_id", "seq", "version"]);
    assert_eq!(
        reply.header("location"),
        Some(format!("/posts/{post_id}/comments/{comment_id}").as_str())
    );
    assert_eq!(reply.header("etag"), Some("\"1\""));
    let msgs = env.stream.all_messages().await?;
    assert_eq!(msgs.len(), 1);
    assert_eq!(
        msgs[0].subject.as_str(),
        format!("comments.{post_id}.{comment_id}")
    );
    assert_eq!(msgs[0].sequence, ack["seq"].as_u64().expect("seq"));
    assert_eq!(
        decoded(&msgs[0]),
        comments::Event::Added {
            post_id: post_id.clone(),
            body: "  first!  ".into(),
            author_name: "bo".into(),
        }
    );

    // Edit, with and without If-Match; remove; remove again.
    let path = format!("/posts/{post_id}/comments/{comment_id}");
    let edit = |body: Value, if_match: Option<&'static str>| {
        let mut req = env.http.patch(env.url(&path)).json(&body);
        if let Some(v) = if_match {
            req = req.header("If-Match", v);
        }
        Reply::of(req)
    };
    let r = edit(json!({"body": "edited"}), Some("\"1\"")).await?;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["version"], json!(2));
    assert_eq!(r.header("etag"), Some("\"2\""));
    edit(json!({"body": "again"}), Some("\"1\""))
        .await?
        .assert_problem(412, "version 2");

    let before_refusals = env.comments_last_seq().await?;
    // Bad inputs: each a precise 4xx, none appends.
    edit(json!({"body": "   "}), None)
        .await?
        .assert_problem(422, "body");
    edit(json!({"body": "x".repeat(10_001)}), None)
        .await?
        .assert_problem(422, "at most 10000 bytes");
    edit(json!({"body": "ok", "author_name": "x"}), None)
        .await?
        .assert_problem(400, "unknown field");
    let malformed = Reply::of(
        env.http
            .patch(env.url(&path))
            .header("content-type", "application/json")
            .body("{\"body\":"),
    )
    .await?;
    malformed.assert_problem(400, "");
    let wrong_type = Reply::of(
        env.http
            .post(env.url(&format!("/posts/{post_id}/comments")))
            .header("content-type", "text/plain")
            .body("hi"),
    )
    .await?;
    wrong_type.assert_problem(415, "application/json");
    let huge = Reply::of(
        env.http
            .post(env.url(&format!("/posts/{post_id}/comments")))
            .header("content-type", "application/json")
            .body(format!(
                "{{\"body\":\"{}\",\"author_name\":\"bo\"}}",
                "x".repeat(70_000)
            )),
    )
    .await?;
    huge.assert_problem(413, "");
    env.add(
        &post_id,
        &json!({"body": "ok", "author_name": "a\u{202E}b"}),
    )
    .await?
    .assert_problem(422, "author_name");
    env.add(&post_id, &json!({"body": "", "author_name": "bo"}))
        .await?
        .assert_problem(422, "body");
    env.add("not-a-uuid", &json!({"body": "ok", "author_name": "bo"}))
        .await?
        .assert_problem(400, "not a UUID");
    let unknown_post = uuid::Uuid::now_v7().to_string();
    env.add(&unknown_post, &json!({"body": "ok", "author_name": "bo"}))
        .await?
        .assert_problem(404, &format!("post {unknown_post} not found"));
    // The comment under another post is not that post's comment.
    let other_post = env.new_post().await?;
    Reply::of(
        env.http
            .patch(env.url(&format!("/posts/{other_post}/comments/{comment_id}")))
            .json(&json!({"body": "moved?"})),
    )
    .await?
    .assert_problem(404, "not found");
    Reply::of(env.http.delete(env.url(&format!(
        "/posts/{post_id}/comments/{}",
        uuid::Uuid::now_v7()
    ))))
    .await?
    .assert_problem(404, "not found");
    assert_eq!(
        env.comments_last_seq().await?,
        before_refusals,
        "a refused command appended an event"
    );

    let removed = Reply::of(env.http.delete(env.url(&path))).await?;
    assert_eq!(removed.status, 200, "{removed:?}");
    assert_eq!(removed.json()["version"], json!(3));
    Reply::of(env.http.delete(env.url(&path)))
        .await?
        .assert_problem(409, "removed");
    edit(json!({"body": "after"}), None)
        .await?
        .assert_problem(409, "removed");
    let last = env.stream.all_messages().await?.pop().expect("a message");
    assert_eq!(
        decoded(&last),
        comments::Event::Removed {
            reason: comments::RemovalReason::Author
        }
    );

    // A deleted post takes no new comment.
    env.delete_post(&other_post).await?;
    let before = env.comments_last_seq().await?;
    env.add(&other_post, &json!({"body": "late", "author_name": "bo"}))
        .await?
        .assert_problem(409, "deleted");
    assert_eq!(env.comments_last_seq().await?, before);

    // Idempotency-Key: the same key and body make one comment.
    let keyed = |key: &'static str, body: &'static str| {
        Reply::of(
            env.http
                .post(env.url(&format!("/posts/{post_id}/comments")))
                .header("Idempotency-Key", key)
                .json(&json!({"body": body, "author_name": "cy"})),
        )
    };
    let first = keyed("k-1", "once").await?;
    let second = keyed("k-1", "once").await?;
    assert_eq!(first.status, 201);
    assert_eq!(second.status, 201);
    assert_eq!(first.json()["comment_id"], second.json()["comment_id"]);
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    keyed("k-1", "other body")
        .await?
        .assert_problem(422, "different body");
    let adds = env
        .stream
        .all_messages()
        .await?
        .iter()
        .filter(|m| msg_header(m, "Event-Type") == Some("CommentAdded"))
        .count();
    assert_eq!(adds, 2, "the keyed create appended twice");

    // /projections lists the process manager with a checkpoint per stream.
    let p = Reply::of(env.http.get(env.url("/projections")))
        .await?
        .json();
    assert_eq!(p["data"][0]["name"], json!("post-deleted-cascade"));
    assert!(p["data"][0]["checkpoints"]["POSTS"].is_u64(), "{p}");
    assert!(p["data"][0]["checkpoints"]["COMMENTS"].is_u64(), "{p}");
    let ready = Reply::of(env.http.get(env.url("/readyz"))).await?;
    assert_eq!(ready.status, 200, "{ready:?}");
    Ok(())
}

#[tokio::test]
async fn a_deleted_post_removes_each_live_comment_exactly_once() -> anyhow::Result<()> {
    let env = Env::start().await?;
    let post_id = env.new_post().await?;
    let untouched_post = env.new_post().await?;
    let live: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(env.new_comment(&post_id, &format!("c{i}")).await?);
        }
        ids
    };
    let by_author = env.new_comment(&post_id, "gone").await?;
    let r = Reply::of(
        env.http
            .delete(env.url(&format!("/posts/{post_id}/comments/{by_author}"))),
    )
    .await?;
    assert_eq!(r.status, 200);
    let elsewhere = env.new_comment(&untouched_post, "stays").await?;

    let deleted = Reply::of(
        env.http
            .delete(format!("{}/posts/{post_id}", env.posts.base_url))
            .header("X-Correlation-Id", "cascade-test")
            .header("Actor", "moderator-7"),
    )
    .await?;
    assert_eq!(deleted.status, 200);
    let posts_reader = StreamReader::connect(&env.nats_url).await?;
    let deleted_msg = posts_reader
        .post_messages(&post_id)
        .await?
        .pop()
        .expect("the PostDeleted");
    let deleted_id = msg_header(&deleted_msg, "Nats-Msg-Id")
        .expect("Nats-Msg-Id")
        .to_string();

    wait_for("every live comment removed", CASCADE_DEADLINE, || async {
        for c in &live {
            if env.removals(&post_id, c).await.ok()?.is_empty() {
                return None;
            }
        }
        Some(())
    })
    .await?;
    // The cascade's consumer has moved past the PostDeleted: nothing more comes.
    wait_for(
        "the cascade's checkpoint past the delete",
        CASCADE_DEADLINE,
        || async {
            let p = Reply::of(env.http.get(env.url("/projections")))
                .await
                .ok()?
                .json();
            (p["data"][0]["checkpoints"]["POSTS"].as_u64()? >= deleted_msg.sequence).then_some(())
        },
    )
    .await?;
    for c in &live {
        let removals = env.removals(&post_id, c).await?;
        assert_eq!(
            removals.len(),
            1,
            "comment {c} removed {} times",
            removals.len()
        );
        let m = &removals[0];
        assert_eq!(
            decoded(m),
            comments::Event::Removed {
                reason: comments::RemovalReason::PostDeleted
            }
        );
        assert_eq!(msg_header(m, "Causation-Id"), Some(deleted_id.as_str()));
        assert_eq!(msg_header(m, "Correlation-Id"), Some("cascade-test"));
        assert_eq!(msg_header(m, "Actor"), Some("moderator-7"));
        assert_eq!(
            msg_header(m, "Nats-Msg-Id"),
            Some(
                comments_command::cascade::effect_id(&deleted_id, &format!("{post_id}.{c}"))
                    .as_str()
            )
        );
    }
    // The comment its author removed keeps its one removal; the other
    // post's comment none.
    assert_eq!(env.removals(&post_id, &by_author).await?.len(), 1);
    assert!(env.removals(&untouched_post, &elsewhere).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_comment_appended_after_its_post_was_deleted_is_removed_too() -> anyhow::Result<()> {
    let env = Env::start().await?;
    let post_id = env.new_post().await?;
    let deleted = env.delete_post(&post_id).await?;
    assert_eq!(deleted.status, 200);
    // A comment decided while the post was live, appended after the
    // cascade ran: written straight to the stream, as a slow instance would.
    let comment_id = uuid::Uuid::now_v7().to_string();
    let store = eventstore::EventStore::connect_existing(
        std::slice::from_ref(&env.nats_url),
        "late-writer",
        &comments::context::stream(1),
    )
    .await?;
    let (event_type, schema, payload) = comments::encode(&comments::Event::Added {
        post_id: post_id.clone(),
        body: "decided before the delete".into(),
        author_name: "slow".into(),
    });
    let meta = eventstore::Metadata {
        correlation_id: "late".into(),
        causation_id: "late".into(),
        event_id: None,
        actor: None,
        traceparent: None,
    };
    store
        .append(
            &format!("{post_id}.{comment_id}"),
            0,
            &eventstore::EncodedEvent {
                event_type,
                schema,
                payload,
            },
            time::OffsetDateTime::now_utc(),
            &meta,
        )
        .await?;
    wait_for("the late comment removed", CASCADE_DEADLINE, || async {
        (!env.removals(&post_id, &comment_id).await.ok()?.is_empty()).then_some(())
    })
    .await?;
    assert_eq!(env.removals(&post_id, &comment_id).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn comment_view_serves_a_posts_comments_with_read_your_writes_over_two_streams()
-> anyhow::Result<()> {
    let nats = start_nats().await?;
    let url = nats.url();
    let posts = InProcessService::start_command(&url).await?;
    let data = tempfile::tempdir()?;
    // posts-query first: stream COMMENTS does not exist yet, and readiness
    // does not wait for it.
    let query = InProcessService::start_query(&url, data.path()).await?;
    let http = http_client();
    let q = |path: &str| format!("{}{path}", query.base_url);
    wait_for(
        "posts-query ready without COMMENTS",
        CASCADE_DEADLINE,
        || async {
            let r = Reply::of(http.get(q("/readyz"))).await.ok()?;
            (r.status == 200).then_some(())
        },
    )
    .await?;
    let p = Reply::of(http.get(q("/projections"))).await?.json();
    let entry = p["data"]
        .as_array()
        .and_then(|d| d.iter().find(|e| e["name"] == "comment-view"))
        .cloned()
        .expect("a comment-view entry");
    assert!(
        entry["stream_error"]
            .as_str()
            .is_some_and(|e| e.contains("waiting for stream COMMENTS")),
        "{entry}"
    );

    let comments = InProcessService::start_comments(&url).await?;
    let c = |path: &str| format!("{}{path}", comments.base_url);
    let post_id = Reply::of(
        http.post(format!("{}/posts", posts.base_url))
            .json(&json!({"title": "t", "content": "c", "author_name": "ann"})),
    )
    .await?
    .ack(201)
    .post_id;
    let mut ids = Vec::new();
    let mut last_seq = 0;
    for (i, author) in ["bo", "cy", "di"].iter().enumerate() {
        let r = Reply::of(
            http.post(c(&format!("/posts/{post_id}/comments")))
                .json(&json!({"body": format!("comment {i}"), "author_name": author})),
        )
        .await?;
        assert_eq!(r.status, 201, "{r:?}");
        ids.push(r.json()["comment_id"].as_str().expect("id").to_string());
        last_seq = r.json()["seq"].as_u64().expect("seq");
    }
    let edited = Reply::of(
        http.patch(c(&format!("/posts/{post_id}/comments/{}", ids[0])))
            .json(&json!({"body": "comment 0, edited"})),
    )
    .await?;
    assert_eq!(edited.status, 200);
    let removed =
        Reply::of(http.delete(c(&format!("/posts/{post_id}/comments/{}", ids[1])))).await?;
    assert_eq!(removed.status, 200);
    let last = removed.json()["seq"].as_u64().expect("seq");
    assert!(last > last_seq);

    // Read-your-writes on COMMENTS, bare and named.
    for min_seq in [last.to_string(), format!("COMMENTS:{last}")] {
        let r = Reply::of(
            http.get(q(&format!("/posts/{post_id}/comments")))
                .query(&[("min_seq", min_seq.as_str())]),
        )
        .await?;
        assert_eq!(r.status, 200, "{r:?}");
        let v = r.json();
        let data = v["data"].as_array().expect("data");
        let shown: Vec<&str> = data
            .iter()
            .map(|d| d["comment_id"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(
            shown,
            [ids[0].as_str(), ids[2].as_str()],
            "oldest first, removed left out: {v}"
        );
        assert_eq!(data[0]["body"], "comment 0, edited");
        assert_eq!(data[0]["version"], 2);
        assert_eq!(data[0]["post_id"], json!(post_id));
        let mut keys: Vec<&str> = data[0]
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "author_name",
                "body",
                "comment_id",
                "created_at",
                "post_id",
                "updated_at",
                "version"
            ]
        );
        assert!(v["next_cursor"].is_null(), "{v}");
    }
    // Paging by cursor.
    let first = Reply::of(
        http.get(q(&format!("/posts/{post_id}/comments")))
            .query(&[("limit", "1")]),
    )
    .await?
    .json();
    let cursor = first["next_cursor"].as_str().expect("a cursor").to_string();
    let rest = Reply::of(
        http.get(q(&format!("/posts/{post_id}/comments")))
            .query(&[("limit", "1"), ("cursor", cursor.as_str())]),
    )
    .await?
    .json();
    assert_eq!(first["data"][0]["comment_id"], json!(ids[0]));
    assert_eq!(rest["data"][0]["comment_id"], json!(ids[2]));
    // One comment; a removed one is a 404.
    let one = Reply::of(http.get(q(&format!("/posts/{post_id}/comments/{}", ids[2])))).await?;
    assert_eq!(one.status, 200, "{one:?}");
    assert_eq!(one.json()["data"]["author_name"], "di");
    Reply::of(http.get(q(&format!("/posts/{post_id}/comments/{}", ids[1]))))
        .await?
        .assert_problem(404, "not found");
    // Bad inputs.
    Reply::of(http.get(q("/posts/not-a-uuid/comments")))
        .await?
        .assert_problem(400, "not a UUID");
    Reply::of(
        http.get(q(&format!("/posts/{post_id}/comments")))
            .query(&[("min_seq", "POSTS:1")]),
    )
    .await?
    .assert_problem(400, "does not follow");
    Reply::of(
        http.get(q(&format!("/posts/{post_id}/comments")))
            .query(&[("cursor", "nothex")]),
    )
    .await?
    .assert_problem(400, "cursor");
    Reply::of(
        http.get(q(&format!("/posts/{post_id}")))
            .query(&[("min_seq", "COMMENTS:1")]),
    )
    .await?
    .assert_problem(400, "does not follow");
    let unknown =
        Reply::of(http.get(q(&format!("/posts/{}/comments", uuid::Uuid::now_v7())))).await?;
    assert_eq!(unknown.status, 200);
    assert_eq!(unknown.json()["data"], json!([]));

    // Deleting the post empties its comments (through the cascade).
    let deleted = Reply::of(http.delete(format!("{}/posts/{post_id}", posts.base_url))).await?;
    assert_eq!(deleted.status, 200);
    wait_for(
        "the deleted post's comments gone",
        CASCADE_DEADLINE,
        || async {
            let v = Reply::of(http.get(q(&format!("/posts/{post_id}/comments"))))
                .await
                .ok()?
                .json();
            (v["data"] == json!([])).then_some(())
        },
    )
    .await?;
    let p = Reply::of(http.get(q("/projections"))).await?.json();
    let entry = p["data"]
        .as_array()
        .and_then(|d| d.iter().find(|e| e["name"] == "comment-view"))
        .cloned()
        .expect("a comment-view entry");
    assert!(
        entry["checkpoints"]["COMMENTS"].as_u64() >= Some(last),
        "{entry}"
    );
    assert!(entry["stream_error"].is_null(), "{entry}");
    Ok(())
}

#[tokio::test]
async fn a_verify_mismatch_has_its_own_exit_code_and_keeps_the_live_store() -> anyhow::Result<()> {
    let env = Env::start().await?;
    let post_id = env.new_post().await?;
    let comment_id = env.new_comment(&post_id, "bo").await?;
    // A comment-view whose row says something the stream never did, at
    // the stream's own checkpoint: a view that drifted.
    let data = tempfile::tempdir()?;
    let path = data.path().join("comment-view.redb");
    let before = {
        let (mut p, reader) = posts_projections::comment_view::open(&path)?;
        let (event_type, schema, payload) = comments::encode(&comments::Event::Added {
            post_id: post_id.clone(),
            body: "not what was written".into(),
            author_name: "bo".into(),
        });
        let incoming = projection::Incoming {
            seq: 1,
            envelope: Ok(eventstore::RecordedEvent {
                seq: 1,
                subject: format!("comments.{post_id}.{comment_id}"),
                aggregate_id: format!("{post_id}.{comment_id}"),
                event_id: "e1".into(),
                event_type: event_type.to_string(),
                schema,
                occurred_at: time::OffsetDateTime::now_utc(),
                correlation_id: "c".into(),
                causation_id: "c".into(),
                actor: None,
                traceparent: None,
                payload: bytes::Bytes::from(payload),
            }),
        };
        projection::Projection::apply_batch(&mut p, &[&incoming])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        reader.digest()?
    };
    let run = e2e_tests::run_replay(&e2e_tests::replay_args(
        "comment-view",
        &env.nats_url,
        data.path(),
        &["--verify", "--json"],
    ))
    .await?;
    assert_eq!(run.status.code(), Some(3), "{run:?}");
    assert!(run.stderr.contains("digest mismatch"), "{run:?}");
    assert_eq!(run.summary()["ok"], false);
    let (_p, reader) = posts_projections::comment_view::open(&path)?;
    assert_eq!(reader.digest()?, before, "the live store was replaced");
    Ok(())
}

/// A poison message on `POSTS` (no envelope) is parked by the process
/// manager to `dlq.post-deleted-cascade.POSTS.<seq>` with its reason, counted,
/// and passed over: the next deletion still cascades.
#[tokio::test]
async fn the_cascade_parks_a_poison_event_to_dlq_and_goes_on() -> anyhow::Result<()> {
    let env = Env::start().await?;
    let client = async_nats::connect(&env.nats_url).await?;
    let js = async_nats::jetstream::new(client);
    let ack = js
        .publish(
            format!("posts.{}", uuid::Uuid::now_v7()),
            bytes::Bytes::from_static(b"not an event"),
        )
        .await?
        .await?;
    let poison_seq = ack.sequence;
    let dlq = StreamReader::connect_to(&env.nats_url, "DLQ").await?;
    let parked = wait_for("the poison event in DLQ", CASCADE_DEADLINE, || async {
        let msgs = dlq.all_messages().await.ok()?;
        msgs.into_iter()
            .find(|m| m.subject.as_str() == format!("dlq.post-deleted-cascade.POSTS.{poison_seq}"))
    })
    .await?;
    assert!(
        msg_header(&parked, "Parked-Reason").is_some_and(|r| !r.is_empty()),
        "{:?}",
        parked.headers
    );
    assert_eq!(parked.payload.as_ref(), b"not an event");
    // It goes on: a deleted post's comment is still removed.
    let post_id = env.new_post().await?;
    let comment = env.new_comment(&post_id, "bo").await?;
    let r = env.delete_post(&post_id).await?;
    assert_eq!(r.status, 200, "{r:?}");
    wait_for("the removal after the poison", CASCADE_DEADLINE, || async {
        let msgs = env.stream.all_messages().await.ok()?;
        msgs.iter()
            .any(|m| {
                m.subject.ends_with(&comment)
                    && msg_header(m, "Event-Type") == Some("CommentRemoved")
            })
            .then_some(())
    })
    .await?;
    let r = Reply::of(env.http.get(env.url("/projections"))).await?;
    let poison: u64 = r.json()["data"][0]["sources"]
        .as_array()
        .map_or(0, |s| s.iter().filter_map(|x| x["poison"].as_u64()).sum());
    assert_eq!(poison, 1, "{r:?}");
    Ok(())
}
