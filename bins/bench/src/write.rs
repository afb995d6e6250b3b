//! The write side: raw JetStream publishes against `POST /posts` through
//! `posts-command`, on one nats-server.

use std::sync::Arc;

use anyhow::Context;
use async_nats::jetstream;
use bytes::Bytes;
use testkit::{NatsOptions, NatsServer};
use tokio::runtime::Runtime;

use crate::corpus::{self, CreatePool};
use crate::load::{self, OpFuture, Outcome};
use crate::procfs::CpuWatch;
use crate::procfs::PhaseCost;
use crate::report::{Report, Target};
use crate::{
    GATEWAY_SECRET, HTTP_REQUEST_TIMEOUT, Sizes, http1, nats_pid, spawn_command, spawn_gateway,
};

/// In flight for both throughput runs, raw and HTTP: the same window.
pub const THROUGHPUT_IN_FLIGHT: usize = 64;
/// In flight for the create latency run: a moderately busy service.
const LATENCY_IN_FLIGHT: usize = 16;

/// Raw JetStream creates: what `posts-command` appends for `POST /posts`,
/// published directly on `js`.
fn raw_op(
    js: jetstream::Context,
    pool: &CreatePool,
) -> impl Fn(u64) -> OpFuture + Send + Sync + 'static {
    let payloads: Arc<Vec<Bytes>> = Arc::new(pool.payloads.clone());
    let (event_type, schema) = (pool.event_type, pool.schema);
    move |n| {
        let js = js.clone();
        let payload = payloads[usize::try_from(n).unwrap_or(0) % payloads.len()].clone();
        Box::pin(async move {
            let subject = format!("posts.{}", uuid::Uuid::now_v7());
            let headers = corpus::headers(event_type, schema, 0);
            js.publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        })
    }
}

/// `POST /posts` with a pooled body; success is 201. `extra` header lines
/// (a bearer token for the gateway) go into every request.
fn create_op(
    client: &http1::Client,
    pool: &CreatePool,
    extra: &str,
) -> impl Fn(u64) -> OpFuture + Send + Sync + 'static {
    let requests: Arc<Vec<Bytes>> = Arc::new(
        pool.bodies
            .iter()
            .map(|body| client.post_json_with("/posts", body, extra))
            .collect(),
    );
    let client = client.clone();
    move |n| {
        let request = requests[usize::try_from(n).unwrap_or(0) % requests.len()].clone();
        let client = client.clone();
        Box::pin(async move {
            let response = client.send(&request).await?;
            if response.status == 201 {
                Ok(())
            } else {
                Err(format!(
                    "{}: {}",
                    response.status,
                    String::from_utf8_lossy(&response.body[..response.body.len().min(200)])
                ))
            }
        })
    }
}

/// Raw and HTTP create throughput on a fresh nats-server, plus create
/// latency when `with_latency`.
///
/// # Errors
/// When the server or `posts-command` cannot be started.
pub fn run(
    rt: &Runtime,
    report: &mut Report,
    sizes: &Sizes,
    pool: &CreatePool,
    sync_always: bool,
) -> anyhow::Result<()> {
    let (raw_name, http_name) = if sync_always {
        ("raw_publish_pipelined", "command_create_throughput")
    } else {
        (
            "raw_publish_pipelined_nosync",
            "command_create_throughput_nosync",
        )
    };
    let setting = if sync_always {
        "sync_interval: always"
    } else {
        "default sync interval"
    };
    println!("\n== write side, nats-server with {setting}");
    let nats = NatsServer::start_with(&NatsOptions {
        sync_always,
        ..Default::default()
    })
    .context("start nats-server")?;
    let nats_pid = nats_pid(&nats);
    let me = Some(std::process::id());
    let js = rt.block_on(async {
        let client = async_nats::connect(nats.url()).await?;
        let js = jetstream::new(client);
        eventstore::provision(&js, &posts::context::stream(1)).await?;
        anyhow::Ok(js)
    })?;
    let (command, command_url) = spawn_command(&nats.url())?;
    let client = http1::Client::new(&command_url, HTTP_REQUEST_TIMEOUT)?;
    // The gateway in front of the same posts-command (with fsync only: its
    // cost is what it adds to the contract's figures).
    let gateway = if sync_always {
        let (process, url) = spawn_gateway(&command_url)?;
        let client = http1::Client::new(&url, HTTP_REQUEST_TIMEOUT)?;
        let token = gateway::auth::mint(GATEWAY_SECRET, "bench", 3600, None, None)?;
        Some((
            process,
            client,
            format!("Authorization: Bearer {token}\r\n"),
        ))
    } else {
        None
    };

    // Raw and HTTP alternate in short slices, so drift on a shared machine
    // (other processes, the disk's fsync latency) hits both alike.
    let mut raw = Totals::new(raw_name);
    let mut http = Totals::new(http_name);
    let mut through = Totals::new("gateway_create_throughput");
    for _ in 0..sizes.throughput_rounds {
        let watch = CpuWatch::start(&[("bench", me), ("nats-server", nats_pid)]);
        let outcome = rt.block_on(load::timed(
            THROUGHPUT_IN_FLIGHT,
            sizes.throughput_warmup,
            sizes.throughput_slice(),
            raw_op(js.clone(), pool),
        ));
        raw.add(outcome, watch.finish(raw_name));
        let watch = CpuWatch::start(&[
            ("bench", me),
            ("nats-server", nats_pid),
            ("posts-command", command.pid()),
        ]);
        let outcome = rt.block_on(load::timed(
            THROUGHPUT_IN_FLIGHT,
            sizes.throughput_warmup,
            sizes.throughput_slice(),
            create_op(&client, pool, ""),
        ));
        http.add(outcome, watch.finish(http_name));
        if let Some((process, gw, auth)) = &gateway {
            let watch = CpuWatch::start(&[
                ("bench", me),
                ("nats-server", nats_pid),
                ("posts-command", command.pid()),
                ("gateway", process.pid()),
            ]);
            let outcome = rt.block_on(load::timed(
                THROUGHPUT_IN_FLIGHT,
                sizes.throughput_warmup,
                sizes.throughput_slice(),
                create_op(gw, pool, auth),
            ));
            through.add(outcome, watch.finish("gateway_create_throughput"));
        }
    }
    let target = if sync_always { 0.8 } else { 0.4 };
    for (totals, baseline, target) in [
        (&raw, None, None),
        (&http, Some(raw_name), Some(Target::RatioAtLeast(target))),
    ] {
        report.load_costs.push(totals.generator_cost());
        report.add(
            totals.name,
            Some(totals.rate()),
            "events/s",
            baseline,
            target,
            Some(totals.note()),
        );
    }
    report.phase(raw.cost);
    report.phase(http.cost);
    if gateway.is_some() {
        report.load_costs.push(through.generator_cost());
        report.add(
            through.name,
            Some(through.rate()),
            "events/s",
            Some(http_name),
            Some(Target::RatioAtLeast(0.8)),
            Some(through.note()),
        );
        report.phase(through.cost);
    }

    if sync_always {
        // Latency at the throughput run's depth, the peer's
        // `pg_create_latency_at64_*`: every create the slices counted.
        let raw_p99 = load::percentile_ms(&mut raw.latencies, 0.99);
        let note = format!(
            "every create of the {} throughput slices at {THROUGHPUT_IN_FLIGHT} in flight ({} samples); \
             raw JetStream publishes in the same slices: p50 {} / p99 {} ms",
            http.slice_rates.len(),
            http.latencies.len(),
            fmt_ms(load::percentile_ms(&mut raw.latencies, 0.50)),
            fmt_ms(raw_p99),
        );
        report.add(
            "raw_publish_latency_at64_p99",
            raw_p99,
            "ms",
            None,
            None,
            Some(format!("{} samples", raw.latencies.len())),
        );
        report.add(
            "command_create_latency_at64_p50",
            load::percentile_ms(&mut http.latencies, 0.50),
            "ms",
            None,
            None,
            Some(note.clone()),
        );
        report.add(
            "command_create_latency_at64_p99",
            load::percentile_ms(&mut http.latencies, 0.99),
            "ms",
            None,
            None,
            Some(note),
        );

        // Raw and HTTP latency alternate in slices too: on `sync_interval:
        // always` both wait on the disk's fsyncs, so the raw figure says how
        // much of a create's latency the disk alone costs at this depth.
        let rounds = sizes.throughput_rounds.max(1) as u64;
        let (warmup, samples) = (
            sizes.latency_warmup.div_ceil(rounds),
            sizes.latency_samples.div_ceil(rounds),
        );
        let mut raw_latency = load::Outcome::default();
        let mut http_latency = load::Outcome::default();
        let mut http_cost = PhaseCost::named("command_create_latency");
        let mut gateway_latency = load::Outcome::default();
        for _ in 0..rounds {
            raw_latency.absorb(rt.block_on(load::counted(
                LATENCY_IN_FLIGHT,
                warmup,
                samples,
                raw_op(js.clone(), pool),
            )));
            let watch = CpuWatch::start(&[
                ("bench", me),
                ("nats-server", nats_pid),
                ("posts-command", command.pid()),
            ]);
            http_latency.absorb(rt.block_on(load::counted(
                LATENCY_IN_FLIGHT,
                warmup,
                samples,
                create_op(&client, pool, ""),
            )));
            http_cost.absorb(&watch.finish("command_create_latency"));
            if let Some((_, gw, auth)) = &gateway {
                gateway_latency.absorb(rt.block_on(load::counted(
                    LATENCY_IN_FLIGHT,
                    warmup,
                    samples,
                    create_op(gw, pool, auth),
                )));
            }
        }
        report.phase(http_cost);
        let raw_p50 = raw_latency.percentile_ms(0.50);
        let raw_p99 = raw_latency.percentile_ms(0.99);
        let raw_note = latency_note(&raw_latency, rounds, "HTTP");
        let note = format!(
            "{}; raw JetStream publishes in the same run at the same depth: p50 {} / p99 {} ms",
            latency_note(&http_latency, rounds, "raw"),
            fmt_ms(raw_p50),
            fmt_ms(raw_p99),
        );
        report.add(
            "raw_publish_latency_p50",
            raw_p50,
            "ms",
            None,
            None,
            Some(raw_note.clone()),
        );
        report.add(
            "raw_publish_latency_p99",
            raw_p99,
            "ms",
            None,
            None,
            Some(raw_note),
        );
        report.add(
            "command_create_latency_p50",
            http_latency.percentile_ms(0.50),
            "ms",
            None,
            None,
            Some(note.clone()),
        );
        report.add(
            "command_create_latency_p99",
            http_latency.percentile_ms(0.99),
            "ms",
            None,
            Some(Target::ValueAtMost(10.0)),
            Some(note),
        );
        if gateway.is_some() {
            let note = format!(
                "{}; through the gateway (bearer token checked, proxied to the same posts-command)",
                latency_note(&gateway_latency, rounds, "direct")
            );
            report.add(
                "gateway_create_latency_p50",
                gateway_latency.percentile_ms(0.50),
                "ms",
                None,
                None,
                Some(note.clone()),
            );
            report.add(
                "gateway_create_latency_p99",
                gateway_latency.percentile_ms(0.99),
                "ms",
                None,
                None,
                Some(note),
            );
        }
    }
    if sync_always {
        // After the latency runs, which would otherwise follow 4,000 more
        // events on 16 posts.
        hot_updates(rt, report, &client, &command_url, command.pid())?;
    }
    drop(gateway);
    drop(command);
    drop(nats);
    Ok(())
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.2}"))
}

/// Writers racing on the same aggregates, as in the peer's
/// `pg_update_throughput_same_aggregate`: this many tasks...
const HOT_WRITERS: usize = 16;
/// ... on this many posts, each update on one picked at random ...
const HOT_AGGREGATES: usize = 16;
/// ... until this many updates have succeeded.
const HOT_UPDATES: u64 = 4_000;

/// `PATCH /posts/{id}` racing on [`HOT_AGGREGATES`] posts with no
/// `If-Match`: posts-command reloads and decides again on each conflict
/// (`command_conflicts_total`), and a 409 after its retries is retried
/// here, so every update succeeds once.
fn hot_updates(
    rt: &Runtime,
    report: &mut Report,
    client: &http1::Client,
    command_url: &str,
    command_pid: Option<u32>,
) -> anyhow::Result<()> {
    let ids: Vec<String> = rt.block_on(async {
        let mut ids = Vec::new();
        for i in 0..HOT_AGGREGATES {
            let body = serde_json::json!({
                "title": format!("hot post {i}"),
                "content": "raced on",
                "author_name": "bench",
            });
            let r = client
                .send(&client.post_json_with("/posts", body.to_string().as_bytes(), ""))
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            anyhow::ensure!(r.status == 201, "create of a hot post: {}", r.status);
            let v: serde_json::Value = serde_json::from_slice(&r.body)?;
            ids.push(v["post_id"].as_str().unwrap_or_default().to_string());
        }
        anyhow::Ok(ids)
    })?;
    let conflicts_before = rt.block_on(server_conflicts(command_url))?;
    let retried = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let op = {
        let (client, ids, retried) = (client.clone(), Arc::new(ids), retried.clone());
        move |n: u64| -> OpFuture {
            let mut x = n.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            x ^= x >> 29;
            let id = &ids[usize::try_from(x % ids.len() as u64).unwrap_or(0)];
            let body = serde_json::json!({"content": format!("hot update {n}")}).to_string();
            let request =
                client.json_request("PATCH", &format!("/posts/{id}"), body.as_bytes(), "");
            let (client, retried) = (client.clone(), retried.clone());
            Box::pin(async move {
                loop {
                    let r = client.send(&request).await?;
                    match r.status {
                        200 => return Ok(()),
                        409 => {
                            retried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        other => return Err(format!("PATCH: {other}")),
                    }
                }
            })
        }
    };
    let watch = CpuWatch::start(&[("posts-command", command_pid)]);
    let outcome = rt.block_on(load::counted(HOT_WRITERS, 0, HOT_UPDATES, op));
    let cost = watch.finish("command_update_hot_throughput");
    let server = rt.block_on(server_conflicts(command_url))? - conflicts_before;
    let client_retries = retried.load(std::sync::atomic::Ordering::Relaxed);
    #[allow(clippy::cast_precision_loss, reason = "counts are far below 2^52")]
    let per_success = server as f64 / outcome.ok.max(1) as f64;
    let note = format!(
        "{} successful PATCHes (no If-Match), {HOT_WRITERS} tasks on {HOT_AGGREGATES} posts \
         (random pick); {server} conflicts (each reloaded and decided again in posts-command, \
         the figure's numerator), {client_retries} 409s after posts-command's own retries, \
         sent again by the client; {}{}",
        outcome.ok,
        cost.per_event(outcome.rate()),
        outcome
            .error_note()
            .map(|e| format!("; {e}"))
            .unwrap_or_default()
    );
    report.add(
        "command_update_hot_throughput",
        Some(outcome.rate()),
        "updates/s",
        None,
        None,
        Some(note.clone()),
    );
    report.add(
        "command_update_hot_conflicts_per_success",
        Some(per_success),
        "ratio",
        None,
        None,
        Some(note),
    );
    report.phase(cost);
    Ok(())
}

/// posts-command's `command_conflicts_total`, from its `/metrics`.
async fn server_conflicts(command_url: &str) -> anyhow::Result<u64> {
    let text = reqwest::get(format!("{command_url}/metrics"))
        .await?
        .error_for_status()?
        .text()
        .await?;
    let total = text
        .lines()
        .filter(|l| l.starts_with("command_conflicts_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a counter: a whole number, at least 0"
    )]
    Ok(total as u64)
}

/// The note of one side of the alternating latency run.
fn latency_note(outcome: &load::Outcome, rounds: u64, other: &str) -> String {
    format!(
        "{} samples at {LATENCY_IN_FLIGHT} in flight ({:.0}/s), {rounds} slices alternating with the {other} side{}",
        outcome.latencies.len(),
        outcome.rate(),
        outcome
            .error_note()
            .map(|e| format!("; {e}"))
            .unwrap_or_default()
    )
}

/// One side of the alternating throughput run, summed over its slices.
struct Totals {
    name: &'static str,
    ok: u64,
    window_s: f64,
    slice_rates: Vec<f64>,
    errors: Vec<String>,
    cost: PhaseCost,
    /// Every counted operation's latency, over all slices.
    latencies: Vec<std::time::Duration>,
}

impl Totals {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            ok: 0,
            window_s: 0.0,
            slice_rates: Vec::new(),
            errors: Vec::new(),
            cost: PhaseCost::named(name),
            latencies: Vec::new(),
        }
    }

    fn add(&mut self, outcome: Outcome, cost: PhaseCost) {
        self.ok += outcome.ok;
        self.window_s += outcome.window.as_secs_f64();
        self.slice_rates.push(outcome.rate());
        self.errors.extend(outcome.error_note());
        self.cost.absorb(&cost);
        self.latencies.extend(outcome.latencies);
    }

    fn rate(&self) -> f64 {
        #[allow(clippy::cast_precision_loss, reason = "counts are far below 2^52")]
        let ok = self.ok as f64;
        ok / self.window_s.max(f64::MIN_POSITIVE)
    }

    fn note(&self) -> String {
        let slices: Vec<String> = self.slice_rates.iter().map(|r| format!("{r:.0}")).collect();
        let mut note = format!(
            "{THROUGHPUT_IN_FLIGHT} in flight, {} measured slices alternating with the other side ({}/s); {}",
            self.slice_rates.len(),
            slices.join(", "),
            self.cost.per_event(self.rate())
        );
        for e in &self.errors {
            note.push_str("; ");
            note.push_str(e);
        }
        note
    }

    /// What the in-process load generator spent, for the report's "load" field.
    fn generator_cost(&self) -> String {
        let bench = self.cost.cpu_of("bench").unwrap_or(0.0);
        format!(
            "{}: bench process {:.2} cores, {:.0} CPU us per request",
            self.name,
            bench / self.cost.wall_s.max(f64::MIN_POSITIVE),
            bench * 1e6 / (self.rate() * self.cost.wall_s).max(1.0)
        )
    }
}
