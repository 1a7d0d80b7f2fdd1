//! `cargo xtask vm-test`: the e2e suite on real Debian kernels in QEMU.
//!
//! 1. Builds the static (musl) `interceptor`, the guest init (`vm-init`, see `init.rs`) and
//!    every test binary of interceptor-tests.
//! 2. Resolves the newest ABI of each kernel series in Debian's archive with a private apt
//!    setup, downloads and unpacks it once (cache: `$INTERCEPTOR_VM_CACHE`, else
//!    `~/.cache/interceptor-vm`), and stages its netfilter/sched/veth modules.
//! 3. Writes one initramfs per kernel (a Rust newc writer: host tools and their libraries,
//!    modules, the binaries, the plan) and boots the kernels in parallel (TCG unless KVM is
//!    really usable), each under a timeout.
//! 4. In each guest the init probes the kernel's eBPF features, runs `interceptor doctor` and
//!    `apply --dry-run --backend auto` for a few pod configs in every privilege mode, then the
//!    test binaries: as root, and the fallback selection with bpf() denied (seccomp) and
//!    without CAP_BPF/CAP_SYS_ADMIN in the initial user namespace (user namespace).
//! 5. The host does the same denied runs (and probes) itself.
//! 6. Prints the kernel × feature × result matrix; writes it as Markdown
//!    (`target/vm-test/report.md`; full runs also `KERNELS.md`).

pub mod build;
mod cpio;
mod initramfs;
mod kernels;
mod privs;
mod proto;
mod qemu;
mod report;
mod runner;
mod select;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use proto::{AutoCase, Mode, Plan, Run};
use report::Report;
use select::{parse_filters, runs, select, EbpfNeeds, Filter};

const DEFAULT_KERNELS: &[&str] = &["5.10", "6.1", "6.12", "7.2"];
/// The CI-sized run: one kernel (bookworm's, the closest to CI's own), core cases.
const CI_KERNEL: &str = "6.1";
const CI_FILTERS: &[&str] = &["ebpf_e2e/traffic_ebpf", "fallback_e2e/traffic_", "doctor"];
/// Pod configs whose `auto` choice is reported; the first one also decides whether the runs
/// that need eBPF run in a guest.
const AUTO_CASES: &[&[&str]] = &[
    &["-i", "*", "-b", "*"],
    &["-i", "*"],
    &["-i", "*", "-b", "*", "-m", "TPROXY"],
    &["-i", "*", "--redirect-dns"],
    &["-i", "*", "-c", "eth1"],
    &["-i", "*", "--drop-invalid"],
];

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Kernel series to boot, newest Debian ABI of each (default 5.10,6.1,6.12,7.2; with
    /// --ci: 6.1).
    #[arg(long, value_delimiter = ',')]
    kernels: Option<Vec<String>>,
    /// Select tests: `BIN` (a test binary of interceptor-tests, e.g. fallback_e2e),
    /// `BIN/NAME` (libtest filter NAME in BIN) or `NAME` (libtest filter in every binary).
    /// Repeatable or comma-separated; default: everything (with --ci: the core cases).
    #[arg(long, value_delimiter = ',')]
    filter: Vec<String>,
    /// CI-sized run: one kernel, the core cases, no KERNELS.md.
    #[arg(long)]
    ci: bool,
    /// Privilege modes of the test runs (normal, bpf-denied, userns); default all three
    /// (with --ci: normal,bpf-denied).
    #[arg(long, value_delimiter = ',')]
    modes: Option<Vec<String>>,
    /// Guests booted at once (default: the number of cores).
    #[arg(long)]
    jobs: Option<usize>,
    /// vCPUs per guest.
    #[arg(long, default_value_t = 2)]
    smp: u32,
    /// Memory per guest, MiB.
    #[arg(long, default_value_t = 2048)]
    memory: u32,
    /// Timeout of one test binary run in a guest, seconds.
    #[arg(long, default_value_t = 1200)]
    run_timeout: u64,
    /// Timeout of a whole guest, seconds (default: from the runs' timeouts).
    #[arg(long)]
    timeout: Option<u64>,
    /// kvm or tcg (default: kvm only where it really works).
    #[arg(long, env = "INTERCEPTOR_VM_ACCEL")]
    accel: Option<String>,
    /// Download cache (default ~/.cache/interceptor-vm).
    #[arg(long, env = "INTERCEPTOR_VM_CACHE")]
    cache: Option<PathBuf>,
    /// Use the package lists of an earlier run instead of apt-get update.
    #[arg(long)]
    offline: bool,
    /// Skip the host's own bpf()-denied runs.
    #[arg(long)]
    no_host: bool,
    /// Test binaries that need eBPF as a whole (replaces the default list).
    #[arg(long, value_delimiter = ',')]
    ebpf_bins: Option<Vec<String>>,
    /// libtest `--skip` patterns of tests that need eBPF (replaces the default list).
    #[arg(long, value_delimiter = ',')]
    ebpf_skip: Option<Vec<String>>,
    /// Where to write the Markdown report (besides target/vm-test/report.md); default
    /// KERNELS.md for a full, unfiltered run.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cache_dir(args: &Args) -> PathBuf {
    match &args.cache {
        Some(c) => c.clone(),
        None => user_cache("interceptor-vm"),
    }
}

/// `name` in the user's cache folder (`$XDG_CACHE_HOME`, else `~/.cache`, else target/).
pub fn user_cache(name: &str) -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| workspace_root().join("target"));
    base.join(name)
}

/// How much slower than native a guest runs: TCG is some 10-20 times slower, KVM about as
/// fast. Handed to the tests as INTERCEPTOR_TESTS_TIME_SCALE (for their own timeouts).
fn time_scale(accel: &str) -> &'static str {
    if accel == "tcg" {
        "10"
    } else {
        "1"
    }
}

fn plan(label: &str, modules: Vec<String>, runs: Vec<Run>, scale: &str) -> Plan {
    let mut env = vec![(
        "INTERCEPTOR_TESTS_TIME_SCALE".to_string(),
        scale.to_string(),
    )];
    if let Ok(ci) = std::env::var("CI") {
        env.push(("CI".to_string(), ci));
    }
    Plan {
        label: label.to_string(),
        modules,
        env,
        probe_modes: Mode::ALL.to_vec(),
        auto: AUTO_CASES
            .iter()
            .map(|a| AutoCase {
                label: a.join(" "),
                args: a.iter().map(|s| s.to_string()).collect(),
            })
            .collect(),
        runs,
    }
}

pub fn run(args: Args) -> Result<()> {
    let wall = Instant::now();
    let root = workspace_root();
    // What was built and tested: read now, not when the report is written an hour later.
    let tested = revision(&root);
    let cache = cache_dir(&args);
    let out_dir = root.join("target/vm-test");
    std::fs::create_dir_all(&out_dir)?;
    let series: Vec<String> = match &args.kernels {
        Some(k) => k.clone(),
        None if args.ci => vec![CI_KERNEL.to_string()],
        None => DEFAULT_KERNELS.iter().map(|s| s.to_string()).collect(),
    };
    let test_modes: Vec<Mode> = match &args.modes {
        Some(m) => m
            .iter()
            .map(|s| Mode::parse(s).with_context(|| format!("unknown mode {s}")))
            .collect::<Result<_>>()?,
        None if args.ci => vec![Mode::Normal, Mode::Seccomp],
        None => vec![Mode::Normal, Mode::Seccomp, Mode::UserNs],
    };
    let raw_filters: Vec<String> = if args.filter.is_empty() && args.ci {
        CI_FILTERS.iter().map(|s| s.to_string()).collect()
    } else {
        args.filter.clone()
    };
    let (accel, why) = qemu::accel(args.accel.as_deref());
    eprintln!("[vm] accelerator: {accel} ({why})");

    // 1. Builds: only the test binaries the filters can select.
    let t = Instant::now();
    let targets = build::test_targets(&root)?;
    let filters = parse_filters(&raw_filters, &targets);
    for f in &filters {
        if let Filter::Bin(b) | Filter::BinTest(b, _) = f {
            if !targets.contains(b) {
                bail!(
                    "--filter {b}: no such test binary (have: {})",
                    targets.join(", ")
                );
            }
        }
    }
    let wanted: Vec<String> = targets
        .iter()
        .filter(|b| select(b, &filters).is_some())
        .cloned()
        .collect();
    let only = (wanted.len() < targets.len()).then_some(wanted.as_slice());
    let built = build::build(&root, only)?;
    let strip_cache = out_dir.join("stripped");
    let tests: Vec<(String, PathBuf)> = built
        .tests
        .iter()
        .map(|(n, p)| (n.clone(), build::stripped(p, &strip_cache)))
        .collect();
    let interceptor = build::stripped(&built.interceptor, &strip_cache);
    let bins: Vec<String> = tests.iter().map(|(n, _)| n.clone()).collect();
    eprintln!(
        "[vm] built in {:.0} s: interceptor, vm-init, {} test binaries ({})",
        t.elapsed().as_secs_f64(),
        bins.len(),
        bins.join(", ")
    );
    let needs = EbpfNeeds::new(&args);
    let runs = runs(&bins, &filters, &test_modes, args.run_timeout, &needs);
    let denied_selection = format!(
        "{}{}",
        needs.describe(),
        if raw_filters.is_empty() {
            String::new()
        } else {
            format!(", within --filter {}", raw_filters.join(","))
        }
    );

    // 2. Kernels.
    let t = Instant::now();
    let apt = kernels::Apt::new(&cache)?;
    apt.update(&series, args.offline)?;
    let mut guests: Vec<std::result::Result<kernels::Kernel, Report>> = Vec::new();
    for s in &series {
        match apt.kernel(s, &cache) {
            Ok(k) => {
                eprintln!(
                    "[vm] kernel {s}: {} {} from {} (uname -r {}; packages {})",
                    k.package,
                    k.version,
                    k.suite,
                    k.release,
                    k.debs.join(" ")
                );
                guests.push(Ok(k));
            }
            Err(e) => {
                eprintln!("[vm] kernel {s}: {e:#}");
                guests.push(Err(Report {
                    label: s.clone(),
                    error: Some(format!("{e:#}")),
                    ..Default::default()
                }));
            }
        }
    }
    eprintln!("[vm] kernels ready in {:.0} s", t.elapsed().as_secs_f64());

    // 3. The host's own denied runs.
    let mut reports: Vec<Report> = Vec::new();
    if !args.no_host {
        reports.push(host_run(
            &root,
            &out_dir,
            &built,
            &interceptor,
            &tests,
            &runs,
        )?);
    }

    // 4. Guests.
    let userland = initramfs::userland()?;
    let shared = root.join("../shared/conformance");
    // Istio's goldens and the deploy/ manifests, at the paths the tests read them from.
    let mut extra_trees = vec![root.join("deploy")];
    if shared.is_dir() {
        extra_trees.push(shared.canonicalize()?);
    }
    let extra_dirs = vec![root.join("tests")];
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let budget = args.timeout.unwrap_or_else(|| {
        let runs_total: u64 = runs.iter().map(|r| r.timeout_secs).sum();
        (600 + runs_total).min(4 * 3600)
    });
    // Popped from the back: reversed so kernels boot in the order asked for.
    let mut pending: Vec<_> = guests.into_iter().enumerate().collect();
    pending.reverse();
    let queue = std::sync::Mutex::new(pending);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let Some((i, g)) = queue.lock().expect("queue").pop() else {
                    break;
                };
                let r = match g {
                    Err(r) => r,
                    Ok(k) => {
                        let g = Guest {
                            kernel: &k,
                            userland: &userland,
                            init: &built.init,
                            interceptor: &interceptor,
                            tests: &tests,
                            runs: &runs,
                            extra_trees: &extra_trees,
                            extra_dirs: &extra_dirs,
                            dir: out_dir.join(&k.series),
                            accel: &accel,
                            args: &args,
                            timeout: Duration::from_secs(budget),
                        };
                        g.run().unwrap_or_else(|e| Report {
                            label: k.series.clone(),
                            source: source(&k),
                            error: Some(format!("{e:#}")),
                            ..Default::default()
                        })
                    }
                };
                results.lock().expect("results").push((i, r));
            });
        }
    });
    let mut guest_reports = results.into_inner().expect("results");
    guest_reports.sort_by_key(|(i, _)| *i);
    reports.extend(guest_reports.into_iter().map(|(_, r)| r));

    // 5. Report.
    let command = std::iter::once("cargo xtask vm-test".to_string())
        .chain(std::env::args().skip(2))
        .collect::<Vec<_>>()
        .join(" ");
    let meta = report::Meta {
        command,
        accel: format!(
            "{accel}: {why}; guests' tests get INTERCEPTOR_TESTS_TIME_SCALE={}",
            time_scale(&accel)
        ),
        date: format!("{} (tree: {tested})", date()),
        wall: wall.elapsed(),
        denied_selection,
    };
    println!("\n{}", report::matrix(&reports));
    let md = report::markdown(&reports, &meta);
    let report_path = out_dir.join("report.md");
    std::fs::write(&report_path, &md)?;
    let full = !args.ci && args.filter.is_empty() && args.kernels.is_none() && args.modes.is_none();
    let md_path = args
        .markdown
        .clone()
        .or_else(|| full.then(|| root.join("KERNELS.md")));
    if let Some(p) = &md_path {
        std::fs::write(p, &md)?;
    }
    eprintln!(
        "[vm] report: {}{} (wall time {:.0} s)",
        report_path.display(),
        md_path.map_or(String::new(), |p| format!(", {}", p.display())),
        wall.elapsed().as_secs_f64()
    );
    let bad: Vec<String> = reports
        .iter()
        .filter(|r| !r.ok())
        .map(|r| format!("{}: {}", r.label, r.verdict()))
        .collect();
    if !bad.is_empty() {
        bail!("vm-test failed: {}", bad.join("; "));
    }
    Ok(())
}

fn source(k: &kernels::Kernel) -> String {
    format!("{} {} ({})", k.package, k.version, k.suite)
}

/// The commit tested, and whether the work tree differs from it (read-only git calls).
fn revision(root: &Path) -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        None => "unknown revision (not a git work tree)".into(),
        Some(rev) => match git(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(s) if !s.is_empty() => format!("{rev} with local changes"),
            _ => rev,
        },
    }
}

fn date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The host's bpf()-denied runs and probes, through the same runner as the guests.
fn host_run(
    root: &Path,
    out_dir: &Path,
    built: &build::Built,
    interceptor: &Path,
    tests: &[(String, PathBuf)],
    runs: &[Run],
) -> Result<Report> {
    let t = Instant::now();
    let bin_dir = out_dir.join("host-bin");
    let _ = std::fs::remove_dir_all(&bin_dir);
    std::fs::create_dir_all(&bin_dir)?;
    for (name, path) in tests {
        std::os::unix::fs::symlink(path, bin_dir.join(name))?;
    }
    let host_runs: Vec<Run> = runs
        .iter()
        .filter(|r| r.mode != Mode::Normal)
        .cloned()
        .collect();
    let plan = plan("host", Vec::new(), host_runs, "1");
    let env = runner::Env {
        interceptor: interceptor.to_path_buf(),
        tests: bin_dir,
        prober: built.init.clone(),
        path: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        cwd: root.to_path_buf(),
        reap_all: false,
        echo: false,
    };
    eprintln!("[vm] host: probes, doctor and auto in every mode, then the bpf()-denied runs");
    let mut r = runner::Runner::new(env, plan, Vec::<u8>::new());
    r.run_plan();
    let text = String::from_utf8_lossy(&r.out).into_owned();
    std::fs::write(out_dir.join("host-results.log"), &text)?;
    let mut rep = Report::parse("host", &text);
    rep.source = "this machine".into();
    rep.release = uname_r();
    rep.elapsed = t.elapsed();
    rep.done = Some((true, t.elapsed().as_millis() as u64));
    rep.log = relative(&out_dir.join("host-results.log"));
    for run in &rep.runs {
        eprintln!(
            "[host] {} {}: {} passed, {} failed ({:.0} s)",
            run.id,
            run.status,
            run.passed,
            run.failed,
            run.millis as f64 / 1000.0
        );
    }
    Ok(rep)
}

/// `path` relative to the workspace root when below it (for the report).
fn relative(path: &Path) -> String {
    let root = workspace_root();
    path.strip_prefix(&root)
        .unwrap_or(path)
        .display()
        .to_string()
}

fn uname_r() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

struct Guest<'a> {
    kernel: &'a kernels::Kernel,
    userland: &'a cpio::Tree,
    init: &'a Path,
    interceptor: &'a Path,
    tests: &'a [(String, PathBuf)],
    runs: &'a [Run],
    extra_trees: &'a [PathBuf],
    extra_dirs: &'a [PathBuf],
    dir: PathBuf,
    accel: &'a str,
    args: &'a Args,
    timeout: Duration,
}

impl Guest<'_> {
    fn run(&self) -> Result<Report> {
        let k = self.kernel;
        std::fs::create_dir_all(&self.dir)?;
        let modules = k
            .load_order
            .iter()
            .map(|p| Path::new("/").join(p).display().to_string())
            .collect();
        let plan = plan(
            &k.series,
            modules,
            self.runs.to_vec(),
            time_scale(self.accel),
        );
        let initrd = self.dir.join("initrd.cpio");
        let size = initramfs::write(
            self.userland,
            &initramfs::GuestFiles {
                kernel: k,
                init: self.init,
                interceptor: self.interceptor,
                tests: self.tests,
                plan: &plan,
                extra_trees: self.extra_trees,
                extra_dirs: self.extra_dirs,
            },
            &initrd,
        )?;
        eprintln!(
            "[{}] booting {} ({} MiB initramfs, timeout {} s)",
            k.series,
            k.release,
            size >> 20,
            self.timeout.as_secs()
        );
        let out = qemu::boot(&qemu::Boot {
            vmlinuz: &k.vmlinuz,
            initrd: &initrd,
            dir: &self.dir,
            accel: self.accel,
            memory_mib: self.args.memory,
            smp: self.args.smp,
            timeout: self.timeout,
            stall: Duration::from_secs(self.args.run_timeout + 300),
            label: &k.series,
        })?;
        let _ = std::fs::remove_file(&initrd);
        let mut r = Report::parse(&k.series, &out.results);
        r.source = source(k);
        r.elapsed = out.elapsed;
        r.timed_out = out.timed_out;
        r.log = relative(&out.console);
        if r.done.is_none() && !out.timed_out {
            r.error = Some(format!(
                "guest stopped without a result (QEMU exit {:?}); see {}",
                out.exit, r.log
            ));
        }
        eprintln!(
            "[{}] {} in {:.0} s",
            k.series,
            r.verdict(),
            out.elapsed.as_secs_f64()
        );
        Ok(r)
    }
}
