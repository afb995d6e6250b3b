//! The reports context on the read side's nats-server: reports-query
//! catching up on both streams, and the replay tool rebuilding
//! author-stats offline, each against the raw drain of `POSTS`.

use std::time::{Duration, Instant};

use anyhow::bail;
use testkit::ServiceProcess;
use tokio::runtime::Runtime;

use crate::procfs::CpuWatch;
use crate::read::{CATCHUP_POLL, per_sec, write_comments};
use crate::report::{Report, Target};
use crate::{Sizes, http_client, replay};

/// reports-query catching up on both streams from an empty data dir: from
/// its spawn until `/readyz` says author-stats has caught up on both.
fn author_stats_catch_up(
    rt: &Runtime,
    report: &mut Report,
    sizes: &Sizes,
    url: &str,
    posts_seq: u64,
    comments_seq: u64,
) {
    let metric = "reports_catchup_author_stats";
    let run = || -> anyhow::Result<(f64, String)> {
        let dir = tempfile::tempdir()?;
        let port = testkit::free_port();
        let started = Instant::now();
        let mut process = ServiceProcess::spawn(
            "reports-query",
            &[
                "--nats-url".into(),
                url.to_string(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--data-dir".into(),
                dir.path().display().to_string(),
            ],
            &[],
            port,
        )?;
        let http = http_client()?;
        let ready = format!("http://127.0.0.1:{port}/readyz");
        let deadline = started + sizes.catch_up_deadline();
        let took = rt.block_on(async {
            loop {
                if let Ok(r) = http.get(&ready).send().await
                    && r.status().is_success()
                {
                    return Ok(started.elapsed());
                }
                if Instant::now() > deadline {
                    bail!(
                        "reports-query not caught up after {:?}",
                        sizes.catch_up_deadline()
                    );
                }
                tokio::time::sleep(CATCHUP_POLL).await;
            }
        });
        let _ = process.terminate(Duration::from_secs(30));
        let took = took?;
        let events = posts_seq + comments_seq;
        Ok((
            per_sec(events, took),
            format!(
                "{events} events (POSTS {posts_seq} + COMMENTS {comments_seq}) from an empty data dir in {:.2} s, timed from process spawn to /readyz 200",
                took.as_secs_f64()
            ),
        ))
    };
    let (value, note) = match run() {
        Ok((v, n)) => (Some(v), n),
        Err(e) => (None, format!("{e:#}")),
    };
    report.add(
        metric,
        value,
        "events/s",
        Some("raw_ordered_drain"),
        Some(Target::RatioAtLeast(0.5)),
        Some(note),
    );
}

/// `replay author-stats` from sequence 1 of `POSTS` (the backlog) and of a
/// `COMMENTS` stream written here with one comment per two backlog events:
/// the rate over both streams' events, against the raw drain of `POSTS`.
pub(crate) fn author_stats_replay(
    rt: &Runtime,
    report: &mut Report,
    sizes: &Sizes,
    url: &str,
    posts_seq: u64,
    me: Option<u32>,
    nats_pid: Option<u32>,
) {
    let metric = "replay_author_stats";
    let comments = (posts_seq / 2).max(1);
    let written = rt.block_on(write_comments(url, sizes.posts, comments));
    if let Ok(comments_seq) = &written {
        author_stats_catch_up(rt, report, sizes, url, posts_seq, *comments_seq);
    }
    let dir = tempfile::tempdir();
    let (value, note) = match (written, dir) {
        (Ok(comments_seq), Ok(dir)) => {
            let watch = CpuWatch::start(&[("bench", me), ("nats-server", nats_pid)]);
            let run = replay::run("author-stats", url, dir.path(), sizes.catch_up_deadline());
            let cost = watch.finish(metric);
            match run {
                Ok(r) => {
                    report.phase(cost);
                    (
                        Some(r.events_per_sec),
                        format!(
                            "{} events (POSTS {posts_seq} + COMMENTS {comments_seq}) in {:.2} s; process wall {:.2} s{}",
                            r.events,
                            r.seconds,
                            r.wall_s,
                            r.peak_rss_kib
                                .map(|k| format!(", peak RSS {} MiB", k / 1024))
                                .unwrap_or_default()
                        ),
                    )
                }
                Err(e) => (None, e),
            }
        }
        (Err(e), _) => (None, format!("cannot write the comments: {e:#}")),
        (_, Err(e)) => (None, format!("no temp dir: {e}")),
    };
    report.add(
        metric,
        value,
        "events/s",
        Some("raw_ordered_drain"),
        Some(Target::RatioAtLeast(0.5)),
        Some(note),
    );
}
