//! reports-query over real HTTP and a real nats-server: author-stats
//! follows `POSTS` and `COMMENTS`, equals an oracle folded from the two
//! streams, equals a copy built from sequence 1 of both (another
//! interleaving), and reads its own writes across the two streams.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use e2e_tests::{
    InProcessService, Reply, StreamReader, http_client, msg_header, start_nats, wait_for,
};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(30);

/// The figures of one author as the contract defines them, folded from the
/// streams by this test alone.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Figures {
    posts: u64,
    comments_written: u64,
    comments_received: u64,
    last_activity_at: Option<String>,
}

async fn oracle(nats_url: &str) -> anyhow::Result<BTreeMap<String, Figures>> {
    let mut figures: BTreeMap<String, Figures> = BTreeMap::new();
    // post id -> (author, live); comment id -> (post, author, live)
    let mut posts: HashMap<String, (String, bool)> = HashMap::new();
    let mut comments: HashMap<String, (String, String, bool)> = HashMap::new();
    let mut activity: HashMap<String, String> = HashMap::new();
    let mut touch = |author: &str, at: Option<&str>, figures: &mut BTreeMap<String, Figures>| {
        figures.entry(author.to_string()).or_default();
        if let Some(at) = at {
            let e = activity.entry(author.to_string()).or_default();
            if at > e.as_str() {
                *e = at.to_string();
            }
        }
    };
    let header = |m: &async_nats::jetstream::message::StreamMessage, h: &str| {
        msg_header(m, h).unwrap_or_default().to_string()
    };
    for m in StreamReader::connect(nats_url)
        .await?
        .all_messages()
        .await?
    {
        let id = m.subject.as_str().trim_start_matches("posts.").to_string();
        let at = header(&m, "Occurred-At");
        let event = posts::decode(
            &header(&m, "Event-Type"),
            header(&m, "Event-Schema").parse()?,
            &m.payload,
        )?;
        match event {
            posts::Event::Created { author_name, .. } => {
                touch(&author_name, Some(&at), &mut figures);
                posts.insert(id, (author_name, true));
            }
            posts::Event::Updated { author_name, .. } => {
                let p = posts.get_mut(&id).expect("an update follows a create");
                if let Some(a) = author_name {
                    p.0 = a;
                }
                let a = p.0.clone();
                touch(&a, Some(&at), &mut figures);
            }
            posts::Event::Deleted => {
                posts.get_mut(&id).expect("a delete follows a create").1 = false;
            }
        }
    }
    for m in StreamReader::connect_to(nats_url, "COMMENTS")
        .await?
        .all_messages()
        .await?
    {
        let id = m.subject.as_str().to_string();
        let at = header(&m, "Occurred-At");
        let event = comments::decode(
            &header(&m, "Event-Type"),
            header(&m, "Event-Schema").parse()?,
            &m.payload,
        )?;
        match event {
            comments::Event::Added {
                post_id,
                author_name,
                ..
            } => {
                touch(&author_name, Some(&at), &mut figures);
                comments.insert(id, (post_id, author_name, true));
            }
            comments::Event::Edited { .. } => {
                let a = comments[&id].1.clone();
                touch(&a, Some(&at), &mut figures);
            }
            comments::Event::Removed { .. } => {
                comments.get_mut(&id).expect("a removal follows an add").2 = false;
            }
        }
    }
    for (author, live) in posts.values() {
        if *live {
            figures.entry(author.clone()).or_default().posts += 1;
        }
    }
    for (post_id, author, live) in comments.values() {
        if !*live {
            continue;
        }
        figures.entry(author.clone()).or_default().comments_written += 1;
        if let Some((owner, true)) = posts.get(post_id) {
            figures.entry(owner.clone()).or_default().comments_received += 1;
        }
    }
    for (author, f) in &mut figures {
        f.last_activity_at = activity.get(author).cloned();
    }
    Ok(figures)
}

/// Every author a reports-query lists, page by page.
async fn listed(http: &reqwest::Client, base: &str, min_seq: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut q = vec![("limit", "2".to_string()), ("min_seq", min_seq.to_string())];
        if let Some(c) = &cursor {
            q.push(("cursor", c.clone()));
        }
        let r = Reply::of(http.get(format!("{base}/reports/authors")).query(&q)).await?;
        anyhow::ensure!(r.status == 200, "{r:?}");
        let v = r.json();
        out.extend(v["data"].as_array().cloned().unwrap_or_default());
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return Ok(out),
        }
    }
}

fn figures_of(v: &Value) -> Figures {
    Figures {
        posts: v["posts"].as_u64().unwrap_or(u64::MAX),
        comments_written: v["comments_written"].as_u64().unwrap_or(u64::MAX),
        comments_received: v["comments_received"].as_u64().unwrap_or(u64::MAX),
        last_activity_at: v["last_activity_at"].as_str().map(str::to_string),
    }
}

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
    let shown = listed(&http, &base, &min_seq).await?;
    let want = oracle(&url).await?;
    let got: BTreeMap<String, Figures> = shown
        .iter()
        .map(|v| {
            (
                v["author_name"].as_str().unwrap_or_default().to_string(),
                figures_of(v),
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
    let rebuilt = listed(&http, &fresh.base_url, &min_seq).await?;
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
    Ok(())
}
