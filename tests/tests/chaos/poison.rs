//! Scenario 5: poison events published straight onto `posts.<id>`, with a
//! proper envelope except for the one defect each carries. Both projections
//! park exactly those (and republish them to `DLQ`) and go on; the command
//! side refuses to fold a corrupt history, naming the sequence, and stays
//! healthy for every other post.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use async_nats::HeaderMap;
use e2e_tests::{
    Reply, StreamReader, http_client_with_timeout, msg_header, start_secured_nats, subject_for,
};
use serde_json::json;

use crate::checks::{Mirror, verify};
use crate::support::{
    CATCH_UP_DEADLINE, COMMAND_TIMEOUT, Ctx, Service, Summary, projections, read_client, retry,
    run_replay, spawn_command, spawn_query, wait_projections_at, wait_ready,
};
use crate::workload::{
    LoadConfig, Mix, Oracle, Outcome, Plan, SharedOracle, choose, lock, send_recorded, snapshot,
};

/// Posts created before the poison, each a potential victim.
const POSTS_BEFORE: u64 = 10;
/// Normal commands after the poison: the projections must go on.
const COMMANDS_AFTER: u64 = 30;
/// Stream of the parked events, and the subjects the projections use there.
const DLQ_STREAM: &str = "DLQ";
const PROJECTIONS: [&str; 2] = ["post-view", "post-search"];

/// One injected event and what it broke.
struct Poison {
    kind: &'static str,
    post_id: String,
    seq: u64,
}

/// An event to inject: a proper envelope but for one defect.
struct Injection {
    kind: &'static str,
    post_id: String,
    event_type: &'static str,
    schema: &'static str,
    payload: Vec<u8>,
    /// An `Occurred-At` that is not a timestamp.
    broken_envelope: bool,
}

impl Injection {
    fn new(
        kind: &'static str,
        post_id: String,
        event_type: &'static str,
        schema: &'static str,
        payload: Vec<u8>,
    ) -> Self {
        Self {
            kind,
            post_id,
            event_type,
            schema,
            payload,
            broken_envelope: false,
        }
    }
}

/// The envelope a real writer would put on an event.
fn envelope(event_type: &str, schema: &str, expected_last: u64) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", uuid::Uuid::now_v7().to_string().as_str());
    h.insert(
        "Nats-Expected-Last-Subject-Sequence",
        expected_last.to_string().as_str(),
    );
    h.insert("Event-Type", event_type);
    h.insert("Event-Schema", schema);
    h.insert(
        "Occurred-At",
        eventstore::format_rfc3339(time::OffsetDateTime::now_utc()).as_str(),
    );
    h.insert("Correlation-Id", "chaos-poison");
    h.insert("Causation-Id", uuid::Uuid::now_v7().to_string().as_str());
    h
}

/// The stream sequence of the last acknowledged event of `post_id`.
fn last_seq_of(oracle: &SharedOracle, post_id: &str) -> u64 {
    lock(oracle)
        .acked
        .iter()
        .filter(|a| a.post_id == post_id)
        .map(|a| a.seq)
        .max()
        .unwrap_or(0)
}

async fn run_commands(
    cfg: &LoadConfig,
    oracle: &SharedOracle,
    command: &Service,
    rng: &mut crate::support::Rng,
    label: &str,
    n: u64,
) -> anyhow::Result<()> {
    for i in 0..n {
        let plan: Plan = choose(rng, &lock(oracle), cfg, i);
        let corr = format!("{}-{label}-{i}", cfg.tag);
        let outcome = send_recorded(cfg, oracle, &command.base_url, &plan, &corr).await;
        ensure!(
            matches!(outcome, Outcome::Acked { .. } | Outcome::Refused { .. }),
            "{label} command {i} ({plan:?}): {outcome:?}"
        );
    }
    Ok(())
}

pub async fn scenario(ctx: Ctx) -> anyhow::Result<()> {
    let mut rng = ctx.rng();
    let nats = start_secured_nats().await?;
    let url = nats.url();
    let data = ctx.scratch("query")?;
    let command = spawn_command(&url, 1, 1).await?;
    let mut query = spawn_query(&url, data.path(), 1, 1).await?;
    let reads = read_client();
    let reader = StreamReader::connect(&url).await?;
    let cfg = LoadConfig {
        command_urls: vec![command.base_url.clone()],
        authors: LoadConfig::default_authors(),
        mix: Mix::MIXED,
        pace_ms: (0, 0),
        tag: "po".into(),
        http: http_client_with_timeout(COMMAND_TIMEOUT),
    };
    let oracle = Oracle::shared();
    let mut summary = Summary::default();

    // Healthy posts first; only creates, so that every victim is live.
    let creates = LoadConfig {
        mix: Mix {
            create: 1,
            pinned_update: 0,
            unpinned_update: 0,
            delete: 0,
        },
        ..cfg.clone()
    };
    run_commands(
        &creates,
        &oracle,
        &command,
        &mut rng,
        "before",
        POSTS_BEFORE,
    )
    .await?;
    let head = retry("stream head", CATCH_UP_DEADLINE, || reader.last_seq()).await?;
    let before = wait_projections_at(&reads, &query, head, CATCH_UP_DEADLINE).await?;

    // Victims: distinct live posts, picked at random, and one fresh id.
    let mut pool = lock(&oracle).live.clone();
    let mut victim = || pool.remove(rng.index(pool.len()));
    let fresh = uuid::Uuid::now_v7().to_string();
    let update_payload = posts::encode(&posts::Event::Updated {
        title: Some("poisoned".into()),
        content: None,
        author_name: None,
    })
    .2;
    let create_payload = posts::encode(&posts::Event::Created {
        title: "second create".into(),
        content: format!("{} again", crate::workload::COMMON_WORD),
        author_name: "mallory".into(),
    })
    .2;
    let plans = [
        Injection::new(
            "undecodable payload",
            victim(),
            "PostUpdated",
            "2",
            vec![0xff; 9],
        ),
        Injection::new(
            "unknown event type",
            victim(),
            "PostArchived",
            "1",
            Vec::new(),
        ),
        Injection::new(
            "future schema",
            victim(),
            "PostUpdated",
            "99",
            update_payload.clone(),
        ),
        Injection::new(
            "second PostCreated",
            victim(),
            "PostCreated",
            "1",
            create_payload,
        ),
        Injection {
            broken_envelope: true,
            ..Injection::new(
                "broken envelope",
                victim(),
                "PostUpdated",
                "2",
                update_payload.clone(),
            )
        },
        Injection::new(
            "PostUpdated before PostCreated",
            fresh.clone(),
            "PostUpdated",
            "2",
            update_payload,
        ),
    ];
    let mut poisons = Vec::new();
    for i in plans {
        let mut headers = envelope(i.event_type, i.schema, last_seq_of(&oracle, &i.post_id));
        if i.broken_envelope {
            headers.insert("Occurred-At", "yesterday");
        }
        let ack = reader
            .js
            .publish_with_headers(subject_for(&i.post_id), headers, i.payload.into())
            .await?
            .await
            .with_context(|| format!("publish {}", i.kind))?;
        poisons.push(Poison {
            kind: i.kind,
            post_id: i.post_id,
            seq: ack.sequence,
        });
    }
    let injected = poisons.len() as u64;
    // Their histories are corrupt: the load leaves them alone from now on.
    lock(&oracle)
        .live
        .retain(|id| !poisons.iter().any(|p| p.post_id == *id));
    let poison_seqs: HashSet<u64> = poisons.iter().map(|p| p.seq).collect();

    // Later normal events are applied.
    run_commands(&cfg, &oracle, &command, &mut rng, "after", COMMANDS_AFTER).await?;
    let head = retry("stream head", CATCH_UP_DEADLINE, || reader.last_seq()).await?;
    let after = wait_projections_at(&reads, &query, head, CATCH_UP_DEADLINE).await?;
    check_parked(&before, &after, injected)?;
    check_dlq(&reader, &poisons).await?;

    // The command side refuses to fold a corrupt history, naming the sequence.
    for p in &poisons {
        let reply = Reply::of(
            cfg.http
                .patch(command.url(&format!("/posts/{}", p.post_id)))
                .header("X-Correlation-Id", format!("po-refused-{}", p.seq))
                .json(&json!({"title": "after the poison"})),
        )
        .await?;
        let detail = reply.json()["detail"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        ensure!(
            reply.status == 500
                && reply
                    .header("content-type")
                    .is_some_and(|c| c.starts_with("application/problem+json"))
                && detail.contains(&format!("stream sequence {};", p.seq)),
            "PATCH on the post with the {} at seq {}: {} {:?}",
            p.kind,
            p.seq,
            reply.status,
            reply.body
        );
    }
    // ... and stays healthy for every other post.
    run_commands(
        &cfg,
        &oracle,
        &command,
        &mut rng,
        "healthy",
        COMMANDS_AFTER / 2,
    )
    .await?;
    let healthy = lock(&oracle)
        .live
        .iter()
        .find(|id| !poisons.iter().any(|p| p.post_id == **id))
        .cloned()
        .context("a live post without poison")?;
    let outcome = send_recorded(
        &cfg,
        &oracle,
        &command.base_url,
        &Plan {
            post_id: Some(healthy.clone()),
            op: crate::workload::Op::Update {
                title: Some("still fine".into()),
                content: None,
                author: None,
            },
            if_match: None,
        },
        "po-healthy-patch",
    )
    .await;
    ensure!(
        matches!(outcome, Outcome::Acked { .. }),
        "PATCH on healthy post {healthy}: {outcome:?}"
    );
    let ready = Reply::of(cfg.http.get(command.url("/readyz"))).await?;
    ensure!(ready.status == 200, "command /readyz: {ready:?}");

    // The fresh id never existed for the views.
    let (status, body) = crate::support::get_json(
        &reads,
        &query.url(&format!("/posts/{fresh}?include_deleted=true")),
    )
    .await?;
    ensure!(
        status == 404,
        "post {fresh} has only a poison event, yet: {status} {body}"
    );

    // Views equal the oracle (poison skipped); parking survives a SIGKILL.
    let mut mirror = Mirror::new(reader.clone());
    let o = snapshot(&oracle);
    verify(
        &reads,
        &mut mirror,
        &o,
        Some(&query),
        &cfg.authors,
        &poison_seqs,
    )
    .await?
    .ensure_clean("after the poison")?;
    let killed_at = Instant::now();
    query.kill();
    summary.kills += 1;
    query.restart().await?;
    wait_ready(&reads, &query).await?;
    summary.recovered("ready", killed_at.elapsed());
    run_commands(
        &cfg,
        &oracle,
        &command,
        &mut rng,
        "restarted",
        COMMANDS_AFTER / 2,
    )
    .await?;
    let o = snapshot(&oracle);
    let verdict = verify(
        &reads,
        &mut mirror,
        &o,
        Some(&query),
        &cfg.authors,
        &poison_seqs,
    )
    .await?;
    let restarted = projections(&reads, &query).await?;
    check_parked(&before, &restarted, injected)?;
    check_dlq(&reader, &poisons).await?;

    query.terminate()?;
    let replay = run_replay(&url, data.path(), "all", true, None).await?;
    let replay_ok = replay.expect_verified();
    summary.events_written = o.stats.acked;
    summary.events_lost = verdict.lost;
    summary.duplicate_effects = verdict.duplicates;
    summary.note("injected", injected);
    summary.note(
        "parked",
        restarted
            .iter()
            .map(|p| format!("{}:{}", p.name, p.parked))
            .collect::<Vec<_>>()
            .join(","),
    );
    summary.note("stream_events", mirror.messages.len());
    summary.note("rebuild_verified", replay_ok.is_ok());
    summary.print(&ctx);
    verdict.ensure_clean("after the query restart")?;
    summary.ensure_nothing_lost()?;
    o.ensure_clean_answers(false)?;
    replay_ok?;
    data.remove();
    Ok(())
}

/// Each projection parked exactly `injected` more events than before.
fn check_parked(
    before: &[crate::support::ProjectionStatus],
    after: &[crate::support::ProjectionStatus],
    injected: u64,
) -> anyhow::Result<()> {
    for name in PROJECTIONS {
        let b = before.iter().find(|p| p.name == name).context(name)?;
        let a = after.iter().find(|p| p.name == name).context(name)?;
        ensure!(
            a.parked == b.parked + injected,
            "{name} parked {} events, {} before plus {injected} injected expected",
            a.parked,
            b.parked
        );
        ensure!(a.state == "running", "{name} is {}", a.state);
    }
    Ok(())
}

/// `dlq.<projection>.POSTS.<seq>` holds each poison event once, with its origin.
async fn check_dlq(reader: &StreamReader, poisons: &[Poison]) -> anyhow::Result<()> {
    let dlq = retry("get stream DLQ", CATCH_UP_DEADLINE, || async {
        Ok(reader.js.get_stream(DLQ_STREAM).await?)
    })
    .await?;
    for p in poisons {
        for name in PROJECTIONS {
            let subject = format!("dlq.{name}.POSTS.{}", p.seq);
            // Parked events reach the DLQ right after their batch commits.
            let msg = retry(&subject, Duration::from_secs(30), || async {
                Ok(dlq.get_last_raw_message_by_subject(&subject).await?)
            })
            .await
            .with_context(|| format!("{} at seq {} not in the DLQ", p.kind, p.seq))?;
            ensure!(
                msg_header(&msg, "Original-Subject") == Some(subject_for(&p.post_id).as_str())
                    && msg_header(&msg, "Parked-Seq") == Some(p.seq.to_string().as_str()),
                "{subject} has headers {:?}",
                msg.headers
            );
        }
    }
    let info = retry("DLQ info", CATCH_UP_DEADLINE, || async {
        Ok(dlq.get_info().await?)
    })
    .await?;
    let want = poisons.len() as u64 * PROJECTIONS.len() as u64;
    ensure!(
        info.state.messages == want,
        "DLQ holds {} messages, {want} expected (one per projection and poison event)",
        info.state.messages
    );
    Ok(())
}
