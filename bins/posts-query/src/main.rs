use clap::Parser;

/// glibc malloc spent ~40% of the command path's CPU (perf); mimalloc's
/// thread-local free lists cut that for these allocation-heavy request paths.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    servicekit::init_tracing();
    servicekit::no_transparent_huge_pages();
    let config = posts_query::Config::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build();
    servicekit::main_with("posts-query", runtime, |shutdown| {
        posts_query::serve(config, shutdown)
    })
}
