use clap::Parser;

/// glibc malloc spent ~40% of the command path's CPU (perf); mimalloc's
/// thread-local free lists cut that for these allocation-heavy request paths.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One thread by default. A create costs ~30 µs of CPU and waits ~100x that
/// on the JetStream ack, so CPU is not what bounds it; on one thread the
/// publishes of concurrent requests reach the NATS connection together and
/// go out in fewer writes, which raised create throughput from 0.78-0.82 to
/// 0.84-0.87 of raw JetStream in `just bench` (and 0.45 -> 0.47 without
/// fsync). `TOKIO_WORKER_THREADS=N` selects a multi-threaded runtime with N
/// workers; more instances scale out as well (they share nothing but NATS).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    }
    .enable_all()
    .build()
}

fn main() -> std::process::ExitCode {
    servicekit::init_tracing();
    let config = posts_command::Config::parse();
    servicekit::main_with("posts-command", runtime(), |shutdown| {
        posts_command::serve(config, shutdown)
    })
}
