use clap::Parser;

/// glibc malloc spent ~40% of the command path's CPU (perf); mimalloc's
/// thread-local free lists cut that for these allocation-heavy request paths.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    servicekit::init_tracing();
    servicekit::no_transparent_huge_pages();
    let config = posts_query::Config::parse();
    match posts_query::serve(config, servicekit::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "posts-query failed");
            eprintln!("posts-query: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
