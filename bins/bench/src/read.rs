//! The read side on one nats-server: a backlog written with raw publishes,
//! the raw ordered drain, `posts-query` catching up from an empty data dir,
//! search and read-your-writes latency, then the replay tool offline.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use reqwest::header::CONTENT_TYPE;
use serde_json::Value;
use testkit::{NatsOptions, NatsServer, ServiceProcess};
use tokio::runtime::Runtime;

use crate::corpus::{self, CreatePool, Layout, Vocabulary};
use crate::load::{self, OpFuture, percentile_ms};
use crate::procfs::{self, CpuWatch, PhaseCost};
use crate::report::{Report, Target};
use crate::{Sizes, http_client, nats_pid, replay, spawn_command};

/// Publishes in flight while writing the backlog: deep enough to keep the
/// server busy, far below the client's 5 000 pending-ack limit.
const BACKLOG_IN_FLIGHT: usize = 1024;
/// The pull batch `posts-query` follows the stream with: the raw drain uses
/// the runner's own consumer config, so it reads the way the service does.
fn drain_pull_batch_max() -> i64 {
    projection::RunnerOptions::live().pull_batch_max
}
/// How often memory and liveness are looked at during catch-up, and
/// readiness after a restart (measurement, not synchronisation).
pub(crate) const CATCHUP_POLL: Duration = Duration::from_millis(50);
/// A catch-up read with `min_seq` waits at most 3 s in the service, then
/// answers 503; one that takes longer than this is asked again.
const MIN_SEQ_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Until `posts-query` listens (a few ms after its spawn), catch-up reads
/// are refused; they are retried this often.
const CONNECT_RETRY: Duration = Duration::from_millis(2);
/// In flight for search latency.
const SEARCH_IN_FLIGHT: usize = 8;
/// Read-your-writes samples discarded while connections warm up.
const VISIBILITY_WARMUP: usize = 10;
/// How long the services may take to report ready after a restart.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// A search query's seed: fixed, so every run asks the same questions.
const QUERY_SEED: u64 = 0x5ea2c4;

const POST_VIEW: &str = "post-view";
const POST_SEARCH: &str = "post-search";

/// Writes the backlog round by round; returns the stream's last sequence.
async fn write_backlog(nats_url: &str, vocab: &Vocabulary, layout: Layout) -> anyhow::Result<u64> {
    let client = async_nats::connect(nats_url).await?;
    let js = jetstream::new(client);
    eventstore::provision(&js, &posts::context::stream(1)).await?;
    // The stream sequence of each post's last event: its next expected sequence.
    let mut last_seq = vec![0u64; usize::try_from(layout.posts)?];
    let mut stream_last = 0;
    for round in 0..layout.rounds() {
        let mut in_flight = FuturesUnordered::new();
        for i in 0..layout.posts_in_round(round) {
            while in_flight.len() >= BACKLOG_IN_FLIGHT {
                let (idx, seq) = next_ack(&mut in_flight).await?;
                last_seq[idx] = seq;
                stream_last = stream_last.max(seq);
            }
            let idx = usize::try_from(i)?;
            let event = layout.event(vocab, i, round);
            let (event_type, schema, payload) = posts::encode(&event);
            let headers = corpus::headers(event_type, schema, last_seq[idx]);
            // Post ids are UUIDs like the command service's, derived from the index.
            let subject = format!("posts.{}", post_id(i));
            let ack = js
                .publish_with_headers(subject, headers, payload.into())
                .await
                .with_context(|| format!("publish event of post {i} in round {round}"))?;
            in_flight.push(async move { (idx, ack.await) });
        }
        while !in_flight.is_empty() {
            let (idx, seq) = next_ack(&mut in_flight).await?;
            last_seq[idx] = seq;
            stream_last = stream_last.max(seq);
        }
    }
    Ok(stream_last)
}

type AckResult = (
    usize,
    Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
);

async fn next_ack<F>(in_flight: &mut FuturesUnordered<F>) -> anyhow::Result<(usize, u64)>
where
    F: std::future::Future<Output = AckResult>,
{
    match in_flight.next().await {
        Some((idx, Ok(ack))) => Ok((idx, ack.sequence)),
        Some((idx, Err(e))) => bail!("publish of post index {idx} failed: {e}"),
        None => bail!("no publish in flight"),
    }
}

/// A stable UUID-shaped id for backlog post `i`.
fn post_id(i: u64) -> uuid::Uuid {
    uuid::Uuid::from_u64_pair(0x0190_0000_0000_7000 | (i >> 48), 0x8000_0000_0000_0000 | i)
}

/// Writes `comments` CommentAdded events to stream `COMMENTS` (created
/// here, as comments-command would), spread over the backlog's first
/// `posts` posts and five authors; returns the stream's last sequence.
pub(crate) async fn write_comments(
    nats_url: &str,
    posts: u64,
    comments: u64,
) -> anyhow::Result<u64> {
    let client = async_nats::connect(nats_url).await?;
    let js = jetstream::new(client);
    eventstore::provision(&js, &comments::context::stream(1)).await?;
    let mut in_flight = FuturesUnordered::new();
    let mut last = 0;
    for i in 0..comments {
        while in_flight.len() >= BACKLOG_IN_FLIGHT {
            let (_, seq) = next_ack(&mut in_flight).await?;
            last = last.max(seq);
        }
        let post = post_id(i % posts.max(1)).to_string();
        let event = comments::Event::Added {
            post_id: post.clone(),
            body: format!("comment {i}"),
            author_name: format!("reader-{}", i % 5),
        };
        let (event_type, schema, payload) = comments::encode(&event);
        let headers = corpus::headers(event_type, schema, 0);
        let subject = format!("comments.{post}.{}", post_id(i));
        let ack = js
            .publish_with_headers(subject, headers, payload.into())
            .await
            .with_context(|| format!("publish comment {i}"))?;
        in_flight.push(async move { (0usize, ack.await) });
    }
    while !in_flight.is_empty() {
        let (_, seq) = next_ack(&mut in_flight).await?;
        last = last.max(seq);
    }
    Ok(last)
}

/// Reads the whole stream with an ordered consumer, doing nothing with the
/// messages; returns events per second.
async fn ordered_drain(nats_url: &str, last_seq: u64) -> anyhow::Result<f64> {
    let client = async_nats::connect(nats_url).await?;
    let js = jetstream::new(client);
    let stream = js.get_stream("POSTS").await?;
    let started = Instant::now();
    let consumer = stream
        .create_consumer(projection::follower_config(1, drain_pull_batch_max()))
        .await?;
    let mut messages = consumer.messages().await?;
    // No deletes are allowed on the stream: sequences 1..=last_seq are all there.
    let mut n = 0u64;
    while n < last_seq {
        match messages.next().await {
            Some(Ok(_)) => n += 1,
            Some(Err(e)) => bail!("ordered consumer failed after {n} messages: {e}"),
            None => bail!("ordered consumer ended after {n} messages"),
        }
    }
    #[allow(
        clippy::cast_precision_loss,
        reason = "event counts are far below 2^52"
    )]
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// The stream's last sequence, as the server says.
async fn stream_last_seq(nats_url: &str) -> anyhow::Result<u64> {
    let client = async_nats::connect(nats_url).await?;
    let js = jetstream::new(client);
    let mut stream = js.get_stream("POSTS").await?;
    Ok(stream.info().await?.state.last_sequence)
}

/// When each projection reached the target, and memory seen on the way.
struct CatchUp {
    per_projection: HashMap<String, Duration>,
    done: Option<Duration>,
    rss_peak_kib: Option<u64>,
    /// Highest `RssAnon` sampled: memory of the process's own, without the
    /// index files it maps (page cache, which the kernel takes back under
    /// pressure). A floor: sampled every poll.
    anon_peak_kib: Option<u64>,
    error: Option<String>,
}

/// Waits until both projections have made `target_seq` visible, timed by
/// the product's own read-your-writes reads: a listing and a search, each
/// with `min_seq`, answer the moment their projection reaches it (polling
/// `/projections` every 50 ms made each end 25 ms late on average). Memory
/// and liveness are sampled meanwhile.
async fn watch_catch_up(
    client: &reqwest::Client,
    query_url: &str,
    pid: u32,
    target_seq: u64,
    started: Instant,
    deadline: Duration,
) -> CatchUp {
    let mut out = CatchUp {
        per_projection: HashMap::new(),
        done: None,
        rss_peak_kib: None,
        anon_peak_kib: None,
        error: None,
    };
    let reads = [
        (
            POST_VIEW,
            format!("{query_url}/posts?limit=1&min_seq={target_seq}"),
        ),
        (
            POST_SEARCH,
            format!("{query_url}/posts/search?q=catchup&limit=1&min_seq={target_seq}"),
        ),
    ];
    let mut waits: Vec<_> = reads
        .into_iter()
        .map(|(name, url)| {
            let client = client.clone();
            (
                name,
                tokio::spawn(async move { visible_at(&client, &url, started, deadline).await }),
            )
        })
        .collect();
    let mut rss_sampled_max = 0;
    let mut ticks = tokio::time::interval(CATCHUP_POLL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if !procfs::is_running(pid) {
            out.error = Some("posts-query exited during catch-up".into());
            break;
        }
        rss_sampled_max = rss_sampled_max.max(procfs::status_kib(pid, "VmRSS").unwrap_or(0));
        if let Some(anon) = procfs::status_kib(pid, "RssAnon") {
            out.anon_peak_kib = Some(out.anon_peak_kib.unwrap_or(0).max(anon));
        }
        let mut still_waiting = Vec::new();
        for (name, wait) in waits {
            if !wait.is_finished() {
                still_waiting.push((name, wait));
                continue;
            }
            match wait.await.map_err(|e| e.to_string()).and_then(|r| r) {
                Ok(at) => {
                    out.per_projection.insert(name.to_string(), at);
                }
                Err(e) => out.error = Some(format!("{name}: {e}")),
            }
        }
        waits = still_waiting;
        if out.error.is_some() {
            break;
        }
        if waits.is_empty() {
            out.done = out.per_projection.values().max().copied();
            break;
        }
    }
    for (_, wait) in waits {
        wait.abort();
    }
    // VmHWM is the true peak; the samples are a floor in case it is unreadable.
    out.rss_peak_kib =
        procfs::status_kib(pid, "VmHWM").or((rss_sampled_max > 0).then_some(rss_sampled_max));
    out
}

/// When a read of `url` (carrying `min_seq`) first answers 200, since
/// `started`. Until the service listens, the connection is refused: try
/// again shortly. A 503 is the service's bounded wait running out: ask again.
async fn visible_at(
    client: &reqwest::Client,
    url: &str,
    started: Instant,
    deadline: Duration,
) -> Result<Duration, String> {
    loop {
        if started.elapsed() > deadline {
            return Err(format!("not caught up after {deadline:?}"));
        }
        match client.get(url).timeout(MIN_SEQ_READ_TIMEOUT).send().await {
            Ok(resp) if resp.status().is_success() => return Ok(started.elapsed()),
            Ok(resp) if resp.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {}
            Ok(resp) => return Err(format!("{url} answered {}", resp.status())),
            Err(e) if e.is_connect() => tokio::time::sleep(CONNECT_RETRY).await,
            Err(e) if e.is_timeout() => {}
            Err(e) => return Err(format!("{url}: {e}")),
        }
    }
}

async fn wait_ready(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if let Ok(resp) = client.get(format!("{url}/readyz")).send().await
            && resp.status().is_success()
        {
            return Ok(());
        }
        if started.elapsed() > READY_DEADLINE {
            bail!("{url}/readyz not 200 after {READY_DEADLINE:?}");
        }
        tokio::time::sleep(CATCHUP_POLL).await;
    }
}

fn search_op(
    client: reqwest::Client,
    query_url: &str,
    queries: Arc<Vec<String>>,
    hits: Arc<AtomicU64>,
) -> impl Fn(u64) -> OpFuture + Send + Sync + 'static {
    let base = format!("{query_url}/posts/search?q=");
    move |n| {
        let q = &queries[usize::try_from(n).unwrap_or(0) % queries.len()];
        // Queries are lowercase ASCII words and one space: only the space needs escaping.
        let request = client.get(format!("{base}{}", q.replace(' ', "%20")));
        let hits = hits.clone();
        Box::pin(async move {
            let response = request.send().await.map_err(|e| e.to_string())?;
            let status = response.status();
            let body = response.bytes().await.map_err(|e| e.to_string())?;
            if status != reqwest::StatusCode::OK {
                return Err(format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ));
            }
            let total = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["total"].as_u64())
                .unwrap_or(0);
            hits.fetch_add(total, Ordering::Relaxed);
            Ok(())
        })
    }
}

/// Sequential create, then read with `min_seq` right after the ack; the
/// latency is from the ack to the 200.
async fn visibility(
    client: &reqwest::Client,
    command_url: &str,
    query_url: &str,
    pool: &CreatePool,
    samples: usize,
) -> (Vec<Duration>, u64, Option<String>) {
    let mut latencies = Vec::with_capacity(samples);
    let mut errors = 0u64;
    let mut first_error = None;
    for i in 0..samples + VISIBILITY_WARMUP {
        let body = pool.bodies[i % pool.bodies.len()].clone();
        let result: Result<Duration, String> = async {
            let response = client
                .post(format!("{command_url}/posts"))
                .header(CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if response.status() != reqwest::StatusCode::CREATED {
                return Err(format!("create answered {}", response.status()));
            }
            let ack: Value = response.json().await.map_err(|e| e.to_string())?;
            let acked = Instant::now();
            let id = ack["post_id"].as_str().ok_or("ack without post_id")?;
            let seq = ack["seq"].as_u64().ok_or("ack without seq")?;
            let read = client
                .get(format!("{query_url}/posts/{id}?min_seq={seq}"))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let status = read.status();
            let _ = read.bytes().await;
            if status == reqwest::StatusCode::OK {
                Ok(acked.elapsed())
            } else {
                Err(format!("read with min_seq={seq} answered {status}"))
            }
        }
        .await;
        if i < VISIBILITY_WARMUP {
            continue;
        }
        match result {
            Ok(d) => latencies.push(d),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    (latencies, errors, first_error)
}

/// One catch-up of `posts-query` from an empty data dir.
struct CatchUpRound {
    caught: CatchUp,
    cost: PhaseCost,
    /// The raw drain of the same round, run just before it.
    drain: Option<f64>,
}

impl CatchUpRound {
    fn rate(&self, events: u64) -> Option<f64> {
        self.caught.done.map(|t| per_sec(events, t))
    }

    /// CPU per event, when each projection was done, and any error.
    fn details(&self, events: u64) -> String {
        let mut parts = Vec::new();
        if let Some(rate) = self.rate(events) {
            parts.push(self.cost.per_event(rate));
        }
        for name in [POST_VIEW, POST_SEARCH] {
            if let Some(t) = self.caught.per_projection.get(name) {
                parts.push(format!("{name} done at {:.1} s", t.as_secs_f64()));
            }
        }
        if let Some(e) = &self.caught.error {
            parts.push(e.clone());
        }
        parts.join("; ")
    }
}

/// The `posts-query` of a catch-up round, still running.
struct LiveQuery {
    query: ServiceProcess,
    data: tempfile::TempDir,
    url: String,
    pid: u32,
}

/// Spawns `posts-query` on an empty data dir and times it until both
/// projections have made `last_seq` visible; the cost is named by `round`.
fn catch_up(
    rt: &Runtime,
    client: &reqwest::Client,
    nats_url: &str,
    last_seq: u64,
    sizes: &Sizes,
    nats_pid: Option<u32>,
    round: usize,
) -> anyhow::Result<(CatchUp, PhaseCost, LiveQuery)> {
    let data = testkit::temp_dir("bench-query")?;
    let port = testkit::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let query = spawn_query(nats_url, data.path(), port)?;
    let pid = query.pid().context("posts-query has no pid")?;
    let watch = CpuWatch::start(&[
        ("bench", Some(std::process::id())),
        ("nats-server", nats_pid),
        ("posts-query", Some(pid)),
    ]);
    let mut caught = rt.block_on(watch_catch_up(
        client,
        &url,
        pid,
        last_seq,
        started,
        sizes.catch_up_deadline(),
    ));
    let cost = watch.finish(&format!("projection_catchup round {round}"));
    if let Some(e) = &mut caught.error {
        e.push_str(&format!(" (log: {})", query.log_path().display()));
    }
    Ok((
        caught,
        cost,
        LiveQuery {
            query,
            data,
            url,
            pid,
        },
    ))
}

/// `projection_catchup`'s value (its best round; none if any round failed)
/// and note.
fn catch_up_summary(rounds: &[CatchUpRound], events: u64) -> (Option<f64>, String) {
    let rates: Vec<f64> = rounds.iter().filter_map(|r| r.rate(events)).collect();
    let mut note = format!(
        "{events} events from an empty data dir, timed from process spawn; best of {} rounds ({}); \
         the ratio is of the two bests, which may come from different rounds",
        rounds.len(),
        join_rates(&rates)
    );
    let ratios: Vec<String> = rounds
        .iter()
        .map(|r| match (r.rate(events), r.drain) {
            (Some(c), Some(d)) => format!("{:.3}", c / d),
            _ => "-".to_string(),
        })
        .collect();
    note.push_str(&format!(
        "; each round against its own drain, run just before it: {}",
        ratios.join(", ")
    ));
    let best = rounds
        .iter()
        .filter(|r| r.caught.done.is_some())
        .min_by_key(|r| r.caught.done);
    if let Some(r) = best {
        note.push_str(&format!("; best round: {}", r.details(events)));
    }
    let failed = rounds.iter().find(|r| r.caught.done.is_none());
    if let Some(r) = failed {
        note.push_str(&format!("; a round failed: {}", r.details(events)));
    }
    let value = if failed.is_some() {
        None
    } else {
        best.and_then(|r| r.rate(events))
    };
    (value, note)
}

fn join_rates(rates: &[f64]) -> String {
    rates
        .iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn spawn_query(nats_url: &str, data_dir: &Path, port: u16) -> anyhow::Result<ServiceProcess> {
    ServiceProcess::spawn(
        "posts-query",
        &[
            "--nats-url".into(),
            nats_url.to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--replicas".into(),
            "1".into(),
        ],
        &[],
        // Catch-up is timed from the spawn: do not wait for the listener here.
        0,
    )
}

#[allow(
    clippy::cast_precision_loss,
    reason = "event counts are far below 2^52"
)]
fn per_event_us(cpu_s: f64, events: u64) -> f64 {
    cpu_s * 1e6 / (events.max(1) as f64)
}

#[allow(
    clippy::cast_precision_loss,
    reason = "event counts are far below 2^52"
)]
pub(crate) fn per_sec(events: u64, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64()
}

/// Everything on the read side; metrics that cannot be measured are recorded
/// as null with a note.
///
/// # Errors
/// When the server cannot be started or the backlog cannot be written.
#[allow(
    clippy::too_many_lines,
    reason = "one phase after the other, reads best top to bottom"
)]
pub fn run(
    rt: &Runtime,
    report: &mut Report,
    sizes: &Sizes,
    vocab: &Vocabulary,
    pool: &CreatePool,
    catch_up_only: bool,
) -> anyhow::Result<()> {
    println!(
        "\n== read side, nats-server with the default sync interval ({} events, {} posts)",
        sizes.events, sizes.posts
    );
    let nats = NatsServer::start_with(&NatsOptions {
        sync_always: false,
        ..Default::default()
    })
    .context("start nats-server")?;
    let url = nats.url();
    let nats_pid = nats_pid(&nats);
    let me = Some(std::process::id());
    let layout = Layout {
        events: sizes.events,
        posts: sizes.posts,
    };

    let watch = CpuWatch::start(&[("bench", me), ("nats-server", nats_pid)]);
    let last_seq = rt.block_on(write_backlog(&url, vocab, layout))?;
    let cost = watch.finish("backlog_write");
    report.add(
        "backlog_write",
        Some(per_sec(last_seq, Duration::from_secs_f64(cost.wall_s))),
        "events/s",
        None,
        None,
        Some(format!(
            "{last_seq} events ({} posts) by raw publishes, {BACKLOG_IN_FLIGHT} in flight; setup, not a target",
            sizes.posts
        )),
    );
    report.phase(cost);

    // Raw drains and catch-ups alternate, so that both see the same phases of
    // the shared machine, and each reports its best round: the drain as the
    // ceiling, catch-up the same way. The last round's `posts-query` stays
    // up for the reads below.
    let client = http_client()?;
    let mut drain_error = None;
    let mut rounds: Vec<CatchUpRound> = Vec::new();
    let mut live: Option<LiveQuery> = None;
    for round in 1..=sizes.catchup_rounds {
        if let Some(mut previous) = live.take()
            && let Err(e) = previous.query.terminate(Duration::from_secs(30))
        {
            println!("  posts-query did not stop cleanly: {e:#}");
        }
        let watch = CpuWatch::start(&[("bench", me), ("nats-server", nats_pid)]);
        let drain = match rt.block_on(ordered_drain(&url, last_seq)) {
            Ok(rate) => {
                println!("  round {round}: raw_ordered_drain = {rate:.0} events/s");
                Some(rate)
            }
            Err(e) => {
                drain_error = Some(format!("{e:#}"));
                None
            }
        };
        report.phase(watch.finish(&format!("raw_ordered_drain round {round}")));
        let (caught, cost, query) = catch_up(rt, &client, &url, last_seq, sizes, nats_pid, round)?;
        let run = CatchUpRound {
            caught,
            cost,
            drain,
        };
        report.phase(run.cost.clone());
        println!(
            "  round {round}: projection_catchup = {}",
            run.rate(last_seq).map_or_else(
                || "failed".to_string(),
                |rate| format!("{rate:.0} events/s; {}", run.details(last_seq))
            )
        );
        // The runners' own account of where catch-up time went.
        for line in query
            .query
            .log()
            .lines()
            .filter(|l| l.contains("caught up"))
        {
            println!("  posts-query: {}", line.trim());
        }
        let failed = run.caught.done.is_none();
        rounds.push(run);
        live = Some(query);
        if failed {
            break;
        }
    }
    let Some(LiveQuery {
        mut query,
        data,
        url: query_url,
        pid: query_pid,
    }) = live
    else {
        bail!("no catch-up round ran");
    };
    let drains: Vec<f64> = rounds.iter().filter_map(|r| r.drain).collect();
    report.add(
        "raw_ordered_drain",
        drains.iter().copied().reduce(f64::max),
        "events/s",
        None,
        None,
        Some(format!(
            "best of {} runs ({}), one before each catch-up round; consumer max_batch {} (async-nats pulls 500 a request){}",
            drains.len(),
            join_rates(&drains),
            drain_pull_batch_max(),
            drain_error.map(|e| format!("; {e}")).unwrap_or_default()
        )),
    );
    let (value, note) = catch_up_summary(&rounds, last_seq);
    report.add(
        "projection_catchup",
        value,
        "events/s",
        Some("raw_ordered_drain"),
        Some(Target::RatioAtLeast(0.5)),
        Some(note),
    );
    let rss_peak_kib = rounds.iter().filter_map(|r| r.caught.rss_peak_kib).max();
    #[allow(clippy::cast_precision_loss, reason = "KiB counts are far below 2^52")]
    let rss_mib = rss_peak_kib.map(|k| k as f64 / 1024.0);
    report.add(
        "query_rss_peak_mb",
        rss_mib,
        "MiB",
        None,
        Some(Target::ValueAtMost(512.0)),
        Some(format!(
            "VmHWM of posts-query at the end of catch-up, highest of {} rounds",
            rounds.len()
        )),
    );
    let anon_peak_kib = rounds.iter().filter_map(|r| r.caught.anon_peak_kib).max();
    #[allow(clippy::cast_precision_loss, reason = "KiB counts are far below 2^52")]
    report.add(
        "query_anon_peak_mb",
        anon_peak_kib.map(|k| k as f64 / 1024.0),
        "MiB",
        None,
        None,
        Some(format!(
            "highest RssAnon of posts-query sampled every {} ms during catch-up, highest of {} \
             rounds: VmHWM without the index files mapped from the page cache",
            CATCHUP_POLL.as_millis(),
            rounds.len()
        )),
    );
    let caught_up = value.is_some();
    if catch_up_only {
        return Ok(());
    }

    // Search over the caught-up index.
    let queries = Arc::new(corpus::search_queries(
        vocab,
        &layout,
        usize::try_from(sizes.search_samples + sizes.search_warmup)?,
        QUERY_SEED,
    ));
    let search = if caught_up {
        rt.block_on(wait_ready(&client, &query_url)).map(|()| {
            let hits = Arc::new(AtomicU64::new(0));
            let watch = CpuWatch::start(&[
                ("bench", me),
                ("posts-query", Some(query_pid)),
            ]);
            let mut outcome = rt.block_on(load::counted(
                SEARCH_IN_FLIGHT,
                sizes.search_warmup,
                sizes.search_samples,
                search_op(client.clone(), &query_url, queries.clone(), hits.clone()),
            ));
            let cost = watch.finish("search_latency");
            let total = hits.load(Ordering::Relaxed);
            let n = outcome.ok + sizes.search_warmup;
            #[allow(clippy::cast_precision_loss, reason = "query counts are far below 2^52")]
            let cpu = cost.per_op(n as f64, "query");
            report.phase(cost);
            let note = format!(
                "two-word queries over {} posts, {SEARCH_IN_FLIGHT} in flight, {} samples, mean total hits {}; {cpu}{}",
                sizes.posts,
                outcome.latencies.len(),
                total / n.max(1),
                outcome.error_note().map(|e| format!("; {e}")).unwrap_or_default()
            );
            (outcome.percentile_ms(0.50), outcome.percentile_ms(0.99), note)
        })
    } else {
        Err(anyhow::anyhow!("posts-query did not catch up"))
    };
    match search {
        Ok((p50, p99, note)) => {
            report.add(
                "search_latency_p50",
                p50,
                "ms",
                None,
                None,
                Some(note.clone()),
            );
            report.add(
                "search_latency_p99",
                p99,
                "ms",
                None,
                Some(Target::ValueAtMost(10.0)),
                Some(note),
            );
        }
        Err(e) => {
            let note = Some(format!("{e:#}"));
            report.add("search_latency_p50", None, "ms", None, None, note.clone());
            report.add(
                "search_latency_p99",
                None,
                "ms",
                None,
                Some(Target::ValueAtMost(10.0)),
                note,
            );
        }
    }

    // Read-your-writes through both services.
    let vis = if caught_up {
        spawn_command(&url).map(|(command, command_url)| {
            let watch = CpuWatch::start(&[
                ("bench", me),
                ("nats-server", nats_pid),
                ("posts-command", command.pid()),
                ("posts-query", Some(query_pid)),
            ]);
            let (mut lat, errors, first) = rt.block_on(visibility(
                &client,
                &command_url,
                &query_url,
                pool,
                sizes.visibility_samples,
            ));
            let cost = watch.finish("visibility_latency");
            #[allow(clippy::cast_precision_loss, reason = "sample counts are far below 2^52")]
            let cpu = cost.per_op((sizes.visibility_samples + VISIBILITY_WARMUP) as f64, "create+read");
            report.phase(cost);
            let mut note = format!(
                "{} sequential samples, ack to 200 of GET /posts/{{id}}?min_seq; p50 {:.2} ms; {cpu}",
                lat.len(),
                percentile_ms(&mut lat, 0.5).unwrap_or(f64::NAN)
            );
            if errors > 0 {
                note.push_str(&format!(
                    "; {errors} errors, first: {}",
                    first.unwrap_or_default()
                ));
            }
            (percentile_ms(&mut lat, 0.99), note)
        })
    } else {
        Err(anyhow::anyhow!("posts-query did not catch up"))
    };
    match vis {
        Ok((p99, note)) => report.add(
            "visibility_latency_p99",
            p99,
            "ms",
            None,
            Some(Target::ValueAtMost(50.0)),
            Some(note),
        ),
        Err(e) => report.add(
            "visibility_latency_p99",
            None,
            "ms",
            None,
            Some(Target::ValueAtMost(50.0)),
            Some(format!("{e:#}")),
        ),
    }

    // Replay runs offline on the data dir the catch-up produced.
    if let Err(e) = query.terminate(Duration::from_secs(30)) {
        println!("  posts-query did not stop cleanly: {e:#}");
    }
    let replay_seq = rt.block_on(stream_last_seq(&url)).unwrap_or(last_seq);
    for (metric, projection, target) in [
        ("replay_post_view", POST_VIEW, 0.5),
        ("replay_post_search", POST_SEARCH, 0.25),
    ] {
        let watch = CpuWatch::start(&[("bench", me), ("nats-server", nats_pid)]);
        let run = replay::run(projection, &url, data.path(), sizes.catch_up_deadline());
        let cost = watch.finish(metric);
        if run.is_ok() {
            report.phase(cost);
        }
        let (value, note) = match run {
            Ok(r) => (
                Some(r.events_per_sec),
                format!(
                    "{} events in {:.2} s (stream at {replay_seq}); process wall {:.2} s{}{}",
                    r.events,
                    r.seconds,
                    r.wall_s,
                    r.cpu_s
                        .map(|c| format!(
                            ", {c:.1} cpu-s ({:.1} CPU us/event)",
                            per_event_us(c, r.events)
                        ))
                        .unwrap_or_default(),
                    r.peak_rss_kib
                        .map(|k| format!(", peak RSS {} MiB", k / 1024))
                        .unwrap_or_default()
                ),
            ),
            Err(e) => (None, e),
        };
        report.add(
            metric,
            value,
            "events/s",
            Some("raw_ordered_drain"),
            Some(Target::RatioAtLeast(target)),
            Some(note),
        );
    }
    crate::reports::author_stats_replay(rt, report, sizes, &url, replay_seq, me, nats_pid);
    drop(nats);
    Ok(())
}
