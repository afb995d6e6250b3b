//! A cold command on a post with a long history: what
//! `aggregate_load_long_stream_ms` measures. posts-command keeps no
//! snapshots, so a cache miss folds the post's whole history from the
//! stream before it decides.

use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use testkit::{NatsOptions, NatsServer};
use tokio::runtime::Runtime;

use crate::report::Report;
use crate::{corpus, http1, spawn_command};

/// Rounds, each on a fresh posts-command (a cold cache) and each adding
/// two events (the cold PATCH and the warm one).
const ROUNDS: u64 = 3;
/// Publishes in flight while the history is written.
const WRITE_IN_FLIGHT: usize = 1024;
/// How long one cold command may take before the round fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Writes a post with `events - 2 * ROUNDS` events (a create, then
/// updates), so that the last round's command loads fewer than `events`,
/// within the store's fold limit of 100,000; then times a `PATCH` on a fresh posts-command, and
/// one more on the same process, warm.
///
/// # Errors
/// When the server or posts-command cannot be started, or a command fails.
pub fn run(rt: &Runtime, report: &mut Report, events: u64) -> anyhow::Result<()> {
    let events = events.saturating_sub(2 * ROUNDS).max(1);
    println!("\n== long stream: a cold command on a post with {events} events");
    let nats = NatsServer::start_with(&NatsOptions::default()).context("start nats-server")?;
    let id = uuid::Uuid::now_v7();
    let written = Instant::now();
    rt.block_on(write_history(&nats.url(), id, events))?;
    let written = written.elapsed();
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for round in 0..ROUNDS {
        let (command, url) = spawn_command(&nats.url())?;
        let client = http1::Client::new(&url, COMMAND_TIMEOUT)?;
        for (times, which) in [(&mut cold, "cold"), (&mut warm, "warm")] {
            // Each PATCH changes the content: a no-op would measure no append.
            let body = serde_json::json!({"content": format!("long {round} {which}")}).to_string();
            let request =
                client.json_request("PATCH", &format!("/posts/{id}"), body.as_bytes(), "");
            let started = Instant::now();
            let r = rt
                .block_on(client.send(&request))
                .map_err(|e| anyhow::anyhow!("PATCH of the long post: {e}"))?;
            let took = started.elapsed();
            anyhow::ensure!(
                r.status == 200,
                "PATCH of the long post: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
            );
            times.push(took);
        }
        drop(command);
    }
    let ms = |d: &Duration| d.as_secs_f64() * 1e3;
    let list = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.1}", ms(d)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let best = cold.iter().min().map(ms);
    let note = format!(
        "one PATCH on a fresh posts-command (cache empty) on a post of {events}+ events, best of \
         {ROUNDS} rounds ({} ms); the same PATCH again, cached: {} ms; no snapshots, so the cold \
         one folds the whole history from the stream; history written in {:.1} s on a nats-server \
         with the default sync interval",
        list(&cold),
        list(&warm),
        written.as_secs_f64()
    );
    report.add(
        "aggregate_load_long_stream_ms",
        best,
        "ms",
        None,
        None,
        Some(note),
    );
    drop(nats);
    Ok(())
}

/// A create, then `events - 1` updates of post `id`, pipelined.
async fn write_history(nats_url: &str, id: uuid::Uuid, events: u64) -> anyhow::Result<()> {
    let client = async_nats::connect(nats_url).await?;
    let js = jetstream::new(client);
    eventstore::provision(&js, &posts::context::stream(1)).await?;
    let subject = format!("posts.{id}");
    let mut in_flight = FuturesUnordered::new();
    for n in 0..events {
        while in_flight.len() >= WRITE_IN_FLIGHT {
            in_flight.next().await.context("no publish in flight")??;
        }
        let event = if n == 0 {
            posts::Event::Created {
                title: "a long history".into(),
                content: "version 1".into(),
                author_name: "bench".into(),
            }
        } else {
            posts::Event::Updated {
                title: None,
                content: Some(format!("version {}", n + 1)),
                author_name: None,
            }
        };
        let (event_type, schema, payload) = posts::encode(&event);
        let ack = js
            .publish_with_headers(
                subject.clone(),
                corpus::unchecked_headers(event_type, schema),
                payload.into(),
            )
            .await?;
        in_flight.push(async move { ack.await.map(|_| ()) });
    }
    while let Some(acked) = in_flight.next().await {
        acked?;
    }
    Ok(())
}
