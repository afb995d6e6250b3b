use clap::Parser;

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
