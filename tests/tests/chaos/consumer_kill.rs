//! Scenario 1: SIGKILL of the query service at random moments under a mixed
//! write load, restarted on the same data dir each time. Nothing applied
//! twice, nothing skipped, views equal to a rebuild from sequence 1.

use std::collections::HashSet;
use std::time::Instant;

use anyhow::ensure;
use e2e_tests::{StreamReader, http_client_with_timeout, start_nats};

use crate::checks::{Mirror, verify};
use crate::support::{
    COMMAND_TIMEOUT, Ctx, Summary, read_client, run_replay, spawn_command, spawn_query, wait_ready,
};
use crate::workload::{LoadConfig, Mix, Oracle, Writers, snapshot};

/// Writer tasks issuing commands concurrently.
const WRITERS: usize = 8;
/// Query-service kills per round (at least this many in the bounded run).
const KILLS_PER_ROUND: u64 = 10;
/// Random pause between a restart and the next kill, in ms: lets load build
/// up (from 0: some kills land while the service is still catching up).
const BETWEEN_KILLS_MS: (u64, u64) = (0, 1_200);
/// Pause between two commands of one writer, in ms.
const PACE_MS: (u64, u64) = (60, 220);

pub async fn scenario(ctx: Ctx) -> anyhow::Result<()> {
    let mut rng = ctx.rng();
    let nats = start_nats().await?;
    let url = nats.url();
    let data = ctx.scratch("query")?;
    let command = spawn_command(&url, 1, 1).await?;
    let mut query = spawn_query(&url, data.path(), 1, 1).await?;
    let reads = read_client();
    let cfg = LoadConfig {
        command_urls: vec![command.base_url.clone()],
        authors: LoadConfig::default_authors(),
        mix: Mix::MIXED,
        pace_ms: PACE_MS,
        tag: "ck".into(),
        http: http_client_with_timeout(COMMAND_TIMEOUT),
    };
    let oracle = Oracle::shared();
    let writers = Writers::start(&cfg, &oracle, WRITERS, &mut rng);
    let mut summary = Summary::default();

    let kills = KILLS_PER_ROUND.max(ctx.rounds * KILLS_PER_ROUND);
    for _ in 0..kills {
        tokio::time::sleep(rng.millis(BETWEEN_KILLS_MS.0, BETWEEN_KILLS_MS.1)).await;
        let killed_at = Instant::now();
        query.kill();
        summary.kills += 1;
        query.restart().await?;
        wait_ready(&reads, &query).await?;
        summary.recovered("ready", killed_at.elapsed());
    }
    writers.stop().await?;

    let mut mirror = Mirror::new(StreamReader::connect(&url).await?);
    let o = snapshot(&oracle);
    summary.events_written = o.stats.acked;
    summary.note("commands", o.stats.sent);
    summary.note("412s", o.stats.precondition_failed);
    summary.note("409s", o.stats.conflicts);
    let verdict = verify(
        &reads,
        &mut mirror,
        &o,
        Some(&query),
        &cfg.authors,
        &HashSet::new(),
    )
    .await?;
    summary.events_lost = verdict.lost;
    summary.duplicate_effects = verdict.duplicates;
    summary.note("posts", verdict.expected.len());
    summary.note("stream_events", mirror.messages.len());

    // The views equal a rebuild from sequence 1 (offline: the service stops first).
    query.terminate()?;
    let replay = run_replay(&url, data.path(), "all", true, None).await?;
    let replay_ok = replay.expect_verified();
    summary.note("rebuild_verified", replay_ok.is_ok());
    summary.print(&ctx);
    verdict.ensure_clean("after the query-service kills")?;
    summary.ensure_nothing_lost()?;
    o.ensure_clean_answers(false)?;
    replay_ok?;
    ensure!(summary.kills >= kills, "only {} kills", summary.kills);
    data.remove();
    Ok(())
}
