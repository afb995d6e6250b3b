//! Test kit: real `nats-server` processes (single node and a 3-node cluster)
//! on free loopback ports with temp store dirs, and service processes that can
//! be SIGKILLed. Everything is killed on drop. Nothing here mocks JetStream.
//!
//! The `nats-server` binary comes from `NATS_SERVER_BIN` or `PATH`.
//!
//! ```no_run
//! let nats = testkit::NatsServer::start().unwrap();
//! println!("{}", nats.url());
//! ```

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a nats-server may take to accept clients after spawn.
const NATS_START_DEADLINE: Duration = Duration::from_secs(20);
/// How long a service may take to bind its listener after spawn.
const SERVICE_START_DEADLINE: Duration = Duration::from_secs(60);
/// Spawn attempts when a free port was taken by someone else in between.
const PORT_RACE_RETRIES_MAX: u32 = 5;
/// Pause between two looks at a condition in [`wait_until`].
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Waits for `cond` to hold, looking every 20 ms, until `deadline` has passed.
///
/// # Errors
/// When the deadline passes first; the message names `what`.
pub fn wait_until(
    what: &str,
    deadline: Duration,
    mut cond: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; callers retry on a race).
///
/// # Panics
/// When no port can be bound at all.
#[must_use]
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

fn nats_bin() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".to_string())
}

/// Where test logs are kept: `target/test-logs`, left behind for failed runs.
#[must_use]
pub fn logs_dir() -> PathBuf {
    let dir = target_dir().join("test-logs");
    let _ = fs::create_dir_all(&dir);
    dir
}

fn target_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    // The test binary lives in target/<profile>/deps/.
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "target"))
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf)
}

/// The path of a workspace binary built next to the running test binary, or
/// in `POSTS_BIN_DIR` when set.
#[must_use]
pub fn bin_path(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("POSTS_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/test-binary -> target/<profile>/name
    exe.parent()
        .and_then(Path::parent)
        .map_or_else(|| PathBuf::from(name), |p| p.join(name))
}

fn unique_name(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// A log file in [`logs_dir`] named by [`unique_name`]`(prefix)`.
fn new_log_path(prefix: &str) -> PathBuf {
    fresh_log_path(&unique_name(prefix))
}

/// `<logs_dir>/<name>.log`, emptied. Names are unique within a process; a
/// file left by an earlier process with the same pid (pids are reused) is
/// removed, so the log holds only this run (the bench prints lines from it).
fn fresh_log_path(name: &str) -> PathBuf {
    let path = logs_dir().join(format!("{name}.log"));
    let _ = fs::remove_file(&path);
    path
}

/// Pids of every process started through this crate, for [`kill_spawned`].
static SPAWNED: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

fn track(child: &Child) {
    if let Ok(mut pids) = SPAWNED.lock() {
        pids.retain(|p| is_own_child(*p));
        pids.push(child.id());
    }
}

/// Whether `pid` is still a child of this process (a reaped child's pid may
/// belong to anyone by now).
fn is_own_child(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // Fields after the parenthesised command name: state, ppid, ...
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<u32>().ok())
            == Some(std::process::id())
    })
}

/// Temp dirs made through [`temp_dir`], for [`kill_spawned`].
static TEMP_DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// A temp dir under the system temp dir, removed when dropped like any
/// `TempDir`, and also by [`kill_spawned`] (when no drop will run).
///
/// # Errors
/// When the directory cannot be created.
pub fn temp_dir(prefix: &str) -> std::io::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    if let Ok(mut dirs) = TEMP_DIRS.lock() {
        dirs.retain(|d| d.exists());
        dirs.push(dir.path().to_path_buf());
    }
    Ok(dir)
}

/// SIGKILLs every process started through this crate that is still a child
/// of this one, then removes the temp dirs made through [`temp_dir`]. Drops
/// do the same one by one, but they do not run when a harness like `bench`
/// is stopped by a signal: its handler calls this before exiting, so no
/// nats-server, service or store outlives it.
pub fn kill_spawned() {
    let pids = SPAWNED.lock().map(|p| p.clone()).unwrap_or_default();
    for pid in pids.into_iter().filter(|p| is_own_child(*p)) {
        send(pid, rustix::process::Signal::KILL);
    }
    let dirs = TEMP_DIRS.lock().map(|d| d.clone()).unwrap_or_default();
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Starts `nats-server -c config`, output appended to `log`, and tracks it
/// for [`kill_spawned`].
fn spawn_nats(config: &Path, log: &Path, env: &[(String, String)]) -> anyhow::Result<Child> {
    let log = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let child = Command::new(nats_bin())
        .arg("-c")
        .arg(config)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "spawn {} (set NATS_SERVER_BIN or put it on PATH)",
                nats_bin()
            )
        })?;
    track(&child);
    Ok(child)
}

fn kill9(child: &mut Child) {
    signal(child, rustix::process::Signal::KILL);
    let _ = child.wait();
}

fn signal(child: &Child, sig: rustix::process::Signal) {
    send(child.id(), sig);
}

/// kill(2) of process `pid` (ours); a pid that is gone is no error here.
fn send(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// True when the server on `port` answers the NATS handshake with INFO and is
/// the one named `server_name` (a parallel test may have grabbed the same
/// free port for its own server).
fn speaks_nats(port: u16, server_name: &str) -> bool {
    let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok()
        && line.starts_with("INFO ")
        && line.contains(&format!("\"server_name\":\"{server_name}\""))
}

/// Options for a single nats-server.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// `sync_interval: always` (acknowledged means fsynced) when true, the
    /// server default (2 minutes) when false.
    pub sync_always: bool,
    /// A config file copied next to the server's own and included by it
    /// (the repository's `nats/users.conf`: users and permissions).
    pub include: Option<PathBuf>,
    /// Environment of the server process (the users' passwords).
    pub env: Vec<(String, String)>,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self {
            sync_always: true,
            include: None,
            env: Vec::new(),
        }
    }
}

/// One nats-server process with JetStream, on a free loopback port.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    server_name: String,
    config_path: PathBuf,
    log_path: PathBuf,
    store_dir: PathBuf,
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a single node with `sync_interval: always`.
    ///
    /// # Errors
    /// When the binary is missing or the server does not come up in time.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&NatsOptions::default())
    }

    /// Starts a single node with `options`.
    ///
    /// # Errors
    /// When the binary is missing or the server does not come up in time.
    pub fn start_with(options: &NatsOptions) -> anyhow::Result<Self> {
        let mut last_err = None;
        for _ in 0..PORT_RACE_RETRIES_MAX {
            let dir = temp_dir("nats-test")?;
            let store_dir = dir.path().join("store");
            let log_path = new_log_path("nats");
            let port = free_port();
            let config_path = dir.path().join("nats.conf");
            let sync = if options.sync_always {
                "sync_interval: always"
            } else {
                ""
            };
            let server_name = unique_name("nats");
            let include = match &options.include {
                Some(file) => {
                    fs::copy(file, dir.path().join("included.conf"))
                        .with_context(|| format!("copy {}", file.display()))?;
                    "include ./included.conf\n"
                }
                None => "",
            };
            fs::write(
                &config_path,
                format!(
                    "server_name: {server_name}\nlisten: 127.0.0.1:{port}\nmax_payload: 1MB\njetstream {{\n  store_dir: \"{}\"\n  {sync}\n}}\n{include}",
                    store_dir.display()
                ),
            )?;
            let mut server = Self {
                child: None,
                port,
                server_name,
                config_path,
                log_path,
                store_dir,
                env: options.env.clone(),
                _dir: dir,
            };
            // A failed start is most likely a port taken in between: try a new one.
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("nats-server did not start")))
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        self.child = Some(spawn_nats(&self.config_path, &self.log_path, &self.env)?);
        let port = self.port;
        let name = self.server_name.clone();
        let mut exited = false;
        let res = wait_until(
            &format!("nats-server on port {port}"),
            NATS_START_DEADLINE,
            || {
                if let Some(c) = self.child.as_mut()
                    && matches!(c.try_wait(), Ok(Some(_)))
                {
                    exited = true;
                    return true;
                }
                speaks_nats(port, &name)
            },
        );
        if exited {
            bail!(
                "nats-server exited at start; see {}",
                self.log_path.display()
            );
        }
        res
    }

    #[must_use]
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    #[must_use]
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    #[must_use]
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// SIGKILLs the server (no flush, no goodbye) and waits for it to die.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill9(&mut c);
        }
    }

    /// Starts the server again on the same port and store.
    ///
    /// # Errors
    /// When it does not come back in time.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three nats-server processes forming a JetStream cluster on loopback.
pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

struct ClusterNode {
    child: Option<Child>,
    port: u16,
    server_name: String,
    config_path: PathBuf,
    log_path: PathBuf,
}

impl NatsCluster {
    /// Starts three nodes with `sync_interval: always` and waits until each
    /// accepts clients. JetStream's meta leader may still be electing: callers
    /// retry their first stream creation with a deadline.
    ///
    /// # Errors
    /// When a node does not come up in time.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&NatsOptions::default())
    }

    /// [`NatsCluster::start`] with `options`' included config and
    /// environment (`sync_interval: always` whatever `options` say).
    ///
    /// # Errors
    /// When a node does not come up in time.
    pub fn start_with(options: &NatsOptions) -> anyhow::Result<Self> {
        let dir = temp_dir("nats-cluster")?;
        let include = match &options.include {
            Some(file) => {
                fs::copy(file, dir.path().join("included.conf"))
                    .with_context(|| format!("copy {}", file.display()))?;
                "include ./included.conf\n"
            }
            None => "",
        };
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, cp)| format!("nats-route://127.0.0.1:{cp}"))
            .collect();
        let tag = unique_name("c");
        let mut nodes = Vec::new();
        for (i, (port, cport)) in ports.iter().enumerate() {
            let store = dir.path().join(format!("n{i}"));
            let config_path = dir.path().join(format!("n{i}.conf"));
            fs::write(
                &config_path,
                format!(
                    "server_name: {tag}-n{i}\nlisten: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\ncluster {{\n  name: {tag}\n  listen: 127.0.0.1:{cport}\n  routes: [{}]\n}}\n{include}",
                    store.display(),
                    routes.join(", ")
                ),
            )?;
            nodes.push(ClusterNode {
                child: None,
                port: *port,
                server_name: format!("{tag}-n{i}"),
                config_path,
                log_path: fresh_log_path(&format!("{tag}-n{i}")),
            });
        }
        let mut cluster = Self {
            nodes,
            env: options.env.clone(),
            _dir: dir,
        };
        for i in 0..3 {
            cluster.spawn_node(i)?;
        }
        Ok(cluster)
    }

    fn spawn_node(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        node.child = Some(spawn_nats(&node.config_path, &node.log_path, &self.env)?);
        let port = node.port;
        let name = node.server_name.clone();
        wait_until(
            &format!("cluster node n{i} on {port}"),
            NATS_START_DEADLINE,
            || speaks_nats(port, &name),
        )
    }

    /// Client URLs of all three nodes.
    #[must_use]
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect()
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            kill9(&mut c);
        }
    }

    /// Restarts node `i` on its port and store.
    ///
    /// # Errors
    /// When it does not come back in time.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        self.spawn_node(i)
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// A service binary of this workspace running as a child process.
pub struct ServiceProcess {
    child: Option<Child>,
    name: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log_path: PathBuf,
}

impl ServiceProcess {
    /// Spawns `bin` with `args`, logging to `target/test-logs`, and waits until
    /// `ready_port` accepts TCP connections (pass 0 to not wait).
    ///
    /// # Errors
    /// When the binary is missing, exits, or does not listen in time.
    pub fn spawn(
        bin: &str,
        args: &[String],
        envs: &[(String, String)],
        ready_port: u16,
    ) -> anyhow::Result<Self> {
        let log_path = new_log_path(bin);
        let mut p = Self {
            child: None,
            name: bin.to_string(),
            args: args.to_vec(),
            envs: envs.to_vec(),
            log_path,
        };
        p.start(ready_port)?;
        Ok(p)
    }

    /// (Re)starts the process with the same arguments.
    ///
    /// # Errors
    /// As for [`ServiceProcess::spawn`].
    pub fn start(&mut self, ready_port: u16) -> anyhow::Result<()> {
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let _ = writeln!(log, "---- start {} {:?}", self.name, self.args);
        let path = bin_path(&self.name);
        let child = Command::new(&path)
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            // The caller's own (a RUST_LOG of its own included) win.
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| {
                format!("spawn {} (run `cargo build --bins` first)", path.display())
            })?;
        track(&child);
        self.child = Some(child);
        if ready_port == 0 {
            return Ok(());
        }
        let mut exited = None;
        let res = wait_until(
            &format!("{} listening on {ready_port}", self.name),
            SERVICE_START_DEADLINE,
            || {
                if let Some(c) = self.child.as_mut()
                    && let Ok(Some(status)) = c.try_wait()
                {
                    exited = Some(status);
                    return true;
                }
                TcpStream::connect(("127.0.0.1", ready_port)).is_ok()
            },
        );
        if let Some(status) = exited {
            bail!(
                "{} exited at start with {status}; see {}",
                self.name,
                self.log_path.display()
            );
        }
        res
    }

    /// SIGKILLs the process and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill9(&mut c);
        }
    }

    /// SIGSTOP: the process stays alive but runs nothing (its sockets fill
    /// up) until [`ServiceProcess::resume`]; a SIGKILL still ends it.
    pub fn suspend(&self) {
        if let Some(c) = &self.child {
            signal(c, rustix::process::Signal::STOP);
        }
    }

    /// SIGCONT after [`ServiceProcess::suspend`].
    pub fn resume(&self) {
        if let Some(c) = &self.child {
            signal(c, rustix::process::Signal::CONT);
        }
    }

    /// Sends SIGTERM and waits for the exit status, up to `deadline`.
    ///
    /// # Errors
    /// When it does not exit in time (it is then SIGKILLed).
    pub fn terminate(&mut self, deadline: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut c) = self.child.take() else {
            bail!("not running");
        };
        signal(&c, rustix::process::Signal::TERM);
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > end {
                kill9(&mut c);
                bail!("{} ignored SIGTERM for {deadline:?}", self.name);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits for the process to exit by itself, up to `deadline`.
    ///
    /// # Errors
    /// When it is still running at the deadline (it is then SIGKILLed).
    pub fn wait_exit(&mut self, deadline: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut c) = self.child.take() else {
            bail!("not running");
        };
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > end {
                kill9(&mut c);
                bail!("{} still running after {deadline:?}", self.name);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    #[must_use]
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The log so far, for assertions on start-up messages.
    #[must_use]
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
