//! `replay`: rebuilds a projection from stream sequence 1 into a shadow store,
//! catches up to the live head, and swaps it in atomically. With a
//! `posts-query` running on the data dir, the service keeps serving reads from
//! the old store and swaps on request (see ARCHITECTURE.md, "Replay");
//! without one, the tool works on the files itself. `author-stats` (two
//! streams, reports-query's data dir) is rebuilt on the files, with its
//! service stopped.
//!
//! Exit codes: 0 success; 1 failure (NATS unreachable, a stream missing,
//! ...); 2 usage (unknown projection name, bad flags); 3 a `--verify`
//! mismatch (the live store is kept).

use std::fs::File;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use eventstore::{EventStore, connect_checked};
use posts_projections::rebuild;
use posts_projections::{COMMENT_VIEW, POST_SEARCH, POST_VIEW};
use projection::{Projection, RebuildProgress, RunnerOptions, Status, drain_to};
use reports::author_stats::{self, AUTHOR_STATS};
use serde_json::json;

/// glibc malloc took ~30% of a replay's CPU (perf); mimalloc, as in the services.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The exit code of a `--verify` that found the rebuilt store different
/// from the live one (the live store is kept): apart from 1, a failure to
/// run at all, so a script can tell "the view drifted" from "NATS is down".
const EXIT_VERIFY_MISMATCH: u8 = 3;

/// A `--verify` mismatch: the live store is kept.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct VerifyMismatch(String);

/// How often progress is drawn or printed, and reported to a running service.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// Plain progress lines when not on a terminal: one every few seconds.
const PLAIN_LINE_EVERY: Duration = Duration::from_secs(5);
/// The swap request waits for alignment and digests on the service side.
const SWAP_TIMEOUT: Duration = Duration::from_secs(600);
const REPLAY_LOCK_FILE: &str = "replay.lock";

#[derive(Debug, Parser)]
#[command(
    name = "replay",
    version,
    about = "Rebuild a projection from stream sequence 1 with zero read downtime",
    after_help = "Exit codes: 0 success; 1 failure (NATS unreachable, a stream missing, ...); 2 usage; 3 a --verify mismatch (the live store is kept).\n\nExamples:\n  replay post-view --verify\n  replay all --json\n  replay author-stats --data-dir ./data/reports"
)]
struct Args {
    /// Projection to rebuild; `all` is every projection of posts-query whose
    /// stream exists, and author-stats when reports-query's data dir holds
    /// it and no reports-query runs on it.
    #[arg(value_parser = ["post-view", "post-search", "comment-view", "author-stats", "all"])]
    projection: String,
    /// NATS server URL(s), comma separated.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        value_delimiter = ','
    )]
    nats_url: Vec<String>,
    /// NATS user (nats/local.conf names one per service); none for an open
    /// server.
    #[arg(long, env = "NATS_USER")]
    nats_user: Option<String>,
    /// That user's NATS password.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// The data dir of the projection named: posts-query's
    /// (`QUERY_DATA_DIR`, default ./data/query), or for author-stats
    /// reports-query's (`REPORTS_DATA_DIR`, default ./data/reports). With
    /// `all`, posts-query's.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Compare a content digest of the rebuilt store with the live one; fail if they differ.
    #[arg(long)]
    verify: bool,
    /// Print one JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, serde::Serialize)]
struct Outcome {
    name: String,
    events: u64,
    seconds: f64,
    events_per_sec: f64,
    checkpoint: u64,
    live_digest: Option<String>,
    rebuilt_digest: Option<String>,
    verified: Option<bool>,
}

enum Mode {
    /// No service: we hold its lock and work on the files.
    Offline(#[allow(dead_code, reason = "held for its lock")] File),
    /// A service runs with its admin listener at this address and swaps on
    /// request.
    Online(String),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let json = args.json;
    match run(args).await {
        Ok(outcomes) => {
            let events: u64 = outcomes.iter().map(|o| o.events).sum();
            let seconds: f64 = outcomes.iter().map(|o| o.seconds).sum();
            if json {
                let summary = json!({
                    "ok": true,
                    "events": events,
                    "seconds": seconds,
                    "events_per_sec": if seconds > 0.0 { events as f64 / seconds } else { 0.0 },
                    "projections": outcomes,
                });
                println!("{summary}");
            } else {
                for o in &outcomes {
                    eprintln!(
                        "replay {}: {} events in {:.2}s ({:.0} events/s), swapped in at checkpoint {}",
                        o.name, o.events, o.seconds, o.events_per_sec, o.checkpoint
                    );
                    if let (Some(l), Some(r)) = (&o.live_digest, &o.rebuilt_digest) {
                        eprintln!("  live digest    {l}\n  rebuilt digest {r}");
                    }
                    match o.verified {
                        Some(true) => eprintln!("  verified: equal"),
                        Some(false) => eprintln!("  verified: DIFFERENT"),
                        None => {}
                    }
                }
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            if json {
                println!("{}", json!({ "ok": false, "error": format!("{e:#}") }));
            }
            eprintln!("replay: {e:#}");
            if e.downcast_ref::<VerifyMismatch>().is_some() {
                std::process::ExitCode::from(EXIT_VERIFY_MISMATCH)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

/// Where a service keeps its data: the flag for the one projection named,
/// else the service's env var, else its default.
fn data_dir_of(args: &Args, author_stats: bool) -> PathBuf {
    let (env, default) = if author_stats {
        ("REPORTS_DATA_DIR", "./data/reports")
    } else {
        ("QUERY_DATA_DIR", "./data/query")
    };
    let named = args.projection != "all" || !author_stats;
    args.data_dir
        .clone()
        .filter(|_| named)
        .or_else(|| std::env::var_os(env).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(default))
}

/// Stream `spec`'s store, opened on `client`; `None` when it does not exist.
async fn open_stream(
    client: &async_nats::Client,
    urls: &[String],
    spec: &eventstore::StreamSpec,
) -> Option<EventStore> {
    let js = async_nats::jetstream::new(client.clone());
    EventStore::open_existing(client.clone(), js, spec)
        .await
        .ok()
        .map(|s| s.with_dial(urls, "replay"))
}

async fn run(args: Args) -> anyhow::Result<Vec<Outcome>> {
    // NATS first: if it is unreachable, no file is touched.
    let nats_url = eventstore::with_credentials(
        &args.nats_url,
        args.nats_user.as_deref(),
        args.nats_password.as_deref(),
    );
    let urls = eventstore::shown_urls(&nats_url);
    let client = connect_checked(&nats_url, "replay")
        .await
        .with_context(|| "cannot reach NATS; no file was touched")?;
    let posts_store = open_stream(&client, &nats_url, &posts::context::stream(1))
        .await
        .with_context(|| format!("{urls}: no stream POSTS; no file was touched"))?;
    let comments_store = open_stream(&client, &nats_url, &comments::context::stream(1)).await;
    let query_dir = data_dir_of(&args, false);
    let reports_dir = data_dir_of(&args, true);
    let names: Vec<&str> = match args.projection.as_str() {
        "all" => {
            let mut names = vec![POST_VIEW, POST_SEARCH];
            if comments_store.is_some() {
                names.push(COMMENT_VIEW);
                if reports_dir.join(format!("{AUTHOR_STATS}.redb")).exists() {
                    // It is rebuilt on the files only: with its service
                    // running, `all` says so and leaves it alone.
                    if lock(&reports_dir.join(REPORTS_LOCK_FILE)).is_ok() {
                        names.push(AUTHOR_STATS);
                    } else {
                        eprintln!(
                            "replay: author-stats skipped: a reports-query is running on {}; stop it, then `replay author-stats`",
                            reports_dir.display()
                        );
                    }
                }
            }
            names
        }
        POST_VIEW => vec![POST_VIEW],
        POST_SEARCH => vec![POST_SEARCH],
        COMMENT_VIEW => vec![COMMENT_VIEW],
        _ => vec![AUTHOR_STATS],
    };
    let comments_needed = names
        .iter()
        .any(|n| *n == COMMENT_VIEW || *n == AUTHOR_STATS);
    let comments_store = match comments_store {
        Some(s) => Some(s),
        None if comments_needed => {
            bail!("{urls}: no stream COMMENTS (comments-command creates it); no file was touched")
        }
        None => None,
    };
    let mut outcomes = Vec::new();
    let query_names: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| *n != AUTHOR_STATS)
        .collect();
    if !query_names.is_empty() {
        std::fs::create_dir_all(&query_dir)
            .with_context(|| format!("cannot create {}", query_dir.display()))?;
        let replay_lock = lock(&query_dir.join(REPLAY_LOCK_FILE))
            .map_err(|_| anyhow::anyhow!("another replay is running on {}", query_dir.display()))?;
        rebuild::remove_stale_shadows(&query_dir);
        let mode = match lock(&query_dir.join(rebuild::LOCK_FILE)) {
            Ok(f) => Mode::Offline(f),
            Err(_) => Mode::Online(service_address(&query_dir)?),
        };
        for name in query_names {
            // Poison events are parked exactly as the live runner parks
            // them, to stream DLQ, which the command services provision:
            // replay never creates a stream.
            let store = if posts_projections::stream_of(name) == comments::context::STREAM {
                comments_store.as_ref().context("stream COMMENTS")?
            } else {
                &posts_store
            };
            let target = store
                .last_seq()
                .await
                .with_context(|| format!("cannot read stream {}", store.stream_name()))?;
            outcomes.push(replay_one(name, &args, &query_dir, store, target, &mode).await?);
        }
        drop(replay_lock);
    }
    if names.contains(&AUTHOR_STATS) {
        let comments_store = comments_store.as_ref().context("stream COMMENTS")?;
        outcomes.push(
            replay_author_stats(&reports_dir, args.verify, [&posts_store, comments_store]).await?,
        );
    }
    Ok(outcomes)
}

/// The shadows of author-stats: `<dir>/.rebuild/author-stats-<id>/`.
const AUTHOR_STATS_SHADOW_PREFIX: &str = "author-stats-";
/// reports-query's lock on its data dir.
const REPORTS_LOCK_FILE: &str = "reports-query.lock";

/// Rebuilds author-stats from sequence 1 of both its streams into a shadow
/// file, brings the live file up to the same two checkpoints, compares
/// digests with `--verify`, and renames the shadow over the live file.
/// Offline only: reports-query must be stopped.
async fn replay_author_stats(
    dir: &Path,
    verify: bool,
    stores: [&EventStore; 2],
) -> anyhow::Result<Outcome> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let _replay_lock = lock(&dir.join(REPLAY_LOCK_FILE))
        .map_err(|_| anyhow::anyhow!("another replay is running on {}", dir.display()))?;
    let _service_lock = lock(&dir.join(REPORTS_LOCK_FILE)).map_err(|_| {
        anyhow::anyhow!(
            "a reports-query is running on {}: stop it first (author-stats is rebuilt on the files; reports-query has no admin listener for an online swap yet); no file was touched",
            dir.display()
        )
    })?;
    let root = dir.join(rebuild::REBUILD_DIR);
    if let Ok(entries) = std::fs::read_dir(&root) {
        for e in entries.filter_map(Result::ok) {
            if e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(AUTHOR_STATS_SHADOW_PREFIX))
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let shadow_dir = root.join(format!(
        "{AUTHOR_STATS_SHADOW_PREFIX}{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&shadow_dir)?;
    let file = format!("{AUTHOR_STATS}.redb");
    let (shadow_path, live_path) = (shadow_dir.join(&file), dir.join(&file));
    let mut targets = [0u64; 2];
    for (t, store) in targets.iter_mut().zip(stores) {
        *t = store
            .last_seq()
            .await
            .with_context(|| format!("cannot read stream {}", store.stream_name()))?;
    }
    eprintln!(
        "{AUTHOR_STATS}: rebuilding from sequence 1 up to POSTS:{},COMMENTS:{}",
        targets[0], targets[1]
    );
    let started = Instant::now();
    let (slots, shadow_reader) = author_stats::open(&shadow_path)?;
    let mut built = Vec::new();
    for ((slot, store), target) in slots.into_iter().zip(stores).zip(targets) {
        built.push(drain_one(Box::new(slot), store, target).await?);
    }
    let seconds = started.elapsed().as_secs_f64();
    let events: u64 = built.iter().map(|p| p.checkpoint()).sum();
    let mut outcome = Outcome {
        name: AUTHOR_STATS.to_string(),
        events,
        seconds,
        events_per_sec: if seconds > 0.0 {
            events as f64 / seconds
        } else {
            0.0
        },
        checkpoint: events,
        live_digest: None,
        rebuilt_digest: None,
        verified: None,
    };
    if verify {
        let (live_slots, live_reader) = author_stats::open(&live_path)?;
        let mut aligned = Vec::new();
        for ((slot, store), target) in live_slots.into_iter().zip(stores).zip(targets) {
            aligned.push(drain_one(Box::new(slot), store, target).await?);
        }
        let (ld, rd) = (live_reader.digest()?, shadow_reader.digest()?);
        outcome.verified = Some(ld == rd);
        outcome.live_digest = Some(ld.clone());
        outcome.rebuilt_digest = Some(rd.clone());
        drop((aligned, live_reader));
        if ld != rd {
            let _ = std::fs::remove_dir_all(&shadow_dir);
            return Err(VerifyMismatch(format!(
                "{AUTHOR_STATS}: digest mismatch at POSTS:{},COMMENTS:{}: live {ld}, rebuilt {rd}; live store kept",
                targets[0], targets[1]
            ))
            .into());
        }
    }
    drop((built, shadow_reader));
    std::fs::rename(&shadow_path, &live_path)
        .with_context(|| format!("cannot install the rebuilt {AUTHOR_STATS}"))?;
    let _ = std::fs::remove_dir_all(&shadow_dir);
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(outcome)
}

/// Runs `p` on `store` up to `target`.
async fn drain_one(
    p: Box<dyn Projection>,
    store: &EventStore,
    target: u64,
) -> anyhow::Result<Box<dyn Projection>> {
    let status = Status::new(p.name(), p.visible(), p.parked_total());
    drain_to(p, store.clone(), status, RunnerOptions::replay(), target)
        .await
        .map_err(anyhow::Error::msg)
}

fn lock(path: &Path) -> anyhow::Result<File> {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    f.try_lock().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(f)
}

/// The admin listener of the `posts-query` that holds `data_dir`.
fn service_address(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(rebuild::SERVICE_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "a posts-query holds {} but {} is unreadable",
            data_dir.display(),
            path.display()
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    v["admin"]
        .as_str()
        .map(|s| s.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]"))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{} has no admin address: is that posts-query older than this replay?",
                path.display()
            )
        })
}

/// A shadow for `name`: made here when working offline, else asked of the
/// running service, which only swaps in shadows it handed out.
async fn shadow_for(
    name: &str,
    data_dir: &Path,
    mode: &Mode,
    http: &reqwest::Client,
) -> anyhow::Result<rebuild::Shadow> {
    let addr = match mode {
        Mode::Offline(_) => {
            return rebuild::Shadow::create(data_dir, name)
                .with_context(|| format!("cannot create a shadow in {}", data_dir.display()));
        }
        Mode::Online(addr) => addr,
    };
    let resp = http
        .post(format!("http://{addr}/admin/projections/{name}/shadows"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .with_context(|| format!("posts-query's admin listener at {addr} did not answer"))?;
    let code = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    let Some(id) = body["shadow"].as_str().filter(|_| code.is_success()) else {
        bail!(
            "{name}: posts-query gave no shadow ({code}): {}",
            body["detail"].as_str().unwrap_or("no detail")
        );
    };
    rebuild::Shadow::handed_out(data_dir, name, id)
        .with_context(|| format!("{name}: the shadow posts-query handed out"))
}

async fn replay_one(
    name: &str,
    args: &Args,
    data_dir: &Path,
    store: &EventStore,
    target: u64,
    mode: &Mode,
) -> anyhow::Result<Outcome> {
    let status = Status::new(name, 0, 0);
    // The service closes connections idle for 20 s; a merge can take longer
    // between two progress reports and the swap.
    let http = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(5))
        .build()
        .context("cannot build an HTTP client")?;
    let compacting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let progress = tokio::spawn(show_progress(
        name.to_string(),
        status.clone(),
        target,
        compacting.clone(),
        match mode {
            Mode::Online(addr) => Some((http.clone(), addr.clone())),
            Mode::Offline(_) => None,
        },
    ));
    let started = Instant::now();
    let built = async {
        let shadow = shadow_for(name, data_dir, mode, &http).await?;
        let (p, reader) = rebuild::build_shadow(&shadow, store, target, status.clone()).await?;
        // Every event is in; the bar would sit at 100% through the merge.
        compacting.store(true, std::sync::atomic::Ordering::Relaxed);
        if !std::io::stderr().is_terminal() {
            eprintln!("{}", compacting_line(name, target));
        }
        let compact_started = Instant::now();
        let p = rebuild::compact(p).await?;
        tracing::info!(
            projection = name,
            secs = compact_started.elapsed().as_secs_f64(),
            "shadow compacted"
        );
        anyhow::Ok((shadow, p, reader))
    }
    .await;
    let seconds = started.elapsed().as_secs_f64();
    progress.abort();
    let (shadow_dir, shadow, shadow_reader) = built?;
    let events = shadow.checkpoint();
    let mut outcome = Outcome {
        name: name.to_string(),
        events,
        seconds,
        events_per_sec: if seconds > 0.0 {
            events as f64 / seconds
        } else {
            0.0
        },
        checkpoint: events,
        live_digest: None,
        rebuilt_digest: None,
        verified: None,
    };
    match mode {
        Mode::Offline(_) => {
            let live_path = rebuild::live_path(data_dir, name);
            let (live, live_reader) = rebuild::open(name, &live_path, false)?;
            let (live, shadow) = rebuild::align(live, shadow, store).await?;
            outcome.checkpoint = shadow.checkpoint();
            if args.verify {
                let (l, r) = (live_reader.clone(), shadow_reader.clone());
                let (ld, rd) = tokio::task::spawn_blocking(move || {
                    Ok::<_, anyhow::Error>((l.digest()?, r.digest()?))
                })
                .await??;
                outcome.verified = Some(ld == rd);
                outcome.live_digest = Some(ld.clone());
                outcome.rebuilt_digest = Some(rd.clone());
                if ld != rd {
                    return Err(VerifyMismatch(format!(
                        "{name}: digest mismatch at checkpoint {}: live {ld}, rebuilt {rd}; live store kept",
                        outcome.checkpoint
                    ))
                    .into());
                }
            }
            drop((live, live_reader, shadow, shadow_reader));
            rebuild::install(&shadow_dir, data_dir)
                .with_context(|| format!("cannot install the rebuilt {name}"))?;
        }
        Mode::Online(addr) => {
            // Close our handles: the service opens the shadow itself.
            drop((shadow, shadow_reader));
            let resp = http
                .post(format!("http://{addr}/admin/projections/{name}/swap"))
                .timeout(SWAP_TIMEOUT)
                .json(&json!({ "shadow": shadow_dir.id(), "verify": args.verify }))
                .send()
                .await
                .with_context(|| format!("posts-query at {addr} did not take the swap"))?;
            let code = resp.status();
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            if code == reqwest::StatusCode::CONFLICT
                && body["type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("digest-mismatch"))
            {
                return Err(VerifyMismatch(format!(
                    "{name}: {}",
                    body["detail"]
                        .as_str()
                        .unwrap_or("digest mismatch; live store kept")
                ))
                .into());
            }
            if !code.is_success() {
                bail!(
                    "{name}: posts-query refused the swap ({code}): {}",
                    body["detail"].as_str().unwrap_or("no detail")
                );
            }
            outcome.checkpoint = body["checkpoint"].as_u64().unwrap_or(outcome.checkpoint);
            outcome.live_digest = body["live_digest"].as_str().map(str::to_string);
            outcome.rebuilt_digest = body["rebuilt_digest"].as_str().map(str::to_string);
            if args.verify {
                let (Some(live), Some(rebuilt)) = (&outcome.live_digest, &outcome.rebuilt_digest)
                else {
                    bail!("{name}: posts-query swapped without the digests --verify asked for");
                };
                outcome.verified = Some(live == rebuilt);
            }
        }
    }
    Ok(outcome)
}

/// What replay says while post-search merges after every event is in.
fn compacting_line(name: &str, target: u64) -> String {
    format!("{name}: {target}/{target} events applied; compacting the store")
}

async fn show_progress(
    name: String,
    status: Arc<Status>,
    target: u64,
    compacting: Arc<std::sync::atomic::AtomicBool>,
    service: Option<(reqwest::Client, String)>,
) {
    let started = Instant::now();
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(target);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>12} [{bar:40}] {pos}/{len} events {rate} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            // indicatif's own `{per_sec}` shows four decimals.
            .with_key(
                "rate",
                |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.0}/s", state.per_sec());
                },
            )
            .progress_chars("=> "),
        );
        bar.set_message(name.clone());
        bar
    });
    if bar.is_none() {
        eprintln!("{name}: rebuilding from sequence 1 up to {target}");
    }
    let mut last_line = Instant::now();
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let mut spinning = false;
    loop {
        tick.tick().await;
        if let Some(b) = &bar
            && !spinning
            && compacting.load(std::sync::atomic::Ordering::Relaxed)
        {
            spinning = true;
            b.set_style(
                indicatif::ProgressStyle::with_template("{msg} {spinner} {elapsed}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            b.set_message(compacting_line(&name, target));
            b.enable_steady_tick(Duration::from_millis(120));
        }
        // Applied, not visible: post-search commits a replay every 10 s.
        let applied = status.applied();
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        let rate = applied as f64 / secs;
        match &bar {
            Some(b) => b.set_position(applied),
            None if last_line.elapsed() >= PLAIN_LINE_EVERY => {
                let eta = if rate > 0.0 {
                    (target.saturating_sub(applied)) as f64 / rate
                } else {
                    0.0
                };
                eprintln!("{name}: {applied}/{target} events, {rate:.0} events/s, ETA {eta:.0}s");
                last_line = Instant::now();
            }
            None => {}
        }
        if let Some((http, addr)) = &service {
            let report = RebuildProgress {
                applied_seq: applied,
                target_seq: target,
                events_per_sec: rate,
                at_unix_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0)),
            };
            let _ = http
                .post(format!("http://{addr}/admin/projections/{name}/progress"))
                .timeout(Duration::from_secs(1))
                .json(&report)
                .send()
                .await;
        }
    }
}
