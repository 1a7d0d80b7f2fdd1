#![deny(clippy::undocumented_unsafe_blocks)]

use std::process::ExitCode;

use interceptor::cli::{Command, Stop};

fn main() -> ExitCode {
    // Run by a container runtime as a CNI plugin: the protocol is env + stdin, not arguments.
    if interceptor::cni::invoked_as_plugin() {
        return interceptor::cni::main();
    }
    let parsed = match interceptor::cli::parse_from(std::env::args_os()) {
        Ok(p) => p,
        Err(Stop::Display(help)) => help.exit(),
        // Bad input found by the argument parser: the same style and exit code as below.
        Err(Stop::Usage(msg)) => {
            eprintln!("interceptor: {msg}");
            return ExitCode::from(2);
        }
    };
    let cli = &parsed.cli;
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
            eprintln!("interceptor: {}", parsed.describe(&e));
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("interceptor: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
