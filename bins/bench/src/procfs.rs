//! What processes cost, read from `/proc` (Linux only): CPU time and memory.

use std::path::Path;
use std::time::Instant;

/// `/proc/<pid>/stat` counts CPU time in USER_HZ ticks, which Linux fixes at
/// 100 per second for every userspace-visible interface.
const USER_HZ: f64 = 100.0;

/// User plus system CPU seconds `pid` has used so far.
#[must_use]
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is index 0 here; utime is field 14, stime field 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// A `kB` field of `/proc/<pid>/status`, such as `VmHWM` or `VmRSS`, in KiB.
#[must_use]
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        value.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// True while `pid` runs (a zombie waiting to be reaped counts as gone).
#[must_use]
pub fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("State:"))
            .is_some_and(|l| !l.contains("Z") && !l.contains("X"))
    })
}

/// The pid of the process whose command line holds `needle` (used to find the
/// nats-server testkit started, by its config path).
#[must_use]
pub fn find_pid_by_arg(needle: &Path) -> Option<u32> {
    let needle = needle.to_string_lossy();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            cmdline
                .split(|b| *b == 0)
                .any(|arg| String::from_utf8_lossy(arg) == needle)
                .then_some(pid)
        })
}

/// CPU seconds used by a set of processes between [`CpuWatch::start`] and
/// [`CpuWatch::finish`], next to the wall time: what a phase cost.
pub struct CpuWatch {
    started: Instant,
    procs: Vec<(String, u32, f64)>,
}

/// One phase's cost: wall seconds and CPU seconds per process.
#[derive(Debug, Clone)]
pub struct PhaseCost {
    pub phase: String,
    pub wall_s: f64,
    pub cpu_s: Vec<(String, f64)>,
}

impl CpuWatch {
    #[must_use]
    pub fn start(procs: &[(&str, Option<u32>)]) -> Self {
        let procs = procs
            .iter()
            .filter_map(|(name, pid)| {
                let pid = (*pid)?;
                Some((name.to_string(), pid, cpu_seconds(pid)?))
            })
            .collect();
        Self {
            started: Instant::now(),
            procs,
        }
    }

    #[must_use]
    pub fn finish(self, phase: &str) -> PhaseCost {
        let wall_s = self.started.elapsed().as_secs_f64();
        let cpu_s = self
            .procs
            .into_iter()
            .filter_map(|(name, pid, before)| Some((name, cpu_seconds(pid)? - before)))
            .collect();
        PhaseCost {
            phase: phase.to_string(),
            wall_s,
            cpu_s,
        }
    }
}

impl PhaseCost {
    /// A phase with nothing measured yet, to [`absorb`](Self::absorb) slices into.
    #[must_use]
    pub fn named(phase: &str) -> Self {
        Self {
            phase: phase.to_string(),
            wall_s: 0.0,
            cpu_s: Vec::new(),
        }
    }

    /// CPU microseconds per event for each process, given the phase's event
    /// rate (warm-up included in both, so the ratio holds).
    #[must_use]
    pub fn per_event(&self, events_per_sec: f64) -> String {
        self.per_op(events_per_sec * self.wall_s, "event")
    }

    /// CPU microseconds per operation for each process, over `ops` operations.
    #[must_use]
    pub fn per_op(&self, ops: f64, what: &str) -> String {
        if ops <= 0.0 {
            return String::new();
        }
        let parts: Vec<String> = self
            .cpu_s
            .iter()
            .map(|(name, s)| format!("{name} {:.1}", s * 1e6 / ops))
            .collect();
        format!("CPU us/{what}: {}", parts.join(", "))
    }

    /// Adds another slice of the same phase: wall and CPU times sum.
    pub fn absorb(&mut self, other: &PhaseCost) {
        self.wall_s += other.wall_s;
        for (name, s) in &other.cpu_s {
            match self.cpu_s.iter_mut().find(|(n, _)| n == name) {
                Some((_, mine)) => *mine += s,
                None => self.cpu_s.push((name.clone(), *s)),
            }
        }
    }

    /// CPU seconds of `name` in this phase.
    #[must_use]
    pub fn cpu_of(&self, name: &str) -> Option<f64> {
        self.cpu_s.iter().find(|(n, _)| n == name).map(|(_, s)| *s)
    }

    /// `wall 10.0 s; bench 7.1 cpu-s (0.71 cores), ...`
    #[must_use]
    pub fn line(&self) -> String {
        let parts: Vec<String> = self
            .cpu_s
            .iter()
            .map(|(name, s)| {
                format!(
                    "{name} {s:.1} cpu-s ({:.2} cores)",
                    s / self.wall_s.max(1e-9)
                )
            })
            .collect();
        format!("wall {:.1} s; {}", self.wall_s, parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some());
        assert!(status_kib(me, "VmHWM").is_some_and(|k| k > 0));
        assert!(is_running(me));
    }
}
