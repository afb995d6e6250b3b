use clap::Parser;
use gateway::{Cli, Command};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Token { name, ttl_secs }) = cli.command {
        let Some(secret) = cli.config.jwt_secret.as_deref() else {
            eprintln!("gateway token: set GATEWAY_JWT_SECRET (the secret the gateway checks)");
            return std::process::ExitCode::from(2);
        };
        return match gateway::auth::mint(
            secret,
            &name,
            ttl_secs,
            cli.config.jwt_audience.as_deref(),
            cli.config.jwt_issuer.as_deref(),
        ) {
            Ok(token) => {
                println!("{token}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("gateway token: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    servicekit::init_tracing();
    servicekit::main_with("gateway", servicekit::two_threads(), |shutdown| {
        gateway::serve(cli.config, shutdown)
    })
}
