//! Scenario 4: a 3-node JetStream cluster, the stream with 3 replicas, and the
//! stream leader SIGKILLed under write load. Writes go on once a new leader
//! is elected, no acknowledged event is lost, the restarted node catches up,
//! and the query side keeps up.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use async_nats::jetstream;
use e2e_tests::testkit::NatsCluster;
use e2e_tests::{StreamReader, http_client_with_timeout, wait_for};

use crate::checks::{Mirror, verify};
use crate::support::{
    Ctx, Summary, read_client, retry, run_replay, spawn_command, spawn_query, wait_projections_at,
};
use crate::workload::{LoadConfig, Mix, Oracle, Writers, create_until_acked, snapshot};

/// Writer tasks issuing commands concurrently.
const WRITERS: usize = 8;
/// Node kills per round.
const KILLS_PER_ROUND: u64 = 1;
/// Pause between two commands of one writer, in ms.
const PACE_MS: (u64, u64) = (60, 200);
/// Load before each kill, and while the node is down, in ms.
const LOAD_MS: (u64, u64) = (1_000, 2_500);
/// Client timeout of a command: a leader election can hold a publish for a
/// few of the service's 3 s JetStream timeouts; longer than that is a hang.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// Meta-leader election, stream creation and failover on a busy machine.
const CLUSTER_DEADLINE: Duration = Duration::from_secs(90);
/// Spawn attempts of a service while the cluster is still electing (each
/// attempt fails fast if the stream cannot be provisioned yet).
const SPAWN_ATTEMPTS_MAX: u32 = 10;
/// Timeout of the test's own JetStream requests.
const NATS_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A JetStream context of the test's own, connected to every node.
async fn cluster_jetstream(urls: &[String]) -> anyhow::Result<jetstream::Context> {
    let client = async_nats::ConnectOptions::new()
        .name("chaos-cluster")
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(NATS_REQUEST_TIMEOUT))
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            let attempts = u32::try_from(attempts).unwrap_or(u32::MAX).min(10);
            (Duration::from_millis(50) * attempts).min(Duration::from_millis(500))
        })
        .connect(urls)
        .await
        .with_context(|| format!("connect to {urls:?}"))?;
    let mut js = jetstream::new(client);
    js.set_timeout(NATS_REQUEST_TIMEOUT);
    Ok(js)
}

/// Index of the node named `name` ("<tag>-n<i>", as testkit names them).
fn node_index(name: &str) -> Option<usize> {
    name.rsplit_once("-n")?.1.parse().ok()
}

pub async fn scenario(ctx: Ctx) -> anyhow::Result<()> {
    let mut rng = ctx.rng();
    let mut cluster =
        tokio::task::spawn_blocking(|| NatsCluster::start_with(&e2e_tests::secured_nats_options()))
            .await??;
    let urls = cluster.urls();
    let joined = urls.join(",");
    let js = cluster_jetstream(&urls).await?;
    // JetStream answers once a meta leader is elected.
    retry("JetStream account info", CLUSTER_DEADLINE, || async {
        Ok(js.query_account().await?)
    })
    .await?;
    let data = ctx.scratch("query")?;
    let command = spawn_command(&joined, 3, SPAWN_ATTEMPTS_MAX).await?;
    let query = spawn_query(&joined, data.path(), 3, SPAWN_ATTEMPTS_MAX).await?;
    let reads = read_client();
    let reader = StreamReader {
        js: js.clone(),
        name: e2e_tests::STREAM.to_string(),
    };
    let cfg = LoadConfig {
        command_urls: vec![command.base_url.clone()],
        authors: LoadConfig::default_authors(),
        mix: Mix::MIXED,
        pace_ms: PACE_MS,
        tag: "cl".into(),
        http: http_client_with_timeout(COMMAND_TIMEOUT),
    };
    let oracle = Oracle::shared();
    create_until_acked(
        &cfg,
        &oracle,
        &command.base_url,
        &mut rng,
        "first",
        CLUSTER_DEADLINE,
    )
    .await?;
    let info = retry("stream info", CLUSTER_DEADLINE, || reader.info()).await?;
    ensure!(
        info.config.num_replicas == 3,
        "stream POSTS has {} replicas, want 3",
        info.config.num_replicas
    );

    let writers = Writers::start(&cfg, &oracle, WRITERS, &mut rng);
    let mut summary = Summary::default();
    let mut kill_times = Vec::new();
    for k in 0..KILLS_PER_ROUND.max(ctx.rounds * KILLS_PER_ROUND) {
        tokio::time::sleep(rng.millis(LOAD_MS.0, LOAD_MS.1)).await;
        // The victim is the stream leader, never a guess: between elections
        // the stream may have none for a moment.
        let (leader, victim) = wait_for("a stream leader", CLUSTER_DEADLINE, || async {
            let leader = reader.info().await.ok()?.cluster?.leader?;
            let victim = node_index(&leader)?;
            Some((leader, victim))
        })
        .await?;
        summary.note("killed", leader);
        tokio::task::block_in_place(|| cluster.kill(victim));
        let killed_at = Instant::now();
        kill_times.push(killed_at);
        summary.kills += 1;
        // Writes go on once the stream has a new leader.
        let (_, took) = create_until_acked(
            &cfg,
            &oracle,
            &command.base_url,
            &mut rng,
            &format!("failover{k}"),
            CLUSTER_DEADLINE,
        )
        .await?;
        summary.recovered("write_after_kill", took);
        tokio::time::sleep(rng.millis(LOAD_MS.0, LOAD_MS.1)).await;

        tokio::task::block_in_place(|| cluster.restart(victim))?;
        let restarted_at = Instant::now();
        let name = format!("-n{victim}");
        wait_for(
            &format!("node n{victim} current again"),
            CLUSTER_DEADLINE,
            || async {
                let info = reader.info().await.ok()?;
                let cluster = info.cluster?;
                let is_leader = cluster
                    .leader
                    .as_deref()
                    .is_some_and(|l| l.ends_with(&name));
                let current = cluster
                    .replicas
                    .iter()
                    .any(|p| p.name.ends_with(&name) && p.current && !p.offline);
                (is_leader || current).then_some(())
            },
        )
        .await?;
        summary.recovered("node_current", restarted_at.elapsed());
        let head = retry("stream head", CLUSTER_DEADLINE, || reader.last_seq()).await?;
        wait_projections_at(&reads, &query, head, CLUSTER_DEADLINE).await?;
        summary.recovered("projections", killed_at.elapsed());
    }
    writers.stop().await?;

    // Every replica holds everything: all current, none lagging.
    wait_for("all replicas current, lag 0", CLUSTER_DEADLINE, || async {
        let info = reader.info().await.ok()?;
        let cluster = info.cluster?;
        (cluster.leader.is_some()
            && cluster.replicas.len() == 2
            && cluster
                .replicas
                .iter()
                .all(|p| p.current && !p.offline && p.lag.unwrap_or(0) == 0))
        .then_some(())
    })
    .await?;

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
    // The writers' own acks after each kill: the probe that waits for the
    // failover is acknowledged after the kill by construction.
    let acked_after_kill = kill_times
        .iter()
        .map(|t| {
            o.acked
                .iter()
                .filter(|a| a.at > *t && !a.corr.contains("-failover"))
                .count()
        })
        .min()
        .unwrap_or(0);
    summary.events_written = o.stats.acked;
    summary.events_lost = verdict.lost;
    summary.duplicate_effects = verdict.duplicates;
    summary.note("commands", o.stats.sent);
    summary.note("503s", o.stats.unavailable);
    summary.note("acked_after_kill", acked_after_kill);
    summary.note("unknown_outcomes_applied", verdict.uncertain_applied);
    summary.note("stream_events", mirror.messages.len());
    let mut query = query;
    query.terminate()?;
    let replay = run_replay(&joined, data.path(), "all", true, None).await?;
    let replay_ok = replay.expect_verified();
    summary.note("rebuild_verified", replay_ok.is_ok());
    summary.print(&ctx);
    verdict.ensure_clean("after the node kills")?;
    summary.ensure_nothing_lost()?;
    o.ensure_clean_answers(true)?;
    ensure!(
        acked_after_kill > 0,
        "the writers had no write acknowledged after a node kill"
    );
    replay_ok?;
    data.remove();
    Ok(())
}
