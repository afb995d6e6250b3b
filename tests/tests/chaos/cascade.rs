//! Scenario: the `post-deleted-cascade` process manager SIGKILLed in the
//! middle of a cascade, with two comments-command instances bound to the
//! same durable consumers. Each round deletes a post with a few hundred
//! comments and kills one or both instances once some, but not all, of the
//! removals are in the stream. Afterwards every comment that was live at
//! the delete has exactly one `CommentRemoved {post_deleted}`, every comment
//! its author removed keeps exactly one removal, and nothing follows a
//! removal: no effect lost, none applied twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use e2e_tests::{
    Reply, StreamReader, http_client_with_timeout, msg_header, start_secured_nats, wait_for,
};
use serde_json::json;

use crate::support::{COMMAND_TIMEOUT, Ctx, Service, Summary, spawn_command, spawn_comments};

/// Comments per deleted post.
const COMMENTS_PER_POST: usize = 300;
/// One in this many is removed by its author before the delete.
const AUTHOR_REMOVES_ONE_IN: usize = 10;
/// Concurrent writers adding the comments.
const WRITERS: usize = 16;
/// How long a cascade may take, a redelivery after a kill included (the
/// consumer's ack wait is 10 s).
const CASCADE_DEADLINE: Duration = Duration::from_secs(90);
/// How long the test waits for the cascade to start after a delete.
const START_DEADLINE: Duration = Duration::from_secs(30);

pub async fn scenario(ctx: Ctx) -> anyhow::Result<()> {
    let mut rng = ctx.rng();
    let nats = start_secured_nats().await?;
    let url = nats.url();
    let posts = spawn_command(&url, 1, 1).await?;
    let mut instances = vec![
        spawn_comments(&url, 1).await?,
        spawn_comments(&url, 1).await?,
    ];
    let http = http_client_with_timeout(COMMAND_TIMEOUT);
    let reader = StreamReader::connect_to(&url, "COMMENTS").await?;
    let mut summary = Summary::default();
    let mut mid_cascade_kills = 0u64;
    // Comment aggregate id -> whether its author removed it.
    let mut expected: HashMap<String, bool> = HashMap::new();
    let rounds = 2 * ctx.rounds;
    for round in 0..rounds {
        let post_id = Reply::of(
            http.post(posts.url("/posts"))
                .json(&json!({"title": "t", "content": "c", "author_name": "ann"})),
        )
        .await?
        .ack(201)
        .post_id;
        let ids = add_comments(&http, &instances, &post_id).await?;
        for (i, id) in ids.iter().enumerate() {
            let by_author = i % AUTHOR_REMOVES_ONE_IN == 0;
            if by_author {
                let r = Reply::of(
                    http.delete(instances[i % 2].url(&format!("/posts/{post_id}/comments/{id}"))),
                )
                .await?;
                ensure!(r.status == 200, "author removal: {r:?}");
            }
            expected.insert(format!("{post_id}.{id}"), by_author);
        }
        let live = ids.len() - ids.len().div_ceil(AUTHOR_REMOVES_ONE_IN);
        let before = reader.last_seq().await?;
        let deleted = Reply::of(http.delete(posts.url(&format!("/posts/{post_id}")))).await?;
        ensure!(deleted.status == 200, "delete: {deleted:?}");
        // Kill once between 1 and half of the removals are in.
        let kill_at = before + rng.range(1, (live as u64 / 2).max(2));
        let started = Instant::now();
        let seen = loop {
            let last = reader.last_seq().await?;
            if last >= kill_at {
                break last - before;
            }
            ensure!(
                started.elapsed() < START_DEADLINE,
                "round {round}: the cascade did not start"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let both = round % 2 == 0;
        let killed: Vec<usize> = if both {
            (0..instances.len()).collect()
        } else {
            vec![rng.index(instances.len())]
        };
        for &i in &killed {
            instances[i].kill();
            summary.kills += 1;
        }
        let at_kill = reader.last_seq().await? - before;
        if at_kill < live as u64 {
            mid_cascade_kills += 1;
        }
        println!(
            "chaos[cascade]: round {round}: killed {} at {seen}..{at_kill} of {live} removals",
            if both {
                "both instances"
            } else {
                "one instance"
            }
        );
        for &i in &killed {
            instances[i].restart().await?;
        }
        let recovered = Instant::now();
        wait_for("every removal of the round", CASCADE_DEADLINE, || async {
            let last = reader.last_seq().await.ok()?;
            (last >= before + live as u64).then_some(())
        })
        .await?;
        summary.recovered("cascade", recovered.elapsed());
    }
    // Both consumers have handled everything: no redelivery is still to come.
    wait_for(
        "the cascade's consumers drained",
        CASCADE_DEADLINE,
        || async {
            let p = Reply::of(http.get(instances[0].url("/projections")))
                .await
                .ok()?
                .json();
            (p["data"][0]["lag"].as_u64()? == 0).then_some(())
        },
    )
    .await?;

    let msgs = reader.all_messages().await?;
    let mut removals: HashMap<&str, Vec<&async_nats::jetstream::message::StreamMessage>> =
        HashMap::new();
    for m in &msgs {
        let id = m
            .subject
            .as_str()
            .strip_prefix("comments.")
            .context("a COMMENTS subject")?;
        if msg_header(m, "Event-Type") == Some("CommentRemoved") {
            removals.entry(id).or_default().push(m);
        }
    }
    let mut lost = 0u64;
    for (id, by_author) in &expected {
        let got = removals.get(id.as_str()).map_or(0, Vec::len);
        match got {
            0 => lost += 1,
            1 => {}
            n => summary.duplicate_effects += n as u64 - 1,
        }
        if let Some([m]) = removals.get(id.as_str()).map(Vec::as_slice) {
            let event = comments::decode(
                msg_header(m, "Event-Type").context("type")?,
                msg_header(m, "Event-Schema")
                    .context("schema")?
                    .parse()
                    .context("schema number")?,
                &m.payload,
            )?;
            let want = if *by_author {
                comments::RemovalReason::Author
            } else {
                comments::RemovalReason::PostDeleted
            };
            ensure!(
                event == comments::Event::Removed { reason: want },
                "comment {id}: {event:?}, wanted {want:?}"
            );
        }
    }
    summary.events_lost = lost;
    summary.events_written = msgs.len() as u64;
    summary.note("mid_cascade_kills", mid_cascade_kills);
    summary.note("comments", expected.len());
    summary.print(&ctx);
    summary.ensure_nothing_lost()?;
    ensure!(
        mid_cascade_kills > 0,
        "no kill landed in the middle of a cascade; the scenario proved nothing"
    );
    for s in &mut instances {
        s.terminate()?;
    }
    Ok(())
}

/// Adds [`COMMENTS_PER_POST`] comments to `post_id` through both instances,
/// [`WRITERS`] at a time; their ids, in no particular order.
async fn add_comments(
    http: &reqwest::Client,
    instances: &[Service],
    post_id: &str,
) -> anyhow::Result<Vec<String>> {
    let urls: Arc<Vec<String>> = Arc::new(
        instances
            .iter()
            .map(|s| s.url(&format!("/posts/{post_id}/comments")))
            .collect(),
    );
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (http, urls) = (http.clone(), urls.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in (w..COMMENTS_PER_POST).step_by(WRITERS) {
                let r = Reply::of(http.post(&urls[i % urls.len()]).json(
                    &json!({"body": format!("comment {i}"), "author_name": format!("w{w}")}),
                ))
                .await?;
                ensure!(r.status == 201, "add: {r:?}");
                ids.push(
                    r.json()["comment_id"]
                        .as_str()
                        .context("comment_id")?
                        .to_string(),
                );
            }
            anyhow::Ok(ids)
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await??);
    }
    Ok(ids)
}
