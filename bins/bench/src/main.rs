//! `bench`: what users care about, each figure next to the raw ceiling
//! measured by this binary, in the same run, on the same nats-server.
//!
//! It starts its own nats-servers (testkit) and the release service binaries
//! next to it (`target/release/`), prints a table with every ratio and writes
//! `target/bench/report.json`. Targets are printed as pass/miss, never
//! asserted.
//!
//! ```text
//! cargo build --release --bins
//! cargo run --release --bin bench -- --quick     # smoke run, about a minute
//! cargo run --release --bin bench                # 200k-event backlog
//! cargo run --release --bin bench -- --full      # 1M-event backlog
//! ```

mod corpus;
mod http1;
mod load;
mod long;
mod procfs;
mod read;
mod replay;
mod report;
mod reports;
mod write;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde_json::json;
use testkit::{NatsServer, ServiceProcess};

use crate::corpus::{CreatePool, Vocabulary};
use crate::report::{Header, Report};

/// Longest any single HTTP request may take before it counts as an error.
const HTTP_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle keep-alive connections kept per host: above the largest in-flight count.
const HTTP_POOL_IDLE_MAX: usize = 256;
/// Catch-up and replay get this long plus [`DEADLINE_SECS_PER_KEVENT`] per
/// thousand events before they count as failed.
const DEADLINE_BASE: Duration = Duration::from_secs(120);
const DEADLINE_SECS_PER_KEVENT: u64 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    version,
    about = "Benchmarks the posts platform against raw JetStream ceilings",
    after_help = "Examples:\n  bench --quick\n  bench --only read\n  bench --full"
)]
struct Args {
    /// 1M-event backlog and longer runs.
    #[arg(long, conflicts_with = "quick")]
    full: bool,
    /// Tiny sizes for a smoke run of the harness itself (about a minute).
    #[arg(long)]
    quick: bool,
    /// Backlog size override, in events (at least 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    events: Option<u64>,
    /// Posts in the backlog (at most the events); the others are updates.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    posts: Option<u64>,
    /// Pad every post's content to about this many bytes (its own words
    /// repeated, at most 100000): big posts for the memory bounds, e.g.
    /// `--only catchup --events 20000 --posts 20000 --content-bytes 100000`.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    content_bytes: Option<u64>,
    /// Where to write the JSON report (default: <target>/bench/report.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// A peerbench results.json (PostgreSQL with cqrs-es on the same
    /// workload): its figures go beside ours in the table and the report.
    #[arg(long, value_name = "FILE")]
    peer: Option<PathBuf>,
    /// Run only the write side (`write`), only the read side (`read`), or
    /// only the read side up to the end of catch-up (`catchup`), for
    /// iterating on one path; the report then lacks the other metrics.
    #[arg(long, value_parser = ["write", "read", "catchup"])]
    only: Option<String>,
}

/// How big each phase is.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub mode: &'static str,
    pub events: u64,
    pub posts: u64,
    /// Throughput runs alternate raw and HTTP this many times.
    pub throughput_rounds: u32,
    /// Warm-up before each throughput slice (connections, caches), not counted.
    pub throughput_warmup: Duration,
    /// Measured time per side, split over the rounds.
    pub throughput_measure: Duration,
    /// Rounds of a raw drain then a catch-up; each reports its best round.
    pub catchup_rounds: usize,
    pub latency_warmup: u64,
    pub latency_samples: u64,
    pub visibility_samples: usize,
    pub search_warmup: u64,
    pub search_samples: u64,
    /// Events of the post that `aggregate_load_long_stream_ms` loads cold.
    pub long_stream_events: u64,
}

impl Sizes {
    fn from_args(args: &Args) -> Self {
        let mut sizes = if args.quick {
            Self {
                mode: "quick",
                events: 5_000,
                posts: 2_000,
                throughput_rounds: 2,
                throughput_warmup: Duration::from_millis(300),
                throughput_measure: Duration::from_secs(2),
                catchup_rounds: 2,
                latency_warmup: 20,
                latency_samples: 200,
                visibility_samples: 200,
                search_warmup: 20,
                search_samples: 200,
                long_stream_events: 5_000,
            }
        } else if args.full {
            Self {
                mode: "full",
                events: 1_000_000,
                posts: 100_000,
                throughput_rounds: 6,
                throughput_warmup: Duration::from_millis(500),
                throughput_measure: Duration::from_secs(15),
                catchup_rounds: 3,
                latency_warmup: 300,
                latency_samples: 20_000,
                visibility_samples: 1_000,
                search_warmup: 200,
                search_samples: 5_000,
                long_stream_events: 100_000,
            }
        } else {
            Self {
                mode: "default",
                events: 200_000,
                posts: 100_000,
                throughput_rounds: 4,
                throughput_warmup: Duration::from_millis(500),
                throughput_measure: Duration::from_secs(10),
                catchup_rounds: 3,
                latency_warmup: 300,
                latency_samples: 10_000,
                visibility_samples: 500,
                search_warmup: 200,
                search_samples: 2_000,
                long_stream_events: 100_000,
            }
        };
        if let Some(n) = args.events {
            sizes.events = n;
            sizes.posts = sizes.posts.min(n);
        }
        if let Some(n) = args.posts {
            sizes.posts = n.min(sizes.events);
        }
        sizes
    }

    fn throughput_slice(&self) -> Duration {
        self.throughput_measure / self.throughput_rounds.max(1)
    }

    fn catch_up_deadline(&self) -> Duration {
        DEADLINE_BASE + Duration::from_secs(self.events / 1000 * DEADLINE_SECS_PER_KEVENT)
    }
}

/// The HTTP client of the read phases: reqwest, HTTP/1.1 keep-alive pool, no
/// TLS. Creates go through the leaner [`http1::Client`].
///
/// # Errors
/// When the client cannot be built.
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(HTTP_POOL_IDLE_MAX)
        // The services close connections idle for 20 s.
        .pool_idle_timeout(Duration::from_secs(5))
        .timeout(HTTP_REQUEST_TIMEOUT)
        .build()?)
}

/// Starts `posts-command` on a free port and waits until it listens (it
/// connects to NATS before binding, so listening means ready).
///
/// # Errors
/// When it cannot be started.
pub fn spawn_command(nats_url: &str) -> anyhow::Result<(ServiceProcess, String)> {
    let port = testkit::free_port();
    let process = ServiceProcess::spawn(
        "posts-command",
        &[
            "--nats-url".into(),
            nats_url.to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--replicas".into(),
            "1".into(),
        ],
        &[],
        port,
    )?;
    Ok((process, format!("http://127.0.0.1:{port}")))
}

/// The HS256 secret of the bench's gateway and its token.
pub const GATEWAY_SECRET: &str = "bench-gateway-secret-of-at-least-32-bytes";

/// Starts a gateway in front of `posts_command_url` (the other upstreams
/// point nowhere: only creates go through it) and waits until it listens.
///
/// # Errors
/// When it cannot be started.
pub fn spawn_gateway(posts_command_url: &str) -> anyhow::Result<(ServiceProcess, String)> {
    let port = testkit::free_port();
    let process = ServiceProcess::spawn(
        "gateway",
        &[
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--posts-command-url".into(),
            posts_command_url.to_string(),
        ],
        &[("GATEWAY_JWT_SECRET".into(), GATEWAY_SECRET.into())],
        port,
    )?;
    Ok((process, format!("http://127.0.0.1:{port}")))
}

/// The pid of a testkit nats-server, found by its config path on the command line.
#[must_use]
pub fn nats_pid(nats: &NatsServer) -> Option<u32> {
    let config = nats.store_dir().parent()?.join("nats.conf");
    procfs::find_pid_by_arg(&config)
}

fn nats_bin() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".to_string())
}

fn nats_version() -> String {
    Command::new(nats_bin())
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .map(|v| v.rsplit(' ').next().unwrap_or_default().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

/// `/proc/loadavg`'s first three fields: how busy the machine was around the run.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `some avg60` of `/proc/pressure/<resource>`: the share of the last minute
/// in which some task waited for the CPU or for IO (other work on the machine).
fn pressure_avg60(resource: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/pressure/{resource}")).ok()?;
    let some = text.lines().find(|l| l.starts_with("some "))?;
    some.split_whitespace()
        .find_map(|f| f.strip_prefix("avg60="))?
        .parse()
        .ok()
}

/// `<target>/bench/report.json`, next to the `release` dir this binary runs from.
fn default_report_path() -> PathBuf {
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        return Path::new(&dir).join("bench").join("report.json");
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("bench")
        .join("report.json")
}

/// testkit's `bin_path` assumes a test binary in `target/<profile>/deps/`;
/// this one runs from `target/<profile>/` itself, next to the services. Point
/// testkit there through its `POSTS_BIN_DIR` unless the caller chose a dir.
fn point_testkit_at_own_dir() {
    if std::env::var_os("POSTS_BIN_DIR").is_some() {
        return;
    }
    let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    else {
        return;
    };
    #[allow(
        unsafe_code,
        reason = "set_var is unsafe only with other threads running; none exist yet"
    )]
    // SAFETY: called first thing in main, before the runtime or any thread starts.
    unsafe {
        std::env::set_var("POSTS_BIN_DIR", dir);
    }
}

/// Each service binary's path and build time: `cargo run --bin bench` only
/// rebuilds this binary, so the report says which service builds it measured.
fn binaries() -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for name in ["posts-command", "posts-query", "replay"] {
        let path = testkit::bin_path(name);
        let built = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .map(|t| eventstore::format_rfc3339(time::OffsetDateTime::from(t)));
        out.insert(
            name.to_string(),
            json!({ "path": path.display().to_string(), "built": built }),
        );
    }
    serde_json::Value::Object(out)
}

fn check_binaries() -> anyhow::Result<()> {
    for name in ["posts-command", "posts-query", "reports-query", "replay"] {
        let path = testkit::bin_path(name);
        anyhow::ensure!(
            path.exists(),
            "{} is missing: run `cargo build --release --bins` first",
            path.display()
        );
    }
    Ok(())
}

/// On SIGINT or SIGTERM, kills every nats-server and service this run
/// started and removes their temp dirs before exiting: the drops that
/// normally do it do not run when a signal ends the process.
async fn stop_on_signal() {
    servicekit::shutdown_signal().await;
    eprintln!(
        "bench: stopped by a signal; killing the servers and services it started, removing their temp dirs"
    );
    testkit::kill_spawned();
    std::process::exit(130);
}

fn main() -> anyhow::Result<()> {
    point_testkit_at_own_dir();
    let args = Args::parse();
    let sizes = Sizes::from_args(&args);
    if let Some(n) = args.content_bytes {
        corpus::set_content_bytes(usize::try_from(n).unwrap_or(100_000));
    }
    check_binaries()?;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let version = nats_version();
    let vocab = Vocabulary::new();
    let pool = CreatePool::new(&vocab);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.spawn(stop_on_signal());
    println!(
        "bench ({} run): nats-server {version}, {cores} cores, backlog {} events over {} posts, create payload {} B (HTTP body {} B)",
        sizes.mode,
        sizes.events,
        sizes.posts,
        pool.mean_payload_bytes(),
        pool.mean_body_bytes()
    );

    let binaries = binaries();
    println!("service binaries (rebuild with `cargo build --release --bins`): {binaries}");
    let loadavg_at_start = loadavg();
    let pressure_at_start = json!({
        "cpu_some_avg60": pressure_avg60("cpu"),
        "io_some_avg60": pressure_avg60("io"),
    });
    println!(
        "machine load average (1, 5, 15 min): {loadavg_at_start}; pressure (some, avg60 %): {pressure_at_start}"
    );
    let mut report = Report::default();
    if let Some(path) = &args.peer {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read the peer's results {}", path.display()))?;
        let doc: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("parse the peer's results {}", path.display()))?;
        report
            .set_peer(&doc)
            .with_context(|| format!("the peer's results {}", path.display()))?;
    }
    let only = args.only.as_deref();
    if only.is_none() || only == Some("write") {
        write::run(&rt, &mut report, &sizes, &pool, true)?;
        write::run(&rt, &mut report, &sizes, &pool, false)?;
        long::run(&rt, &mut report, sizes.long_stream_events)?;
    }
    if only != Some("write") {
        let catch_up_only = only == Some("catchup");
        read::run(&rt, &mut report, &sizes, &vocab, &pool, catch_up_only)?;
    }

    let load = format!(
        "closed loop with fixed concurrency: tokio tasks inside the bench process, on the same {cores} cores as nats-server and the services, \
         so the generator's CPU competes with what it measures (per-phase CPU of every process is under \"phases\"; generator cost: {costs}); \
         each task sends its next request when the previous one is answered. \
         Creates: {in_flight} in flight for throughput, raw and HTTP alternating in {rounds} slices each ({warm:?} warm-up, then {slice:?} measured per slice), \
         16 in flight for latency, raw and HTTP alternating in {rounds} slices each; raw publishes use async-nats with the same {in_flight}-wide window, headers and payload size ({payload} B postcard). \
         Reads: 1 in flight for visibility (create, then GET with min_seq right after the ack), 8 for search \
         (two distinct words of one live post's final content per query). \
         Posts are generated text: a 4096-word vocabulary with Zipf-distributed frequencies, 3-8 word titles, 40-100 word contents. \
         HTTP clients: creates use the bench's own HTTP/1.1 client (bins/bench/src/http1.rs, like wrk: one keep-alive connection per request in flight, \
         each request written whole, each response parsed with httparse and read in full), reads use reqwest 0.13 (on hyper 1) with a keep-alive pool; no TLS. \
         Read side on a nats-server with the default sync interval: backlog of {events} events over {posts} posts \
         (creates, then one update per post per round, 1 in 100 posts ending deleted) written by raw publishes with the command service's headers; \
         the raw ordered drain and posts-query's catch-up from an empty data dir alternate in {catchup_rounds} rounds, and each reports its best round \
         (other load on the machine only slows a run down, so the best is the least disturbed; the note on projection_catchup has every round).",
        costs = if report.load_costs.is_empty() {
            "no write run here; read metrics give the bench process's CPU per operation in their notes".to_string()
        } else {
            report.load_costs.join("; ")
        },
        in_flight = write::THROUGHPUT_IN_FLIGHT,
        rounds = sizes.throughput_rounds,
        warm = sizes.throughput_warmup,
        slice = sizes.throughput_slice(),
        payload = pool.mean_payload_bytes(),
        events = sizes.events,
        posts = sizes.posts,
        catchup_rounds = sizes.catchup_rounds,
    );
    let header = Header {
        nats_server: version,
        cores,
        load: load.clone(),
        run: json!({
            "mode": sizes.mode,
            "backlog_events": sizes.events,
            "backlog_posts": sizes.posts,
            "create_payload_bytes_mean": pool.mean_payload_bytes(),
            "create_http_body_bytes_mean": pool.mean_body_bytes(),
            "http_client": {
                "creates": "the bench's HTTP/1.1 client (httparse), one keep-alive connection per request in flight, no TLS",
                "reads": "reqwest 0.13 (hyper 1), HTTP/1.1 keep-alive pool, no TLS",
            },
            "binaries": binaries,
            "loadavg_at_start": loadavg_at_start,
            "loadavg_at_end": loadavg(),
            "pressure_at_start": pressure_at_start,
            "pressure_at_end": {
                "cpu_some_avg60": pressure_avg60("cpu"),
                "io_some_avg60": pressure_avg60("io"),
            },
        }),
    };
    let path = args.out.unwrap_or_else(default_report_path);
    report.write_json(&path, header)?;
    println!("\n{}", report.table());
    println!("load: {load}");
    println!("report written to {}", path.display());
    Ok(())
}
