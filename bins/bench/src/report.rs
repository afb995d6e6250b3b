//! The report: metrics with their raw baselines and ratios, printed as a
//! table and written as JSON. Targets are shown as pass/miss, never asserted.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::procfs::PhaseCost;

/// What a metric should reach. Informational only.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    RatioAtLeast(f64),
    ValueAtMost(f64),
}

impl Target {
    fn describe(self) -> String {
        match self {
            Target::RatioAtLeast(r) => format!("ratio >= {r}"),
            Target::ValueAtMost(v) => format!("<= {v}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Metric {
    pub name: String,
    pub value: Option<f64>,
    pub unit: &'static str,
    pub baseline: Option<String>,
    pub ratio: Option<f64>,
    pub target: Option<Target>,
    pub note: Option<String>,
}

impl Metric {
    /// `Some(true)` pass, `Some(false)` miss, `None` when there is no target or no value.
    #[must_use]
    pub fn passed(&self) -> Option<bool> {
        match self.target? {
            Target::RatioAtLeast(r) => self.ratio.map(|x| x >= r),
            Target::ValueAtMost(v) => self.value.map(|x| x <= v),
        }
    }
}

/// Our figures beside the peer's (`../peerbench`: PostgreSQL with cqrs-es
/// on the same workload), by name: ours, then the peer's in its
/// results.json.
const PEER_FIGURES: [(&str, &str); 6] = [
    ("command_create_throughput", "pg_create_throughput"),
    (
        "command_create_latency_at64_p50",
        "pg_create_latency_at64_p50_ms",
    ),
    (
        "command_create_latency_at64_p99",
        "pg_create_latency_at64_p99_ms",
    ),
    (
        "command_update_hot_throughput",
        "pg_update_throughput_same_aggregate",
    ),
    (
        "command_update_hot_conflicts_per_success",
        "pg_update_conflicts_per_success",
    ),
    ("replay_post_view", "pg_replay_rate"),
];

#[derive(Default)]
pub struct Report {
    pub metrics: Vec<Metric>,
    /// The peer's figures by their names, from `--peer FILE`.
    peer: BTreeMap<String, f64>,
    pub phases: Vec<PhaseCost>,
    /// What the in-process load generator cost, one line per run, for the "load" field.
    pub load_costs: Vec<String>,
}

impl Report {
    /// Records a metric; its ratio is computed against `baseline`, which must
    /// be recorded before it.
    pub fn add(
        &mut self,
        name: &str,
        value: Option<f64>,
        unit: &'static str,
        baseline: Option<&str>,
        target: Option<Target>,
        note: Option<String>,
    ) {
        let base_value = baseline.and_then(|b| {
            self.metrics
                .iter()
                .find(|m| m.name == b)
                .and_then(|m| m.value)
        });
        let ratio = match (value, base_value) {
            (Some(v), Some(b)) if b > 0.0 => Some(v / b),
            _ => None,
        };
        let metric = Metric {
            name: name.to_string(),
            value,
            unit,
            baseline: baseline.map(str::to_string),
            ratio,
            target,
            note,
        };
        println!("  {}", one_line(&metric));
        self.metrics.push(metric);
    }

    /// Takes the figures of a peerbench `results.json` (`{"metrics": [{"name",
    /// "value", ...}]}`) to show beside ours.
    ///
    /// # Errors
    /// When `doc` has no metrics list.
    pub fn set_peer(&mut self, doc: &Value) -> anyhow::Result<()> {
        let metrics = doc["metrics"]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("a peerbench results.json has a \"metrics\" list"))?;
        self.peer = metrics
            .iter()
            .filter_map(|m| Some((m["name"].as_str()?.to_string(), m["value"].as_f64()?)))
            .collect();
        Ok(())
    }

    /// The peer's figure for our metric `name`, and its name.
    fn peer_of(&self, name: &str) -> Option<(&'static str, f64)> {
        let theirs = PEER_FIGURES.iter().find(|(ours, _)| *ours == name)?.1;
        Some((theirs, *self.peer.get(theirs)?))
    }

    pub fn phase(&mut self, cost: PhaseCost) {
        println!("  cost of {}: {}", cost.phase, cost.line());
        self.phases.push(cost);
    }

    #[must_use]
    pub fn table(&self) -> String {
        let header = [
            "metric", "value", "unit", "baseline", "ratio", "target", "result", "peer", "/peer",
        ];
        let rows: Vec<[String; 9]> = self
            .metrics
            .iter()
            .map(|m| {
                let peer = self.peer_of(&m.name);
                [
                    m.name.clone(),
                    m.value.map_or_else(|| "null".to_string(), fmt_value),
                    m.unit.to_string(),
                    m.baseline.clone().unwrap_or_else(|| "-".into()),
                    m.ratio.map_or_else(|| "-".into(), |r| format!("{r:.3}")),
                    m.target.map_or_else(|| "-".into(), Target::describe),
                    match m.passed() {
                        Some(true) => "pass".into(),
                        Some(false) => "MISS".into(),
                        None if m.target.is_some() => "n/a".into(),
                        None => "-".into(),
                    },
                    peer.map_or_else(|| "-".into(), |(_, v)| fmt_value(v)),
                    match (m.value, peer) {
                        (Some(v), Some((_, p))) if p > 0.0 => format!("{:.2}", v / p),
                        _ => "-".into(),
                    },
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &[String]| {
            let mut s = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                // Numbers right-aligned, words left-aligned.
                if matches!(i, 1 | 4 | 7 | 8) {
                    let _ = write!(s, "{cell:>w$}  ");
                } else {
                    let _ = write!(s, "{cell:<w$}  ");
                }
            }
            out.push_str(s.trim_end());
            out.push('\n');
        };
        line(&header.map(str::to_string));
        line(&widths.map(|w| "-".repeat(w)));
        for row in &rows {
            line(row);
        }
        if !self.peer.is_empty() {
            out.push_str(
                "peer: PostgreSQL + cqrs-es on the same workload (--peer); /peer is ours over \
                 theirs: above 1 is better for rates, worse for latencies\n",
            );
        }
        let notes: Vec<String> = self
            .metrics
            .iter()
            .filter_map(|m| m.note.as_ref().map(|n| format!("  {}: {n}", m.name)))
            .collect();
        if !notes.is_empty() {
            out.push_str("notes:\n");
            for n in notes {
                out.push_str(&n);
                out.push('\n');
            }
        }
        out
    }

    /// Writes the JSON report, creating the directory.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_json(&self, path: &Path, header: Header) -> anyhow::Result<()> {
        let doc = Document {
            nats_server: header.nats_server,
            cores: header.cores,
            load: header.load,
            metrics: self
                .metrics
                .iter()
                .map(|m| MetricJson {
                    peer: self.peer_of(&m.name).map(|(name, value)| PeerJson {
                        name,
                        value,
                        ratio: m.value.filter(|_| value > 0.0).map(|v| v / value),
                    }),
                    name: &m.name,
                    value: m.value,
                    unit: m.unit,
                    baseline: m.baseline.as_deref(),
                    ratio: m.ratio,
                    target: m.target.map(Target::describe),
                    pass: m.passed(),
                    note: m.note.as_deref(),
                })
                .collect(),
            run: header.run,
            phases: self
                .phases
                .iter()
                .map(|p| PhaseJson {
                    phase: &p.phase,
                    wall_s: round3(p.wall_s),
                    cpu_s: p
                        .cpu_s
                        .iter()
                        .map(|(name, s)| (name.as_str(), round3(*s)))
                        .collect(),
                })
                .collect(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")?;
        Ok(())
    }
}

/// The report's top-level facts besides the metrics.
pub struct Header {
    pub nats_server: String,
    pub cores: usize,
    pub load: String,
    /// How the run was set up: sizes, HTTP client, machine load.
    pub run: Value,
}

#[derive(Serialize)]
struct Document<'a> {
    nats_server: String,
    cores: usize,
    load: String,
    metrics: Vec<MetricJson<'a>>,
    run: Value,
    phases: Vec<PhaseJson<'a>>,
}

#[derive(Serialize)]
struct MetricJson<'a> {
    name: &'a str,
    value: Option<f64>,
    unit: &'a str,
    baseline: Option<&'a str>,
    ratio: Option<f64>,
    target: Option<String>,
    pass: Option<bool>,
    note: Option<&'a str>,
    /// The peer's figure for the same workload, with `--peer`.
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<PeerJson>,
}

#[derive(Serialize)]
struct PeerJson {
    name: &'static str,
    value: f64,
    /// Ours over the peer's.
    ratio: Option<f64>,
}

/// CPU seconds per process during one phase, next to its wall time.
#[derive(Serialize)]
struct PhaseJson<'a> {
    phase: &'a str,
    wall_s: f64,
    cpu_s: BTreeMap<&'a str, f64>,
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn fmt_value(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn one_line(m: &Metric) -> String {
    let mut s = format!(
        "{} = {} {}",
        m.name,
        m.value.map_or_else(|| "null".to_string(), fmt_value),
        m.unit
    );
    if let Some(r) = m.ratio {
        let _ = write!(
            s,
            " (ratio {r:.3} of {})",
            m.baseline.as_deref().unwrap_or("?")
        );
    }
    if let Some(n) = &m.note {
        let _ = write!(s, " [{n}]");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peers_figures_stand_beside_ours_by_workload() {
        let mut r = Report::default();
        r.add(
            "command_create_throughput",
            Some(3847.0),
            "events/s",
            None,
            None,
            None,
        );
        r.add("search_latency_p99", Some(5.0), "ms", None, None, None);
        r.set_peer(&serde_json::json!({"metrics": [
            {"name": "pg_create_throughput", "value": 4505.0, "unit": "cmd/s", "note": ""},
            {"name": "pg_replay_rate", "value": 99200.0, "unit": "ev/s", "note": ""},
        ]}))
        .unwrap();
        let table = r.table();
        let row = |name: &str| {
            table
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_default()
                .to_string()
        };
        let create = row("command_create_throughput");
        assert!(
            create.contains("4505") && create.trim_end().ends_with("0.85"),
            "{create}"
        );
        let last: Vec<String> = row("search_latency_p99")
            .split_whitespace()
            .rev()
            .take(2)
            .map(str::to_string)
            .collect();
        assert_eq!(last, ["-", "-"], "no peer figure for it: {table}");
        assert_eq!(
            r.peer_of("replay_post_view"),
            Some(("pg_replay_rate", 99200.0))
        );
        assert!(r.set_peer(&serde_json::json!({"rows": []})).is_err());
    }
}
