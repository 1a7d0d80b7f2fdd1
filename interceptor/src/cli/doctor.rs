//! `interceptor doctor`: which backend `apply --backend auto` would pick here, and why. A front
//! end only: the probe is `service::probe`; this prints its rows as a table in words (the
//! default) or as JSON (`-o json`).

use anyhow::Result;
use clap::Args;

use super::args::{EbpfArgs, OutputFormat};
use crate::service::install;
use crate::service::probe::{self, Depth, Report, Status};

#[derive(Args, Debug, Clone)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub ebpf: EbpfArgs,
    /// Output: a table in words (the default, for people) or JSON (for tools).
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

/// What `auto` picks given the probe, for a config eBPF can honour: the install service's
/// choice, in words.
pub fn auto_backend(report: &Report) -> String {
    match report.ebpf_missing() {
        None => format!("ebpf ({})", install::EBPF_READY),
        Some(why) => match install::netfilter_fallback(format!("eBPF unavailable ({why})")) {
            Ok(c) => format!("{} ({})", c.backend.as_str(), c.why),
            Err(e) => format!("none ({})", e.reason),
        },
    }
}

/// The table: check | status | why, in words.
pub fn table(report: &Report) -> String {
    let w = report
        .checks
        .iter()
        .map(|c| c.name.len())
        .chain([5])
        .max()
        .unwrap_or(5);
    let mut out = format!("{:<w$}  {:<7}  why\n", "check", "status");
    for c in &report.checks {
        let mark = if c.needed || c.status == Status::Present {
            ""
        } else {
            " (not needed)"
        };
        out.push_str(&format!(
            "{:<w$}  {:<7}  {}{mark}\n",
            c.name, c.status, c.why
        ));
    }
    out
}

/// `interceptor doctor`: the table and the backend `auto` would use (or the same as JSON).
pub fn run(args: &DoctorArgs) -> Result<()> {
    let report = probe::probe(&args.ebpf.bpffs, args.ebpf.cgroup.as_deref(), Depth::Full);
    let elapsed_ms = report.elapsed.as_secs_f64() * 1e3;
    match args.output {
        OutputFormat::Text => {
            print!("{}", table(&report));
            println!("probe took {elapsed_ms:.1} ms");
            println!("auto backend: {}", auto_backend(&report));
        }
        OutputFormat::Json => {
            let doc = serde_json::json!({
                "checks": report.checks,
                "elapsed_ms": elapsed_ms,
                "ebpf_missing": report.ebpf_missing(),
                "auto_backend": auto_backend(&report),
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
    }
    Ok(())
}
