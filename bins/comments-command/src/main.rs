use clap::Parser;

fn main() -> std::process::ExitCode {
    servicekit::init_tracing();
    let config = comments_command::Config::parse();
    servicekit::main_with("comments-command", servicekit::two_threads(), |shutdown| {
        comments_command::serve(config, shutdown)
    })
}
