//! Scenario: a projection whose store keeps failing (a full disk), as the
//! hardening review found it: SIGTERM must still stop the service, a replay
//! must fail instead of hanging, the healthy projection must keep following,
//! and a swap that fails after its exchange must leave reads on the index
//! that is live.

use std::time::Instant;

use anyhow::{Context, ensure};
use e2e_tests::{CONDITION_DEADLINE, StreamReader, publish_event, start_secured_nats};
use posts::Event;

use crate::support::{
    Ctx, Summary, get_json, projections, read_client, run_replay, spawn_query, spawn_query_failing,
    wait_projections_at,
};

/// Events written one at a time while post-view fails: each its own batch,
/// several times what a runner's queue holds (32 batches).
const EVENTS_WHILE_FAILING: u64 = 120;

pub async fn scenario(ctx: Ctx) -> anyhow::Result<()> {
    let mut summary = Summary::default();
    let nats = start_secured_nats().await?;
    let url = nats.url();
    let js = StreamReader::connect(&url).await?.js;
    eventstore::provision(&js, &posts::context::stream(1)).await?;
    eventstore::provision(&js, &eventstore::dlq_spec(1)).await?;
    let scratch = ctx.scratch("faults")?;
    let data = scratch.path().join("query");
    let fault = scratch.path().join("disk-full");
    std::fs::write(&fault, b"")?;
    let http = read_client();

    // Findings 2 and 3: post-view fails every batch.
    let mut query =
        spawn_query_failing(&url, &data, &format!("view-apply@{}", fault.display())).await?;
    let mut head = 0;
    for i in 0..EVENTS_WHILE_FAILING {
        let event = Event::Created {
            title: format!("fault {i}"),
            content: "written while post-view fails".into(),
            author_name: "ann".into(),
        };
        head = publish_event(&js, &uuid::Uuid::now_v7().to_string(), &event).await?;
        // post-search must follow each one: its read waits for it (3 s at most).
        let (status, body) = get_json(
            &http,
            &query.url(&format!("/posts/search?q=fault&min_seq={head}&limit=1")),
        )
        .await?;
        ensure!(
            status == 200,
            "post-search did not follow event {head} while post-view failed: {status} {body}"
        );
    }
    let all = projections(&http, &query).await?;
    let view = all
        .iter()
        .find(|p| p.name == "post-view")
        .context("post-view")?;
    let search = all
        .iter()
        .find(|p| p.name == "post-search")
        .context("post-search")?;
    ensure!(view.state == "halted" && view.checkpoint == 0, "{all:?}");
    ensure!(
        search.state == "running" && search.checkpoint == head,
        "{all:?}"
    );

    let started = Instant::now();
    query
        .terminate()
        .context("SIGTERM with a halted projection")?;
    summary.recovered("sigterm_with_a_halted_projection", started.elapsed());

    let started = Instant::now();
    let run = run_replay(
        &url,
        &data,
        "post-view",
        false,
        Some(&format!("view-apply@{}", fault.display())),
    )
    .await?;
    ensure!(
        !run.status.success()
            && run.stderr.contains("halted")
            && run.stderr.contains("simulated storage fault"),
        "a replay whose store keeps failing must fail with the fault: {run:?}"
    );
    summary.recovered("replay_gives_up_on_a_halted_store", started.elapsed());

    // The fault clears: everything is applied once, and equals a rebuild.
    std::fs::remove_file(&fault)?;
    let mut query = spawn_query(&url, &data, 1, 1).await?;
    wait_projections_at(&http, &query, head, CONDITION_DEADLINE).await?;
    run_replay(&url, &data, "all", true, None)
        .await?
        .expect_verified()?;
    query.terminate()?;

    // Finding 7: the swap fails after the exchange; reads must use the index
    // now at the live path, and see what comes next.
    std::fs::write(&fault, b"")?;
    let query = spawn_query_failing(
        &url,
        &data,
        &format!("swap-after-exchange@{}", fault.display()),
    )
    .await?;
    wait_projections_at(&http, &query, head, CONDITION_DEADLINE).await?;
    let run = run_replay(&url, &data, "post-search", false, None).await?;
    ensure!(
        !run.status.success() && run.stderr.contains("refused the swap"),
        "the armed swap fails: {run:?}"
    );
    let id = uuid::Uuid::now_v7().to_string();
    head = publish_event(
        &js,
        &id,
        &Event::Created {
            title: "after the failed install".into(),
            content: "zebracorn".into(),
            author_name: "ann".into(),
        },
    )
    .await?;
    let (status, body) = get_json(
        &http,
        &query.url(&format!("/posts/search?q=zebracorn&min_seq={head}")),
    )
    .await?;
    ensure!(
        status == 200 && body["data"][0]["post_id"] == id.as_str(),
        "a failed install left search reading a removed index: {status} {body}"
    );
    std::fs::remove_file(&fault)?;
    run_replay(&url, &data, "post-search", true, None)
        .await?
        .expect_verified()?;
    wait_projections_at(&http, &query, head, CONDITION_DEADLINE).await?;
    drop(query);
    summary.events_written = head;
    summary.print(&ctx);
    scratch.remove();
    Ok(())
}
