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
    let result = match &cli.command {
        Command::Apply(args) => interceptor::apply::run(args),
        Command::Remove(args) => interceptor::apply::remove(args).map(Ok),
        Command::Cleanup(args) => interceptor::apply::cleanup(&args.settings()).map(Ok),
        Command::Daemon(args) => interceptor::daemon::run(args).map(Ok),
        Command::Pod(cmd) => interceptor::apply::pod(cmd),
        Command::Logs(args) => interceptor::apply::logs(args).map(Ok),
        Command::Doctor(args) => interceptor::doctor::run(args).map(Ok),
        Command::Explain(args) => interceptor::explain::run(args),
        Command::Validate(args) => interceptor::validate::run(args),
        Command::CniInstall(args) => interceptor::cni::install::run_install(args).map(Ok),
        Command::CniUninstall(args) => interceptor::cni::install::run_uninstall(args).map(Ok),
    };
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
