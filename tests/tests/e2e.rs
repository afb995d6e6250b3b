//! End-to-end tests: one test binary with a module per area (link time).
//! Every test starts its own `nats-server` on a free port, so they run in
//! parallel. Process-based tests need `cargo build --bins` first.

#[path = "e2e/cli.rs"]
mod cli;
#[path = "e2e/command.rs"]
mod command;
#[path = "e2e/comments.rs"]
mod comments;
#[path = "e2e/faults.rs"]
mod faults;
#[path = "e2e/gateway.rs"]
mod gateway;
#[path = "e2e/hardening.rs"]
mod hardening;
#[path = "e2e/long_history.rs"]
mod long_history;
#[path = "e2e/metrics.rs"]
mod metrics;
#[path = "e2e/query.rs"]
mod query;
#[path = "e2e/replay.rs"]
mod replay;
#[path = "e2e/reports.rs"]
mod reports;
#[path = "e2e/security.rs"]
mod security;
