//! reports-query over real HTTP and a real nats-server: author-stats
//! follows `POSTS` and `COMMENTS`, equals an oracle folded from the two
//! streams, equals a copy built from sequence 1 of both (another
//! interleaving), and reads its own writes across the two streams.

use std::collections::BTreeMap;
use std::time::Duration;

use e2e_tests::{
    Figures, InProcessService, Reply, StreamReader, author_stats_oracle, http_client,
    listed_authors, msg_header, start_nats, wait_for,
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn author_stats_equals_the_oracle_and_a_rebuild_and_reads_its_writes() -> anyhow::Result<()> {
    let nats = start_nats().await?;
    let url = nats.url();
    let posts = InProcessService::start_command(&url).await?;
    let comments = InProcessService::start_comments(&url).await?;
    let live_dir = tempfile::tempdir()?;
    let reports = InProcessService::start_reports(&url, live_dir.path()).await?;
    let http = http_client();
    let p = |path: &str| format!("{}{path}", posts.base_url);
    let c = |path: &str| format!("{}{path}", comments.base_url);

    let create = |author: &'static str| {
        Reply::of(
            http.post(p("/posts"))
                .json(&json!({"title": "t", "content": "c", "author_name": author})),
        )
    };
    let p1 = create("ann").await?.ack(201).post_id;
    let p2 = create("ann").await?.ack(201).post_id;
    let p3 = create("eve").await?.ack(201).post_id;
    let mut comment_seq = 0;
    let mut add = Vec::new();
    for (post, author) in [
        (&p1, "bo"),
        (&p1, "cy"),
        (&p2, "bo"),
        (&p3, "ann"),
        (&p3, "bo"),
    ] {
        let r = Reply::of(
            http.post(c(&format!("/posts/{post}/comments")))
                .json(&json!({"body": "hi", "author_name": author})),
        )
        .await?;
        assert_eq!(r.status, 201, "{r:?}");
        comment_seq = r.json()["seq"].as_u64().expect("seq");
        add.push((
            post.clone(),
            r.json()["comment_id"].as_str().expect("id").to_string(),
        ));
    }
    // cy removes theirs; p2 moves to di; p1 is deleted (its comments go with it).
    let r =
        Reply::of(http.delete(c(&format!("/posts/{}/comments/{}", add[1].0, add[1].1)))).await?;
    assert_eq!(r.status, 200);
    let r = Reply::of(
        http.patch(p(&format!("/posts/{p2}")))
            .json(&json!({"author_name": "di"})),
    )
    .await?;
    assert_eq!(r.status, 200);
    let r = Reply::of(http.delete(p(&format!("/posts/{p1}")))).await?;
    let posts_seq = r.ack(200).seq;
    let r = Reply::of(
        http.patch(c(&format!("/posts/{}/comments/{}", add[4].0, add[4].1)))
            .json(&json!({"body": "edited"})),
    )
    .await?;
    assert_eq!(r.status, 200);
    comment_seq = comment_seq.max(r.json()["seq"].as_u64().expect("seq"));
    // The cascade removes bo's comment on p1: wait until COMMENTS has it.
    let comments_stream = StreamReader::connect_to(&url, "COMMENTS").await?;
    let removed_by_cascade = wait_for("the cascade's removal", DEADLINE, || async {
        let msgs = comments_stream.all_messages().await.ok()?;
        msgs.iter()
            .find(|m| {
                m.subject.as_str() == format!("comments.{}.{}", add[0].0, add[0].1)
                    && msg_header(m, "Event-Type") == Some("CommentRemoved")
            })
            .map(|m| m.sequence)
    })
    .await?;
    let last_comments = comment_seq.max(removed_by_cascade);
    let min_seq = format!("POSTS:{posts_seq},COMMENTS:{last_comments}");

    // Read-your-writes over two streams, then the oracle.
    let base = reports.base_url.clone();
    let shown = listed_authors(&http, &base, &min_seq).await?;
    let want = author_stats_oracle(&url).await?;
    let got: BTreeMap<String, Figures> = shown
        .iter()
        .map(|v| {
            (
                v["author_name"].as_str().unwrap_or_default().to_string(),
                Figures::of(v),
            )
        })
        .collect();
    assert_eq!(got, want, "author-stats against the oracle");
    // A few figures spelled out, so that the oracle is checked as well.
    assert_eq!(got["di"].posts, 1);
    assert_eq!(got["di"].comments_received, 1);
    assert_eq!(got["ann"].posts, 0);
    assert_eq!(got["eve"].comments_received, 2);
    assert_eq!(got["cy"].comments_written, 0);
    assert_eq!(got["bo"].comments_written, 2);
    // Ordered by posts descending, then name.
    let order: Vec<&str> = shown
        .iter()
        .map(|v| v["author_name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(order, ["di", "eve", "ann", "bo", "cy"]);

    // One author; the 404 and the 400s.
    let one = Reply::of(http.get(format!("{base}/reports/authors/eve"))).await?;
    assert_eq!(one.status, 200, "{one:?}");
    assert_eq!(one.json()["data"]["posts"], 1);
    Reply::of(http.get(format!("{base}/reports/authors/nobody")))
        .await?
        .assert_problem(404, "never appeared");
    Reply::of(
        http.get(format!("{base}/reports/authors"))
            .query(&[("min_seq", "3")]),
    )
    .await?
    .assert_problem(400, "names no stream");
    Reply::of(
        http.get(format!("{base}/reports/authors"))
            .query(&[("min_seq", "DLQ:3")]),
    )
    .await?
    .assert_problem(400, "does not follow");
    Reply::of(
        http.get(format!("{base}/reports/authors"))
            .query(&[("cursor", "zz")]),
    )
    .await?
    .assert_problem(400, "cursor");
    let p = Reply::of(http.get(format!("{base}/projections")))
        .await?
        .json();
    assert_eq!(p["data"][0]["name"], "author-stats");
    assert_eq!(p["data"][0]["checkpoints"]["POSTS"], posts_seq);
    assert!(
        p["data"][0]["checkpoints"]["COMMENTS"].as_u64() >= Some(last_comments),
        "{p}"
    );

    // A copy built from sequence 1 of both streams at once: another
    // interleaving, the same figures.
    let fresh_dir = tempfile::tempdir()?;
    let fresh = InProcessService::start_reports(&url, fresh_dir.path()).await?;
    let rebuilt = listed_authors(&http, &fresh.base_url, &min_seq).await?;
    assert_eq!(
        rebuilt, shown,
        "a rebuild from sequence 1 differs from the live copy"
    );
    wait_for("both ready", DEADLINE, || async {
        let r = Reply::of(http.get(format!("{}/readyz", fresh.base_url)))
            .await
            .ok()?;
        (r.status == 200).then_some(())
    })
    .await?;

    // replay author-stats: refused while reports-query runs on the dir, and
    // verified against the live file once it is stopped.
    let args = e2e_tests::replay_args(
        "author-stats",
        &url,
        live_dir.path(),
        &["--verify", "--json"],
    );
    let refused = e2e_tests::run_replay(&args).await?;
    assert!(!refused.status.success(), "{refused:?}");
    assert!(refused.stderr.contains("stop it first"), "{refused:?}");
    reports.stop().await?;
    let run = e2e_tests::run_replay(&args).await?;
    let outcomes = run.assert_verified(&["author-stats"]);
    let comments_last = StreamReader::connect_to(&url, "COMMENTS")
        .await?
        .last_seq()
        .await?;
    assert_eq!(
        outcomes["author-stats"]["events"].as_u64(),
        Some(posts_seq + comments_last),
        "{outcomes:?}"
    );
    // The rebuilt file serves the same figures.
    let again = InProcessService::start_reports(&url, live_dir.path()).await?;
    assert_eq!(
        listed_authors(&http, &again.base_url, &min_seq).await?,
        shown
    );
    Ok(())
}
