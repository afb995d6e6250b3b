//! Chaos and fault suite: real `nats-server` processes, the service binaries
//! that `cargo build --bins` made running as real processes, SIGKILLs at
//! random moments and at named failpoints, and invariants checked against an
//! oracle built from the command responses alone: no acknowledged event lost,
//! no effect applied twice, live views equal to a rebuild from sequence 1.
//!
//! Every random choice comes from a PRNG seeded by `CHAOS_SEED` (or the
//! clock); the seed is printed at start and in every failure, and the logs of
//! every process stay in `target/test-logs`. `CHAOS_ROUNDS=N` multiplies kill
//! counts and durations for long soaks; the default (1) is bounded so that
//! `just test` stays quick. Each scenario prints one `CHAOS SUMMARY` line:
//! kills, events written, events lost, duplicate effects, recovery times.
//!
//! Scenarios are independent (own nats-server, own data dirs) and run in
//! parallel.

#[path = "chaos/cascade.rs"]
mod cascade;
#[path = "chaos/checks.rs"]
mod checks;
#[path = "chaos/cluster.rs"]
mod cluster;
#[path = "chaos/consumer_kill.rs"]
mod consumer_kill;
#[path = "chaos/failpoints.rs"]
mod failpoints;
#[path = "chaos/faults.rs"]
mod faults;
#[path = "chaos/nats_restart.rs"]
mod nats_restart;
#[path = "chaos/poison.rs"]
mod poison;
#[path = "chaos/reports.rs"]
mod reports;
#[path = "chaos/support.rs"]
mod support;
#[path = "chaos/two_commands.rs"]
mod two_commands;
#[path = "chaos/workload.rs"]
mod workload;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn query_service_sigkilled_at_random_moments() {
    support::run("consumer-kill", consumer_kill::scenario).await;
}

// The range phase of a catch-up starts at 50k events behind; this run makes
// it start at 2k (an override read by debug builds only), so kills land in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(debug_assertions),
    ignore = "the range-phase override exists only in debug builds (run without --release)"
)]
async fn query_service_sigkilled_in_the_range_phase() {
    support::run("consumer-kill-ranges", consumer_kill::scenario).await;
}

// Failpoints compile to nothing in release builds of the services, and this
// binary's profile is theirs: there it is reported as ignored, not passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(debug_assertions),
    ignore = "failpoints exist only in debug builds (run without --release)"
)]
async fn crashes_at_failpoints_in_projections_and_swaps() {
    support::run("failpoints", failpoints::scenario).await;
}

// Fault points, like failpoints, exist only in debug builds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(debug_assertions),
    ignore = "fault points exist only in debug builds (run without --release)"
)]
async fn a_failing_store_neither_hangs_nor_freezes_the_others() {
    support::run("faults", faults::scenario).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_server_sigkilled_under_write_load() {
    support::run("nats-restart", nats_restart::scenario).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_stream_leader_sigkilled_under_write_load() {
    support::run("cluster", cluster::scenario).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_events_are_parked_and_refused() {
    support::run("poison", poison::scenario).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn comments_command_sigkilled_mid_cascade_with_two_instances() {
    support::run("cascade", cascade::scenario).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reports_query_sigkilled_while_both_streams_grow() {
    support::run("reports", reports::scenario).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_command_instances_race_on_the_same_posts() {
    support::run("two-commands", two_commands::scenario).await;
}
