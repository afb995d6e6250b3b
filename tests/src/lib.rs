//! Shared helpers for the workspace's end-to-end tests: a real `nats-server`,
//! the command and query services started in-process or as child processes
//! and spoken to over real HTTP sockets, the `replay` binary run to
//! completion, direct reads of the `POSTS` stream with async-nats (never
//! through the product's own read path), and a model of what a test wrote
//! ([`Written`]) to compare the read models against.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let env = e2e_tests::CommandEnv::start().await?;
//! let reply = env.create_post("title", "content", "ann").await?;
//! assert_eq!(reply.status, 201);
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
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

/// The stream and subject layout of docs/api.md, spelled out independently of
/// the product's constants so a rename there fails here.
pub const STREAM: &str = "POSTS";

#[must_use]
pub fn subject_for(post_id: &str) -> String {
    format!("posts.{post_id}")
}

/// Creates streams `POSTS` and `DLQ` as `posts-command` does at start-up:
/// a query service only waits for them.
///
/// # Errors
/// When NATS cannot be reached or refuses.
pub async fn provision_streams(nats_url: &str) -> anyhow::Result<()> {
    let client = async_nats::connect(nats_url).await?;
    let js = jetstream::new(client);
    eventstore::provision(&js, &posts::context::stream(1)).await?;
    eventstore::provision(&js, &eventstore::dlq_spec(1)).await?;
    Ok(())
}

/// The admin listener of the `posts-query` running on `data_dir`, as
/// `http://host:port`, from the service file it writes there.
///
/// # Errors
/// When the file is missing or names no admin address.
pub fn admin_url(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join("posts-query.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let v: Value = serde_json::from_str(&text)?;
    let admin = v["admin"]
        .as_str()
        .with_context(|| format!("{} has no admin address: {text}", path.display()))?;
    Ok(format!("http://{admin}"))
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
        // The services close connections idle for 20 s (servicekit::Limits):
        // a pooled one is dropped before, never reused as the server closes it.
        .pool_idle_timeout(Duration::from_secs(5))
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
        // A registered type, as a reference to its page, with its own title.
        let kind = v["type"].as_str().unwrap_or_default();
        let registered = kind
            .strip_prefix("/docs/problems/")
            .and_then(servicekit::problem_type);
        assert!(
            registered.is_some(),
            "problem type {kind:?} is not registered: {v}"
        );
        assert_eq!(
            v["title"].as_str(),
            registered.map(|t| t.title),
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

/// A service's `run` future on the test's runtime, serving a real socket,
/// with a graceful stop.
pub struct InProcessService {
    pub base_url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcessService {
    /// Spawns `run(shutdown)` for a service listening on `addr`.
    fn spawn<F>(
        addr: std::net::SocketAddr,
        run: impl FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> F,
    ) -> Self
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(Box::pin(async {
            let _ = rx.await;
        })));
        Self {
            base_url: format!("http://{addr}"),
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// `posts-command`: connects to `nats_url` (the service's own start-up
    /// checks) and serves on a fresh loopback port.
    ///
    /// # Errors
    /// When the start-up checks fail or no port can be bound.
    pub async fn start_command(nats_url: &str) -> anyhow::Result<Self> {
        Self::start_command_with_budget(nats_url, eventstore::STREAM_MAX_BYTES_DEFAULT).await
    }

    /// [`InProcessService::start_command`] with stream `POSTS`'s byte budget
    /// set to `stream_max_bytes`.
    ///
    /// # Errors
    /// As for [`InProcessService::start_command`].
    pub async fn start_command_with_budget(
        nats_url: &str,
        stream_max_bytes: i64,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let config = posts_command::Config {
            nats_url: vec![nats_url.to_string()],
            nats_user: None,
            nats_password: None,
            listen: addr,
            replicas: 1,
            stream_max_bytes,
        };
        let state = posts_command::connect(&config).await?;
        Ok(Self::spawn(addr, |stop| {
            posts_command::run(state, listener, stop)
        }))
    }

    /// `comments-command`: connects to `nats_url` (stream `POSTS` must
    /// exist: start posts-command first) and serves on a fresh loopback port.
    ///
    /// # Errors
    /// When the start-up checks fail or no port can be bound.
    pub async fn start_comments(nats_url: &str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let config = comments_command::Config {
            nats_url: vec![nats_url.to_string()],
            nats_user: None,
            nats_password: None,
            listen: addr,
            replicas: 1,
            stream_max_bytes: eventstore::STREAM_MAX_BYTES_DEFAULT,
        };
        let state = comments_command::connect(&config).await?;
        Ok(Self::spawn(addr, |stop| {
            comments_command::run(state, listener, stop)
        }))
    }

    /// `reports-query` on `data_dir` (streams `POSTS` and `COMMENTS` must
    /// exist): serves on a fresh loopback port.
    ///
    /// # Errors
    /// When the start-up checks fail or no port can be bound.
    pub async fn start_reports(nats_url: &str, data_dir: &std::path::Path) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let config = reports_query::Config {
            nats_url: vec![nats_url.to_string()],
            nats_user: None,
            nats_password: None,
            listen: addr,
            data_dir: data_dir.to_path_buf(),
        };
        let state = reports_query::start(&config).await?;
        Ok(Self::spawn(addr, |stop| {
            reports_query::run(state, listener, stop)
        }))
    }

    /// `posts-query` on `data_dir`: connects to `nats_url`, opens both
    /// projections and serves on a fresh loopback port.
    ///
    /// # Errors
    /// When the start-up checks fail or no port can be bound.
    pub async fn start_query(nats_url: &str, data_dir: &std::path::Path) -> anyhow::Result<Self> {
        provision_streams(nats_url).await?;
        Self::start_query_on_existing_streams(nats_url, data_dir).await
    }

    /// [`InProcessService::start_query`] on streams the command services
    /// made: what a query service's NATS user must do (it may not create
    /// one).
    ///
    /// # Errors
    /// When the start-up checks fail or no port can be bound.
    pub async fn start_query_on_existing_streams(
        nats_url: &str,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let config = posts_query::Config {
            nats_url: vec![nats_url.to_string()],
            nats_user: None,
            nats_password: None,
            listen: addr,
            admin_listen: "127.0.0.1:0".parse()?,
            data_dir: data_dir.to_path_buf(),
            replicas: 1,
        };
        let state = posts_query::start(&config, addr).await?;
        Ok(Self::spawn(addr, |stop| {
            posts_query::run(state, listener, stop)
        }))
    }

    /// `gateway` with `config` (its `listen` is ignored): serves on a fresh
    /// loopback port.
    ///
    /// # Errors
    /// A bad configuration, or no port can be bound.
    pub async fn start_gateway(config: &gateway::Config) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let gw = std::sync::Arc::new(gateway::Gateway::new(config)?);
        Ok(Self::spawn(addr, |stop| gateway::run(gw, listener, stop)))
    }

    /// Asks for a graceful shutdown and waits for `run` to return (the query
    /// service's runners commit what they applied).
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

impl Drop for InProcessService {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The repository's `nats/` directory.
#[must_use]
pub fn nats_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../nats")
}

/// `nats/dev-users.env` as (variable, value) pairs.
///
/// # Panics
/// When the file cannot be read.
#[must_use]
pub fn dev_nats_passwords() -> Vec<(String, String)> {
    let path = nats_dir().join("dev-users.env");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The development password of NATS user `user` (`NATS_PASSWORD_<USER>`).
///
/// # Panics
/// When `nats/dev-users.env` has none.
#[must_use]
pub fn dev_nats_password(user: &str) -> String {
    let var = format!(
        "NATS_PASSWORD_{}",
        user.to_ascii_uppercase().replace('-', "_")
    );
    dev_nats_passwords()
        .into_iter()
        .find(|(k, _)| *k == var)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("{var} is not in nats/dev-users.env"))
}

/// The environment a service binary runs with to connect as its own NATS
/// user (`NATS_USER=<bin>`, its development password). An open server
/// ignores credentials, so every spawned service gets them.
#[must_use]
pub fn service_credentials(bin: &str) -> Vec<(String, String)> {
    vec![
        ("NATS_USER".to_string(), bin.to_string()),
        ("NATS_PASSWORD".to_string(), dev_nats_password(bin)),
    ]
}

/// Server options with the repository's users and permissions
/// (`nats/users.conf`), plus one user for the test harness itself, `tester`,
/// allowed everything and taken for any connection without credentials
/// (`no_auth_user`): the harness's own clients stay as they are, while every
/// service runs under its own least-privileged user (a wrong password fails
/// a chaos run at once: checked by hand).
///
/// # Panics
/// When `nats/users.conf` cannot be read or has changed shape.
#[must_use]
pub fn secured_nats_options() -> testkit::NatsOptions {
    static FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let file = FILE.get_or_init(|| {
        let users =
            std::fs::read_to_string(nats_dir().join("users.conf")).expect("read nats/users.conf");
        let end = users
            .rfind("\n  ]\n}")
            .expect("nats/users.conf ends its users list");
        let text = format!(
            "{}\n    {{ user: tester, password: tester-only }}\n  ]\n}}\nno_auth_user: tester\n",
            &users[..end]
        );
        let path =
            std::env::temp_dir().join(format!("posts-test-users-{}.conf", std::process::id()));
        std::fs::write(&path, text).expect("write the test users config");
        path
    });
    testkit::NatsOptions {
        include: Some(file.clone()),
        env: dev_nats_passwords(),
        ..Default::default()
    }
}

/// A single node with [`secured_nats_options`].
///
/// # Errors
/// When it does not start.
pub async fn start_secured_nats() -> anyhow::Result<NatsServer> {
    start_nats_with(&secured_nats_options()).await
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
    start_nats_with(&testkit::NatsOptions::default()).await
}

/// [`start_nats`] with explicit server options (e.g. without
/// `sync_interval: always`, for tests that write a large stream quickly).
///
/// # Errors
/// When it does not come up.
pub async fn start_nats_with(options: &testkit::NatsOptions) -> anyhow::Result<NatsServer> {
    let mut last = None;
    for _ in 0..PORT_RACE_RETRIES_MAX {
        let options = options.clone();
        let nats = tokio::task::spawn_blocking(move || NatsServer::start_with(&options)).await??;
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

/// Reads one stream (`POSTS` unless told) directly with async-nats.
#[derive(Clone)]
pub struct StreamReader {
    pub js: jetstream::Context,
    pub name: String,
}

impl StreamReader {
    /// A reader of `POSTS`.
    ///
    /// # Errors
    /// When the server does not answer.
    pub async fn connect(nats_url: &str) -> anyhow::Result<Self> {
        Self::connect_to(nats_url, STREAM).await
    }

    /// A reader of stream `name`.
    ///
    /// # Errors
    /// When the server does not answer.
    pub async fn connect_to(nats_url: &str, name: &str) -> anyhow::Result<Self> {
        Ok(Self {
            js: jetstream_for(nats_url).await?,
            name: name.to_string(),
        })
    }

    /// # Errors
    /// When the stream is missing or the server does not answer.
    pub async fn stream(&self) -> anyhow::Result<jetstream::stream::Stream> {
        self.js
            .get_stream(&self.name)
            .await
            .with_context(|| format!("get stream {}", self.name))
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
    pub service: InProcessService,
    pub http: reqwest::Client,
    pub reader: StreamReader,
}

impl CommandEnv {
    /// # Errors
    /// When nats-server or the service does not start.
    pub async fn start() -> anyhow::Result<Self> {
        let nats = start_nats().await?;
        let service = InProcessService::start_command(&nats.url()).await?;
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
    spawn_service_process("posts-command", nats_url).await
}

/// Spawns the command service `bin` (`posts-command`, `comments-command`),
/// with `--nats-url` and `--listen`, on a free port and waits until it
/// listens. Retries when the port was taken.
///
/// # Errors
/// When it does not start.
pub async fn spawn_service_process(
    bin: &'static str,
    nats_url: &str,
) -> anyhow::Result<(testkit::ServiceProcess, String)> {
    spawn_service_process_with_env(bin, nats_url, &[]).await
}

/// [`spawn_service_process`] with `envs` set as well (a fault to arm).
///
/// # Errors
/// When it does not start.
pub async fn spawn_service_process_with_env(
    bin: &'static str,
    nats_url: &str,
    envs: &[(&str, &str)],
) -> anyhow::Result<(testkit::ServiceProcess, String)> {
    let mut env = service_credentials(bin);
    env.extend(
        envs.iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string())),
    );
    let http = http_client_with_timeout(Duration::from_secs(2));
    let mut last = None;
    for _ in 0..PORT_RACE_RETRIES_MAX {
        let port = testkit::free_port();
        let args = command_args(nats_url, port);
        let env = env.clone();
        let spawned = tokio::task::spawn_blocking(move || {
            testkit::ServiceProcess::spawn(bin, &args, &env, port)
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
        let listening = wait_for(&format!("{bin} log"), Duration::from_secs(10), || {
            let log = process.log();
            let outcome = if log.contains(&format!("{bin} listening")) {
                Some(true)
            } else if log.contains(&format!("{bin} failed")) {
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
                wait_for(&format!("{bin} /livez"), Duration::from_secs(5), || {
                    let req = http.get(&livez);
                    async move {
                        let r = Reply::of(req).await.ok()?;
                        (r.status == 200 && r.body == "ok").then_some(())
                    }
                })
                .await
            }
            Ok(false) => Err(anyhow::anyhow!("{bin} failed to start")),
            Err(e) => Err(e),
        };
        match ours {
            Ok(()) => return Ok((process, base_url)),
            Err(e) => last = Some(e.context(format!("see {}", process.log_path().display()))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("{bin} did not start")))
}

/// Spawn attempts when a free port was taken by someone else in between.
const PORT_RACE_RETRIES_MAX: u32 = 3;

// ---------------------------------------------------------------------------
// Query side: posts-query in-process or as a process, /projections, replay.
// ---------------------------------------------------------------------------

/// How long a query service may take to catch up with what a test wrote.
pub const CATCH_UP_DEADLINE: Duration = Duration::from_secs(60);
/// A `replay` run on the test streams (tens of thousands of events at most)
/// finishes well inside this; a hang must fail the test, not stall it.
pub const REPLAY_DEADLINE: Duration = Duration::from_secs(120);
/// The projections every query service runs, by their contract names.
pub const PROJECTION_NAMES: [&str; 2] = ["post-view", "post-search"];

/// A real nats-server, in-process `posts-command` and `posts-query` on it
/// (the query service on a temp data dir), an HTTP client and a direct reader
/// of the stream: what most query tests need.
pub struct QueryEnv {
    pub query: InProcessService,
    pub command: InProcessService,
    pub http: reqwest::Client,
    pub reader: StreamReader,
    pub nats: NatsServer,
    pub data_dir: tempfile::TempDir,
}

impl QueryEnv {
    /// # Errors
    /// When nats-server or a service does not start.
    pub async fn start() -> anyhow::Result<Self> {
        let nats = start_nats().await?;
        let data_dir = tempfile::Builder::new().prefix("query-data").tempdir()?;
        let command = InProcessService::start_command(&nats.url()).await?;
        let query = InProcessService::start_query(&nats.url(), data_dir.path()).await?;
        let reader = StreamReader::connect(&nats.url()).await?;
        let env = Self {
            query,
            command,
            http: http_client(),
            reader,
            nats,
            data_dir,
        };
        wait_ready(&env.http, &env.query.base_url).await?;
        Ok(env)
    }

    /// A URL on the query service.
    #[must_use]
    pub fn q(&self, path: &str) -> String {
        format!("{}{path}", self.query.base_url)
    }

    /// A URL on the command service.
    #[must_use]
    pub fn cmd(&self, path: &str) -> String {
        format!("{}{path}", self.command.base_url)
    }

    /// `GET path` on the query service.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn get(&self, path: &str) -> anyhow::Result<Reply> {
        Reply::of(self.http.get(self.q(path))).await
    }

    /// Creates a post through the command service, asserting 201.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn create(&self, title: &str, content: &str, author: &str) -> anyhow::Result<Ack> {
        create_post(&self.http, &self.command.base_url, title, content, author).await
    }

    /// Updates a post through the command service, asserting 200.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn update(&self, post_id: &str, body: &Value) -> anyhow::Result<Ack> {
        update_post(&self.http, &self.command.base_url, post_id, body).await
    }

    /// Deletes a post through the command service, asserting 200.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn delete(&self, post_id: &str) -> anyhow::Result<Ack> {
        delete_post(&self.http, &self.command.base_url, post_id).await
    }
}

/// `POST {command}/posts`, asserting 201.
///
/// # Errors
/// Transport errors.
pub async fn create_post(
    http: &reqwest::Client,
    command: &str,
    title: &str,
    content: &str,
    author: &str,
) -> anyhow::Result<Ack> {
    let reply = Reply::of(
        http.post(format!("{command}/posts"))
            .json(&create_body(title, content, author)),
    )
    .await?;
    Ok(reply.ack(201))
}

/// `PATCH {command}/posts/{id}`, asserting 200.
///
/// # Errors
/// Transport errors.
pub async fn update_post(
    http: &reqwest::Client,
    command: &str,
    post_id: &str,
    body: &Value,
) -> anyhow::Result<Ack> {
    let reply = Reply::of(http.patch(format!("{command}/posts/{post_id}")).json(body)).await?;
    Ok(reply.ack(200))
}

/// `DELETE {command}/posts/{id}`, asserting 200.
///
/// # Errors
/// Transport errors.
pub async fn delete_post(
    http: &reqwest::Client,
    command: &str,
    post_id: &str,
) -> anyhow::Result<Ack> {
    let reply = Reply::of(http.delete(format!("{command}/posts/{post_id}"))).await?;
    Ok(reply.ack(200))
}

/// Waits until `GET {base}/readyz` answers 200.
///
/// # Errors
/// When it does not within [`CATCH_UP_DEADLINE`].
pub async fn wait_ready(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let url = format!("{base}/readyz");
    wait_for("posts-query /readyz 200", CATCH_UP_DEADLINE, || {
        let req = http.get(&url);
        async move { Reply::of(req).await.ok().filter(|r| r.status == 200) }
    })
    .await?;
    Ok(())
}

/// The `data` array of `GET {base}/projections`.
///
/// # Errors
/// Transport errors or a non-200 answer.
pub async fn projections(http: &reqwest::Client, base: &str) -> anyhow::Result<Vec<Value>> {
    let reply = Reply::of(http.get(format!("{base}/projections"))).await?;
    if reply.status != 200 {
        bail!("/projections answered {}: {}", reply.status, reply.body);
    }
    let v = reply.json();
    v["data"]
        .as_array()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("/projections has no data array: {v}"))
}

/// The entry of projection `name` in a `/projections` answer.
///
/// # Panics
/// When it is missing.
#[must_use]
pub fn projection<'a>(entries: &'a [Value], name: &str) -> &'a Value {
    entries
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no projection {name} in {entries:?}"))
}

/// Waits until `/projections` shows every projection with checkpoint and
/// stream last sequence both equal to `seq`, and returns that answer.
///
/// # Errors
/// When that does not happen within [`CATCH_UP_DEADLINE`].
pub async fn wait_checkpoints(
    http: &reqwest::Client,
    base: &str,
    seq: u64,
) -> anyhow::Result<Vec<Value>> {
    let end = Instant::now() + CATCH_UP_DEADLINE;
    loop {
        let last_seen = projections(http, base).await;
        if let Ok(entries) = &last_seen {
            let done = PROJECTION_NAMES.iter().all(|name| {
                entries.iter().any(|e| {
                    e["name"] == *name
                        && e["checkpoint"].as_u64() == Some(seq)
                        && e["stream_last_seq"].as_u64() == Some(seq)
                })
            });
            if done {
                return Ok(entries.clone());
            }
        }
        if Instant::now() > end {
            bail!(
                "timed out after {CATCH_UP_DEADLINE:?} waiting for every checkpoint at stream \
                 sequence {seq}; last /projections: {last_seen:?}"
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The arguments that run `posts-query` on `data_dir`, listening on `port`.
#[must_use]
pub fn query_args(nats_url: &str, port: u16, data_dir: &std::path::Path) -> Vec<String> {
    vec![
        "--nats-url".to_string(),
        nats_url.to_string(),
        "--listen".to_string(),
        format!("127.0.0.1:{port}"),
        "--data-dir".to_string(),
        data_dir.display().to_string(),
    ]
}

/// Waits until `process` logs that it listens on `127.0.0.1:port`: the port
/// is ours, not another test's service that took it first.
///
/// # Errors
/// When no such line appears within [`CATCH_UP_DEADLINE`].
pub async fn wait_listening(process: &testkit::ServiceProcess, port: u16) -> anyhow::Result<()> {
    let address = format!("127.0.0.1:{port}");
    wait_for(
        &format!("a log line: listening on {address}"),
        CATCH_UP_DEADLINE,
        || {
            let found = process
                .log()
                .lines()
                .any(|l| l.contains("listening") && l.contains(&address));
            async move { found.then_some(()) }
        },
    )
    .await
}

/// Spawns a `posts-query` process (built by `cargo build --bins`) on
/// `data_dir` and a free port, and waits until it is ready (`/readyz` 200).
/// Retries when the port was taken.
///
/// # Errors
/// When it does not start.
pub async fn spawn_query_process(
    nats_url: &str,
    data_dir: &std::path::Path,
) -> anyhow::Result<(testkit::ServiceProcess, String)> {
    provision_streams(nats_url).await?;
    let http = http_client_with_timeout(Duration::from_secs(5));
    let mut last = None;
    for _ in 0..PORT_RACE_RETRIES_MAX {
        let port = testkit::free_port();
        let args = query_args(nats_url, port, data_dir);
        let spawned = tokio::task::spawn_blocking(move || {
            testkit::ServiceProcess::spawn(
                "posts-query",
                &args,
                &service_credentials("posts-query"),
                port,
            )
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
        let listening = wait_for("posts-query log", CATCH_UP_DEADLINE, || {
            let log = process.log();
            let outcome = if log.contains("posts-query listening") {
                Some(true)
            } else if log.contains("posts-query failed") {
                Some(false)
            } else {
                None
            };
            async move { outcome }
        })
        .await;
        let base_url = format!("http://127.0.0.1:{port}");
        let ours = match listening {
            Ok(true) => wait_ready(&http, &base_url).await,
            Ok(false) => Err(anyhow::anyhow!(
                "posts-query failed to start:\n{}",
                process.log()
            )),
            Err(e) => Err(e),
        };
        match ours {
            Ok(()) => return Ok((process, base_url)),
            Err(e) => last = Some(e.context(format!("see {}", process.log_path().display()))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("posts-query did not start")))
}

/// What a finished `replay` run printed.
#[derive(Debug)]
pub struct ReplayRun {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl ReplayRun {
    /// The `--json` summary on stdout.
    ///
    /// # Panics
    /// When stdout is not one JSON document.
    #[must_use]
    pub fn summary(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("replay stdout is not JSON ({e}): {self:?}"))
    }

    /// Asserts exit 0 and a `--json` summary with `ok: true` and, for each
    /// rebuilt projection, `verified: true` with equal digests; returns the
    /// per-projection outcomes by name.
    ///
    /// # Panics
    /// When any of that does not hold.
    #[must_use]
    pub fn assert_verified(&self, names: &[&str]) -> std::collections::HashMap<String, Value> {
        assert!(self.status.success(), "replay failed: {self:?}");
        let summary = self.summary();
        assert_eq!(summary["ok"], true, "{summary}");
        let outcomes = summary["projections"]
            .as_array()
            .unwrap_or_else(|| panic!("no projections in {summary}"));
        let by_name: std::collections::HashMap<String, Value> = outcomes
            .iter()
            .map(|o| {
                (
                    o["name"].as_str().unwrap_or_default().to_string(),
                    o.clone(),
                )
            })
            .collect();
        let mut got: Vec<&str> = by_name.keys().map(String::as_str).collect();
        got.sort_unstable();
        let mut want = names.to_vec();
        want.sort_unstable();
        assert_eq!(got, want, "rebuilt projections: {summary}");
        for (name, o) in &by_name {
            assert_eq!(o["verified"], true, "{name} not verified: {o}");
            assert!(o["live_digest"].is_string(), "{name}: {o}");
            assert_eq!(o["live_digest"], o["rebuilt_digest"], "{name}: {o}");
        }
        by_name
    }
}

/// Runs the `replay` binary with `args` to completion (killed after
/// [`REPLAY_DEADLINE`]), capturing its output.
///
/// # Errors
/// When it cannot be spawned or runs past the deadline.
pub async fn run_replay(args: &[String]) -> anyhow::Result<ReplayRun> {
    let path = testkit::bin_path("replay");
    let child = tokio::process::Command::new(&path)
        .args(args)
        .envs(service_credentials("replay"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawn {} (run `cargo build --bins` first)", path.display()))?;
    let out = tokio::time::timeout(REPLAY_DEADLINE, child.wait_with_output())
        .await
        .with_context(|| format!("replay {args:?} still running after {REPLAY_DEADLINE:?}"))??;
    Ok(ReplayRun {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `replay <projection> --nats-url <url> --data-dir <dir> [extra...]`.
#[must_use]
pub fn replay_args(
    projection: &str,
    nats_url: &str,
    data_dir: &std::path::Path,
    extra: &[&str],
) -> Vec<String> {
    let mut args = vec![
        projection.to_string(),
        "--nats-url".to_string(),
        nats_url.to_string(),
        "--data-dir".to_string(),
        data_dir.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_string()));
    args
}

/// Content digests of both projections' files under a stopped service's
/// data dir: `(post-view, post-search)`.
///
/// # Errors
/// When a store cannot be opened (a running service still holds it).
pub fn file_digests(data_dir: &std::path::Path) -> anyhow::Result<(String, String)> {
    let (view, view_reader) = posts_projections::view::open(&data_dir.join("post-view.redb"))?;
    let view_digest = view_reader.digest()?;
    drop((view, view_reader));
    let (search, search_reader) = posts_projections::search::open(
        &data_dir.join("post-search"),
        posts_projections::search::WRITER_HEAP_LIVE_BYTES,
    )?;
    let search_digest = search_reader.digest()?;
    drop((search, search_reader));
    Ok((view_digest, search_digest))
}

/// Headers of an event as the command service writes them (a fresh
/// `Nats-Msg-Id`, `Occurred-At` now), for tests that publish directly.
#[must_use]
pub fn event_headers(event_type: &str, schema: u32) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", uuid::Uuid::now_v7().to_string().as_str());
    h.insert("Event-Type", event_type);
    h.insert("Event-Schema", schema.to_string().as_str());
    h.insert(
        "Occurred-At",
        eventstore::format_rfc3339(time::OffsetDateTime::now_utc()).as_str(),
    );
    h.insert("Correlation-Id", uuid::Uuid::now_v7().to_string().as_str());
    h.insert("Causation-Id", uuid::Uuid::now_v7().to_string().as_str());
    h
}

/// Publishes `event` (postcard, through `posts::encode`) on `posts.<post_id>`
/// with valid headers, waits for the ack, and returns its stream sequence.
///
/// # Errors
/// When the server does not acknowledge.
pub async fn publish_event(
    js: &jetstream::Context,
    post_id: &str,
    event: &posts::Event,
) -> anyhow::Result<u64> {
    let (ty, schema, bytes) = posts::encode(event);
    let ack = js
        .publish_with_headers(
            subject_for(post_id),
            event_headers(ty, schema),
            bytes.into(),
        )
        .await?
        .await?;
    Ok(ack.sequence)
}

/// What a test expects one post to look like, from the commands it sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedPost {
    pub title: String,
    pub content: String,
    pub author_name: String,
    pub version: u64,
    pub deleted: bool,
}

/// The posts a test wrote through the command service, as the acks and the
/// request bodies say they must now be, and the highest acked sequence.
#[derive(Debug, Default, Clone)]
pub struct Written {
    pub posts: std::collections::BTreeMap<String, ExpectedPost>,
    /// Post ids in creation order.
    pub order: Vec<String>,
    pub last_seq: u64,
}

impl Written {
    /// Records an acked create.
    ///
    /// # Panics
    /// When the ack is not version 1 of a new post.
    pub fn record_create(&mut self, ack: &Ack, title: &str, content: &str, author: &str) {
        assert_eq!(ack.version, 1, "{ack:?}");
        let fresh = self.posts.insert(
            ack.post_id.clone(),
            ExpectedPost {
                title: title.to_string(),
                content: content.to_string(),
                author_name: author.to_string(),
                version: 1,
                deleted: false,
            },
        );
        assert!(fresh.is_none(), "post {} created twice", ack.post_id);
        self.order.push(ack.post_id.clone());
        self.last_seq = self.last_seq.max(ack.seq);
    }

    /// Records an acked update with the body that was sent.
    ///
    /// # Panics
    /// When the post is unknown or the ack's version is not the next one.
    pub fn record_update(&mut self, ack: &Ack, body: &Value) {
        let post = self.posts.get_mut(&ack.post_id).expect("known post");
        assert_eq!(ack.version, post.version + 1, "{ack:?}");
        post.version = ack.version;
        if let Some(t) = body["title"].as_str() {
            post.title = t.to_string();
        }
        if let Some(c) = body["content"].as_str() {
            post.content = c.to_string();
        }
        if let Some(a) = body["author_name"].as_str() {
            post.author_name = a.to_string();
        }
        self.last_seq = self.last_seq.max(ack.seq);
    }

    /// Records an acked delete.
    ///
    /// # Panics
    /// When the post is unknown or the ack's version is not the next one.
    pub fn record_delete(&mut self, ack: &Ack) {
        let post = self.posts.get_mut(&ack.post_id).expect("known post");
        assert_eq!(ack.version, post.version + 1, "{ack:?}");
        post.version = ack.version;
        post.deleted = true;
        self.last_seq = self.last_seq.max(ack.seq);
    }

    /// Creates a post through `command` and records it.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn create(
        &mut self,
        http: &reqwest::Client,
        command: &str,
        title: &str,
        content: &str,
        author: &str,
    ) -> anyhow::Result<Ack> {
        let ack = create_post(http, command, title, content, author).await?;
        self.record_create(&ack, title, content, author);
        Ok(ack)
    }

    /// Creates `n` posts through `command`, `CONCURRENCY` at a time; `make(i)`
    /// gives post `i`'s (title, content, author).
    ///
    /// # Errors
    /// Transport errors.
    pub async fn create_many(
        &mut self,
        http: &reqwest::Client,
        command: &str,
        n: usize,
        make: impl Fn(usize) -> (String, String, String),
    ) -> anyhow::Result<Vec<Ack>> {
        /// Requests in flight at once: enough to overlap fsyncs, few enough
        /// for a 2-core machine running other tests.
        const CONCURRENCY: usize = 8;
        let mut acks = Vec::with_capacity(n);
        let bodies: Vec<(String, String, String)> = (0..n).map(make).collect();
        for chunk in bodies.chunks(CONCURRENCY) {
            let replies = futures::future::join_all(
                chunk
                    .iter()
                    .map(|(t, c, a)| create_post(http, command, t, c, a)),
            )
            .await;
            for ((t, c, a), ack) in chunk.iter().zip(replies) {
                let ack = ack?;
                self.record_create(&ack, t, c, a);
                acks.push(ack);
            }
        }
        Ok(acks)
    }

    /// Updates a post through `command` and records it.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn update(
        &mut self,
        http: &reqwest::Client,
        command: &str,
        post_id: &str,
        body: &Value,
    ) -> anyhow::Result<Ack> {
        let ack = update_post(http, command, post_id, body).await?;
        self.record_update(&ack, body);
        Ok(ack)
    }

    /// Deletes a post through `command` and records it.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn delete(
        &mut self,
        http: &reqwest::Client,
        command: &str,
        post_id: &str,
    ) -> anyhow::Result<Ack> {
        let ack = delete_post(http, command, post_id).await?;
        self.record_delete(&ack);
        Ok(ack)
    }

    /// Ids of the posts that are not deleted.
    #[must_use]
    pub fn live_ids(&self) -> std::collections::BTreeSet<String> {
        self.posts
            .iter()
            .filter(|(_, p)| !p.deleted)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Asserts that `GET {base}/posts/{id}?include_deleted=true` shows every
    /// written post exactly as expected (version included: an event applied
    /// twice or skipped shows there).
    ///
    /// # Errors
    /// Transport errors.
    ///
    /// # Panics
    /// When a post differs.
    pub async fn assert_served(&self, http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
        for (id, want) in &self.posts {
            let reply = Reply::of(
                http.get(format!("{base}/posts/{id}"))
                    .query(&[("include_deleted", "true")]),
            )
            .await?;
            assert_eq!(reply.status, 200, "post {id}: {reply:?}");
            let d = &reply.json()["data"];
            let got = ExpectedPost {
                title: d["title"].as_str().unwrap_or_default().to_string(),
                content: d["content"].as_str().unwrap_or_default().to_string(),
                author_name: d["author_name"].as_str().unwrap_or_default().to_string(),
                version: d["version"].as_u64().unwrap_or_default(),
                deleted: d["deleted"].as_bool().unwrap_or_default(),
            };
            assert_eq!(&got, want, "post {id} as served by {base}");
        }
        Ok(())
    }
}

/// Every page of `GET {base}/posts` (with `extra` query pairs) at `limit`,
/// following `next_cursor`, read at `min_seq`. Asserts the page shapes: full
/// pages until the last, and no cursor after the last.
///
/// # Errors
/// Transport errors.
///
/// # Panics
/// When a page is not a 200 or has the wrong shape.
pub async fn list_all(
    http: &reqwest::Client,
    base: &str,
    extra: &[(&str, &str)],
    limit: usize,
    min_seq: u64,
) -> anyhow::Result<Vec<Value>> {
    let mut rows = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut req = http.get(format!("{base}/posts")).query(extra).query(&[
            ("limit", limit.to_string()),
            ("min_seq", min_seq.to_string()),
        ]);
        if let Some(c) = &cursor {
            req = req.query(&[("cursor", c)]);
        }
        let reply = Reply::of(req).await?;
        assert_eq!(reply.status, 200, "{reply:?}");
        let v = reply.json();
        let page = v["data"].as_array().expect("data array").clone();
        assert!(page.len() <= limit, "page over limit: {v}");
        cursor = v["next_cursor"].as_str().map(str::to_string);
        if cursor.is_some() {
            assert_eq!(page.len(), limit, "a page before the last is full: {v}");
        } else {
            assert!(v["next_cursor"].is_null(), "{v}");
        }
        rows.extend(page);
        if cursor.is_none() {
            return Ok(rows);
        }
        assert!(rows.len() <= 100_000, "cursor never ends");
    }
}

/// Every page of `GET {base}/posts/search?q=..` (with `extra` query pairs)
/// at `limit`, following `next_cursor`; returns the hits and the `total`
/// every page reported (asserted equal on all pages and to the hit count).
///
/// # Errors
/// Transport errors.
///
/// # Panics
/// When a page is not a 200 or has the wrong shape.
pub async fn search_all(
    http: &reqwest::Client,
    base: &str,
    q: &str,
    extra: &[(&str, &str)],
    limit: usize,
    min_seq: u64,
) -> anyhow::Result<(Vec<Value>, u64)> {
    let mut hits = Vec::new();
    let mut cursor: Option<String> = None;
    let mut total = None;
    loop {
        let mut req = http
            .get(format!("{base}/posts/search"))
            .query(&[("q", q)])
            .query(extra)
            .query(&[
                ("limit", limit.to_string()),
                ("min_seq", min_seq.to_string()),
            ]);
        if let Some(c) = &cursor {
            req = req.query(&[("cursor", c)]);
        }
        let reply = Reply::of(req).await?;
        assert_eq!(reply.status, 200, "{reply:?}");
        let v = reply.json();
        let page = v["data"].as_array().expect("data array").clone();
        let page_total = v["total"].as_u64().expect("total");
        assert!(
            total.is_none_or(|t| t == page_total),
            "total moved while paging: {v}"
        );
        total = Some(page_total);
        assert!(page.len() <= limit, "page over limit: {v}");
        cursor = v["next_cursor"].as_str().map(str::to_string);
        if cursor.is_some() {
            assert_eq!(page.len(), limit, "a page before the last is full: {v}");
        } else {
            assert!(v["next_cursor"].is_null(), "{v}");
        }
        hits.extend(page);
        if cursor.is_none() {
            let total = total.unwrap_or_default();
            assert_eq!(
                u64::try_from(hits.len())?,
                total,
                "pages hold exactly total hits"
            );
            return Ok((hits, total));
        }
        assert!(hits.len() <= 100_000, "cursor never ends");
    }
}

/// The `post_id`s of listing rows or search hits, in order.
#[must_use]
pub fn ids_of(rows: &[Value]) -> Vec<String> {
    rows.iter()
        .map(|r| r["post_id"].as_str().unwrap_or_default().to_string())
        .collect()
}

// ---------------------------------------------------------------------------
// Reports: an oracle of author-stats folded from the streams.
// ---------------------------------------------------------------------------

/// The figures of one author as the contract defines them, folded from the
/// streams by this test alone.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Figures {
    pub posts: u64,
    pub comments_written: u64,
    pub comments_received: u64,
    pub last_activity_at: Option<String>,
}

impl Figures {
    /// The figures of one entry of `/reports/authors`.
    #[must_use]
    pub fn of(v: &Value) -> Self {
        Self {
            posts: v["posts"].as_u64().unwrap_or(u64::MAX),
            comments_written: v["comments_written"].as_u64().unwrap_or(u64::MAX),
            comments_received: v["comments_received"].as_u64().unwrap_or(u64::MAX),
            last_activity_at: v["last_activity_at"].as_str().map(str::to_string),
        }
    }
}

/// author-stats folded from streams `POSTS` and `COMMENTS` by the tests
/// alone, as the contract defines the figures.
///
/// # Errors
/// When a stream cannot be read or holds an event that does not decode.
///
/// # Panics
/// When the streams break an aggregate's invariants.
pub async fn author_stats_oracle(nats_url: &str) -> anyhow::Result<BTreeMap<String, Figures>> {
    let mut figures: BTreeMap<String, Figures> = BTreeMap::new();
    // post id -> (author, live); comment id -> (post, author, live)
    let mut posts: HashMap<String, (String, bool)> = HashMap::new();
    let mut comments: HashMap<String, (String, String, bool)> = HashMap::new();
    let mut activity: HashMap<String, String> = HashMap::new();
    let mut touch = |author: &str, at: Option<&str>, figures: &mut BTreeMap<String, Figures>| {
        figures.entry(author.to_string()).or_default();
        if let Some(at) = at {
            let e = activity.entry(author.to_string()).or_default();
            if at > e.as_str() {
                *e = at.to_string();
            }
        }
    };
    let header = |m: &async_nats::jetstream::message::StreamMessage, h: &str| {
        msg_header(m, h).unwrap_or_default().to_string()
    };
    for m in StreamReader::connect(nats_url)
        .await?
        .all_messages()
        .await?
    {
        let id = m.subject.as_str().trim_start_matches("posts.").to_string();
        let at = header(&m, "Occurred-At");
        let event = posts::decode(
            &header(&m, "Event-Type"),
            header(&m, "Event-Schema").parse()?,
            &m.payload,
        )?;
        match event {
            posts::Event::Created { author_name, .. } => {
                touch(&author_name, Some(&at), &mut figures);
                posts.insert(id, (author_name, true));
            }
            posts::Event::Updated { author_name, .. } => {
                let p = posts.get_mut(&id).expect("an update follows a create");
                if let Some(a) = author_name {
                    p.0 = a;
                }
                let a = p.0.clone();
                touch(&a, Some(&at), &mut figures);
            }
            posts::Event::Deleted => {
                posts.get_mut(&id).expect("a delete follows a create").1 = false;
            }
        }
    }
    for m in StreamReader::connect_to(nats_url, "COMMENTS")
        .await?
        .all_messages()
        .await?
    {
        let id = m.subject.as_str().to_string();
        let at = header(&m, "Occurred-At");
        let event = comments::decode(
            &header(&m, "Event-Type"),
            header(&m, "Event-Schema").parse()?,
            &m.payload,
        )?;
        match event {
            comments::Event::Added {
                post_id,
                author_name,
                ..
            } => {
                touch(&author_name, Some(&at), &mut figures);
                comments.insert(id, (post_id, author_name, true));
            }
            comments::Event::Edited { .. } => {
                let a = comments[&id].1.clone();
                touch(&a, Some(&at), &mut figures);
            }
            comments::Event::Removed { .. } => {
                comments.get_mut(&id).expect("a removal follows an add").2 = false;
            }
        }
    }
    for (author, live) in posts.values() {
        if *live {
            figures.entry(author.clone()).or_default().posts += 1;
        }
    }
    for (post_id, author, live) in comments.values() {
        if !*live {
            continue;
        }
        figures.entry(author.clone()).or_default().comments_written += 1;
        if let Some((owner, true)) = posts.get(post_id) {
            figures.entry(owner.clone()).or_default().comments_received += 1;
        }
    }
    for (author, f) in &mut figures {
        f.last_activity_at = activity.get(author).cloned();
    }
    Ok(figures)
}

/// Every author a reports-query lists, page by page.
///
/// # Errors
/// Transport errors and any answer but 200.
pub async fn listed_authors(
    http: &reqwest::Client,
    base: &str,
    min_seq: &str,
) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut q = vec![("limit", "2".to_string()), ("min_seq", min_seq.to_string())];
        if let Some(c) = &cursor {
            q.push(("cursor", c.clone()));
        }
        let r = Reply::of(http.get(format!("{base}/reports/authors")).query(&q)).await?;
        anyhow::ensure!(r.status == 200, "{r:?}");
        let v = r.json();
        out.extend(v["data"].as_array().cloned().unwrap_or_default());
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return Ok(out),
        }
    }
}
