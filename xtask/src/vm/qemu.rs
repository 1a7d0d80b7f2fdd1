//! Booting a guest in QEMU, always under a timeout: console on the first serial port (to a
//! log file), results on the second (to another file, read back by the report).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The accelerator, and why. KVM only when the CPU advertises virtualisation (vmx/svm) and
/// /dev/kvm is writable: on nested PVM guests /dev/kvm exists but guests die in emulation
/// failures and QEMU hangs. `INTERCEPTOR_VM_ACCEL=kvm|tcg` overrides.
pub fn accel(forced: Option<&str>) -> (String, String) {
    if let Some(a) = forced {
        return (
            a.to_string(),
            "forced (--accel / INTERCEPTOR_VM_ACCEL)".into(),
        );
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let c = std::ffi::CString::new("/dev/kvm").expect("no NUL");
    // SAFETY: access(2) on a C string.
    let writable = unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0;
    match (virt, writable) {
        (true, true) => (
            "kvm".into(),
            "vmx/svm in /proc/cpuinfo and /dev/kvm writable".into(),
        ),
        (false, _) => ("tcg".into(), "no vmx/svm in /proc/cpuinfo".into()),
        (true, false) => ("tcg".into(), "/dev/kvm not writable".into()),
    }
}

pub struct Boot<'a> {
    pub vmlinuz: &'a Path,
    pub initrd: &'a Path,
    pub dir: &'a Path,
    pub accel: &'a str,
    pub memory_mib: u32,
    pub smp: u32,
    pub timeout: Duration,
    /// Killed when the guest reports nothing for this long (the init reports at least once
    /// per test run, and kills a run at its own timeout).
    pub stall: Duration,
    /// Printed before progress lines.
    pub label: &'a str,
}

pub struct Outcome {
    pub console: PathBuf,
    pub results: String,
    pub elapsed: Duration,
    pub timed_out: bool,
    pub exit: Option<i32>,
}

pub fn boot(b: &Boot) -> Result<Outcome> {
    std::fs::create_dir_all(b.dir)?;
    let console = b.dir.join("console.log");
    let results = b.dir.join("results.log");
    for f in [&console, &results] {
        std::fs::write(f, "")?;
    }
    let cpu = if b.accel == "kvm" { "host" } else { "max" };
    let append = [
        "console=ttyS0",
        "panic=-1",
        "quiet",
        "loglevel=4",
        "random.trust_cpu=on",
        "rdinit=/init",
    ]
    .join(" ");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", b.accel, "-cpu", cpu])
        .args(["-m", &b.memory_mib.to_string(), "-smp", &b.smp.to_string()])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-nic", "none", "-device", "virtio-rng-pci"])
        .arg("-kernel")
        .arg(b.vmlinuz)
        .arg("-initrd")
        .arg(b.initrd)
        .args(["-append", &append])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", results.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .context("running qemu-system-x86_64 (setup.sh installs qemu-system-x86)")?;
    let mut stderr = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut progress = Progress::new(&results, b.label);
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        progress.poll();
        let stalled = progress.last.elapsed() > b.stall;
        if start.elapsed() > b.timeout || stalled {
            timed_out = true;
            eprintln!(
                "[{}] {} after {} s: killing QEMU",
                b.label,
                if stalled { "no progress" } else { "timeout" },
                start.elapsed().as_secs()
            );
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    progress.poll();
    let qemu_err = err_thread.join().unwrap_or_default();
    if !qemu_err.trim().is_empty() {
        std::fs::write(b.dir.join("qemu-stderr.log"), &qemu_err)?;
    }
    Ok(Outcome {
        console,
        results: std::fs::read_to_string(&results)?.replace('\r', ""),
        elapsed: start.elapsed(),
        timed_out,
        exit: status.and_then(|s| s.code()),
    })
}

/// Prints one line per finished test run as the results file grows.
struct Progress {
    path: PathBuf,
    label: String,
    pos: u64,
    partial: String,
    /// When the results last grew.
    last: Instant,
}

impl Progress {
    fn new(path: &Path, label: &str) -> Self {
        Self {
            path: path.to_path_buf(),
            label: label.to_string(),
            pos: 0,
            partial: String::new(),
            last: Instant::now(),
        }
    }

    fn poll(&mut self) {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.pos)).is_err() {
            return;
        }
        let mut buf = String::new();
        let Ok(n) = f.read_to_string(&mut buf) else {
            return;
        };
        self.pos += n as u64;
        if n > 0 {
            self.last = Instant::now();
        }
        self.partial.push_str(&buf.replace('\r', ""));
        while let Some(i) = self.partial.find('\n') {
            let l: String = self.partial.drain(..=i).collect();
            let f: Vec<&str> = l.trim_end_matches('\n').split('\t').collect();
            match f[0] {
                "ready" => eprintln!("[{}] booted: {}", self.label, f.get(1).unwrap_or(&"")),
                "modules" if f.len() >= 4 => eprintln!(
                    "[{}] modules: {} loaded, {} failed ({} ms)",
                    self.label, f[1], f[2], f[3]
                ),
                "doctor" if f.len() >= 4 => eprintln!(
                    "[{}] doctor ({}): exit {} ({} ms)",
                    self.label, f[1], f[2], f[3]
                ),
                "auto" if f.len() >= 5 => {
                    eprintln!("[{}] auto ({}) {}: {}", self.label, f[1], f[2], f[3])
                }
                "run" if f.len() >= 9 => eprintln!(
                    "[{}] {} {}: {} passed, {} failed, {} ignored ({:.0} s){}",
                    self.label,
                    f[1],
                    f[2],
                    f[4],
                    f[5],
                    f[6],
                    f[7].parse::<f64>().unwrap_or(0.0) / 1000.0,
                    if f[8].is_empty() {
                        String::new()
                    } else {
                        format!(" — {}", f[8])
                    }
                ),
                "done" => eprintln!("[{}] guest done: {}", self.label, f.get(1).unwrap_or(&"")),
                _ => {}
            }
        }
    }
}
