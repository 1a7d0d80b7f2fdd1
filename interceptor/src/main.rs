#![deny(clippy::undocumented_unsafe_blocks)]

use std::process::ExitCode;

use clap::Parser;
use interceptor::cli::{Cli, Command};

fn main() -> ExitCode {
    // Run by a container runtime as a CNI plugin: the protocol is env + stdin, not arguments.
    if interceptor::cni::invoked_as_plugin() {
        return interceptor::cni::main();
    }
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Structured logs: human by default, JSON lines on request (the daemon's --log-json).
    if matches!(&cli.command, Command::Daemon(a) if a.log_json) {
        fmt.json().init();
    } else {
        fmt.init();
    }
    let result = interceptor::cli::run(&cli.command);
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        // Bad input: named flag and value, nothing applied; exit 2 like a usage error.
        Ok(Err(e)) => {
            eprintln!("interceptor: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("interceptor: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
