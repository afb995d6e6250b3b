use clap::Parser;

fn main() -> std::process::ExitCode {
    servicekit::init_tracing();
    let config = reports_query::Config::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("reports-query: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(reports_query::serve(config, servicekit::shutdown_signal())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "reports-query failed");
            eprintln!("reports-query: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
