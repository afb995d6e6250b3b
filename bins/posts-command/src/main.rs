use clap::Parser;

/// glibc malloc spent ~40% of the command path's CPU (perf); mimalloc's
/// thread-local free lists cut that for these allocation-heavy request paths.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    servicekit::init_tracing();
    let config = posts_command::Config::parse();
    match posts_command::serve(config, servicekit::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "posts-command failed");
            eprintln!("posts-command: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
