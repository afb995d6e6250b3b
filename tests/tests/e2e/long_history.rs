//! Aggregates with a long history: past a few dozen events, loads and
//! history pages read the subject through a consumer in batches instead of
//! a direct get per event. Both paths must give every event once, in order.

use e2e_tests::{InProcessService, QueryEnv, Reply};
use serde_json::json;

type TestResult = anyhow::Result<()>;

/// More events than the direct gets take (64), with other posts' events
/// in between so the consumer's subject filter matters.
const UPDATES: u64 = 150;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cold_command_and_the_history_see_every_event_of_a_long_post() -> TestResult {
    let env = QueryEnv::start().await?;
    let long = env.create("long", "v1", "ann").await?;
    let other = env.create("other", "v1", "bob").await?;
    let mut seqs = vec![long.seq];
    for n in 0..UPDATES {
        let ack = env
            .update(&long.post_id, &json!({"content": format!("v{}", n + 2)}))
            .await?;
        seqs.push(ack.seq);
        if n % 10 == 0 {
            env.update(&other.post_id, &json!({"content": format!("o{n}")}))
                .await?;
        }
    }

    // A command service that has never seen the post folds it from the
    // stream: the version it checks If-Match against counts every event.
    let cold = InProcessService::start_command(&env.nats.url()).await?;
    let version = UPDATES + 1;
    let r = Reply::of(
        env.http
            .patch(format!("{}/posts/{}", cold.base_url, long.post_id))
            .header("If-Match", format!("\"{version}\""))
            .json(&json!({"title": "long, folded cold"})),
    )
    .await?;
    let ack = r.ack(200);
    assert_eq!(ack.version, version + 1);
    seqs.push(ack.seq);
    // A pin one behind is refused, with the version another cold fold finds.
    let colder = InProcessService::start_command(&env.nats.url()).await?;
    let r = Reply::of(
        env.http
            .patch(format!("{}/posts/{}", colder.base_url, long.post_id))
            .header("If-Match", format!("\"{version}\""))
            .json(&json!({"content": "stale"})),
    )
    .await?;
    let doc = r.assert_problem(412, "version");
    assert_eq!(doc["current_version"], version + 1, "{doc}");

    // The history, one page of every event of the post, in stream order.
    let page = Reply::of(
        env.http
            .get(env.q(&format!("/posts/{}/events", long.post_id)))
            .query(&[("limit", "1000"), ("min_seq", &ack.seq.to_string())]),
    )
    .await?;
    assert_eq!(page.status, 200, "{page:?}");
    let v = page.json();
    let got: Vec<u64> = v["data"]
        .as_array()
        .expect("data array")
        .iter()
        .map(|e| e["seq"].as_u64().unwrap_or_default())
        .collect();
    assert_eq!(got, seqs, "every event of the post once, in order");
    assert!(v["next_cursor"].is_null(), "{}", v["next_cursor"]);
    Ok(())
}
