//! Scenario 6: two command-service processes on one nats-server take
//! concurrent pinned and unpinned updates of the same few posts. Versions
//! stay contiguous, every 200 names a version no other 200 of that post
//! names, and every acknowledged value is in the history at its version.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::ensure;
use e2e_tests::{StreamReader, http_client_with_timeout, start_secured_nats, wait_for};

use crate::checks::{Mirror, verify};
use crate::support::{COMMAND_TIMEOUT, Ctx, Summary, spawn_command};
use crate::workload::{LoadConfig, Mix, Oracle, Outcome, Writers, choose, send_recorded, snapshot};

/// Posts every task updates.
const POSTS: u64 = 5;
/// Tasks; each alternates between the two instances, command by command.
const WRITERS: usize = 8;
/// Updates acknowledged per round before the tasks stop (about 3 s of them).
const UPDATES_PER_ROUND: u64 = 300;
/// How long the tasks may take to get there, and to race at least once.
const WRITE_DEADLINE: Duration = Duration::from_secs(90);
/// Pause between two commands of one task, in ms: close enough to collide.
const PACE_MS: (u64, u64) = (15, 60);

pub async fn scenario(ctx: Ctx) -> anyhow::Result<()> {
    let mut rng = ctx.rng();
    let nats = start_secured_nats().await?;
    let url = nats.url();
    let a = spawn_command(&url, 1, 1).await?;
    let b = spawn_command(&url, 1, 1).await?;
    let cfg = LoadConfig {
        command_urls: vec![a.base_url.clone(), b.base_url.clone()],
        authors: LoadConfig::default_authors(),
        mix: Mix::UPDATES,
        pace_ms: PACE_MS,
        tag: "tc".into(),
        http: http_client_with_timeout(COMMAND_TIMEOUT),
    };
    let oracle = Oracle::shared();
    let creates = LoadConfig {
        mix: Mix {
            create: 1,
            pinned_update: 0,
            unpinned_update: 0,
            delete: 0,
        },
        ..cfg.clone()
    };
    for i in 0..POSTS {
        let plan = choose(&mut rng, &crate::workload::lock(&oracle), &creates, i);
        let outcome = send_recorded(
            &creates,
            &oracle,
            &a.base_url,
            &plan,
            &format!("tc-create-{i}"),
        )
        .await;
        ensure!(
            matches!(outcome, Outcome::Acked { .. }),
            "create {i}: {outcome:?}"
        );
    }

    let writers = Writers::start(&cfg, &oracle, WRITERS, &mut rng);
    // Until enough updates are through, and the instances have raced: a
    // pinned update refused (412) because the other one wrote first.
    let want = POSTS + UPDATES_PER_ROUND * ctx.rounds;
    let raced = wait_for(
        &format!("{want} acknowledged commands and a 412"),
        WRITE_DEADLINE,
        || async {
            let o = crate::workload::lock(&oracle);
            (o.stats.acked >= want && o.stats.precondition_failed > 0).then_some(())
        },
    )
    .await;
    writers.stop().await?;
    raced?;

    let o = snapshot(&oracle);
    let mut summary = Summary::default();
    // The stream as it is: events on each subject, counted, equal the last
    // acknowledged version, each acknowledged command at its version with
    // exactly the values it sent (an update that changed nothing appended
    // nothing, and its ack names the post's event at that version: the
    // reconciliation checks it).
    let mut mirror = Mirror::new(StreamReader::connect(&url).await?);
    let verdict = verify(
        &cfg.http,
        &mut mirror,
        &o,
        None,
        &cfg.authors,
        &HashSet::new(),
    )
    .await?;
    let appended: HashSet<&str> = mirror
        .messages
        .iter()
        .filter_map(|m| e2e_tests::msg_header(m, "Correlation-Id"))
        .collect();
    // Every 200 that appended names a version of its post that no other
    // names.
    let mut versions: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for ack in o
        .acked
        .iter()
        .filter(|a| appended.contains(a.corr.as_str()))
    {
        versions
            .entry(ack.post_id.as_str())
            .or_default()
            .push(ack.version);
    }
    let mut repeated = 0;
    for (post, vs) in &versions {
        let distinct: HashSet<u64> = vs.iter().copied().collect();
        repeated += (vs.len() - distinct.len()) as u64;
        // No unknown outcomes here: the acked versions are exactly 1..=n.
        let n = vs.len() as u64;
        ensure!(
            distinct == (1..=n).collect(),
            "post {post}: acknowledged versions {vs:?} are not 1..={n}"
        );
    }
    for (post, vs) in &versions {
        let want = vs.iter().copied().max().unwrap_or(0);
        let got = verdict.expected.get(*post).map_or(0, |e| e.version);
        ensure!(
            got == want,
            "post {post}: {got} events on its subject, last acknowledged version {want}"
        );
    }
    summary.events_written = o.stats.acked;
    summary.events_lost = verdict.lost;
    summary.duplicate_effects = verdict.duplicates + repeated;
    summary.note("commands", o.stats.sent);
    summary.note("412s", o.stats.precondition_failed);
    summary.note("no_op_updates", verdict.no_ops);
    summary.note("409s", o.stats.conflicts);
    summary.note("stream_events", mirror.messages.len());
    summary.print(&ctx);
    verdict.ensure_clean("with two command instances")?;
    summary.ensure_nothing_lost()?;
    o.ensure_clean_answers(false)?;
    ensure!(
        o.stats.acked > POSTS,
        "no update was acknowledged ({} commands)",
        o.stats.sent
    );
    Ok(())
}
