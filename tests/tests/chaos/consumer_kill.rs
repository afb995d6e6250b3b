//! Scenario 1: SIGKILL of the query service under a mixed write load,
//! restarted on the same data dir each time: every other kill at a random
//! moment, the others part-way through a backlog (the service is suspended,
//! a backlog written, the service resumed and killed once `/projections`
//! shows it applying: with post-view itself between two batches, with
//! post-search's latest events not yet committed, or, in a backlog of over
//! 10k events, with post-view holding applied events for a later commit).
//! Nothing applied twice, nothing skipped, views equal to a rebuild from
//! sequence 1.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use e2e_tests::{StreamReader, http_client_with_timeout, start_secured_nats, wait_for};

use crate::checks::{Mirror, verify};
use crate::support::{
    CATCH_UP_DEADLINE, COMMAND_TIMEOUT, Ctx, Rng, Service, Summary, projections, read_client,
    run_replay, spawn_command, spawn_query_with_env, wait_ready,
};
use crate::workload::{
    LoadConfig, Mix, Oracle, Outcome, SharedOracle, Writers, choose, lock, send_recorded, snapshot,
};

/// Where the ranges variant's catch-ups read in ranges, and their length.
const RANGES_FROM_EVENTS: u64 = 2_000;
const RANGE_EVENTS: u64 = 500;
/// Writer tasks issuing commands concurrently.
const WRITERS: usize = 8;
/// Query-service kills per round (at least this many in the bounded run).
const KILLS_PER_ROUND: u64 = 10;
/// Random pause between a restart and the next kill, in ms: lets load build
/// up (from 0: some kills land while the service is still catching up).
const BETWEEN_KILLS_MS: (u64, u64) = (0, 1_200);
/// Pause between two commands of one writer, in ms.
const PACE_MS: (u64, u64) = (60, 220);
/// Backlog sizes (commands) tried in turn for a kill part-way through a
/// backlog, until one is big enough that the kill lands while applying.
const BACKLOG_COMMANDS: [u64; 3] = [600, 2_400, 9_600];
/// The same with post-view itself killed between two of its batches: live,
/// a batch holds up to `RunnerOptions::live().batch_events_max` (2,000).
/// Under 10,000: from that many events to come, post-view holds its
/// changes and commits them near the head, so `/projections` would not
/// show it part-way.
const BACKLOG_COMMANDS_VIEW_MIDWAY: [u64; 2] = [4_000, 8_000];
/// The same with post-view holding what it applied: from 10,000 events to
/// come after a batch (of up to 2,000), until fewer than 500 are.
const BACKLOG_COMMANDS_VIEW_HELD: [u64; 2] = [16_000, 24_000];
/// Commands in flight while a backlog is written.
const BACKLOG_IN_FLIGHT: u64 = 32;
/// Writing a backlog, at most: this, plus [`BACKLOG_DEADLINE_PER_COMMAND`]
/// for each command (a debug build on a loaded 2-core machine).
const BACKLOG_DEADLINE: Duration = Duration::from_secs(60);
const BACKLOG_DEADLINE_PER_COMMAND: Duration = Duration::from_millis(10);

pub async fn scenario(ctx: Ctx) -> anyhow::Result<()> {
    let mut rng = ctx.rng();
    let nats = start_secured_nats().await?;
    let url = nats.url();
    let data = ctx.scratch("query")?;
    let command = spawn_command(&url, 1, 1).await?;
    // The ranges variant: a catch-up from 2,000 events behind reads in
    // ranges of 500 (debug builds only), so kills land in the range phase.
    let in_ranges = ctx.scenario.ends_with("ranges");
    let envs: Vec<(String, String)> = if in_ranges {
        vec![
            (
                "FEED_RANGES_FROM_EVENTS".into(),
                RANGES_FROM_EVENTS.to_string(),
            ),
            ("FEED_RANGE_EVENTS".into(), RANGE_EVENTS.to_string()),
        ]
    } else {
        Vec::new()
    };
    let mut query = spawn_query_with_env(&url, data.path(), &envs).await?;
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
    let mut writers = Writers::start(&cfg, &oracle, WRITERS, &mut rng);
    let mut summary = Summary::default();

    let kills = KILLS_PER_ROUND.max(ctx.rounds * KILLS_PER_ROUND);
    let (mut behind, mut view_midway, mut view_held, mut backlog_commands) =
        (0u64, 0u64, 0u64, 0u64);
    let mut lags = Vec::new();
    for k in 0..kills {
        if k % 2 == 0 {
            tokio::time::sleep(rng.millis(BETWEEN_KILLS_MS.0, BETWEEN_KILLS_MS.1)).await;
            query.kill();
        } else {
            let midway = if k % 8 == 5 {
                Midway::ViewHeld
            } else if k % 4 == 3 {
                Midway::View
            } else {
                Midway::Search
            };
            let sizes: &[u64] = match midway {
                Midway::Search => &BACKLOG_COMMANDS,
                Midway::View => &BACKLOG_COMMANDS_VIEW_MIDWAY,
                Midway::ViewHeld => &BACKLOG_COMMANDS_VIEW_HELD,
            };
            let mut killed = None;
            for (attempt, &n) in sizes.iter().enumerate() {
                backlog_commands += n;
                let tag = format!("{}-b{k}-a{attempt}", cfg.tag);
                let backlog = Backlog {
                    commands: n,
                    midway,
                    tag: &tag,
                };
                // No other writes meanwhile: the backlog's own
                // acknowledgements bound it.
                writers.pause().await;
                let outcome =
                    kill_mid_backlog(&mut query, &reads, &cfg, &oracle, &mut rng, &backlog).await;
                writers.resume();
                killed = outcome?;
                if killed.is_some() {
                    break;
                }
            }
            let Some(lag) = killed else {
                bail!(
                    "posts-query applied backlogs of up to {} commands before /projections \
                     showed it part-way{}; no kill landed mid-backlog",
                    sizes.last().copied().unwrap_or_default(),
                    match midway {
                        Midway::Search => "",
                        Midway::View => " (post-view between batches)",
                        Midway::ViewHeld => " (post-view holding applied events)",
                    }
                );
            };
            behind += 1;
            view_midway += u64::from(midway == Midway::View);
            view_held += u64::from(midway == Midway::ViewHeld);
            lags.push(lag);
        }
        let killed_at = Instant::now();
        summary.kills += 1;
        query.restart().await?;
        wait_ready(&reads, &query).await?;
        summary.recovered("ready", killed_at.elapsed());
    }
    writers.stop().await?;
    summary.note("kills_mid_backlog", behind);
    summary.note("kills_view_midway", view_midway);
    summary.note("kills_view_held", view_held);
    summary.note("lags_at_kill", format!("{lags:?}").replace(' ', ""));
    summary.note("backlog_commands", backlog_commands);

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

    // The ranges variant did what it is for: catch-ups read in ranges.
    let range_phases = query
        .process
        .log()
        .matches("reading a backlog in ranges")
        .count();
    summary.note("range_phases", range_phases);
    if in_ranges {
        ensure!(
            range_phases > 0,
            "no catch-up read in ranges; see {}",
            query.process.log_path().display()
        );
    }

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
    ensure!(
        o.stats.acked > backlog_commands / 2,
        "only {} commands acknowledged; the kills met too little load",
        o.stats.acked
    );
    data.remove();
    Ok(())
}

/// Where a kill part-way through a backlog lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Midway {
    /// post-search short of the backlog's end: its latest events are not
    /// yet committed.
    Search,
    /// post-view itself short of the backlog's end, between two batches.
    View,
    /// post-view far behind, holding events of the backlog it applied and
    /// has not committed.
    ViewHeld,
}

struct Backlog<'a> {
    commands: u64,
    midway: Midway,
    /// Titles, contents and correlation ids carry it.
    tag: &'a str,
}

/// Suspends `query`, writes a backlog of commands through the command
/// service (in the oracle like the writers'; the caller has paused them),
/// resumes it, and SIGKILLs it as soon as `/projections` shows it part-way
/// through: post-view at or past the backlog's first event, and the
/// projection the backlog names short of its last; or, for
/// [`Midway::ViewHeld`], post-view having applied events of the backlog
/// and committed none. Returns how far short post-view's or post-search's
/// checkpoint is, or `None` (no kill) when it was already through at the
/// first look that saw post-view in the backlog.
async fn kill_mid_backlog(
    query: &mut Service,
    reads: &reqwest::Client,
    cfg: &LoadConfig,
    oracle: &SharedOracle,
    rng: &mut Rng,
    backlog: &Backlog<'_>,
) -> anyhow::Result<Option<u64>> {
    let target = if backlog.midway == Midway::Search {
        "post-search"
    } else {
        "post-view"
    };
    query.suspend();
    let written = write_backlog(cfg, oracle, rng, backlog.commands, backlog.tag).await;
    query.resume();
    let Some((first, last)) = written? else {
        bail!(
            "no command of a backlog of {} was acknowledged",
            backlog.commands
        );
    };
    let short = wait_for(
        "posts-query to move into its backlog",
        CATCH_UP_DEADLINE,
        || async {
            let now = projections(reads, query).await.ok()?;
            let entry = |name: &str| now.iter().find(|p| p.name == name);
            let view = entry("post-view")?;
            let at = entry(target)?.checkpoint;
            if backlog.midway == Midway::ViewHeld {
                return if view.checkpoint >= first {
                    Some(0) // committed already: too late
                } else {
                    (view.applied >= first).then_some(last.saturating_sub(view.checkpoint))
                };
            }
            (view.checkpoint >= first).then_some(last.saturating_sub(at))
        },
    )
    .await?;
    if short == 0 {
        return Ok(None);
    }
    query.kill();
    Ok(Some(short))
}

/// `n` commands chosen like the writers' and filed in the oracle,
/// [`BACKLOG_IN_FLIGHT`] at a time. Returns the first and last stream
/// sequence acknowledged, if any was.
async fn write_backlog(
    cfg: &LoadConfig,
    oracle: &SharedOracle,
    rng: &mut Rng,
    n: u64,
    tag: &str,
) -> anyhow::Result<Option<(u64, u64)>> {
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..BACKLOG_IN_FLIGHT {
        let (mut cfg, oracle, mut rng) = (cfg.clone(), oracle.clone(), rng.fork(t));
        // Titles and contents carry the tag: unique per task and command.
        cfg.tag = format!("{tag}-t{t}");
        tasks.spawn(async move {
            let base = &cfg.command_urls[usize::try_from(t).unwrap_or(0) % cfg.command_urls.len()];
            let mut acked: Option<(u64, u64)> = None;
            for i in (t..n).step_by(usize::try_from(BACKLOG_IN_FLIGHT).unwrap_or(1)) {
                let plan = choose(&mut rng, &lock(&oracle), &cfg, i);
                let corr = format!("{}-n{i}", cfg.tag);
                if let Outcome::Acked { seq, .. } =
                    send_recorded(&cfg, &oracle, base, &plan, &corr).await
                {
                    acked = Some(acked.map_or((seq, seq), |(lo, hi)| (lo.min(seq), hi.max(seq))));
                }
            }
            acked
        });
    }
    let deadline =
        BACKLOG_DEADLINE + BACKLOG_DEADLINE_PER_COMMAND * u32::try_from(n).unwrap_or(u32::MAX);
    tokio::time::timeout(deadline, async {
        let mut all: Option<(u64, u64)> = None;
        while let Some(done) = tasks.join_next().await {
            if let Some((lo, hi)) = done.context("backlog writer")? {
                all = Some(all.map_or((lo, hi), |(a, b)| (a.min(lo), b.max(hi))));
            }
        }
        anyhow::Ok(all)
    })
    .await
    .with_context(|| format!("writing a backlog of {n} commands took over {deadline:?}"))?
}
