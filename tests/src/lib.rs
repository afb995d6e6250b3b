//! Shared helpers for the workspace's end-to-end tests: a real `nats-server`,
//! the command service started in-process or as a child process and spoken to
//! over real HTTP sockets, and direct reads of the `POSTS` stream with
//! async-nats (never through the product's own read path).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let env = e2e_tests::CommandEnv::start().await?;
//! let reply = env.create_post("title", "content", "ann").await?;
//! assert_eq!(reply.status, 201);
//! # Ok(()) }
//! ```

use std::collections::HashSet;
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use testkit::NatsServer;

pub use testkit;

/// Per-request timeout of the default client: any contract answer, 503s
/// included, comes back far sooner; a hang must fail the test, not stall it.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a condition may take to hold in [`wait_for`] callers that have no
/// better bound (service recovery, server restart).
pub const CONDITION_DEADLINE: Duration = Duration::from_secs(30);
/// Pause between two looks at a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// Timeout of the async-nats requests the tests make themselves.
const NATS_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The stream and subject layout of DESIGN.md, spelled out independently of
/// the product's constants so a rename there fails here.
pub const STREAM: &str = "POSTS";

#[must_use]
pub fn subject_for(post_id: &str) -> String {
    format!("posts.{post_id}")
}

/// Waits until `cond` returns `Some`, polling every 25 ms, up to `deadline`.
///
/// # Errors
/// When the deadline passes first; the message names `what`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut cond: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = cond().await {
            return Ok(v);
        }
        if Instant::now() > end {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A reqwest client with [`HTTP_TIMEOUT`].
///
/// # Panics
/// When the client cannot be built (no TLS, so only on resource exhaustion).
#[must_use]
pub fn http_client() -> reqwest::Client {
    http_client_with_timeout(HTTP_TIMEOUT)
}

/// A reqwest client with its own per-request timeout.
///
/// # Panics
/// As for [`http_client`].
#[must_use]
pub fn http_client_with_timeout(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("build reqwest client")
}

/// An HTTP answer, read fully.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// Sends `req` and reads the whole answer.
    ///
    /// # Errors
    /// Transport errors and timeouts.
    pub async fn of(req: reqwest::RequestBuilder) -> anyhow::Result<Self> {
        let resp = req.send().await.context("send request")?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.text().await.context("read response body")?;
        Ok(Self {
            status,
            headers,
            body,
        })
    }

    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON.
    ///
    /// # Panics
    /// When the body is not JSON.
    #[must_use]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    /// Asserts a success `status` with an ack body `{post_id, version, seq}`
    /// and returns it.
    ///
    /// # Panics
    /// When the status or body shape differ.
    #[must_use]
    pub fn ack(&self, status: u16) -> Ack {
        assert_eq!(self.status, status, "unexpected answer: {self:?}");
        let v = self.json();
        let obj = v.as_object().expect("ack is an object");
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["post_id", "seq", "version"], "ack fields: {v}");
        Ack {
            post_id: v["post_id"].as_str().expect("post_id string").to_string(),
            version: v["version"].as_u64().expect("version u64"),
            seq: v["seq"].as_u64().expect("seq u64"),
        }
    }

    /// Asserts an RFC 9457 problem document with `status` whose `detail`
    /// contains `detail_part` (case-insensitive), and returns the document.
    ///
    /// # Panics
    /// When it is anything else.
    pub fn assert_problem(&self, status: u16, detail_part: &str) -> Value {
        assert_eq!(self.status, status, "unexpected answer: {self:?}");
        let ct = self.header("content-type").unwrap_or("");
        assert!(
            ct.starts_with("application/problem+json"),
            "content type {ct:?} for {self:?}"
        );
        let v = self.json();
        assert_eq!(v["status"].as_u64(), Some(u64::from(status)), "{v}");
        assert!(
            v["type"].as_str().is_some_and(|t| !t.is_empty()),
            "problem type: {v}"
        );
        assert!(
            v["title"].as_str().is_some_and(|t| !t.is_empty()),
            "problem title: {v}"
        );
        let detail = v["detail"].as_str().unwrap_or_default();
        assert!(
            detail.to_lowercase().contains(&detail_part.to_lowercase()),
            "detail {detail:?} should mention {detail_part:?}"
        );
        v
    }
}

/// The body of a successful command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub post_id: String,
    pub version: u64,
    pub seq: u64,
}

/// A JSON body for `POST /posts`.
#[must_use]
pub fn create_body(title: &str, content: &str, author_name: &str) -> Value {
    json!({"title": title, "content": content, "author_name": author_name})
}

/// A `posts-command` running inside the test process on a real socket.
pub struct InProcessCommand {
    pub base_url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcessCommand {
    /// Connects to `nats_url` (the service's own start-up checks) and serves
    /// on a fresh loopback port.
    ///
    /// # Errors
    /// When the start-up checks fail or no port can be bound.
    pub async fn start(nats_url: &str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let config = posts_command::Config {
            nats_url: vec![nats_url.to_string()],
            listen: addr,
            replicas: 1,
        };
        let state = posts_command::connect(&config).await?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(posts_command::run(state, listener, async {
            let _ = rx.await;
        }));
        Ok(Self {
            base_url: format!("http://{addr}"),
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// Asks for a graceful shutdown and waits for `run` to return.
    ///
    /// # Errors
    /// When `run` failed or did not stop within 10 s.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .context("graceful shutdown took over 10s")???;
        }
        Ok(())
    }
}

impl Drop for InProcessCommand {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Starts a nats-server off the async worker (its start-up wait blocks).
///
/// testkit takes "something on the port speaks NATS" as "our server is up".
/// When two parallel tests drew the same free port, that something can be
/// the other test's server while ours died on `address already in use`; the
/// two tests would then share one server. Our server's own log settles it.
///
/// # Errors
/// When it does not come up.
pub async fn start_nats() -> anyhow::Result<NatsServer> {
    let mut last = None;
    for _ in 0..PORT_RACE_RETRIES_MAX {
        let nats = tokio::task::spawn_blocking(NatsServer::start).await??;
        match nats_listens_itself(&nats, 1).await {
            Ok(()) => return Ok(nats),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("nats-server did not start")))
}

/// Restarts `nats` on its port and store, and checks that the server now on
/// the port is ours (see [`start_nats`]).
///
/// # Errors
/// When it does not come back, or another test's server took the port while
/// ours was down.
pub async fn restart_nats(nats: &mut NatsServer) -> anyhow::Result<()> {
    let starts_before = nats_log(nats).matches(NATS_READY_LINE).count();
    tokio::task::block_in_place(|| nats.restart())?;
    nats_listens_itself(nats, starts_before + 1).await
}

/// What nats-server logs once its client listener is bound.
const NATS_READY_LINE: &str = "Server is ready";

fn nats_log(nats: &NatsServer) -> String {
    std::fs::read_to_string(nats.log_path()).unwrap_or_default()
}

/// Waits until our server's log shows its `n_ready`-th successful start, or
/// a fatal error (such as the port being taken).
async fn nats_listens_itself(nats: &NatsServer, n_ready: usize) -> anyhow::Result<()> {
    let log_path = nats.log_path().to_path_buf();
    let ready = wait_for("nats-server log", Duration::from_secs(10), || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let outcome = if log.matches(NATS_READY_LINE).count() >= n_ready {
            Some(true)
        } else if log.contains("[FTL]") {
            Some(false)
        } else {
            None
        };
        async move { outcome }
    })
    .await?;
    if !ready {
        bail!(
            "our nats-server on port {} did not start (another server holds the port?); see {}",
            nats.port(),
            log_path.display()
        );
    }
    Ok(())
}

/// A JetStream context of the test's own, independent of the service's.
///
/// # Errors
/// When the server does not answer.
pub async fn jetstream_for(nats_url: &str) -> anyhow::Result<jetstream::Context> {
    let client = async_nats::ConnectOptions::new()
        .name("e2e-tests")
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(NATS_REQUEST_TIMEOUT))
        // Tests restart servers: come back within half a second, not after
        // the default exponential backoff.
        .reconnect_delay_callback(|attempts| {
            let attempts = u32::try_from(attempts).unwrap_or(u32::MAX).min(10);
            (Duration::from_millis(50) * attempts).min(Duration::from_millis(500))
        })
        .connect(nats_url)
        .await
        .with_context(|| format!("connect test client to {nats_url}"))?;
    let mut js = jetstream::new(client);
    js.set_timeout(NATS_REQUEST_TIMEOUT);
    Ok(js)
}

/// Reads the `POSTS` stream directly with async-nats.
#[derive(Clone)]
pub struct StreamReader {
    pub js: jetstream::Context,
}

impl StreamReader {
    /// # Errors
    /// When the server does not answer.
    pub async fn connect(nats_url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            js: jetstream_for(nats_url).await?,
        })
    }

    /// # Errors
    /// When the stream is missing or the server does not answer.
    pub async fn stream(&self) -> anyhow::Result<jetstream::stream::Stream> {
        self.js
            .get_stream(STREAM)
            .await
            .with_context(|| format!("get stream {STREAM}"))
    }

    /// # Errors
    /// As for [`StreamReader::stream`].
    pub async fn info(&self) -> anyhow::Result<jetstream::stream::Info> {
        Ok(self.stream().await?.get_info().await?)
    }

    /// The stream's last sequence.
    ///
    /// # Errors
    /// As for [`StreamReader::stream`].
    pub async fn last_seq(&self) -> anyhow::Result<u64> {
        Ok(self.info().await?.state.last_sequence)
    }

    /// Every message of the stream, read one by one with the stream's
    /// message-get API (not direct get, which the product loads with). The
    /// stream denies deletes, so sequences `1..=last` are all present.
    ///
    /// # Errors
    /// When a message is missing or the server does not answer.
    pub async fn all_messages(&self) -> anyhow::Result<Vec<jetstream::message::StreamMessage>> {
        let stream = self.stream().await?;
        let info = stream.get_info().await?;
        let mut out = Vec::new();
        for seq in info.state.first_sequence.max(1)..=info.state.last_sequence {
            let msg = stream
                .get_raw_message(seq)
                .await
                .with_context(|| format!("get message {seq}"))?;
            out.push(msg);
        }
        Ok(out)
    }

    /// The messages of one post, in stream order.
    ///
    /// # Errors
    /// As for [`StreamReader::all_messages`].
    pub async fn post_messages(
        &self,
        post_id: &str,
    ) -> anyhow::Result<Vec<jetstream::message::StreamMessage>> {
        let subject = subject_for(post_id);
        Ok(self
            .all_messages()
            .await?
            .into_iter()
            .filter(|m| m.subject.as_str() == subject)
            .collect())
    }
}

/// A header value of a stored message.
#[must_use]
pub fn msg_header<'a>(msg: &'a jetstream::message::StreamMessage, name: &str) -> Option<&'a str> {
    msg.headers.get(name).map(async_nats::HeaderValue::as_str)
}

/// Decodes a stored event's payload through its `Event-Type` and `Event-Schema`.
///
/// # Panics
/// When the envelope or payload does not decode.
#[must_use]
pub fn decode_event(msg: &jetstream::message::StreamMessage) -> posts::Event {
    let ty = msg_header(msg, "Event-Type").expect("Event-Type header");
    let schema: u32 = msg_header(msg, "Event-Schema")
        .expect("Event-Schema header")
        .parse()
        .expect("Event-Schema is an integer");
    posts::decode(ty, schema, &msg.payload)
        .unwrap_or_else(|e| panic!("event at seq {} does not decode: {e}", msg.sequence))
}

/// The `content` an event sets, if any.
#[must_use]
pub fn event_content(event: &posts::Event) -> Option<&str> {
    match event {
        posts::Event::Created { content, .. } => Some(content),
        posts::Event::Updated { content, .. } => content.as_deref(),
        posts::Event::Deleted => None,
    }
}

/// Asserts that the stream sequences of `msgs` strictly increase.
///
/// # Panics
/// When they do not.
pub fn assert_increasing(msgs: &[jetstream::message::StreamMessage]) {
    for pair in msgs.windows(2) {
        assert!(
            pair[0].sequence < pair[1].sequence,
            "stream order broken: {} then {}",
            pair[0].sequence,
            pair[1].sequence
        );
    }
}

/// Asserts that `versions` are distinct and exactly `first..=first+n-1`.
///
/// # Panics
/// When a version repeats or one is missing.
pub fn assert_contiguous(versions: &[u64], first: u64) {
    let distinct: HashSet<u64> = versions.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        versions.len(),
        "versions repeat: {versions:?}"
    );
    let n = u64::try_from(versions.len()).expect("count fits u64");
    let want: HashSet<u64> = (first..first + n).collect();
    assert_eq!(distinct, want, "versions are not contiguous from {first}");
}

/// A real nats-server, an in-process `posts-command` on it, an HTTP client and
/// a direct reader of the stream: what most command tests need.
pub struct CommandEnv {
    pub nats: NatsServer,
    pub service: InProcessCommand,
    pub http: reqwest::Client,
    pub reader: StreamReader,
}

impl CommandEnv {
    /// # Errors
    /// When nats-server or the service does not start.
    pub async fn start() -> anyhow::Result<Self> {
        let nats = start_nats().await?;
        let service = InProcessCommand::start(&nats.url()).await?;
        let reader = StreamReader::connect(&nats.url()).await?;
        Ok(Self {
            nats,
            service,
            http: http_client(),
            reader,
        })
    }

    #[must_use]
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.service.base_url)
    }

    /// `POST /posts` with a JSON body.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn create(&self, body: &Value) -> anyhow::Result<Reply> {
        Reply::of(self.http.post(self.url("/posts")).json(body)).await
    }

    /// `POST /posts` with the three fields.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn create_post(
        &self,
        title: &str,
        content: &str,
        author_name: &str,
    ) -> anyhow::Result<Reply> {
        self.create(&create_body(title, content, author_name)).await
    }

    /// Creates a post and returns its ack, asserting 201.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn new_post(&self, title: &str) -> anyhow::Result<Ack> {
        Ok(self
            .create_post(title, "some content", "e2e")
            .await?
            .ack(201))
    }

    /// `PATCH /posts/{id}` with a JSON body and optional `If-Match`.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn patch(
        &self,
        post_id: &str,
        body: &Value,
        if_match: Option<&str>,
    ) -> anyhow::Result<Reply> {
        let mut req = self
            .http
            .patch(self.url(&format!("/posts/{post_id}")))
            .json(body);
        if let Some(v) = if_match {
            req = req.header("If-Match", v);
        }
        Reply::of(req).await
    }

    /// `DELETE /posts/{id}`.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn delete(&self, post_id: &str) -> anyhow::Result<Reply> {
        Reply::of(self.http.delete(self.url(&format!("/posts/{post_id}")))).await
    }

    /// `GET path`.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn get(&self, path: &str) -> anyhow::Result<Reply> {
        Reply::of(self.http.get(self.url(path))).await
    }
}

/// The arguments that point a `posts-command` process at `nats_url` and make
/// it listen on `port`.
#[must_use]
pub fn command_args(nats_url: &str, port: u16) -> Vec<String> {
    vec![
        "--nats-url".to_string(),
        nats_url.to_string(),
        "--listen".to_string(),
        format!("127.0.0.1:{port}"),
    ]
}

/// Spawns a `posts-command` process (built by `cargo build --bins`) on a free
/// port and waits until it listens. Retries when the port was taken.
///
/// # Errors
/// When it does not start.
pub async fn spawn_command_process(
    nats_url: &str,
) -> anyhow::Result<(testkit::ServiceProcess, String)> {
    let http = http_client_with_timeout(Duration::from_secs(2));
    let mut last = None;
    for _ in 0..PORT_RACE_RETRIES_MAX {
        let port = testkit::free_port();
        let args = command_args(nats_url, port);
        let spawned = tokio::task::spawn_blocking(move || {
            testkit::ServiceProcess::spawn("posts-command", &args, &[], port)
        })
        .await?;
        let process = match spawned {
            Ok(p) => p,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        // The port may have been taken by another test's service in between,
        // which would satisfy testkit's readiness check: our own log settles it.
        let listening = wait_for("posts-command log", Duration::from_secs(10), || {
            let log = process.log();
            let outcome = if log.contains("posts-command listening") {
                Some(true)
            } else if log.contains("posts-command failed") {
                Some(false)
            } else {
                None
            };
            async move { outcome }
        })
        .await;
        let base_url = format!("http://127.0.0.1:{port}");
        let livez = format!("{base_url}/livez");
        let ours = match listening {
            Ok(true) => {
                wait_for("posts-command /livez", Duration::from_secs(5), || {
                    let req = http.get(&livez);
                    async move {
                        let r = Reply::of(req).await.ok()?;
                        (r.status == 200 && r.body == "ok").then_some(())
                    }
                })
                .await
            }
            Ok(false) => Err(anyhow::anyhow!("posts-command failed to start")),
            Err(e) => Err(e),
        };
        match ours {
            Ok(()) => return Ok((process, base_url)),
            Err(e) => last = Some(e.context(format!("see {}", process.log_path().display()))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("posts-command did not start")))
}

/// Spawn attempts when a free port was taken by someone else in between.
const PORT_RACE_RETRIES_MAX: u32 = 3;
