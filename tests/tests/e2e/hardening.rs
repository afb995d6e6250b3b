//! The findings of the hardening review, each as the attack or the fault a
//! user would meet, over real processes.

use std::path::Path;

use e2e_tests::{
    InProcessService, Reply, Written, admin_url, http_client, replay_args, run_replay,
    spawn_query_process, start_nats, wait_checkpoints,
};
use serde_json::json;

type TestResult = anyhow::Result<()>;

/// The files a running `posts-query` keeps at the top of its data dir.
const DATA_DIR_FILES: [&str; 4] = [
    "post-view.redb",
    "post-search",
    "posts-query.lock",
    "posts-query.json",
];

fn assert_data_dir_intact(data_dir: &Path, when: &str) {
    for f in DATA_DIR_FILES {
        assert!(
            data_dir.join(f).exists(),
            "{when}: {f} is gone from the data dir"
        );
    }
}

/// Finding 1: the swap endpoint was on the public listener and took any path
/// under `<data>/.rebuild`, `.rebuild` itself included; swapping post-search
/// with it removed the data dir under the running service.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swap_never_takes_a_client_path_and_admin_is_off_the_public_listener() -> TestResult {
    let nats = start_nats().await?;
    let command = InProcessService::start_command(&nats.url()).await?;
    let http = http_client();
    let data = tempfile::Builder::new().prefix("swap-attack").tempdir()?;
    let (query, base) = spawn_query_process(&nats.url(), data.path()).await?;
    let mut w = Written::default();
    w.create_many(&http, &command.base_url, 5, |i| {
        (format!("attack {i}"), format!("lorem {i}"), "ann".into())
    })
    .await?;
    wait_checkpoints(&http, &base, w.last_seq).await?;
    // As in the report: one replay, which leaves `.rebuild` behind.
    let run = run_replay(&replay_args("post-search", &nats.url(), data.path(), &[])).await?;
    assert!(run.status.success(), "{run:?}");
    let rebuild_root = data.path().join(".rebuild");
    assert!(rebuild_root.is_dir(), "the replay made {}", rebuild_root.display());
    let data_dir_text = data.path().canonicalize()?.display().to_string();

    // The public listener has no admin route at all.
    for path in ["swap", "progress", "shadows"] {
        let r = Reply::of(
            http.post(format!("{base}/admin/projections/post-search/{path}"))
                .json(&json!({"path": rebuild_root, "verify": false})),
        )
        .await?;
        r.assert_problem(404, "route");
    }
    assert_data_dir_intact(data.path(), "after the public swap");

    // The admin listener takes only shadows it handed out, by id.
    let admin = admin_url(data.path())?;
    assert!(admin.starts_with("http://127.0.0.1:"), "loopback: {admin}");
    let swap = |body: serde_json::Value| {
        Reply::of(
            http.post(format!("{admin}/admin/projections/post-search/swap"))
                .json(&body),
        )
    };
    let r = swap(json!({"path": rebuild_root, "verify": false})).await?;
    assert_eq!(r.status, 400, "a path is not a field of the swap: {r:?}");
    assert!(!r.body.contains(&data_dir_text), "no path in errors: {r:?}");
    for id in [
        ".rebuild".to_string(),
        "..".to_string(),
        rebuild_root.display().to_string(),
        "0".repeat(32),
    ] {
        let r = swap(json!({"shadow": id, "verify": false})).await?;
        r.assert_problem(404, "no shadow");
        assert!(!r.body.contains(&data_dir_text), "no path in errors: {r:?}");
    }
    // A handed-out id is single use and bound to its projection.
    let handed =
        Reply::of(http.post(format!("{admin}/admin/projections/post-view/shadows"))).await?;
    assert_eq!(handed.status, 201, "{handed:?}");
    let id = handed.json()["shadow"].as_str().expect("an id").to_string();
    swap(json!({"shadow": id, "verify": false}))
        .await?
        .assert_problem(404, "no shadow");
    assert_data_dir_intact(data.path(), "after the admin swaps");

    // The service goes on, and so does the protocol.
    w.create(&http, &command.base_url, "after the attack", "lorem", "ann")
        .await?;
    wait_checkpoints(&http, &base, w.last_seq).await?;
    w.assert_served(&http, &base).await?;
    let run = run_replay(&replay_args("all", &nats.url(), data.path(), &["--verify"])).await?;
    assert!(run.status.success(), "{run:?}");
    assert_data_dir_intact(data.path(), "after a real replay");
    drop(query);
    Ok(())
}
