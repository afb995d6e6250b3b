//! Runs the `replay` binary with `--json` and reads its figures.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::procfs;

/// How often the replay process is looked at (exit, memory).
const POLL: Duration = Duration::from_millis(50);

/// What one replay run reported.
pub struct ReplayRun {
    pub events: u64,
    pub seconds: f64,
    pub events_per_sec: f64,
    /// The process's own wall time, start-up included.
    pub wall_s: f64,
    pub peak_rss_kib: Option<u64>,
    /// CPU seconds the process used, as last seen before it exited.
    pub cpu_s: Option<f64>,
}

/// `replay <projection> --nats-url URL --data-dir DIR --json`.
///
/// # Errors
/// A note for the report when the binary is missing, fails, times out, or
/// prints no usable JSON.
pub fn run(
    projection: &str,
    nats_url: &str,
    data_dir: &Path,
    deadline: Duration,
) -> Result<ReplayRun, String> {
    let bin = testkit::bin_path("replay");
    if !bin.exists() {
        return Err(format!(
            "replay binary missing at {} (build it with `cargo build --release --bins`)",
            bin.display()
        ));
    }
    let log_path = testkit::logs_dir().join(format!(
        "bench-replay-{projection}-{}.log",
        std::process::id()
    ));
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut child = Command::new(&bin)
        .arg(projection)
        .arg("--nats-url")
        .arg(nats_url)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot spawn {}: {e}", bin.display()))?;
    let pid = child.id();
    let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let mut peak_rss_kib = None;
    let mut cpu_s = None;
    let status = loop {
        // VmHWM and CPU time only grow; the last readings before exit are the totals.
        if let Some(k) = procfs::status_kib(pid, "VmHWM") {
            peak_rss_kib = Some(k);
        }
        if let Some(c) = procfs::cpu_seconds(pid) {
            cpu_s = Some(c);
        }
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(format!("waiting for replay: {e}")),
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "replay {projection} still running after {deadline:?}; killed (log: {})",
                log_path.display()
            ));
        }
        std::thread::sleep(POLL);
    };
    let wall_s = started.elapsed().as_secs_f64();
    let stdout = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "replay {projection} exited with {status} (log: {})",
            log_path.display()
        ));
    }
    let figures = parse(&stdout).ok_or_else(|| {
        format!(
            "replay {projection} printed no JSON with events and seconds (stdout: {:?})",
            stdout.chars().take(200).collect::<String>()
        )
    })?;
    Ok(ReplayRun {
        wall_s,
        peak_rss_kib,
        cpu_s,
        ..figures
    })
}

/// The JSON object on stdout: the whole output, or else its last line that
/// is one. `events_per_sec` is computed when absent.
fn parse(stdout: &str) -> Option<ReplayRun> {
    let object = serde_json::from_str::<Value>(stdout.trim())
        .ok()
        .filter(Value::is_object)
        .or_else(|| {
            stdout.lines().rev().find_map(|l| {
                serde_json::from_str::<Value>(l.trim())
                    .ok()
                    .filter(Value::is_object)
            })
        })?;
    let events = object["events"].as_u64()?;
    let seconds = object["seconds"].as_f64()?;
    #[allow(
        clippy::cast_precision_loss,
        reason = "event counts are far below 2^52"
    )]
    let computed = events as f64 / seconds.max(f64::MIN_POSITIVE);
    Some(ReplayRun {
        events,
        seconds,
        events_per_sec: object["events_per_sec"].as_f64().unwrap_or(computed),
        wall_s: 0.0,
        peak_rss_kib: None,
        cpu_s: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_last_json_line() {
        let out = "progress\n{\"events\": 1000, \"seconds\": 0.5}\n";
        let r = parse(out).expect("parsed");
        assert_eq!(r.events, 1000);
        assert!((r.events_per_sec - 2000.0).abs() < 1e-9);
    }

    #[test]
    fn parses_pretty_json() {
        let out = "{\n  \"events\": 10,\n  \"seconds\": 2.0,\n  \"events_per_sec\": 5.0\n}\n";
        assert!(parse(out).is_some_and(|r| (r.events_per_sec - 5.0).abs() < 1e-9));
        assert!(parse("").is_none());
    }
}
