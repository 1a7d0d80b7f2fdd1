//! `interceptor doctor`: which backend `apply --backend auto` would pick here, and why. A front
//! end only: the probe is `service::probe`; this prints its rows as a table in words (the
//! default) or as JSON (`-o json`), then the other programs at the cgroup's socket hooks and
//! what they mean for interception (`service::probe::coexist`).

use anyhow::Result;
use clap::Args;

use super::args::{EbpfArgs, OutputFormat};
use crate::service::install;
use crate::service::probe::coexist::{self, Neighbours, ORDER_NEEDED};
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

/// The programs at the cgroup's socket hooks (ours marked, in the order they run), the
/// findings about them and the order we need, in words.
pub fn neighbours_text(n: &Neighbours) -> String {
    let where_ = n.cgroup.display();
    if let Some(e) = &n.error {
        return format!("cgroup programs at {where_}: not listed ({e})\n");
    }
    let mut out = format!("cgroup programs at {where_} (each hook's in the order they run):\n");
    let hw = n
        .programs
        .iter()
        .map(|p| p.hook.len())
        .chain([4])
        .max()
        .unwrap_or(4);
    let nw = n
        .programs
        .iter()
        .map(|p| p.name.len())
        .chain([4])
        .max()
        .unwrap_or(4);
    out.push_str(&format!(
        "  {:<hw$}  {:>7}  {:<nw$}  {:<17}  what\n",
        "hook", "id", "name", "runs"
    ));
    for p in &n.programs {
        out.push_str(&format!(
            "  {:<hw$}  {:>7}  {:<nw$}  {:<17}  {}\n",
            p.hook,
            p.id,
            p.name,
            p.order.words(),
            p.known.unwrap_or(if p.ours { "interceptor" } else { "-" })
        ));
    }
    if n.programs.is_empty() {
        out.push_str("  (none)\n");
    }
    for f in &n.findings {
        out.push_str(&format!(
            "{}: {} (id {}) at {}: {}. Fix: {}.\n",
            f.kind.words(),
            f.name,
            f.id,
            f.hook,
            f.what,
            f.fix
        ));
    }
    out.push_str(&format!("order needed: {ORDER_NEEDED}.\n"));
    out
}

/// `interceptor doctor`: the table, the programs beside ours and the backend `auto` would use
/// (or the same as JSON).
pub fn run(args: &DoctorArgs) -> Result<()> {
    let report = probe::probe(&args.ebpf.bpffs, args.ebpf.cgroup.as_deref(), Depth::Full);
    let elapsed_ms = report.elapsed.as_secs_f64() * 1e3;
    let neighbours = coexist::neighbours(&args.ebpf.bpffs, args.ebpf.cgroup.as_deref());
    match args.output {
        OutputFormat::Text => {
            print!("{}", table(&report));
            print!("{}", neighbours_text(&neighbours));
            println!("probe took {elapsed_ms:.1} ms");
            println!("auto backend: {}", auto_backend(&report));
        }
        OutputFormat::Json => {
            let doc = serde_json::json!({
                "checks": report.checks,
                "elapsed_ms": elapsed_ms,
                "ebpf_missing": report.ebpf_missing(),
                "auto_backend": auto_backend(&report),
                "cgroup_programs": neighbours,
                "order_needed": ORDER_NEEDED,
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
    }
    Ok(())
}
