//! `vm-init`: the guest's `/init` (PID 1) for `cargo xtask vm-test`, a static musl binary.
//!
//! It mounts the pseudo file systems, loads the kernel modules the plan lists, probes the
//! kernel's eBPF features itself, runs `interceptor doctor` and `apply --dry-run --backend
//! auto` for a few pod configurations, then every test run of the plan, each in its privilege
//! mode, and reports all of it as marker lines on the second serial port (see `proto`).
//! Test output goes to the console (first serial port). Then it powers the machine off.
//!
//! `/init probe` (not as PID 1) prints the raw feature probes as `feature\tok|no\tdetail`
//! lines; the init runs it in a child so that each privilege mode can be applied to it.

mod bpfprobe;
mod privs;
mod proto;
mod runner;

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

use proto::{line, mark, Mode, Plan};
use runner::Runner;

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("probe") {
        for (name, outcome) in bpfprobe::run_all() {
            let (st, detail) = match outcome {
                Ok(d) => ("ok", d),
                Err(e) => ("no", e),
            };
            print!("{}", line(&[name, st, &detail]));
        }
        return;
    }
    if std::process::id() != 1 {
        eprintln!("vm-init: meant to run as /init (PID 1) of a vm-test guest");
        std::process::exit(2);
    }
    let start = Instant::now();
    let ok = std::panic::catch_unwind(|| Init::boot(start).map(|mut i| i.run()));
    let ok = match ok {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => {
            println!("init: error: {e}");
            false
        }
        Err(_) => {
            println!("init: panicked");
            false
        }
    };
    println!("init: {}", if ok { "success" } else { "failure" });
    // SAFETY: sync and power off; nothing runs after this.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF);
    }
}

fn mount(src: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| CString::new(s).expect("no NUL");
    let (src_c, target_c, fs_c, data_c) = (c(src), c(target), c(fstype), c(data));
    // SAFETY: valid C strings for the duration of the call.
    let r = unsafe {
        libc::mount(
            src_c.as_ptr(),
            target_c.as_ptr(),
            fs_c.as_ptr(),
            flags,
            data_c.as_ptr().cast(),
        )
    };
    if r != 0 {
        println!(
            "init: mount {fstype} on {target}: {}",
            std::io::Error::last_os_error()
        );
    }
}

struct Init {
    start: Instant,
    runner: Runner<File>,
}

impl Init {
    fn boot(start: Instant) -> Result<Init, String> {
        let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        mount("proc", "/proc", "proc", nosuid, "");
        mount("sysfs", "/sys", "sysfs", nosuid, "");
        mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
        mount("tmpfs", "/run", "tmpfs", libc::MS_NOSUID, "mode=0755");
        mount("tmpfs", "/tmp", "tmpfs", libc::MS_NOSUID, "mode=1777");
        mount("tmpfs", "/dev/shm", "tmpfs", libc::MS_NOSUID, "mode=1777");
        mount("bpf", "/sys/fs/bpf", "bpf", 0, "mode=0700");
        mount("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, "");
        let _ = std::fs::create_dir_all("/var");
        if !Path::new("/var/run").exists() {
            let _ = std::os::unix::fs::symlink("../run", "/var/run");
        }
        let _ = std::fs::create_dir_all("/root");
        let results = std::fs::OpenOptions::new()
            .write(true)
            .open(proto::RESULTS_TTY)
            .map_err(|e| format!("{}: {e}", proto::RESULTS_TTY))?;
        let text = std::fs::read_to_string(proto::PLAN_PATH)
            .map_err(|e| format!("{}: {e}", proto::PLAN_PATH))?;
        let plan = Plan::parse(&text)?;
        let env = runner::Env {
            interceptor: proto::INTERCEPTOR.into(),
            tests: proto::TEST_DIR.into(),
            prober: "/init".into(),
            path: PATH.into(),
            cwd: "/root".into(),
            reap_all: true,
            echo: true,
        };
        Ok(Init {
            start,
            runner: Runner::new(env, plan, results),
        })
    }

    fn run(&mut self) -> bool {
        let uts = uname();
        println!("init: kernel {} {}", uts.0, uts.1);
        self.runner.mark(&[mark::READY, &uts.0, &uts.1]);
        self.load_modules();
        if Path::new("/sbin/modprobe").exists() {
            let _ = std::fs::write("/proc/sys/kernel/modprobe", "/sbin/modprobe\n");
        }
        // The tests build their own namespaces; the initial one only needs a working lo.
        let ip = Path::new("/usr/sbin/ip");
        let _ = self
            .runner
            .exec(Mode::Normal, ip, &["link", "set", "lo", "up"], 30, |_| {});
        let ok = self.runner.run_plan();
        let secs = self.start.elapsed().as_millis().to_string();
        #[rustfmt::skip]
        self.runner.mark(&[mark::DONE, if ok { "success" } else { "failure" }, &secs]);
        ok
    }

    fn load_modules(&mut self) {
        let t = Instant::now();
        let (mut loaded, mut failed) = (0, 0);
        for m in self.runner.plan.modules.clone() {
            match finit_module(&m) {
                Ok(()) => loaded += 1,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => loaded += 1,
                Err(e) => {
                    failed += 1;
                    let name = Path::new(&m)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or(m.clone());
                    println!("init: module {name}: {e}");
                    self.runner.mark(&[mark::MODFAIL, &name, &e.to_string()]);
                }
            }
        }
        let ms = t.elapsed().as_millis().to_string();
        println!("init: {loaded} modules loaded, {failed} failed, {ms} ms");
        let (l, f) = (loaded.to_string(), failed.to_string());
        self.runner.mark(&[mark::MODULES, &l, &f, &ms]);
    }
}

fn finit_module(path: &str) -> std::io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: finit_module on an open file with empty parameters.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), c"".as_ptr(), 0) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn uname() -> (String, String) {
    // SAFETY: uname fills the zeroed struct.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    unsafe { libc::uname(&mut u) };
    let s = |f: &[libc::c_char]| {
        // SAFETY: utsname fields are NUL-terminated.
        unsafe { std::ffi::CStr::from_ptr(f.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    (s(&u.release), s(&u.version))
}
