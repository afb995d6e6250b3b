//! `just up` and `scripts/up` run as a user runs them, in a copy of the
//! repository's justfile, scripts/ and nats/ (so ./data is the copy's), on
//! free ports, with the debug binaries (`UP_BIN_DIR`: no release build).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::{http_client, wait_for};
use rustix::process::{Pid, Signal, kill_process, kill_process_group};

/// Start-up of six debug processes, NATS first.
const UP_DEADLINE: Duration = Duration::from_secs(120);
/// scripts/up gives each process 15 s to stop before SIGKILL.
const STOP_DEADLINE: Duration = Duration::from_secs(60);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// A running `up`: stopped with SIGTERM (which scripts/up turns into a
/// clean stop of everything it started) when a test fails half-way.
struct Up {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// NATS, its monitoring, then the listeners in the order of `start`.
    ports: Vec<u16>,
}

impl Up {
    fn start(via_just: bool) -> anyhow::Result<Self> {
        let dir = testkit::temp_dir("up")?;
        let root = repo_root();
        std::fs::copy(root.join("justfile"), dir.path().join("justfile"))?;
        copy_tree(&root.join("scripts"), &dir.path().join("scripts"))?;
        copy_tree(&root.join("nats"), &dir.path().join("nats"))?;
        let ports: Vec<u16> = (0..8).map(|_| testkit::free_port()).collect();
        let bin_dir = testkit::bin_path("posts-command")
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| anyhow::anyhow!("no bin dir"))?;
        let mut cmd = if via_just {
            let just = std::env::var("JUST_BIN").unwrap_or_else(|_| "just".into());
            let mut c = Command::new(just);
            c.arg("up");
            c
        } else {
            let mut c = Command::new("bash");
            c.arg("scripts/up");
            c
        };
        let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
        cmd.current_dir(dir.path())
            .env("UP_BIN_DIR", &bin_dir)
            .env("UP_NATS_PORT", ports[0].to_string())
            .env("UP_NATS_MONITOR_PORT", ports[1].to_string())
            .env("UP_COMMAND_LISTEN", addr(2))
            .env("UP_QUERY_LISTEN", addr(3))
            .env("UP_COMMENTS_LISTEN", addr(4))
            .env("UP_REPORTS_LISTEN", addr(5))
            .env("UP_GATEWAY_LISTEN", addr(6))
            .env("UP_QUERY_ADMIN_LISTEN", addr(7))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout"))?)
            .stderr(std::fs::File::create(dir.path().join("stderr"))?);
        // Its own process group, as a shell gives a foreground job: the
        // group is what a terminal's Ctrl-C reaches.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn()?;
        Ok(Self {
            child: Some(child),
            dir,
            ports,
        })
    }

    fn output(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    fn pid(&self) -> Option<Pid> {
        let id = self.child.as_ref()?.id();
        Pid::from_raw(i32::try_from(id).ok()?)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        while !self
            .output("stdout")
            .contains("up: Ctrl-C stops everything")
        {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                anyhow::bail!(
                    "up exited during start-up ({status}):\n{}\n{}",
                    self.output("stdout"),
                    self.output("stderr")
                );
            }
            anyhow::ensure!(
                started.elapsed() < UP_DEADLINE,
                "up did not finish starting in {UP_DEADLINE:?}:\n{}\n{}",
                self.output("stdout"),
                self.output("stderr")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let url = format!("http://127.0.0.1:{}/readyz", self.ports[6]);
        let http = http_client();
        wait_for("the gateway's /readyz to be 200", UP_DEADLINE, || {
            let req = http.get(&url);
            async move { req.send().await.ok().filter(|r| r.status() == 200) }
        })
        .await?;
        Ok(())
    }

    async fn wait_exit(&mut self) -> anyhow::Result<ExitStatus> {
        let child = self.child.as_mut().expect("running");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            anyhow::ensure!(
                started.elapsed() < STOP_DEADLINE,
                "up did not stop in {STOP_DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = kill_process(pid, Signal::TERM);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

fn port_closed(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
}

async fn stop_is_clean(via_just: bool, stop: impl FnOnce(&Up)) -> anyhow::Result<()> {
    let mut up = Up::start(via_just)?;
    up.wait_ready().await?;
    stop(&up);
    let status = up.wait_exit().await?;
    let (stdout, stderr) = (up.output("stdout"), up.output("stderr"));
    assert!(
        status.success(),
        "a stop that was asked for exits 0, got {status}:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("up: stopped (data kept in ./data"),
        "{stdout}"
    );
    assert!(
        !stderr.lines().any(|l| l.contains("error")),
        "no error line on a clean stop:\n{stderr}"
    );
    for port in &up.ports[2..] {
        assert!(port_closed(*port), "port {port} still open after the stop");
    }
    assert!(
        port_closed(up.ports[0]),
        "NATS still listens after the stop"
    );
    Ok(())
}

#[tokio::test]
async fn a_stop_that_was_asked_for_exits_0_with_no_error_line() -> anyhow::Result<()> {
    // Ctrl-C on a terminal: SIGINT to the whole foreground group, just included.
    stop_is_clean(true, |up| {
        kill_process_group(up.pid().expect("running"), Signal::INT).expect("SIGINT to the group");
    })
    .await?;
    // A supervisor's SIGTERM to scripts/up itself.
    stop_is_clean(false, |up| {
        kill_process(up.pid().expect("running"), Signal::TERM).expect("SIGTERM");
    })
    .await
}
