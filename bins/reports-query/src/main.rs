use clap::Parser;

fn main() -> std::process::ExitCode {
    servicekit::init_tracing();
    let config = reports_query::Config::parse();
    servicekit::main_with("reports-query", servicekit::two_threads(), |shutdown| {
        reports_query::serve(config, shutdown)
    })
}
