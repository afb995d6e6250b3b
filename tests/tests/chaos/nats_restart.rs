//! Scenario 3: the single nats-server (`sync_interval: always`) SIGKILLed
//! under write load and restarted on the same port and store. Every
//! acknowledged event survives; commands during the outage get 503, never a
//! 500 and never a hang; both services reconnect by themselves.

use std::collections::HashSet;
use std::time::Instant;

use e2e_tests::{
    StreamReader, http_client_with_timeout, restart_nats, start_secured_nats, wait_for,
};

use crate::checks::{Mirror, verify};
use crate::support::{
    CATCH_UP_DEADLINE, COMMAND_TIMEOUT, Ctx, Summary, read_client, retry, run_replay,
    spawn_command, spawn_query, wait_projections_at,
};
use crate::workload::{LoadConfig, Mix, Oracle, Writers, create_until_acked, lock, snapshot};

/// Writer tasks issuing commands concurrently.
const WRITERS: usize = 8;
/// NATS kills per round (at least this many in the bounded run).
const KILLS_PER_ROUND: u64 = 3;
/// Pause between two commands of one writer, in ms.
const PACE_MS: (u64, u64) = (40, 160);
/// Load before each kill, in ms.
const LOAD_BEFORE_KILL_MS: (u64, u64) = (500, 1_500);
/// How long NATS stays down at least, in ms: commands keep arriving
/// meanwhile, and it stays down until one of them has been answered 503.
const OUTAGE_MS: (u64, u64) = (200, 1_200);

pub async fn scenario(ctx: Ctx) -> anyhow::Result<()> {
    let mut rng = ctx.rng();
    let mut nats = start_secured_nats().await?;
    let url = nats.url();
    let data = ctx.scratch("query")?;
    let command = spawn_command(&url, 1, 1).await?;
    let query = spawn_query(&url, data.path(), 1, 1).await?;
    let reads = read_client();
    let reader = StreamReader::connect(&url).await?;
    let cfg = LoadConfig {
        command_urls: vec![command.base_url.clone()],
        authors: LoadConfig::default_authors(),
        mix: Mix::MIXED,
        pace_ms: PACE_MS,
        tag: "nr".into(),
        http: http_client_with_timeout(COMMAND_TIMEOUT),
    };
    let oracle = Oracle::shared();
    let writers = Writers::start(&cfg, &oracle, WRITERS, &mut rng);
    let mut summary = Summary::default();

    let kills = KILLS_PER_ROUND.max(ctx.rounds * KILLS_PER_ROUND);
    for k in 0..kills {
        tokio::time::sleep(rng.millis(LOAD_BEFORE_KILL_MS.0, LOAD_BEFORE_KILL_MS.1)).await;
        let unavailable_before = lock(&oracle).stats.unavailable;
        tokio::task::block_in_place(|| nats.kill());
        summary.kills += 1;
        tokio::time::sleep(rng.millis(OUTAGE_MS.0, OUTAGE_MS.1)).await;
        // NATS stays down until a writer's command has seen the outage.
        wait_for(
            &format!("a 503 during outage {k}"),
            CATCH_UP_DEADLINE,
            || async { (lock(&oracle).stats.unavailable > unavailable_before).then_some(()) },
        )
        .await?;
        restart_nats(&mut nats).await?;
        let back_at = Instant::now();
        // The command service reconnects by itself: a create goes through.
        let (_, took) = create_until_acked(
            &cfg,
            &oracle,
            &command.base_url,
            &mut rng,
            &format!("probe{k}"),
            CATCH_UP_DEADLINE,
        )
        .await?;
        summary.recovered("first_post", took);
        // So does the query service: it applies everything up to the head.
        let head = retry("stream head", CATCH_UP_DEADLINE, || reader.last_seq()).await?;
        wait_projections_at(&reads, &query, head, CATCH_UP_DEADLINE).await?;
        summary.recovered("projections", back_at.elapsed());
    }
    writers.stop().await?;

    let o = snapshot(&oracle);
    let mut mirror = Mirror::new(reader.clone());
    let verdict = verify(
        &reads,
        &mut mirror,
        &o,
        Some(&query),
        &cfg.authors,
        &HashSet::new(),
    )
    .await?;
    summary.events_written = o.stats.acked;
    summary.events_lost = verdict.lost;
    summary.duplicate_effects = verdict.duplicates;
    summary.note("commands", o.stats.sent);
    summary.note("503s", o.stats.unavailable);
    summary.note("unknown_outcomes_applied", verdict.uncertain_applied);
    summary.note("stream_events", mirror.messages.len());
    let mut query = query;
    query.terminate()?;
    let replay = run_replay(&url, data.path(), "all", true, None).await?;
    let replay_ok = replay.expect_verified();
    summary.note("rebuild_verified", replay_ok.is_ok());
    summary.print(&ctx);
    verdict.ensure_clean("after the NATS restarts")?;
    summary.ensure_nothing_lost()?;
    o.ensure_clean_answers(true)?;
    replay_ok?;
    data.remove();
    Ok(())
}
