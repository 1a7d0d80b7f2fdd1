//! `interceptor doctor`: on this machine (root, a recent kernel) every hook the eBPF backend
//! needs is probed present and `auto` picks eBPF; with bpf() taken away (capabilities dropped,
//! an unprivileged uid, a seccomp filter) the same binary says bpf() is denied, why, and that
//! `auto` falls back to iptables/nftables.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Instant;

use interceptor::cli::doctor;
use interceptor::service::probe::{self, rows, Depth, Status};
use interceptor_tests::bin;
use interceptor_tests::ebpf::EbpfInstall;

/// The rows the brief names as needed by the eBPF backend today (the report has more: every
/// program of the object, from the loader's own lists).
const NEEDED: &[&str] = &[
    rows::BPF_SYSCALL,
    rows::CAPABILITIES,
    rows::BPFFS,
    rows::CGROUP2,
    rows::CONNECT4,
    rows::CONNECT6,
    rows::SOCK_OPS,
    rows::GETSOCKOPT,
    rows::GETPEERNAME4,
    rows::GETPEERNAME6,
    rows::SK_LOOKUP,
    rows::SK_LOOKUP_POD,
    rows::SK_MSG,
    rows::CGROUP_LINK,
    rows::NETNS_COOKIE_SOCK_ADDR,
    rows::LPM_TRIE,
    rows::LRU_HASH,
    rows::RING_BUF,
];

/// Rows the eBPF backend does without (a kernel before 5.15 lacks them: the proxy's sockets
/// carry their pod, the cookie comes from the bind6 probe); probed and shown all the same.
const NOT_NEEDED: &[&str] = &[
    rows::NETNS_COOKIE_SOCK_OPS,
    rows::NETNS_COOKIE_SOCKOPT,
    rows::SO_NETNS_COOKIE,
];

fn text(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "doctor failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout.into_owned()
}

/// The table row of `name` (its line starts with the name followed by column padding).
fn row<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with("  "))
        })
        .unwrap_or_else(|| panic!("no `{name}` row in:\n{out}"))
}

fn auto_line(out: &str) -> &str {
    let last = out.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("auto backend: "),
        "last line is not the verdict:\n{out}"
    );
    last
}

/// `auto` fell back to netfilter because of bpf(), with the reason spelled out.
fn assert_fallback_for_bpf(out: &str) {
    let verdict = auto_line(out);
    assert!(
        verdict
            .starts_with("auto backend: iptables (eBPF unavailable (bpf() syscall missing: denied")
            || verdict.starts_with(
                "auto backend: nftables (eBPF unavailable (bpf() syscall missing: denied"
            ),
        "{verdict}"
    );
    // Nothing that depends on bpf() claims to be present.
    for name in [rows::CONNECT4, rows::GETSOCKOPT, rows::RING_BUF] {
        assert!(row(out, name).contains("unknown"), "{}", row(out, name));
    }
}

#[test]
fn every_needed_hook_is_present_here() {
    let out = text(&bin::run(&["doctor"], &[]));
    println!("{out}");
    for name in NEEDED {
        let line = row(&out, name);
        assert!(
            line[name.len()..].trim_start().starts_with("present"),
            "{line}"
        );
    }
    // Every other row is present too, or explicitly not needed.
    for line in out
        .lines()
        .skip(1)
        .filter(|l| l.contains("  missing  ") || l.contains("  unknown  "))
    {
        assert!(line.ends_with("(not needed)"), "{line}");
    }
    assert_eq!(
        auto_line(&out),
        "auto backend: ebpf (the kernel supports every eBPF hook needed)"
    );
}

/// `-o json` is the same probe for tools: every needed row present (status as the table's
/// word), no reason to fall back, the same verdict line. In the bpf()-denied runs of the VM
/// matrix (`INTERCEPTOR_TESTS_NO_EBPF=1`): bpf() missing with its reason, and the fallback.
#[test]
fn json_output_carries_the_same_rows() {
    let out = text(&bin::run(&["doctor", "-o", "json"], &[]));
    let doc: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let checks = doc["checks"].as_array().expect("checks");
    let check = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {out}"))
    };
    if !interceptor_tests::ebpf_expected() {
        let c = check(rows::BPF_SYSCALL);
        // bpf() denied (the reason named), or a kernel that has bpf() but lacks a needed hook
        // or helper (5.10): a needed row is missing either way, and `auto` falls back naming it.
        let why = if c["status"] == "present" {
            assert!(
                checks
                    .iter()
                    .any(|c| c["needed"] == true && c["status"] == "missing"),
                "{out}"
            );
            "eBPF unavailable"
        } else {
            assert_eq!(c["status"], "missing", "{c}");
            assert!(
                c["why"].as_str().unwrap_or_default().starts_with("denied"),
                "{c}"
            );
            "eBPF unavailable (bpf() syscall missing: denied"
        };
        let verdict = doc["auto_backend"].as_str().unwrap_or_default();
        assert!(
            ["iptables", "nftables"]
                .iter()
                .any(|b| verdict.starts_with(&format!("{b} ({why}"))),
            "{out}"
        );
        assert!(doc["ebpf_missing"].is_string(), "{out}");
        return;
    }
    for name in NEEDED {
        let c = check(name);
        assert_eq!(c["status"], "present", "{c}");
        assert_eq!(c["needed"], true, "{c}");
        assert!(!c["why"].as_str().unwrap_or_default().is_empty(), "{c}");
    }
    for name in NOT_NEEDED {
        let c = check(name);
        assert_eq!(c["needed"], false, "{c}");
        assert!(!c["why"].as_str().unwrap_or_default().is_empty(), "{c}");
    }
    assert!(doc["ebpf_missing"].is_null(), "{out}");
    assert_eq!(
        doc["auto_backend"],
        "ebpf (the kernel supports every eBPF hook needed)"
    );
    assert!(
        doc["elapsed_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{out}"
    );
}

/// The library answer `apply --backend auto` uses: the full probe says usable, the real loader
/// agrees (it loads and attaches the same object), and once installed the probe trusts the
/// installation and costs only a few syscalls.
#[test]
fn probe_agrees_with_the_loader_and_is_cheap_once_installed() {
    let fresh = PathBuf::from(format!("/sys/fs/bpf/ic-doctor-none-{}", std::process::id()));
    let start = Instant::now();
    let full = probe::probe(&fresh, None, Depth::ReuseInstalled);
    let full_ms = start.elapsed().as_secs_f64() * 1e3;
    assert_eq!(full.ebpf_missing(), None, "{}", doctor::table(&full));
    for name in NEEDED {
        assert_eq!(
            full.get(name).map(|c| c.status),
            Some(Status::Present),
            "{name}"
        );
    }
    assert_eq!(
        full.get(rows::INSTALLATION).map(|c| c.status),
        Some(Status::Missing)
    );

    let install = EbpfInstall::new("doctor");
    install
        .load()
        .expect("doctor said eBPF is usable, yet the loader failed");
    let bpffs = install.dir().to_path_buf();
    let start = Instant::now();
    let runs = 5;
    for _ in 0..runs {
        assert_eq!(probe::ebpf_missing(&bpffs, None), None);
    }
    let quick_ms = start.elapsed().as_secs_f64() * 1e3 / f64::from(runs);
    let quick = probe::probe(&bpffs, None, Depth::ReuseInstalled);
    assert_eq!(
        quick.get(rows::INSTALLATION).map(|c| c.status),
        Some(Status::Present)
    );
    assert!(
        quick
            .get(rows::CONNECT4)
            .unwrap()
            .why
            .contains("already loaded"),
        "{}",
        doctor::table(&quick)
    );
    println!(
        "full probe: {full_ms:.1} ms; with an installation: {quick_ms:.1} ms per ebpf_missing call"
    );
    // Generous bounds (debug build, busy shared machine); the numbers are printed above.
    let scale = interceptor_tests::time_scale();
    assert!(full_ms < 5000.0 * scale, "full probe took {full_ms} ms");
    assert!(
        quick_ms < 200.0 * scale,
        "probe with an installation took {quick_ms} ms"
    );
}

/// The non-bpf rows can say missing too, with the fix.
#[test]
fn bpffs_and_cgroup_can_be_missing() {
    let tmp = std::env::temp_dir().join(format!("ic-doctor-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let bpffs = tmp.join("interceptor");
    let out = text(&bin::run(
        &[
            "doctor",
            "--bpffs",
            bpffs.to_str().unwrap(),
            "--cgroup",
            tmp.to_str().unwrap(),
        ],
        &[],
    ));
    std::fs::remove_dir_all(&tmp).unwrap();
    println!("{out}");
    let b = row(&out, rows::BPFFS);
    assert!(
        b.contains("missing") && b.contains("mount -t bpf bpf"),
        "{b}"
    );
    let c = row(&out, rows::CGROUP2);
    assert!(c.contains("missing") && c.contains("not cgroup v2"), "{c}");
    let verdict = auto_line(&out);
    assert!(
        verdict.contains("bpffs missing") && verdict.contains("cgroup v2 missing"),
        "{verdict}"
    );
    assert!(!verdict.starts_with("auto backend: ebpf"), "{verdict}");
}

fn setpriv(opts: &[&str], args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(opts)
        .arg("--")
        .arg(bin::interceptor_bin())
        .args(args)
        .output()
        .expect("running setpriv (util-linux)")
}

#[test]
fn capabilities_dropped_means_bpf_denied() {
    let out = text(&setpriv(
        &[
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--bounding-set=-bpf,-sys_admin,-perfmon",
        ],
        &["doctor"],
    ));
    println!("{out}");
    let bpf = row(&out, rows::BPF_SYSCALL);
    assert!(
        bpf.contains("missing")
            && bpf.contains("EPERM")
            && bpf.contains("neither CAP_BPF nor CAP_SYS_ADMIN"),
        "{bpf}"
    );
    let caps = row(&out, rows::CAPABILITIES);
    assert!(caps.contains("missing"), "{caps}");
    assert_fallback_for_bpf(&out);
}

/// Without CAP_BPF/CAP_SYS_ADMIN: a process whose every bpf() call fails.
const NO_BPF: [&str; 3] = [
    "--inh-caps=-all",
    "--ambient-caps=-all",
    "--bounding-set=-bpf,-sys_admin,-perfmon",
];

/// A dry run loads nothing into the kernel, so it does not probe: where bpf() is denied it still
/// prints both outcomes (a probe would have found eBPF unavailable, as the next test shows).
#[test]
fn a_dry_run_does_not_probe() {
    let out = setpriv(
        &NO_BPF,
        &[
            "apply",
            "--dry-run",
            "-i",
            "*",
            "--ipv6",
            "false",
            "--dns-servers",
            "",
        ],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("# backend: not probed (a dry run loads nothing into the kernel)"),
        "{stderr}"
    );
    assert!(
        stdout.contains("# if eBPF: the pod's map entries"),
        "{stdout}"
    );
    assert!(
        stdout.contains("fallback's rules") && stdout.contains("ISTIO_OUTPUT"),
        "{stdout}"
    );
}

/// `apply --backend auto` takes the same probe (a dry run with --probe): without CAP_BPF it
/// falls back, saying why.
#[test]
fn apply_auto_falls_back_without_bpf() {
    let out = setpriv(
        &NO_BPF,
        &[
            "apply",
            "--dry-run",
            "--probe",
            "-i",
            "*",
            "--ipv6",
            "false",
            "--dns-servers",
            "10.0.0.10",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("# backend:"))
        .unwrap_or_else(|| panic!("{stderr}"));
    println!("{line}");
    assert!(
        line.starts_with(
            "# backend: iptables (eBPF unavailable (bpf() syscall missing: denied (EPERM)"
        ) || line.starts_with(
            "# backend: nftables (eBPF unavailable (bpf() syscall missing: denied (EPERM)"
        ),
        "{line}"
    );
}

#[test]
fn unprivileged_user_means_bpf_denied() {
    let out = text(&setpriv(
        &["--reuid=65534", "--regid=65534", "--clear-groups"],
        &["doctor"],
    ));
    println!("{out}");
    let bpf = row(&out, rows::BPF_SYSCALL);
    assert!(bpf.contains("missing") && bpf.contains("EPERM"), "{bpf}");
    assert!(
        row(&out, rows::CAPABILITIES).contains("has none of CAP_BPF"),
        "{out}"
    );
    assert_fallback_for_bpf(&out);
}

/// Runs doctor (with every capability) under a seccomp filter failing bpf() with `errno`.
fn doctor_under_seccomp(errno: i32) -> String {
    let mut cmd = Command::new(bin::interceptor_bin());
    cmd.arg("doctor");
    // SAFETY: only async-signal-safe calls (prctl) on stack data between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Classic BPF over seccomp_data: A = nr; nr == __NR_bpf ? ERRNO(errno) : ALLOW.
            let stmt = |code: u32, k: u32| libc::sock_filter {
                code: code as u16,
                jt: 0,
                jf: 0,
                k,
            };
            let filter = [
                stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
                libc::sock_filter {
                    code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                    jt: 0,
                    jf: 1,
                    k: libc::SYS_bpf as u32,
                },
                stmt(
                    libc::BPF_RET | libc::BPF_K,
                    libc::SECCOMP_RET_ERRNO | errno as u32,
                ),
                stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
            ];
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut _,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    text(&cmd.output().expect("running interceptor doctor"))
}

#[test]
fn seccomp_denying_bpf_is_named() {
    let out = doctor_under_seccomp(libc::EPERM);
    println!("{out}");
    let bpf = row(&out, rows::BPF_SYSCALL);
    assert!(
        bpf.contains("missing") && bpf.contains("EPERM") && bpf.contains("seccomp filter"),
        "{bpf}"
    );
    // The capabilities are there: the diagnosis must not blame them.
    assert!(row(&out, rows::CAPABILITIES).contains("present"), "{out}");
    assert_fallback_for_bpf(&out);
}

#[test]
fn seccomp_enosys_is_not_mistaken_for_an_old_kernel() {
    let out = doctor_under_seccomp(libc::ENOSYS);
    println!("{out}");
    let bpf = row(&out, rows::BPF_SYSCALL);
    assert!(
        bpf.contains("missing") && bpf.contains("ENOSYS") && bpf.contains("seccomp filter"),
        "{bpf}"
    );
    assert_fallback_for_bpf(&out);
}
