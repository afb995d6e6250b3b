//! Closed-loop load: a fixed number of tokio tasks inside this process, each
//! sending its next request as soon as the previous one is answered.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

/// A boxed operation, for closures whose future type cannot be named.
pub type OpFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'static>>;

/// What a load run observed inside its measurement window.
#[derive(Debug, Default)]
pub struct Outcome {
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Latency of every successful operation that counted, unsorted.
    pub latencies: Vec<Duration>,
    pub window: Duration,
}

impl Outcome {
    /// Successful operations per second of the window.
    #[must_use]
    pub fn rate(&self) -> f64 {
        #[allow(clippy::cast_precision_loss, reason = "counts are far below 2^52")]
        let ok = self.ok as f64;
        ok / self.window.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// Nearest-rank percentile (`p` in 0..=1) in milliseconds; `None` without samples.
    #[must_use]
    pub fn percentile_ms(&mut self, p: f64) -> Option<f64> {
        percentile_ms(&mut self.latencies, p)
    }

    /// Adds a later run of the same kind: counts, latencies and window.
    pub fn absorb(&mut self, other: Self) {
        self.window += other.window;
        self.merge(other);
    }

    fn merge(&mut self, other: Self) {
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latencies.extend(other.latencies);
    }

    fn failed(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }

    /// A short note when anything failed, for the report.
    #[must_use]
    pub fn error_note(&self) -> Option<String> {
        (self.errors > 0).then(|| {
            format!(
                "{} errors, first: {}",
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            )
        })
    }
}

/// Nearest-rank percentile in milliseconds; sorts `samples` in place.
pub fn percentile_ms(samples: &mut [Duration], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a rank between 1 and the sample count"
    )]
    let rank = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    Some(samples[rank - 1].as_secs_f64() * 1e3)
}

/// Runs `op` from `concurrency` tasks for `warmup + measure`; counts the
/// operations that complete inside the measurement window. Operation `n` is
/// numbered so callers can cycle through prepared inputs.
pub async fn timed<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    measure: Duration,
    op: F,
) -> Outcome
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let window_start = start + warmup;
    let window_end = window_start + measure;
    let mut tasks = JoinSet::new();
    let stride = concurrency as u64;
    for worker in 0..stride {
        let op = op.clone();
        tasks.spawn(async move {
            let mut seen = Outcome::default();
            let mut n = worker;
            loop {
                let t0 = Instant::now();
                if t0 >= window_end {
                    break;
                }
                let result = op(n).await;
                n += stride;
                let t1 = Instant::now();
                if t1 < window_start || t1 > window_end {
                    continue;
                }
                match result {
                    Ok(()) => {
                        seen.ok += 1;
                        seen.latencies.push(t1 - t0);
                    }
                    Err(e) => seen.failed(e),
                }
            }
            seen
        });
    }
    let mut total = Outcome {
        window: measure,
        ..Outcome::default()
    };
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(seen) => total.merge(seen),
            Err(e) => total.failed(format!("load task died: {e}")),
        }
    }
    total
}

/// Runs `warmup_n + n` operations from `concurrency` tasks and keeps the
/// latencies of the last `n`.
pub async fn counted<F, Fut>(concurrency: usize, warmup_n: u64, n: u64, op: F) -> Outcome
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let op = Arc::new(op);
    let tickets = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let op = op.clone();
        let tickets = tickets.clone();
        tasks.spawn(async move {
            let mut seen = Outcome::default();
            loop {
                let ticket = tickets.fetch_add(1, Ordering::Relaxed);
                if ticket >= warmup_n + n {
                    break;
                }
                let t0 = Instant::now();
                let result = op(ticket).await;
                let elapsed = t0.elapsed();
                if ticket < warmup_n {
                    continue;
                }
                match result {
                    Ok(()) => {
                        seen.ok += 1;
                        seen.latencies.push(elapsed);
                    }
                    Err(e) => seen.failed(e),
                }
            }
            seen
        });
    }
    let mut total = Outcome::default();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(seen) => total.merge(seen),
            Err(e) => total.failed(format!("load task died: {e}")),
        }
    }
    total.window = start.elapsed();
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&mut v, 0.5), Some(50.0));
        assert_eq!(percentile_ms(&mut v, 0.99), Some(99.0));
        assert_eq!(percentile_ms(&mut v, 1.0), Some(100.0));
        assert_eq!(percentile_ms(&mut [], 0.5), None);
    }
}
