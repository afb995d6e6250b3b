//! The write load and its oracle. Writers send a mixed workload of commands
//! over HTTP; every command carries its own `X-Correlation-Id`, which the
//! service stores on the event, so the oracle can later tell exactly which
//! commands took effect: the acknowledged ones (with version and sequence
//! from the response) and, among those whose outcome is unknown (503,
//! timeout), the ones the stream shows.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::{Value, json};
use tokio::sync::{OwnedRwLockWriteGuard, RwLock};

use crate::support::Rng;

/// The word every post's content carries, so a search for it finds every
/// live post of an author.
pub const COMMON_WORD: &str = "chaos";
/// Words for titles and contents: none is within two edits of the common
/// word, so typo tolerance cannot blur the per-author counts.
const WORDS: [&str; 10] = [
    "river", "stone", "lantern", "orbit", "maple", "quartz", "harbor", "violet", "ember", "tundra",
];
/// Unexpected answers kept verbatim for the failure message.
const UNEXPECTED_KEPT_MAX: usize = 20;

/// A command, as the oracle remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Create {
        title: String,
        content: String,
        author: String,
    },
    Update {
        title: Option<String>,
        content: Option<String>,
        author: Option<String>,
    },
    Delete,
}

impl Op {
    /// The event this command must have produced, if it produced one.
    #[must_use]
    pub fn event(&self) -> posts::Event {
        match self.clone() {
            Op::Create {
                title,
                content,
                author,
            } => posts::Event::Created {
                title,
                content,
                author_name: author,
            },
            Op::Update {
                title,
                content,
                author,
            } => posts::Event::Updated {
                title,
                content,
                author_name: author,
            },
            Op::Delete => posts::Event::Deleted,
        }
    }
}

/// A command to send: to which post, what, pinned to which version.
#[derive(Debug, Clone)]
pub struct Plan {
    pub post_id: Option<String>,
    pub op: Op,
    pub if_match: Option<u64>,
}

/// What came back.
#[derive(Debug, Clone)]
pub enum Outcome {
    Acked {
        post_id: String,
        version: u64,
        seq: u64,
    },
    /// 412 or 409: refused, nothing appended. `deleted` when the post is.
    Refused { status: u16, deleted: bool },
    /// 503: the event store was unavailable; the outcome is unknown.
    Unavailable,
    /// No answer within the client timeout: a hang.
    Timeout(String),
    /// The connection failed.
    Transport(String),
    /// Any other answer.
    Unexpected { status: u16, body: String },
}

/// One acknowledged command.
#[derive(Debug, Clone)]
pub struct Acked {
    pub post_id: String,
    pub corr: String,
    pub version: u64,
    pub seq: u64,
    pub at: Instant,
}

/// Counts of answers by kind.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub sent: u64,
    pub acked: u64,
    pub precondition_failed: u64,
    pub conflicts: u64,
    pub unavailable: u64,
    pub timeouts: u64,
    pub transport_errors: u64,
    pub server_errors: u64,
    pub unexpected: Vec<String>,
}

/// What the writers know from the answers alone.
#[derive(Debug, Default, Clone)]
pub struct Oracle {
    /// Every command that may have taken effect (acknowledged or unknown),
    /// by correlation id. Refused commands are not here: if one shows up in
    /// the stream, that is a bug.
    pub ops: HashMap<String, Op>,
    pub acked: Vec<Acked>,
    /// Correlation ids of the commands whose outcome is unknown.
    pub uncertain: Vec<String>,
    /// Highest acknowledged version per post: what a pinned update pins.
    pub latest: HashMap<String, u64>,
    /// Posts believed live, in the order their creation was acknowledged.
    pub live: Vec<String>,
    pub stats: Stats,
}

pub type SharedOracle = Arc<Mutex<Oracle>>;

impl Oracle {
    #[must_use]
    pub fn shared() -> SharedOracle {
        Arc::new(Mutex::new(Self::default()))
    }

    /// Files the answer to one command.
    pub fn record(&mut self, plan: &Plan, corr: &str, outcome: Outcome) {
        self.stats.sent += 1;
        let unknown = |me: &mut Self| {
            me.ops.insert(corr.to_string(), plan.op.clone());
            me.uncertain.push(corr.to_string());
        };
        match outcome {
            Outcome::Acked {
                post_id,
                version,
                seq,
            } => {
                let consistent = match &plan.post_id {
                    Some(id) => *id == post_id,
                    None => version == 1,
                };
                if !consistent {
                    self.unexpected(format!(
                        "ack {post_id} v{version} does not fit {plan:?} ({corr})"
                    ));
                }
                self.stats.acked += 1;
                self.ops.insert(corr.to_string(), plan.op.clone());
                match plan.op {
                    Op::Create { .. } => self.live.push(post_id.clone()),
                    Op::Delete => self.live.retain(|p| *p != post_id),
                    Op::Update { .. } => {}
                }
                let latest = self.latest.entry(post_id.clone()).or_insert(0);
                *latest = (*latest).max(version);
                self.acked.push(Acked {
                    post_id,
                    corr: corr.to_string(),
                    version,
                    seq,
                    at: Instant::now(),
                });
            }
            Outcome::Refused { status, deleted } => {
                if status == 412 {
                    self.stats.precondition_failed += 1;
                } else {
                    self.stats.conflicts += 1;
                }
                if deleted && let Some(id) = &plan.post_id {
                    self.live.retain(|p| p != id);
                }
            }
            Outcome::Unavailable => {
                self.stats.unavailable += 1;
                unknown(self);
            }
            Outcome::Timeout(why) => {
                self.stats.timeouts += 1;
                self.unexpected(format!("timeout ({corr}, {plan:?}): {why}"));
                unknown(self);
            }
            Outcome::Transport(why) => {
                self.stats.transport_errors += 1;
                self.unexpected(format!("transport error ({corr}, {plan:?}): {why}"));
                unknown(self);
            }
            Outcome::Unexpected { status, body } => {
                if status >= 500 {
                    self.stats.server_errors += 1;
                }
                self.unexpected(format!("{status} ({corr}, {plan:?}): {body}"));
                unknown(self);
            }
        }
    }

    fn unexpected(&mut self, what: String) {
        if self.stats.unexpected.len() < UNEXPECTED_KEPT_MAX {
            self.stats.unexpected.push(what);
        }
    }

    /// Fails unless every answer was one the contract allows: acks, 412,
    /// 409 and (when `allow_503`) 503. Never a 500, a hang or a dead socket.
    ///
    /// # Errors
    /// Naming the first unexpected answers.
    pub fn ensure_clean_answers(&self, allow_503: bool) -> anyhow::Result<()> {
        let s = &self.stats;
        ensure!(
            s.unexpected.is_empty() && (allow_503 || s.unavailable == 0),
            "unexpected command answers: {} timeouts, {} transport errors, {} 5xx (not 503), {} 503 (allowed: {allow_503}); first ones:\n{}",
            s.timeouts,
            s.transport_errors,
            s.server_errors,
            s.unavailable,
            s.unexpected.join("\n")
        );
        Ok(())
    }
}

/// How writers pick commands: weights out of their sum.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub create: u64,
    pub pinned_update: u64,
    pub unpinned_update: u64,
    pub delete: u64,
}

impl Mix {
    /// Creates, pinned and unpinned updates, deletes.
    pub const MIXED: Mix = Mix {
        create: 25,
        pinned_update: 30,
        unpinned_update: 33,
        delete: 12,
    };
    /// Only updates of existing posts.
    pub const UPDATES: Mix = Mix {
        create: 0,
        pinned_update: 50,
        unpinned_update: 50,
        delete: 0,
    };
}

/// What the writers share.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Command services; writers spread their commands over them.
    pub command_urls: Vec<String>,
    pub authors: Vec<String>,
    pub mix: Mix,
    /// Pause between two commands of one writer, in ms: keeps the load
    /// moderate on a small, busy machine. Pacing, not synchronisation.
    pub pace_ms: (u64, u64),
    /// Prefix of the correlation ids, unique per scenario.
    pub tag: String,
    pub http: reqwest::Client,
}

impl LoadConfig {
    /// Authors used by the load.
    #[must_use]
    pub fn default_authors() -> Vec<String> {
        ["ann", "bob", "cyd", "dee"]
            .iter()
            .map(ToString::to_string)
            .collect()
    }
}

/// Chooses the next command from what the oracle knows.
pub fn choose(rng: &mut Rng, oracle: &Oracle, cfg: &LoadConfig, n: u64) -> Plan {
    let mix = cfg.mix;
    let total = mix.create + mix.pinned_update + mix.unpinned_update + mix.delete;
    let roll = rng.below(total);
    if oracle.live.is_empty() || roll < mix.create {
        return Plan {
            post_id: None,
            op: Op::Create {
                title: title(rng, &cfg.tag, n),
                content: content(rng, &cfg.tag, n),
                author: cfg.authors[rng.index(cfg.authors.len())].clone(),
            },
            if_match: None,
        };
    }
    let post_id = oracle.live[rng.index(oracle.live.len())].clone();
    let roll = roll - mix.create;
    if roll >= mix.pinned_update + mix.unpinned_update {
        return Plan {
            post_id: Some(post_id),
            op: Op::Delete,
            if_match: None,
        };
    }
    let if_match =
        (roll < mix.pinned_update).then(|| oracle.latest.get(&post_id).copied().unwrap_or(1));
    // A non-empty subset of the three fields.
    let fields = rng.range(1, 7);
    let op = Op::Update {
        title: (fields & 1 != 0).then(|| title(rng, &cfg.tag, n)),
        content: (fields & 2 != 0).then(|| content(rng, &cfg.tag, n)),
        author: (fields & 4 != 0).then(|| cfg.authors[rng.index(cfg.authors.len())].clone()),
    };
    Plan {
        post_id: Some(post_id),
        op,
        if_match,
    }
}

fn word(rng: &mut Rng) -> &'static str {
    WORDS[rng.index(WORDS.len())]
}

fn title(rng: &mut Rng, tag: &str, n: u64) -> String {
    format!("{} {} {tag} n{n}", word(rng), word(rng))
}

/// Unique per command (tag and counter), always with the common word.
fn content(rng: &mut Rng, tag: &str, n: u64) -> String {
    format!(
        "{COMMON_WORD} {} {} {} — {tag} n{n}",
        word(rng),
        word(rng),
        word(rng)
    )
}

/// Sends one command with its correlation id and classifies the answer.
pub async fn execute(http: &reqwest::Client, base_url: &str, plan: &Plan, corr: &str) -> Outcome {
    let req = match (&plan.op, &plan.post_id) {
        (
            Op::Create {
                title,
                content,
                author,
            },
            _,
        ) => http
            .post(format!("{base_url}/posts"))
            .json(&json!({"title": title, "content": content, "author_name": author})),
        (
            Op::Update {
                title,
                content,
                author,
            },
            Some(id),
        ) => {
            let mut body = serde_json::Map::new();
            for (k, v) in [
                ("title", title),
                ("content", content),
                ("author_name", author),
            ] {
                if let Some(v) = v {
                    body.insert(k.to_string(), json!(v));
                }
            }
            http.patch(format!("{base_url}/posts/{id}"))
                .json(&Value::Object(body))
        }
        (Op::Delete, Some(id)) => http.delete(format!("{base_url}/posts/{id}")),
        (_, None) => {
            return Outcome::Unexpected {
                status: 0,
                body: "update or delete without a post id".into(),
            };
        }
    };
    let mut req = req.header("X-Correlation-Id", corr);
    if let Some(v) = plan.if_match {
        req = req.header("If-Match", format!("\"{v}\""));
    }
    let failed = |e: reqwest::Error| {
        if e.is_timeout() {
            Outcome::Timeout(e.to_string())
        } else {
            Outcome::Transport(format!("{e:#}"))
        }
    };
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let status = resp.status().as_u16();
    let body = match resp.text().await {
        Ok(b) => b,
        Err(e) => return failed(e),
    };
    match status {
        200 | 201 => {
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            match (
                v["post_id"].as_str(),
                v["version"].as_u64(),
                v["seq"].as_u64(),
            ) {
                (Some(post_id), Some(version), Some(seq)) => Outcome::Acked {
                    post_id: post_id.to_string(),
                    version,
                    seq,
                },
                _ => Outcome::Unexpected { status, body },
            }
        }
        412 => Outcome::Refused {
            status,
            deleted: false,
        },
        409 => Outcome::Refused {
            status,
            deleted: body.contains("is deleted"),
        },
        503 => Outcome::Unavailable,
        _ => Outcome::Unexpected { status, body },
    }
}

/// Sends one command and files its answer; returns the answer.
pub async fn send_recorded(
    cfg: &LoadConfig,
    oracle: &SharedOracle,
    base_url: &str,
    plan: &Plan,
    corr: &str,
) -> Outcome {
    let outcome = execute(&cfg.http, base_url, plan, corr).await;
    lock(oracle).record(plan, corr, outcome.clone());
    outcome
}

/// Locks the oracle, whatever a panicking writer left behind.
pub fn lock(oracle: &SharedOracle) -> std::sync::MutexGuard<'_, Oracle> {
    oracle.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A copy of the oracle to check against (no lock held across awaits).
#[must_use]
pub fn snapshot(oracle: &SharedOracle) -> Oracle {
    lock(oracle).clone()
}

/// A pool of writer tasks that can be paused (no command in flight) and stopped.
pub struct Writers {
    handles: Vec<tokio::task::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    gate: Arc<RwLock<()>>,
    paused: Option<OwnedRwLockWriteGuard<()>>,
}

impl Writers {
    /// Starts `n` writers, each with its own PRNG forked from `rng`.
    pub fn start(cfg: &LoadConfig, oracle: &SharedOracle, n: usize, rng: &mut Rng) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(RwLock::new(()));
        let handles = (0..n)
            .map(|id| {
                let writer = Writer {
                    id,
                    cfg: cfg.clone(),
                    oracle: oracle.clone(),
                    stop: stop.clone(),
                    gate: gate.clone(),
                    rng: rng.fork(id as u64),
                };
                tokio::spawn(writer.run())
            })
            .collect();
        Self {
            handles,
            stop,
            gate,
            paused: None,
        }
    }

    /// Returns once no command is in flight; none starts until [`Writers::resume`].
    pub async fn pause(&mut self) {
        if self.paused.is_none() {
            self.paused = Some(self.gate.clone().write_owned().await);
        }
    }

    pub fn resume(&mut self) {
        self.paused = None;
    }

    /// Stops every writer after its command in flight.
    ///
    /// # Errors
    /// When a writer panicked.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        self.resume();
        for h in self.handles.drain(..) {
            h.await.context("writer task")?;
        }
        Ok(())
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in &self.handles {
            h.abort();
        }
    }
}

struct Writer {
    id: usize,
    cfg: LoadConfig,
    oracle: SharedOracle,
    stop: Arc<AtomicBool>,
    gate: Arc<RwLock<()>>,
    rng: Rng,
}

impl Writer {
    async fn run(mut self) {
        let mut n = 0u64;
        while !self.stop.load(Ordering::SeqCst) {
            let (lo, hi) = self.cfg.pace_ms;
            tokio::time::sleep(self.rng.millis(lo, hi)).await;
            // Held until the answer is filed: a pause waits for it.
            let _open = self.gate.read().await;
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            n += 1;
            let corr = format!("{}-w{}-n{n}", self.cfg.tag, self.id);
            let plan = {
                let o = lock(&self.oracle);
                choose(&mut self.rng, &o, &self.cfg, n * 100 + self.id as u64)
            };
            let urls = &self.cfg.command_urls;
            let base = &urls[(self.id + usize::try_from(n).unwrap_or(0)) % urls.len()];
            send_recorded(&self.cfg, &self.oracle, base, &plan, &corr).await;
        }
    }
}

/// Creates a post through `base_url`, recorded in the oracle, retrying (each
/// attempt a new command) until one is acknowledged. Returns the ack and how
/// long it took.
///
/// # Errors
/// When no create is acknowledged within `deadline`.
pub async fn create_until_acked(
    cfg: &LoadConfig,
    oracle: &SharedOracle,
    base_url: &str,
    rng: &mut Rng,
    label: &str,
    deadline: Duration,
) -> anyhow::Result<(Acked, Duration)> {
    let started = Instant::now();
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        let corr = format!("{}-{label}-a{attempt}", cfg.tag);
        let plan = Plan {
            post_id: None,
            op: Op::Create {
                title: title(rng, &cfg.tag, attempt),
                content: content(rng, &cfg.tag, attempt),
                author: cfg.authors[rng.index(cfg.authors.len())].clone(),
            },
            if_match: None,
        };
        if let Outcome::Acked { .. } = send_recorded(cfg, oracle, base_url, &plan, &corr).await {
            let o = lock(oracle);
            let ack = o
                .acked
                .iter()
                .rev()
                .find(|a| a.corr == corr)
                .cloned()
                .context("ack just filed")?;
            return Ok((ack, started.elapsed()));
        }
        anyhow::ensure!(
            started.elapsed() < deadline,
            "no create acknowledged within {deadline:?} ({attempt} attempts)"
        );
        // Probing a service that is coming back: pacing, not synchronisation.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
