//! The platform's metrics, in the Prometheus (OpenMetrics) text format:
//! one registry per process with every family DESIGN names registered at
//! start-up, so each is there at zero before anything happens. Labels stay
//! bounded: route templates, projection names, never ids.
//!
//! Code records into [`metrics()`]; a service whose figures live elsewhere
//! (a projection's status) registers a refresher with [`on_scrape`], run
//! before each [`render`].

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every family: name, type, help. A family with no series yet is still
/// written out (its HELP and TYPE lines), so it is there from start-up.
const FAMILIES: [(&str, &str, &str); 12] = [
    (
        "http_requests",
        "counter",
        "HTTP requests answered, by route template, method and status",
    ),
    (
        "http_request_duration_seconds",
        "histogram",
        "Time to answer an HTTP request, by route template and method",
    ),
    (
        "eventstore_append_duration_seconds",
        "histogram",
        "Time for one append to be acknowledged by JetStream, by stream",
    ),
    (
        "command_conflicts",
        "counter",
        "Appends refused by optimistic concurrency (then reloaded and re-decided), by stream",
    ),
    (
        "idempotency_hits",
        "counter",
        "Commands answered from a remembered Idempotency-Key, by stream",
    ),
    (
        "projection_lag_events",
        "gauge",
        "Events in the stream past the projection's checkpoint",
    ),
    (
        "projection_applied_events",
        "counter",
        "Events the projection has applied",
    ),
    (
        "projection_parked_events",
        "counter",
        "Events the projection parked (DLQ)",
    ),
    (
        "projection_state",
        "gauge",
        "0 running, 1 rebuilding, 2 halted",
    ),
    (
        "projection_last_error_timestamp_seconds",
        "gauge",
        "When the projection last failed (it retries from its checkpoint), Unix seconds; 0 never",
    ),
    (
        "search_duration_seconds",
        "histogram",
        "Time to run one full-text search, parsing to page",
    ),
    (
        "dlq_messages",
        "gauge",
        "Messages in stream DLQ: parked events of every projection",
    ),
];

fn help(name: &str) -> &'static str {
    FAMILIES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map_or("", |(_, _, h)| h)
}

/// Latency buckets, in seconds: 0.5 ms to 10 s.
const SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn seconds_histogram() -> Histogram {
    Histogram::new(SECONDS_BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The route template (`/posts/{id}`), `unmatched` for none.
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectionLabels {
    pub projection: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub stream: String,
}

type Refresher = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;
type SecondsFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every family of this process.
pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: SecondsFamily<RouteLabels>,
    pub append_duration: SecondsFamily<StreamLabels>,
    pub command_conflicts: Family<StreamLabels, Counter>,
    pub idempotency_hits: Family<StreamLabels, Counter>,
    pub projection_lag: Family<ProjectionLabels, Gauge>,
    pub projection_applied: Family<ProjectionLabels, Counter>,
    pub projection_parked: Family<ProjectionLabels, Counter>,
    /// 0 running, 1 rebuilding, 2 halted.
    pub projection_state: Family<ProjectionLabels, Gauge>,
    pub projection_last_error: Family<ProjectionLabels, Gauge>,
    pub search_duration: Histogram,
    pub dlq_messages: Gauge,
    refreshers: Mutex<Vec<Refresher>>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let http_requests = Family::<HttpLabels, Counter>::default();
        let http_duration: SecondsFamily<RouteLabels> =
            Family::new_with_constructor(seconds_histogram);
        let append_duration: SecondsFamily<StreamLabels> =
            Family::new_with_constructor(seconds_histogram);
        let command_conflicts = Family::<StreamLabels, Counter>::default();
        let idempotency_hits = Family::<StreamLabels, Counter>::default();
        let projection_lag = Family::<ProjectionLabels, Gauge>::default();
        let projection_applied = Family::<ProjectionLabels, Counter>::default();
        let projection_parked = Family::<ProjectionLabels, Counter>::default();
        let projection_state = Family::<ProjectionLabels, Gauge>::default();
        let projection_last_error = Family::<ProjectionLabels, Gauge>::default();
        let search_duration = seconds_histogram();
        let dlq_messages = Gauge::default();
        registry.register(
            "http_requests",
            help("http_requests"),
            http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            help("http_request_duration_seconds"),
            http_duration.clone(),
        );
        registry.register(
            "eventstore_append_duration_seconds",
            help("eventstore_append_duration_seconds"),
            append_duration.clone(),
        );
        registry.register(
            "command_conflicts",
            help("command_conflicts"),
            command_conflicts.clone(),
        );
        registry.register(
            "idempotency_hits",
            help("idempotency_hits"),
            idempotency_hits.clone(),
        );
        registry.register(
            "projection_lag_events",
            help("projection_lag_events"),
            projection_lag.clone(),
        );
        registry.register(
            "projection_applied_events",
            help("projection_applied_events"),
            projection_applied.clone(),
        );
        registry.register(
            "projection_parked_events",
            help("projection_parked_events"),
            projection_parked.clone(),
        );
        registry.register(
            "projection_state",
            help("projection_state"),
            projection_state.clone(),
        );
        registry.register(
            "projection_last_error_timestamp_seconds",
            help("projection_last_error_timestamp_seconds"),
            projection_last_error.clone(),
        );
        registry.register(
            "search_duration_seconds",
            help("search_duration_seconds"),
            search_duration.clone(),
        );
        registry.register("dlq_messages", help("dlq_messages"), dlq_messages.clone());
        Self {
            registry,
            http_requests,
            http_duration,
            append_duration,
            command_conflicts,
            idempotency_hits,
            projection_lag,
            projection_applied,
            projection_parked,
            projection_state,
            projection_last_error,
            search_duration,
            dlq_messages,
            refreshers: Mutex::new(Vec::new()),
        }
    }

    /// Makes the labelled series of `stream` exist, at zero.
    pub fn declare_stream(&self, stream: &str) {
        let l = StreamLabels {
            stream: stream.to_string(),
        };
        let _ = self.append_duration.get_or_create(&l);
        let _ = self.command_conflicts.get_or_create(&l);
        let _ = self.idempotency_hits.get_or_create(&l);
    }

    /// Sets projection `name`'s figures (counters only move up: a rebuilt
    /// store that restarts lower keeps the counter where it was).
    pub fn set_projection(&self, name: &str, lag: u64, applied: u64, parked: u64, state: i64) {
        let l = ProjectionLabels {
            projection: name.to_string(),
        };
        self.projection_lag
            .get_or_create(&l)
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
        raise(&self.projection_applied.get_or_create(&l), applied);
        raise(&self.projection_parked.get_or_create(&l), parked);
        self.projection_state.get_or_create(&l).set(state);
        let _ = self.projection_last_error.get_or_create(&l);
    }

    /// Sets when projection `name` last failed, in Unix seconds.
    pub fn set_projection_last_error(&self, name: &str, at_unix_s: u64) {
        let l = ProjectionLabels {
            projection: name.to_string(),
        };
        self.projection_last_error
            .get_or_create(&l)
            .set(i64::try_from(at_unix_s).unwrap_or(i64::MAX));
    }
}

fn raise(counter: &Counter, to: u64) {
    let now = counter.get();
    if to > now {
        counter.inc_by(to - now);
    }
}

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Runs `refresh` before every [`render`]: for figures read from elsewhere.
pub fn on_scrape<F, Fut>(refresh: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let refresher: Refresher = Arc::new(move || Box::pin(refresh()));
    if let Ok(mut all) = metrics().refreshers.lock() {
        all.push(refresher);
    }
}

/// [`on_scrape`] for figures held by `owner`, which the refresher holds
/// weakly: once the owner is dropped (a stopped service), its stores close
/// and its series stop moving.
pub fn on_scrape_of<T, F, Fut>(owner: &Arc<T>, refresh: F)
where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let weak = Arc::downgrade(owner);
    let refresh = Arc::new(refresh);
    on_scrape(move || {
        let owner = weak.upgrade();
        let refresh = refresh.clone();
        async move {
            if let Some(owner) = owner {
                refresh(owner).await;
            }
        }
    });
}

/// The text of every family, after running the refreshers.
pub async fn render() -> String {
    let refreshers: Vec<Refresher> = metrics()
        .refreshers
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default();
    for refresh in refreshers {
        refresh().await;
    }
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &metrics().registry).is_err() {
        out.clear();
    }
    let mut missing = String::new();
    for (name, kind, help) in FAMILIES {
        if !out.contains(&format!("# TYPE {name} ")) {
            missing.push_str(&format!("# HELP {name} {help}.\n# TYPE {name} {kind}\n"));
        }
    }
    match out.rfind("# EOF") {
        Some(at) => out.insert_str(at, &missing),
        None => {
            out.push_str(&missing);
            out.push_str("# EOF\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_there_from_the_start() {
        let text = futures_lite_block_on(render());
        for family in [
            "http_requests",
            "http_request_duration_seconds",
            "eventstore_append_duration_seconds",
            "command_conflicts",
            "idempotency_hits",
            "projection_lag_events",
            "projection_applied_events",
            "projection_parked_events",
            "projection_state",
            "projection_last_error_timestamp_seconds",
            "search_duration_seconds",
            "dlq_messages",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family}: {text}"
            );
        }
        metrics().set_projection("p", 3, 10, 1, 0);
        metrics().set_projection("p", 0, 4, 1, 0);
        let text = futures_lite_block_on(render());
        assert!(
            text.contains("projection_applied_events_total{projection=\"p\"} 10"),
            "{text}"
        );
        assert!(
            text.contains("projection_lag_events{projection=\"p\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("projection_last_error_timestamp_seconds{projection=\"p\"} 0"),
            "{text}"
        );
        metrics().set_projection_last_error("p", 1_765_000_000);
        let text = futures_lite_block_on(render());
        assert!(
            text.contains("projection_last_error_timestamp_seconds{projection=\"p\"} 1765000000"),
            "{text}"
        );
    }

    /// A minimal executor: `render` awaits nothing here.
    fn futures_lite_block_on<F: Future>(f: F) -> F::Output {
        use std::task::{Context, Poll, Waker};
        let mut f = std::pin::pin!(f);
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }
}
