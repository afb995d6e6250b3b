//! `GET /metrics` on every service, parsed with a Prometheus text parser:
//! every family is there, the series move with the work, labels are route
//! templates, and a projection's lag falls to 0 once it has caught up.
//! Services run as processes: each has its own registry, as in production.

use std::time::Duration;

use e2e_tests::{
    Reply, http_client, spawn_command_process, spawn_query_process, spawn_service_process,
    start_nats, wait_for,
};
use serde_json::json;

const FAMILIES: [&str; 12] = [
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
];

async fn scrape(
    http: &reqwest::Client,
    base: &str,
) -> anyhow::Result<(String, prometheus_parse::Scrape)> {
    let r = Reply::of(http.get(format!("{base}/metrics"))).await?;
    anyhow::ensure!(r.status == 200, "{r:?}");
    let text = r.body.clone();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?;
    Ok((text, scrape))
}

fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .and_then(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

#[tokio::test]
async fn every_service_serves_its_metrics_and_lag_falls_to_zero() -> anyhow::Result<()> {
    let nats = start_nats().await?;
    let url = nats.url();
    let http = http_client();
    let (_posts, posts) = spawn_command_process(&url).await?;
    let (_comments, comments) = spawn_service_process("comments-command", &url).await?;
    let dir = tempfile::tempdir()?;
    let (_query, query) = spawn_query_process(&url, dir.path()).await?;

    // Every family from the start, before any work.
    for base in [&posts, &comments, &query] {
        let (text, _) = scrape(&http, base).await?;
        for family in FAMILIES {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{base}: {family} missing:\n{text}"
            );
        }
    }

    let create = || {
        Reply::of(
            http.post(format!("{posts}/posts"))
                .header("idempotency-key", "metrics-1")
                .json(&json!({"title": "t", "content": "c", "author_name": "ann"})),
        )
    };
    let created = create().await?.ack(201);
    let _ = create().await?.ack(201);
    let mut last = created.seq;
    for i in 0..20 {
        let r = Reply::of(
            http.post(format!("{posts}/posts"))
                .json(&json!({"title": format!("p{i}"), "content": "c", "author_name": "bo"})),
        )
        .await?;
        last = r.ack(201).seq;
    }
    let r = Reply::of(
        http.post(format!("{comments}/posts/{}/comments", created.post_id))
            .json(&json!({"body": "b", "author_name": "cy"})),
    )
    .await?;
    assert_eq!(r.status, 201, "{r:?}");
    let r = Reply::of(http.get(format!("{posts}/posts/not-an-id/nothing"))).await?;
    assert_eq!(r.status, 404);

    let (text, s) = scrape(&http, &posts).await?;
    assert_eq!(
        value(
            &s,
            "http_requests_total",
            &[("route", "/posts"), ("method", "POST"), ("status", "201")]
        ),
        Some(22.0),
        "{text}"
    );
    assert_eq!(
        value(&s, "idempotency_hits_total", &[("stream", "POSTS")]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&s, "command_conflicts_total", &[("stream", "POSTS")]),
        Some(0.0),
        "{text}"
    );
    assert!(
        text.contains("eventstore_append_duration_seconds_count{stream=\"POSTS\"} 21"),
        "{text}"
    );
    // Labels are templates: no raw path, no id.
    assert!(
        !text.contains("not-an-id") && !text.contains(&created.post_id),
        "{text}"
    );
    // (The parser reads no braces inside label values: match the text.)
    let (text, _) = scrape(&http, &comments).await?;
    assert!(
        text.contains(
            "http_requests_total{route=\"/posts/{post_id}/comments\",method=\"POST\",status=\"201\"} 1"
        ),
        "{text}"
    );

    // The projections catch up: lag 0, every event applied.
    let s = wait_for("post-view's lag at 0", Duration::from_secs(30), || {
        let http = http.clone();
        let query = query.clone();
        async move {
            let (_, s) = scrape(&http, &query).await.ok()?;
            let lag = value(&s, "projection_lag_events", &[("projection", "post-view")])?;
            let applied = value(
                &s,
                "projection_applied_events_total",
                &[("projection", "post-view")],
            )?;
            (lag == 0.0 && applied >= last as f64).then_some(s)
        }
    })
    .await?;
    for p in ["post-view", "post-search"] {
        assert_eq!(
            value(&s, "projection_state", &[("projection", p)]),
            Some(0.0)
        );
        assert_eq!(
            value(&s, "projection_parked_events_total", &[("projection", p)]),
            Some(0.0)
        );
    }
    assert!(
        value(
            &s,
            "projection_lag_events",
            &[("projection", "comment-view")]
        )
        .is_some()
    );
    assert_eq!(value(&s, "dlq_messages", &[]), Some(0.0));
    let r = Reply::of(http.get(format!("{query}/posts/search?q=t"))).await?;
    assert_eq!(r.status, 200, "{r:?}");
    let (text, _) = scrape(&http, &query).await?;
    assert!(text.contains("search_duration_seconds_count 1"), "{text}");
    Ok(())
}

/// A `traceparent` on a command reaches its event, and the projection's
/// apply of that event is recorded with the same trace id (in the logs:
/// target `projection::trace`, debug level; no OTLP collector here).
#[tokio::test]
async fn a_traceparent_reaches_the_event_and_the_projections_apply() -> anyhow::Result<()> {
    let nats = start_nats().await?;
    let url = nats.url();
    let posts = e2e_tests::InProcessService::start_command(&url).await?;
    let dir = tempfile::tempdir()?;
    let port = testkit::free_port();
    let args = e2e_tests::query_args(&url, port, dir.path());
    let mut envs = e2e_tests::service_credentials("posts-query");
    envs.push(("RUST_LOG".into(), "info,projection::trace=debug".into()));
    let query = tokio::task::spawn_blocking(move || {
        testkit::ServiceProcess::spawn("posts-query", &args, &envs, port)
    })
    .await??;
    e2e_tests::wait_listening(&query, port).await?;
    let http = http_client();
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let r = Reply::of(
        http.post(format!("{}/posts", posts.base_url))
            .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
            .json(&json!({"title": "traced", "content": "c", "author_name": "ann"})),
    )
    .await?;
    let ack = r.ack(201);
    let stream = e2e_tests::StreamReader::connect(&url).await?;
    let msgs = stream.all_messages().await?;
    assert_eq!(
        e2e_tests::msg_header(&msgs[0], "traceparent"),
        Some(format!("00-{trace_id}-b7ad6b7169203331-01").as_str())
    );
    for projection in ["post-view", "post-search"] {
        wait_for(
            &format!("{projection}'s apply in trace {trace_id}"),
            Duration::from_secs(30),
            || {
                let found = query.log().lines().any(|l| {
                    l.contains("applied")
                        && l.contains(trace_id)
                        && l.contains(projection)
                        && l.contains(&format!("seq={}", ack.seq))
                });
                async move { found.then_some(()) }
            },
        )
        .await?;
    }
    Ok(())
}
