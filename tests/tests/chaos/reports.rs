//! Scenario: reports-query SIGKILLed at random moments while posts and
//! comments are written through both command services (posts created,
//! moved to other authors and deleted; comments added, edited and removed,
//! and removed by the cascade). Afterwards author-stats equals an oracle
//! folded from the two streams, and equals a copy built from sequence 1 of
//! both by a second reports-query: no event lost or applied twice, whatever
//! the interleaving and the kill points.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::ensure;
use e2e_tests::{
    Figures, Reply, StreamReader, author_stats_oracle, http_client_with_timeout, listed_authors,
    start_secured_nats, wait_for,
};
use serde_json::json;

use crate::support::{
    COMMAND_TIMEOUT, Ctx, Rng, Summary, spawn_command, spawn_comments, spawn_reports,
};

/// Operations per writer task.
const OPS_PER_WRITER: u64 = 500;
const WRITERS: u64 = 4;
/// Kills of reports-query per round.
const KILLS: u64 = 3;
const AUTHORS: [&str; 5] = ["ann", "bo", "cy", "di", "eve"];
const CATCH_UP: Duration = Duration::from_secs(90);

pub async fn scenario(ctx: Ctx) -> anyhow::Result<()> {
    let mut rng = ctx.rng();
    let nats = start_secured_nats().await?;
    let url = nats.url();
    let posts = spawn_command(&url, 1, 1).await?;
    let comments = spawn_comments(&url, 1).await?;
    let scratch = ctx.scratch("reports")?;
    let live_dir = scratch.path().join("live");
    let mut reports = spawn_reports(&url, &live_dir, 1).await?;
    let http = http_client_with_timeout(COMMAND_TIMEOUT);
    let mut summary = Summary::default();

    let writers: Vec<_> = (0..WRITERS * ctx.rounds)
        .map(|w| {
            let (http, p, c) = (
                http.clone(),
                posts.base_url.clone(),
                comments.base_url.clone(),
            );
            let rng = rng.fork(w);
            tokio::spawn(write(http, p, c, rng))
        })
        .collect();
    // Kill reports-query at random moments while the writers run.
    let started = Instant::now();
    for _ in 0..KILLS * ctx.rounds {
        tokio::time::sleep(rng.millis(300, 1500)).await;
        reports.kill();
        summary.kills += 1;
        let t = Instant::now();
        reports.restart().await?;
        summary.recovered("restart", t.elapsed());
    }
    let mut written = 0;
    for w in writers {
        written += w.await??;
    }
    summary.note(
        "write_secs",
        format!("{:.1}", started.elapsed().as_secs_f64()),
    );
    summary.events_written = written;

    // Everything written, and the cascade done: then read both heads.
    wait_for("the cascade drained", CATCH_UP, || async {
        let p = Reply::of(http.get(comments.url("/projections")))
            .await
            .ok()?
            .json();
        (p["data"][0]["lag"].as_u64()? == 0).then_some(())
    })
    .await?;
    let posts_last = StreamReader::connect(&url).await?.last_seq().await?;
    let comments_last = StreamReader::connect_to(&url, "COMMENTS")
        .await?
        .last_seq()
        .await?;
    let min_seq = format!("POSTS:{posts_last},COMMENTS:{comments_last}");
    let t = Instant::now();
    let live = wait_for("author-stats caught up", CATCH_UP, || async {
        listed_authors(&http, &reports.base_url, &min_seq)
            .await
            .ok()
    })
    .await?;
    summary.recovered("catch_up", t.elapsed());
    let want = author_stats_oracle(&url).await?;
    let got: BTreeMap<String, Figures> = live
        .iter()
        .map(|v| {
            (
                v["author_name"].as_str().unwrap_or_default().to_string(),
                Figures::of(v),
            )
        })
        .collect();
    let differing = want.iter().filter(|(a, f)| got.get(*a) != Some(*f)).count()
        + got.keys().filter(|a| !want.contains_key(*a)).count();
    summary.duplicate_effects = differing as u64;
    summary.note("authors", want.len());
    summary.note("posts_seq", posts_last);
    summary.note("comments_seq", comments_last);

    // A second reports-query, from sequence 1 of both streams.
    let fresh_dir = scratch.path().join("fresh");
    let mut fresh = spawn_reports(&url, &fresh_dir, 1).await?;
    let rebuilt = wait_for("the fresh copy caught up", CATCH_UP, || async {
        listed_authors(&http, &fresh.base_url, &min_seq).await.ok()
    })
    .await?;
    summary.print(&ctx);
    ensure!(
        got == want,
        "author-stats differs from the oracle for {differing} authors: got {got:?}, want {want:?}"
    );
    ensure!(
        rebuilt == live,
        "a copy built from sequence 1 differs from the live one"
    );
    reports.terminate()?;
    fresh.terminate()?;
    scratch.remove();
    Ok(())
}

/// One writer: [`OPS_PER_WRITER`] random operations on its own posts and
/// comments; the number of commands acknowledged.
async fn write(
    http: reqwest::Client,
    posts: String,
    comments: String,
    mut rng: Rng,
) -> anyhow::Result<u64> {
    let mut live_posts: Vec<String> = Vec::new();
    let mut live_comments: Vec<(String, String)> = Vec::new();
    let mut acked = 0;
    for _ in 0..OPS_PER_WRITER {
        let author = AUTHORS[rng.index(AUTHORS.len())];
        let r = match rng.below(10) {
            0..=2 => {
                let r = Reply::of(
                    http.post(format!("{posts}/posts"))
                        .json(&json!({"title": "t", "content": "c", "author_name": author})),
                )
                .await?;
                if r.status == 201 {
                    live_posts.push(r.json()["post_id"].as_str().unwrap_or_default().to_string());
                }
                r
            }
            3 if !live_posts.is_empty() => {
                let p = &live_posts[rng.index(live_posts.len())];
                Reply::of(
                    http.patch(format!("{posts}/posts/{p}"))
                        .json(&json!({"author_name": author})),
                )
                .await?
            }
            4 if !live_posts.is_empty() => {
                let p = live_posts.swap_remove(rng.index(live_posts.len()));
                Reply::of(http.delete(format!("{posts}/posts/{p}"))).await?
            }
            5..=7 if !live_posts.is_empty() => {
                let p = live_posts[rng.index(live_posts.len())].clone();
                let r = Reply::of(
                    http.post(format!("{comments}/posts/{p}/comments"))
                        .json(&json!({"body": "b", "author_name": author})),
                )
                .await?;
                if r.status == 201 {
                    let id = r.json()["comment_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    live_comments.push((p, id));
                }
                r
            }
            8 if !live_comments.is_empty() => {
                let (p, c) = &live_comments[rng.index(live_comments.len())];
                Reply::of(
                    http.patch(format!("{comments}/posts/{p}/comments/{c}"))
                        .json(&json!({"body": "edited"})),
                )
                .await?
            }
            9 if !live_comments.is_empty() => {
                let (p, c) = live_comments.swap_remove(rng.index(live_comments.len()));
                Reply::of(http.delete(format!("{comments}/posts/{p}/comments/{c}"))).await?
            }
            _ => continue,
        };
        // 409 is expected: a comment removed by the cascade, a deleted post.
        ensure!(r.status < 300 || r.status == 409, "unexpected answer {r:?}");
        if r.status < 300 {
            acked += 1;
        }
    }
    Ok(acked)
}
