//! Scenario 2: crashes at exactly the dangerous instants. The query service
//! aborts right after a redb commit and right before and after a tantivy
//! commit while events flow; the replay tool aborts in the middle of a swap.
//! After each, the service restarted without the failpoint serves exactly
//! what the oracle expects, and a later replay succeeds.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use e2e_tests::{StreamReader, http_client_with_timeout, start_secured_nats, wait_for};

use crate::checks::{Mirror, verify};
use crate::support::{
    COMMAND_TIMEOUT, Ctx, Service, Summary, expect_failpoint_abort, read_client, run_replay,
    spawn_command, spawn_doomed_query, spawn_query, wait_ready,
};
use crate::workload::{LoadConfig, Mix, Oracle, SharedOracle, Writers, lock, snapshot};

/// Writer tasks issuing commands concurrently.
const WRITERS: usize = 8;
/// Pause between two commands of one writer, in ms.
const PACE_MS: (u64, u64) = (60, 220);
/// Failpoints inside the live projections.
const RUNTIME_FAILPOINTS: [&str; 3] = [
    "view-after-commit",
    "search-before-commit",
    "search-after-commit",
];
/// Failpoints inside the offline swap, with the projection replayed.
const SWAP_FAILPOINTS: [(&str, &str); 3] = [
    ("swap-before-rename", "post-view"),
    ("swap-before-rename", "post-search"),
    ("swap-after-exchange", "post-search"),
];
/// How long an armed service may take to reach its failpoint: the next batch
/// or commit, with events flowing.
const FAILPOINT_DEADLINE: Duration = Duration::from_secs(60);
/// Random load between two faults, in ms.
const LOAD_BETWEEN_MS: (u64, u64) = (300, 1_000);
/// Commands acknowledged while `posts-query` is down before an offline swap.
const UNSEEN_MIN: u64 = 10;

struct Env {
    url: String,
    reads: reqwest::Client,
    mirror: Mirror,
    oracle: SharedOracle,
    authors: Vec<String>,
}

impl Env {
    /// Writers paused or stopped: the full oracle check against `query`.
    async fn check(
        &mut self,
        query: &Service,
        when: &str,
        summary: &mut Summary,
    ) -> anyhow::Result<()> {
        let o = snapshot(&self.oracle);
        let verdict = verify(
            &self.reads,
            &mut self.mirror,
            &o,
            Some(query),
            &self.authors,
            &HashSet::new(),
        )
        .await?;
        summary.events_lost += verdict.lost;
        summary.duplicate_effects += verdict.duplicates;
        verdict.ensure_clean(when)
    }

    async fn start_query(&self, data: &Path) -> anyhow::Result<Service> {
        let query = spawn_query(&self.url, data, 1, 1).await?;
        wait_ready(&self.reads, &query).await?;
        Ok(query)
    }
}

pub async fn scenario(ctx: Ctx) -> anyhow::Result<()> {
    // The test is ignored in release builds, where the failpoints are not
    // compiled in; if it is run anyway, it must not pass by doing nothing.
    anyhow::ensure!(
        cfg!(debug_assertions),
        "failpoints exist only in debug builds (run without --release)"
    );
    let mut rng = ctx.rng();
    let nats = start_secured_nats().await?;
    let url = nats.url();
    let data = ctx.scratch("query")?;
    let command = spawn_command(&url, 1, 1).await?;
    let cfg = LoadConfig {
        command_urls: vec![command.base_url.clone()],
        authors: LoadConfig::default_authors(),
        mix: Mix::MIXED,
        pace_ms: PACE_MS,
        tag: "fp".into(),
        http: http_client_with_timeout(COMMAND_TIMEOUT),
    };
    let mut env = Env {
        url: url.clone(),
        reads: read_client(),
        mirror: Mirror::new(StreamReader::connect(&url).await?),
        oracle: Oracle::shared(),
        authors: cfg.authors.clone(),
    };
    let mut query = env.start_query(data.path()).await?;
    let mut writers = Writers::start(&cfg, &env.oracle, WRITERS, &mut rng);
    let mut summary = Summary::default();

    // Crashes inside the live projections, with events flowing.
    for _ in 0..ctx.rounds {
        for fp in RUNTIME_FAILPOINTS {
            tokio::time::sleep(rng.millis(LOAD_BETWEEN_MS.0, LOAD_BETWEEN_MS.1)).await;
            query.terminate()?;
            let mut doomed = spawn_doomed_query(&url, data.path(), fp)?;
            expect_failpoint_abort(&mut doomed, fp, FAILPOINT_DEADLINE)?;
            let aborted_at = Instant::now();
            summary.kills += 1;
            query = env.start_query(data.path()).await?;
            summary.recovered("ready", aborted_at.elapsed());
            writers.pause().await;
            env.check(&query, &format!("after failpoint {fp}"), &mut summary)
                .await?;
            writers.resume();
        }
    }

    // Crashes in the middle of an offline swap.
    for _ in 0..ctx.rounds {
        for (fp, projection) in SWAP_FAILPOINTS {
            query.terminate()?;
            // Events the live store has not seen: the replay must align.
            let acked_before = lock(&env.oracle).stats.acked;
            writers.resume();
            tokio::time::sleep(rng.millis(LOAD_BETWEEN_MS.0, LOAD_BETWEEN_MS.1)).await;
            let unseen = wait_for(
                &format!("{UNSEEN_MIN} commands acknowledged while posts-query is down"),
                FAILPOINT_DEADLINE,
                || async {
                    (lock(&env.oracle).stats.acked >= acked_before + UNSEEN_MIN).then_some(())
                },
            )
            .await;
            writers.pause().await;
            unseen?;
            let crashed = run_replay(&url, data.path(), projection, false, Some(fp)).await?;
            crashed
                .expect_failpoint_abort(fp)
                .with_context(|| format!("replay {projection} with {fp}"))?;
            let aborted_at = Instant::now();
            summary.kills += 1;
            query = env.start_query(data.path()).await?;
            summary.recovered("ready", aborted_at.elapsed());
            env.check(
                &query,
                &format!("after replay {projection} died at {fp}"),
                &mut summary,
            )
            .await?;
            query.terminate()?;
            run_replay(&url, data.path(), projection, true, None)
                .await?
                .expect_verified()
                .with_context(|| format!("replay {projection} after a crash at {fp}"))?;
            query = env.start_query(data.path()).await?;
        }
    }
    writers.stop().await?;

    let o = snapshot(&env.oracle);
    env.check(&query, "at the end", &mut summary).await?;
    query.terminate()?;
    let replay = run_replay(&url, data.path(), "all", true, None).await?;
    let replay_ok = replay.expect_verified();
    summary.events_written = o.stats.acked;
    summary.note("commands", o.stats.sent);
    summary.note("stream_events", env.mirror.messages.len());
    summary.note("rebuild_verified", replay_ok.is_ok());
    summary.print(&ctx);
    summary.ensure_nothing_lost()?;
    o.ensure_clean_answers(false)?;
    replay_ok?;
    data.remove();
    Ok(())
}
