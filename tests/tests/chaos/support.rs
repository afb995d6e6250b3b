//! What every chaos scenario shares: the seed and the PRNG, the scenario
//! context and its summary line, service processes (spawn, SIGKILL, restart
//! on the same port), reads of the query side's status, and the replay tool.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use e2e_tests::testkit::{self, ServiceProcess};
use e2e_tests::{Reply, http_client_with_timeout, wait_for};
use serde_json::Value;

/// Env var that fixes the seed of every random choice, to repeat a run.
pub const SEED_ENV: &str = "CHAOS_SEED";
/// Env var that scales kill counts and durations (1 = the bounded default).
pub const ROUNDS_ENV: &str = "CHAOS_ROUNDS";
/// Env var that arms a failpoint in a debug build of the services.
pub const FAILPOINT_ENV: &str = "POSTS_FAILPOINT";
/// Signal number of SIGABRT on Linux: what `std::process::abort` dies of.
pub const SIGABRT: i32 = 6;

/// Client timeout of a command. Every answer of the contract (503 included)
/// comes back far sooner: the service's own JetStream timeout is 3 s. A
/// command still unanswered after this is a hang and fails the scenario.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Client timeout of a read from the query side.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a service may take to log that it listens (debug build, busy box).
const LISTEN_DEADLINE: Duration = Duration::from_secs(60);
/// How long a service may take to stop on SIGTERM (it commits its stores).
const TERMINATE_DEADLINE: Duration = Duration::from_secs(30);
/// How long a replay of a few thousand events may take in a debug build.
const REPLAY_DEADLINE: Duration = Duration::from_secs(180);
/// How long the query side may take to catch up to a head it was shown.
pub const CATCH_UP_DEADLINE: Duration = Duration::from_secs(60);
/// How long a restarted service may take to become ready.
pub const READY_DEADLINE: Duration = Duration::from_secs(60);
/// Pause between two attempts of a test-side request that may fail while a
/// server is coming back.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Spawn attempts when a free port was taken by a parallel test meanwhile.
const PORT_ATTEMPTS_MAX: u32 = 4;

/// The rounds multiplier: `CHAOS_ROUNDS`, at least 1.
///
/// # Panics
/// When the variable is set to something other than a positive integer.
pub fn rounds() -> u64 {
    static ROUNDS: OnceLock<u64> = OnceLock::new();
    *ROUNDS.get_or_init(|| match std::env::var(ROUNDS_ENV) {
        Ok(v) if !v.trim().is_empty() => match v.trim().parse::<u64>() {
            Ok(n) if n >= 1 => n,
            _ => panic!("{ROUNDS_ENV}={v:?} is not a positive integer"),
        },
        _ => 1,
    })
}

/// The run's seed: `CHAOS_SEED`, or derived from the clock. Printed once.
///
/// # Panics
/// When the variable is set to something other than a u64.
pub fn base_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| {
        let seed = match std::env::var(SEED_ENV) {
            Ok(v) if !v.trim().is_empty() => v
                .trim()
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("{SEED_ENV}={v:?} is not a u64")),
            _ => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                // Truncation is fine: any 64 bits of the clock make a seed.
                #[allow(clippy::cast_possible_truncation, reason = "low bits suffice")]
                let low = nanos as u64;
                splitmix64(low ^ u64::from(std::process::id()).rotate_left(32))
            }
        };
        println!(
            "chaos: {SEED_ENV}={seed} {ROUNDS_ENV}={} (set both to repeat this run); logs in {}",
            rounds(),
            testkit::logs_dir().display()
        );
        seed
    })
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a: a stable hash of a scenario name (std's hasher is not stable).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// xorshift64*: tiny, seeded, good enough to pick moments and commands.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    #[must_use]
    pub fn new(seed: u64) -> Self {
        let s = splitmix64(seed);
        Self(if s == 0 { 0x9E37_79B9_7F4A_7C15 } else { s })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    /// A duration of `lo_ms..=hi_ms` milliseconds.
    pub fn millis(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        Duration::from_millis(self.range(lo_ms, hi_ms))
    }

    /// An index into a slice of `len` items.
    pub fn index(&mut self, len: usize) -> usize {
        usize::try_from(self.below(len as u64)).unwrap_or(0)
    }

    /// An independent generator for a sub-task, derived from this one.
    pub fn fork(&mut self, stream: u64) -> Self {
        Self::new(self.next_u64() ^ splitmix64(stream))
    }
}

/// One scenario's identity and knobs.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub scenario: &'static str,
    pub base_seed: u64,
    pub rounds: u64,
}

impl Ctx {
    /// The scenario's PRNG: the run seed mixed with the scenario name, so
    /// scenarios running in parallel draw independent, repeatable sequences.
    #[must_use]
    pub fn rng(&self) -> Rng {
        Rng::new(self.base_seed ^ fnv1a(self.scenario))
    }

    /// A scratch directory under the test logs: removed when the scenario
    /// passes, kept (next to the service logs) when it fails.
    ///
    /// # Errors
    /// When it cannot be created.
    pub fn scratch(&self, what: &str) -> anyhow::Result<Scratch> {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = testkit::logs_dir().join(format!(
            "chaos-{}-{what}-{}-{n}",
            self.scenario,
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Scratch { dir })
    }
}

/// A directory kept for post-mortems unless [`Scratch::remove`] is called.
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The scenario passed: the files are not needed.
    pub fn remove(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs one scenario on its own task and turns any failure, error or panic,
/// into a panic that names the seed, so the run can be repeated.
pub async fn run<F, Fut>(scenario: &'static str, body: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let ctx = Ctx {
        scenario,
        base_seed: base_seed(),
        rounds: rounds(),
    };
    let (seed, rounds) = (ctx.base_seed, ctx.rounds);
    println!("chaos[{scenario}]: start ({SEED_ENV}={seed} {ROUNDS_ENV}={rounds})");
    let started = Instant::now();
    let failure = match tokio::spawn(body(ctx)).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(join) => Some(match join.try_into_panic() {
            Ok(payload) => payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_else(|| "panic with a non-text payload".to_string()),
            Err(join) => format!("task failed: {join}"),
        }),
    };
    if let Some(why) = failure {
        panic!(
            "chaos[{scenario}] FAILED after {:.1}s; repeat with {SEED_ENV}={seed} {ROUNDS_ENV}={rounds}; \
             service and nats-server logs are kept in {}\n{why}",
            started.elapsed().as_secs_f64(),
            testkit::logs_dir().display()
        );
    }
    println!(
        "chaos[{scenario}]: passed in {:.1}s ({SEED_ENV}={seed})",
        started.elapsed().as_secs_f64()
    );
}

/// The numbers the team tracks, printed as one line per scenario.
#[derive(Debug, Default)]
pub struct Summary {
    pub kills: u64,
    pub events_written: u64,
    pub events_lost: u64,
    pub duplicate_effects: u64,
    /// Recovery times by what was waited for, in the order first recorded.
    recoveries: Vec<(&'static str, Vec<Duration>)>,
    /// Further `key=value` facts (503 counts, parked events, ...).
    notes: BTreeMap<&'static str, String>,
}

impl Summary {
    pub fn recovered(&mut self, what: &'static str, took: Duration) {
        match self.recoveries.iter_mut().find(|(w, _)| *w == what) {
            Some((_, v)) => v.push(took),
            None => self.recoveries.push((what, vec![took])),
        }
    }

    pub fn note(&mut self, key: &'static str, value: impl ToString) {
        self.notes.insert(key, value.to_string());
    }

    /// Prints the summary line.
    pub fn print(&self, ctx: &Ctx) {
        let mut line = format!(
            "CHAOS SUMMARY scenario={} seed={} rounds={} kills={} events_written={} events_lost={} duplicate_effects={}",
            ctx.scenario,
            ctx.base_seed,
            ctx.rounds,
            self.kills,
            self.events_written,
            self.events_lost,
            self.duplicate_effects
        );
        if self.recoveries.is_empty() {
            line.push_str(" recover_ms=n/a");
        }
        for (what, times) in &self.recoveries {
            let ms: Vec<u128> = times.iter().map(Duration::as_millis).collect();
            let max = ms.iter().copied().max().unwrap_or(0);
            let avg = ms.iter().sum::<u128>() / ms.len().max(1) as u128;
            line.push_str(&format!(
                " recover_{what}_ms=max:{max},avg:{avg},n:{}",
                ms.len()
            ));
        }
        for (k, v) in &self.notes {
            line.push_str(&format!(" {k}={v}"));
        }
        println!("{line}");
    }

    /// Fails if anything was lost or doubled.
    ///
    /// # Errors
    /// When events were lost or effects duplicated.
    pub fn ensure_nothing_lost(&self) -> anyhow::Result<()> {
        ensure!(
            self.events_lost == 0,
            "{} acknowledged events were lost",
            self.events_lost
        );
        ensure!(
            self.duplicate_effects == 0,
            "{} effects were applied twice",
            self.duplicate_effects
        );
        Ok(())
    }
}

/// Retries `f` until it succeeds or `deadline` passes; the error names `what`
/// and carries the last failure.
///
/// # Errors
/// The last failure once the deadline has passed.
pub async fn retry<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > end => {
                return Err(e.context(format!("{what}: still failing after {deadline:?}")));
            }
            Err(_) => tokio::time::sleep(RETRY_PAUSE).await,
        }
    }
}

/// A service binary of this workspace running as a child process, spoken to
/// on its own loopback port.
pub struct Service {
    pub process: ServiceProcess,
    pub port: u16,
    pub base_url: String,
    bin: &'static str,
    listening_seen: usize,
    failed_seen: usize,
}

impl Service {
    /// Spawns `bin` with `args(port)` on a free port and waits until its own
    /// log says it listens (a parallel test may have taken the port, which
    /// would satisfy a bare TCP check). `attempts` spawns are tried.
    ///
    /// # Errors
    /// When no attempt comes up.
    pub async fn spawn(
        bin: &'static str,
        args: impl Fn(u16) -> Vec<String>,
        envs: &[(String, String)],
        attempts: u32,
    ) -> anyhow::Result<Self> {
        let mut last = None;
        for _ in 0..attempts.max(1) {
            let port = testkit::free_port();
            let mut e = envs.to_vec();
            e.extend(e2e_tests::service_credentials(bin));
            let a = args(port);
            let spawned =
                tokio::task::spawn_blocking(move || ServiceProcess::spawn(bin, &a, &e, port))
                    .await
                    .context("spawn task")?;
            let process = match spawned {
                Ok(p) => p,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let mut service = Self {
                process,
                port,
                base_url: format!("http://127.0.0.1:{port}"),
                bin,
                listening_seen: 0,
                failed_seen: 0,
            };
            match service.await_listening().await {
                Ok(()) => return Ok(service),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("{bin} did not start")))
    }

    async fn await_listening(&mut self) -> anyhow::Result<()> {
        let listening = format!("{} listening", self.bin);
        let failed = format!("{} failed", self.bin);
        let (want_listening, failed_before) = (self.listening_seen + 1, self.failed_seen);
        let outcome = wait_for(
            &format!("{} to log that it listens", self.bin),
            LISTEN_DEADLINE,
            || {
                let log = self.process.log();
                let outcome = if log.matches(&listening).count() >= want_listening {
                    Some(true)
                } else if log.matches(&failed).count() > failed_before {
                    Some(false)
                } else {
                    None
                };
                async move { outcome }
            },
        )
        .await
        .with_context(|| format!("see {}", self.process.log_path().display()))?;
        if outcome {
            self.listening_seen = want_listening;
            Ok(())
        } else {
            self.failed_seen += 1;
            bail!(
                "{} failed to start; see {}",
                self.bin,
                self.process.log_path().display()
            )
        }
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        tokio::task::block_in_place(|| self.process.kill());
    }

    /// SIGSTOP: alive, running nothing, until [`Service::resume`].
    pub fn suspend(&self) {
        self.process.suspend();
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.process.resume();
    }

    /// Starts the process again with the same arguments, on the same port.
    ///
    /// # Errors
    /// When it does not come back.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let port = self.port;
        tokio::task::block_in_place(|| {
            self.process.kill();
            self.process.start(port)
        })?;
        self.await_listening().await
    }

    /// SIGTERM, and the exit status, which must be a success.
    ///
    /// # Errors
    /// When it does not stop in time or exits with a failure.
    pub fn terminate(&mut self) -> anyhow::Result<()> {
        let status = tokio::task::block_in_place(|| self.process.terminate(TERMINATE_DEADLINE))?;
        ensure!(
            status.success(),
            "{} exited with {status} on SIGTERM; see {}",
            self.bin,
            self.process.log_path().display()
        );
        Ok(())
    }

    #[must_use]
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }
}

/// The arguments of a `posts-command` on `port`.
fn command_args(nats_urls: &str, replicas: usize, port: u16) -> Vec<String> {
    vec![
        "--nats-url".into(),
        nats_urls.into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--replicas".into(),
        replicas.to_string(),
    ]
}

/// The arguments of a `posts-query` on `port` with `data_dir`.
fn query_args(nats_urls: &str, data_dir: &Path, replicas: usize, port: u16) -> Vec<String> {
    vec![
        "--nats-url".into(),
        nats_urls.into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--replicas".into(),
        replicas.to_string(),
    ]
}

/// Spawns a `posts-command` process.
///
/// # Errors
/// When it does not start after `attempts` tries.
pub async fn spawn_command(
    nats_urls: &str,
    replicas: usize,
    attempts: u32,
) -> anyhow::Result<Service> {
    let urls = nats_urls.to_string();
    Service::spawn(
        "posts-command",
        move |port| command_args(&urls, replicas, port),
        &[],
        attempts.max(PORT_ATTEMPTS_MAX),
    )
    .await
}

/// Spawns a `comments-command` process (stream `POSTS` must exist).
///
/// # Errors
/// When it does not start after `attempts` tries.
pub async fn spawn_comments(nats_urls: &str, attempts: u32) -> anyhow::Result<Service> {
    let urls = nats_urls.to_string();
    Service::spawn(
        "comments-command",
        move |port| command_args(&urls, 1, port),
        &[],
        attempts.max(PORT_ATTEMPTS_MAX),
    )
    .await
}

/// Spawns a `reports-query` process on `data_dir`.
///
/// # Errors
/// When it does not start after `attempts` tries.
pub async fn spawn_reports(
    nats_urls: &str,
    data_dir: &Path,
    attempts: u32,
) -> anyhow::Result<Service> {
    let urls = nats_urls.to_string();
    let dir = data_dir.display().to_string();
    Service::spawn(
        "reports-query",
        move |port| {
            vec![
                "--nats-url".into(),
                urls.clone(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--data-dir".into(),
                dir.clone(),
            ]
        },
        &[],
        attempts.max(PORT_ATTEMPTS_MAX),
    )
    .await
}

/// Spawns a `posts-query` process on `data_dir`.
///
/// # Errors
/// When it does not start after `attempts` tries.
pub async fn spawn_query(
    nats_urls: &str,
    data_dir: &Path,
    replicas: usize,
    attempts: u32,
) -> anyhow::Result<Service> {
    let urls = nats_urls.to_string();
    let dir = data_dir.to_path_buf();
    Service::spawn(
        "posts-query",
        move |port| query_args(&urls, &dir, replicas, port),
        &[],
        attempts.max(PORT_ATTEMPTS_MAX),
    )
    .await
}

/// Spawns a `posts-query` process on `data_dir` with `envs` set.
///
/// # Errors
/// When it does not start.
pub async fn spawn_query_with_env(
    nats_urls: &str,
    data_dir: &Path,
    envs: &[(String, String)],
) -> anyhow::Result<Service> {
    let urls = nats_urls.to_string();
    let dir = data_dir.to_path_buf();
    Service::spawn(
        "posts-query",
        move |port| query_args(&urls, &dir, 1, port),
        envs,
        PORT_ATTEMPTS_MAX,
    )
    .await
}

/// Spawns a `posts-query` process on `data_dir` with a fault point armed
/// (`POSTS_FAILPOINT=point@file`: it fails while the file exists).
///
/// # Errors
/// When it does not start.
pub async fn spawn_query_failing(
    nats_urls: &str,
    data_dir: &Path,
    fault_point: &str,
) -> anyhow::Result<Service> {
    let envs = [(FAILPOINT_ENV.to_string(), fault_point.to_string())];
    spawn_query_with_env(nats_urls, data_dir, &envs).await
}

/// Spawns a `posts-query` with a failpoint armed and without waiting for it:
/// it may die before it ever listens.
///
/// # Errors
/// When the binary cannot be spawned.
pub fn spawn_doomed_query(
    nats_urls: &str,
    data_dir: &Path,
    failpoint: &str,
) -> anyhow::Result<ServiceProcess> {
    let args = query_args(nats_urls, data_dir, 1, testkit::free_port());
    let mut envs = vec![(FAILPOINT_ENV.to_string(), failpoint.to_string())];
    envs.extend(e2e_tests::service_credentials("posts-query"));
    ServiceProcess::spawn("posts-query", &args, &envs, 0)
}

/// Waits for a process armed with `failpoint` to abort there by itself.
///
/// # Errors
/// When it does not die in time, dies otherwise, or dies elsewhere.
pub fn expect_failpoint_abort(
    process: &mut ServiceProcess,
    failpoint: &str,
    deadline: Duration,
) -> anyhow::Result<()> {
    use std::os::unix::process::ExitStatusExt;
    let status = tokio::task::block_in_place(|| process.wait_exit(deadline))
        .with_context(|| format!("failpoint {failpoint} never fired"))?;
    ensure!(
        status.signal() == Some(SIGABRT),
        "armed with {failpoint}, the process exited with {status}, not SIGABRT; see {}",
        process.log_path().display()
    );
    let said = format!("failpoint {failpoint}: aborting");
    ensure!(
        process.log().contains(&said),
        "the process aborted, but not at {failpoint}; see {}",
        process.log_path().display()
    );
    Ok(())
}

/// A reqwest client for the query side.
#[must_use]
pub fn read_client() -> reqwest::Client {
    http_client_with_timeout(READ_TIMEOUT)
}

/// GETs `url` and parses the body as JSON.
///
/// # Errors
/// Transport errors and bodies that are not JSON.
pub async fn get_json(http: &reqwest::Client, url: &str) -> anyhow::Result<(u16, Value)> {
    let reply = Reply::of(http.get(url)).await?;
    let body = serde_json::from_str(&reply.body)
        .with_context(|| format!("GET {url}: {} {:?}", reply.status, reply.body))?;
    Ok((reply.status, body))
}

/// One entry of the query side's `/projections`.
#[derive(Debug, Clone)]
pub struct ProjectionStatus {
    pub name: String,
    pub checkpoint: u64,
    /// Applied, committed or not: ahead of `checkpoint` while held.
    pub applied: u64,
    pub parked: u64,
    pub state: String,
}

/// Reads `/projections`: the projections of stream `POSTS` (comment-view,
/// which follows `COMMENTS`, is not these scenarios' business).
///
/// # Errors
/// Transport errors and unexpected shapes.
pub async fn projections(
    http: &reqwest::Client,
    query: &Service,
) -> anyhow::Result<Vec<ProjectionStatus>> {
    let (status, body) = get_json(http, &query.url("/projections")).await?;
    ensure!(status == 200, "/projections answered {status}: {body}");
    let entries = body["data"]
        .as_array()
        .with_context(|| format!("/projections has no data array: {body}"))?;
    entries
        .iter()
        .filter(|e| e["checkpoints"]["POSTS"].is_u64())
        .map(|e| {
            Ok(ProjectionStatus {
                name: e["name"].as_str().context("name")?.to_string(),
                checkpoint: e["checkpoint"].as_u64().context("checkpoint")?,
                applied: e["applied"].as_u64().context("applied")?,
                parked: e["parked"].as_u64().context("parked")?,
                state: e["state"].as_str().unwrap_or_default().to_string(),
            })
        })
        .collect()
}

/// Waits until every projection's checkpoint has reached `head`.
///
/// # Errors
/// When the deadline passes first; the error shows the last status.
pub async fn wait_projections_at(
    http: &reqwest::Client,
    query: &Service,
    head: u64,
    deadline: Duration,
) -> anyhow::Result<Vec<ProjectionStatus>> {
    let last = std::sync::Mutex::new(Vec::new());
    let reached = wait_for(
        &format!("both projections at stream sequence {head}"),
        deadline,
        || async {
            let now = projections(http, query).await.ok()?;
            let done = now.len() == 2 && now.iter().all(|p| p.checkpoint >= head);
            let out = done.then(|| now.clone());
            *last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = now;
            out
        },
    )
    .await;
    reached.with_context(|| {
        format!(
            "last /projections: {:?}; see {}",
            last.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            query.process.log_path().display()
        )
    })
}

/// Waits until `/readyz` answers 200.
///
/// # Errors
/// When the deadline passes first.
pub async fn wait_ready(http: &reqwest::Client, service: &Service) -> anyhow::Result<()> {
    let url = service.url("/readyz");
    wait_for(
        &format!("{} /readyz 200", service.bin),
        READY_DEADLINE,
        || async { (Reply::of(http.get(&url)).await.ok()?.status == 200).then_some(()) },
    )
    .await
    .with_context(|| format!("see {}", service.process.log_path().display()))
}

/// One run of the `replay` tool.
#[derive(Debug)]
pub struct ReplayRun {
    /// What was asked for: `post-view`, `post-search` or `all`.
    pub projection: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub log_path: PathBuf,
}

impl ReplayRun {
    /// Requires exit 0, the projections asked for, and for each `verified:
    /// true` with equal live and rebuilt digests (run with `--verify`).
    ///
    /// # Errors
    /// When the run failed or a digest differed.
    pub fn expect_verified(&self) -> anyhow::Result<()> {
        ensure!(
            self.status.success(),
            "replay exited with {}; see {}",
            self.status,
            self.log_path.display()
        );
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .with_context(|| format!("replay printed no JSON; see {}", self.log_path.display()))?;
        let v: Value = serde_json::from_str(line)?;
        ensure!(v["ok"] == Value::Bool(true), "replay summary: {v}");
        let projections = v["projections"]
            .as_array()
            .with_context(|| format!("replay summary without projections: {v}"))?;
        let mut names: Vec<&str> = projections
            .iter()
            .map(|p| p["name"].as_str().unwrap_or_default())
            .collect();
        names.sort_unstable();
        let mut want: Vec<&str> = match self.projection.as_str() {
            "all" => e2e_tests::PROJECTION_NAMES.to_vec(),
            one => vec![one],
        };
        want.sort_unstable();
        ensure!(
            names == want,
            "replay {} rebuilt {names:?}, want {want:?}: {v}",
            self.projection
        );
        for p in projections {
            ensure!(
                p["verified"] == Value::Bool(true)
                    && p["live_digest"].is_string()
                    && p["live_digest"] == p["rebuilt_digest"],
                "live store differs from a rebuild from sequence 1: {p}"
            );
        }
        Ok(())
    }

    /// Requires that the run died of SIGABRT at `failpoint`.
    ///
    /// # Errors
    /// When it did anything else.
    pub fn expect_failpoint_abort(&self, failpoint: &str) -> anyhow::Result<()> {
        use std::os::unix::process::ExitStatusExt;
        ensure!(
            self.status.signal() == Some(SIGABRT),
            "replay armed with {failpoint} exited with {}, not SIGABRT; see {}",
            self.status,
            self.log_path.display()
        );
        ensure!(
            self.stderr
                .contains(&format!("failpoint {failpoint}: aborting")),
            "replay aborted, but not at {failpoint}; see {}",
            self.log_path.display()
        );
        Ok(())
    }
}

/// Runs `replay <projection> --json [--verify]` offline on `data_dir`, with
/// `failpoint` armed if given. Its output is kept in the test logs.
///
/// # Errors
/// When it cannot be spawned or does not finish in time.
pub async fn run_replay(
    nats_urls: &str,
    data_dir: &Path,
    projection: &str,
    verify: bool,
    failpoint: Option<&str>,
) -> anyhow::Result<ReplayRun> {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut cmd = tokio::process::Command::new(testkit::bin_path("replay"));
    cmd.arg(projection)
        .args(["--nats-url", nats_urls, "--json"])
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .envs(e2e_tests::service_credentials("replay"))
        .env_remove(FAILPOINT_ENV)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if verify {
        cmd.arg("--verify");
    }
    if let Some(fp) = failpoint {
        cmd.env(FAILPOINT_ENV, fp);
    }
    let output = tokio::time::timeout(REPLAY_DEADLINE, cmd.output())
        .await
        .with_context(|| format!("replay {projection} still running after {REPLAY_DEADLINE:?}"))?
        .context("spawn replay (run `cargo build --bins` first)")?;
    let log_path = testkit::logs_dir().join(format!(
        "replay-{projection}-{}-{n}.log",
        std::process::id()
    ));
    let run = ReplayRun {
        projection: projection.to_string(),
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        log_path,
    };
    let _ = std::fs::write(
        &run.log_path,
        format!(
            "replay {projection} verify={verify} failpoint={failpoint:?}\nexit: {}\n--- stdout\n{}\n--- stderr\n{}\n",
            run.status, run.stdout, run.stderr
        ),
    );
    Ok(run)
}
