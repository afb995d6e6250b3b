//! NATS users, least privilege: a nats-server with the repository's
//! `nats/users.conf` and the development passwords of `nats/dev-users.env`.
//! Every service runs under its own user and does all its work (commands,
//! projections, the cascade, DLQ parking, replay); and no user can step
//! outside its permissions (publish another context's events, create or
//! delete streams), and anonymous connections are refused.

use std::time::Duration;

use async_nats::jetstream;
use e2e_tests::{
    InProcessService, Reply, dev_nats_password, dev_nats_passwords, http_client, nats_dir,
    replay_args, run_replay, start_nats_with, wait_for,
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);

struct Secured {
    nats: testkit::NatsServer,
}

impl Secured {
    async fn start() -> anyhow::Result<Self> {
        let passwords = dev_nats_passwords();
        let nats = start_nats_with(&testkit::NatsOptions {
            include: Some(nats_dir().join("users.conf")),
            env: passwords.clone(),
            ..Default::default()
        })
        .await?;
        Ok(Self { nats })
    }

    /// The server's URL with `user`'s credentials.
    fn url_for(&self, user: &str) -> String {
        eventstore::with_credentials(
            &[self.nats.url()],
            Some(user),
            Some(&dev_nats_password(user)),
        )
        .remove(0)
    }

    /// A raw connection as `user`, collecting the server's error messages.
    async fn connect(
        &self,
        user: &str,
    ) -> anyhow::Result<(
        async_nats::Client,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    )> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let client = async_nats::ConnectOptions::with_user_and_password(
            user.to_string(),
            dev_nats_password(user),
        )
        .custom_inbox_prefix(format!("_INBOX_{user}"))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(self.nats.url())
        .await?;
        Ok((client, rx))
    }
}

/// A stream's last sequence, read as `gateway` (read-only).
async fn last_seq(env: &Secured, stream: &str) -> anyhow::Result<u64> {
    let (client, _) = env.connect("gateway").await?;
    let js = jetstream::new(client);
    let mut s = js.get_stream(stream).await?;
    Ok(s.info().await?.state.last_sequence)
}

#[tokio::test]
async fn every_service_does_its_work_under_its_own_nats_user() -> anyhow::Result<()> {
    let env = Secured::start().await?;
    let posts = InProcessService::start_command(&env.url_for("posts-command")).await?;
    let comments = InProcessService::start_comments(&env.url_for("comments-command")).await?;
    let query_dir = tempfile::tempdir()?;
    let reports_dir = tempfile::tempdir()?;
    let query = InProcessService::start_query_on_existing_streams(
        &env.url_for("posts-query"),
        query_dir.path(),
    )
    .await?;
    let reports =
        InProcessService::start_reports(&env.url_for("reports-query"), reports_dir.path()).await?;
    let http = http_client();

    // With idempotency keys: the buckets are read and written too.
    let create = || {
        Reply::of(
            http.post(format!("{}/posts", posts.base_url))
                .header("idempotency-key", "secured-1")
                .json(&json!({"title": "Secured", "content": "least privilege", "author_name": "ann"})),
        )
    };
    let created = create().await?.ack(201);
    assert_eq!(
        create().await?.ack(201),
        created,
        "the key was not remembered"
    );
    let id = created.post_id;
    let add = || {
        Reply::of(
            http.post(format!("{}/posts/{id}/comments", comments.base_url))
                .header("idempotency-key", "secured-2")
                .json(&json!({"body": "hello", "author_name": "bo"})),
        )
    };
    let added = add().await?;
    assert_eq!(added.status, 201, "{added:?}");
    assert_eq!(add().await?.body, added.body, "the key was not remembered");
    let history = Reply::of(http.get(format!("{}/posts/{id}/events", query.base_url))).await?;
    assert_eq!(
        history.json()["data"].as_array().map(Vec::len),
        Some(1),
        "{history:?}"
    );
    let comment_seq = added.json()["seq"].as_u64().expect("seq");
    let read = Reply::of(http.get(format!(
        "{}/posts/{id}?min_seq={}",
        query.base_url, created.seq
    )))
    .await?;
    assert_eq!(read.status, 200, "{read:?}");
    let found = Reply::of(http.get(format!(
        "{}/posts/search?q=privilege&min_seq={}",
        query.base_url, created.seq
    )))
    .await?;
    assert_eq!(found.json()["total"], 1, "{found:?}");
    let listed = Reply::of(http.get(format!(
        "{}/posts/{id}/comments?min_seq=COMMENTS:{comment_seq}",
        query.base_url
    )))
    .await?;
    assert_eq!(listed.json()["data"].as_array().map(Vec::len), Some(1));
    let report = Reply::of(http.get(format!(
        "{}/reports/authors/ann?min_seq=POSTS:{},COMMENTS:{comment_seq}",
        reports.base_url, created.seq
    )))
    .await?;
    assert_eq!(report.status, 200, "{report:?}");
    assert_eq!(report.json()["data"]["comments_received"], 1);

    // The cascade, on its durable consumers and acks, under comments-command.
    let deleted = Reply::of(http.delete(format!("{}/posts/{id}", posts.base_url))).await?;
    assert_eq!(deleted.status, 200, "{deleted:?}");
    wait_for("the cascade's CommentRemoved", DEADLINE, || async {
        last_seq(&env, "COMMENTS").await.ok().filter(|s| *s == 2)
    })
    .await?;

    // A poison event: posts-query parks it to DLQ under its own user.
    let (writer, _) = env.connect("posts-command").await?;
    let js = jetstream::new(writer);
    js.publish(
        format!("posts.{}", uuid::Uuid::now_v7()),
        bytes::Bytes::from_static(b"not an event"),
    )
    .await?
    .await?;
    wait_for("the poison event in DLQ", DEADLINE, || async {
        last_seq(&env, "DLQ").await.ok().filter(|s| *s >= 1)
    })
    .await?;

    // replay, online, under its own user (--nats-user/--nats-password).
    let pw = dev_nats_password("replay");
    let run = run_replay(&replay_args(
        "post-view",
        &env.nats.url(),
        query_dir.path(),
        &[
            "--verify",
            "--json",
            "--nats-user",
            "replay",
            "--nats-password",
            &pw,
        ],
    ))
    .await?;
    let _ = run.assert_verified(&["post-view"]);
    Ok(())
}

#[tokio::test]
async fn no_nats_user_can_step_outside_its_permissions() -> anyhow::Result<()> {
    let env = Secured::start().await?;
    // Streams and buckets, made by their command services.
    let posts = InProcessService::start_command(&env.url_for("posts-command")).await?;
    let _comments = InProcessService::start_comments(&env.url_for("comments-command")).await?;
    let http = http_client();
    let _ = Reply::of(
        http.post(format!("{}/posts", posts.base_url))
            .json(&json!({"title": "t", "content": "c", "author_name": "ann"})),
    )
    .await?
    .ack(201);
    let before = (
        last_seq(&env, "POSTS").await?,
        last_seq(&env, "COMMENTS").await?,
        last_seq(&env, "DLQ").await?,
    );

    // Anonymous, and a wrong password: refused.
    let anonymous = eventstore::connect_checked(&[env.nats.url()], "anonymous").await;
    assert!(anonymous.is_err(), "an anonymous connection was let in");
    let wrong = eventstore::connect_checked(
        &eventstore::with_credentials(&[env.nats.url()], Some("posts-query"), Some("wrong")),
        "wrong-password",
    )
    .await;
    assert!(wrong.is_err(), "a wrong password was let in");

    let post_subject = format!("posts.{}", uuid::Uuid::now_v7());
    let comment_subject = format!("comments.{}.{}", uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let forbidden: &[(&str, &str)] = &[
        ("posts-query", &post_subject),
        ("posts-query", &comment_subject),
        ("reports-query", &post_subject),
        ("reports-query", &comment_subject),
        ("replay", &post_subject),
        ("replay", &comment_subject),
        ("gateway", &post_subject),
        ("gateway", &comment_subject),
        ("gateway", "dlq.x.POSTS.1"),
        ("posts-command", &comment_subject),
        ("comments-command", &post_subject),
    ];
    for (user, subject) in forbidden {
        let (client, mut errors) = env.connect(user).await?;
        client
            .publish(subject.to_string(), bytes::Bytes::from_static(b"{}"))
            .await?;
        client.flush().await?;
        let error = tokio::time::timeout(DEADLINE, errors.recv())
            .await
            .map_err(|_| anyhow::anyhow!("{user} published to {subject} without an error"))?
            .unwrap_or_default();
        assert!(
            error.to_lowercase().contains("permissions violation") && error.contains(subject),
            "{user} -> {subject}: {error}"
        );
    }

    // No user but the owner may create or change a stream; none may delete
    // one (command services included). A refused request gets no answer, so
    // each waits out a short timeout: all at once.
    let mut attempts = Vec::new();
    for user in [
        "posts-command",
        "comments-command",
        "posts-query",
        "reports-query",
        "replay",
        "gateway",
    ] {
        let (client, _) = env.connect(user).await?;
        let mut js = jetstream::new(client);
        js.set_timeout(Duration::from_secs(2));
        let js = std::sync::Arc::new(js);
        if user != "posts-command" {
            let j = js.clone();
            attempts.push(tokio::spawn(async move {
                let changed = j
                    .create_stream(jetstream::stream::Config {
                        name: "POSTS".into(),
                        subjects: vec!["posts.>".into()],
                        max_messages: 1,
                        ..Default::default()
                    })
                    .await;
                (user, "change POSTS", changed.is_ok())
            }));
        }
        let j = js.clone();
        attempts.push(tokio::spawn(async move {
            let created = j
                .create_stream(jetstream::stream::Config {
                    name: "EVIL".into(),
                    subjects: vec!["evil.>".into()],
                    ..Default::default()
                })
                .await;
            (user, "create EVIL", created.is_ok())
        }));
        for stream in ["POSTS", "COMMENTS", "DLQ"] {
            let j = js.clone();
            attempts.push(tokio::spawn(async move {
                let deleted = j.delete_stream(stream).await;
                (user, stream, deleted.is_ok())
            }));
        }
    }
    for attempt in attempts {
        let (user, what, allowed) = attempt.await?;
        assert!(!allowed, "{user} could {what}");
    }
    let (client, _) = env.connect("gateway").await?;
    let js = jetstream::new(client);
    for stream in ["POSTS", "COMMENTS", "DLQ"] {
        let mut s = js.get_stream(stream).await?;
        assert_ne!(
            s.info().await?.config.max_messages,
            1,
            "{stream} was changed"
        );
    }
    // A user cannot read another's replies.
    let (spy, mut errors) = env.connect("posts-query").await?;
    let _sub = spy.subscribe("_INBOX_posts-command.>").await?;
    spy.flush().await?;
    let error = tokio::time::timeout(DEADLINE, errors.recv())
        .await
        .map_err(|_| anyhow::anyhow!("posts-query subscribed to posts-command's inbox"))?
        .unwrap_or_default();
    assert!(
        error.to_lowercase().contains("permissions violation"),
        "{error}"
    );

    let after = (
        last_seq(&env, "POSTS").await?,
        last_seq(&env, "COMMENTS").await?,
        last_seq(&env, "DLQ").await?,
    );
    assert_eq!(after, before, "a refused publish was stored");
    Ok(())
}
