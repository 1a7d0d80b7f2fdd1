//! Carrying out a [`Plan`]'s probes, doctor/auto checks and test runs, reporting marker lines
//! (see `proto`). The guest's `/init` runs it as PID 1; the host runs the same code for its
//! own bpf()-denied run, so both report alike.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::privs;
use super::proto::{line, mark, Mode, Plan, Run, When};

/// Where things are and how processes are handled, guest or host.
pub struct Env {
    /// The static `interceptor` binary.
    pub interceptor: PathBuf,
    /// Folder of the test binaries.
    pub tests: PathBuf,
    /// The vm-init binary (`probe` subcommand).
    pub prober: PathBuf,
    pub path: String,
    pub cwd: PathBuf,
    /// Reap every exited process (only as PID 1; on the host this would steal other
    /// threads' children).
    pub reap_all: bool,
    /// Echo child output (to the console in the guest).
    pub echo: bool,
}

/// What a child process did.
pub struct Exit {
    /// Exit code, or 128+signal; None on timeout.
    pub code: Option<i32>,
    pub millis: u128,
}

pub struct Runner<W: Write> {
    pub env: Env,
    pub plan: Plan,
    pub out: W,
    userns: Option<privs::UserNs>,
    /// Environment of the current test run, besides the plan's.
    extra_env: Vec<(String, String)>,
    /// `auto`'s choice for the first auto case, per mode (what conditional runs look at).
    auto_first: Vec<(Mode, String, String)>,
}

impl<W: Write> Runner<W> {
    pub fn new(env: Env, plan: Plan, out: W) -> Self {
        Self {
            env,
            plan,
            out,
            userns: None,
            extra_env: Vec::new(),
            auto_first: Vec::new(),
        }
    }

    pub fn mark(&mut self, fields: &[&str]) {
        let _ = self.out.write_all(line(fields).as_bytes());
        let _ = self.out.flush();
    }

    /// Probes, doctor and auto in every probe mode, then the test runs; true when every run
    /// passed (or was skipped for a stated reason).
    pub fn run_plan(&mut self) -> bool {
        let needs_userns = self.plan.probe_modes.contains(&Mode::UserNs)
            || self.plan.runs.iter().any(|r| r.mode == Mode::UserNs);
        if needs_userns {
            match privs::UserNs::create() {
                Ok(ns) => self.userns = Some(ns),
                Err(e) => self.mark(&[mark::NOTE, &format!("cannot make a user namespace: {e}")]),
            }
        }
        for mode in self.plan.probe_modes.clone() {
            self.probes(mode);
            self.doctor(mode);
            self.auto(mode);
        }
        let mut ok = true;
        for run in self.plan.runs.clone() {
            ok &= self.test_run(&run);
        }
        ok
    }

    fn probes(&mut self, mode: Mode) {
        let mut lines = Vec::new();
        let prober = self.env.prober.clone();
        let exit = self.exec(mode, &prober, &["probe"], 120, |l| {
            lines.push(l.to_string())
        });
        for l in &lines {
            let f: Vec<&str> = l.split('\t').collect();
            if f.len() == 3 {
                self.mark(&[mark::PROBE, mode.name(), f[0], f[1], f[2]]);
            }
        }
        if exit.code != Some(0) {
            self.mark(&[
                mark::NOTE,
                &format!("probe run in mode {mode} exited {:?}", exit.code),
            ]);
        }
    }

    fn doctor(&mut self, mode: Mode) {
        let mut lines = Vec::new();
        let bin = self.env.interceptor.clone();
        let exit = self.exec(mode, &bin, &["doctor"], 300, |l| lines.push(l.to_string()));
        let code = exit.code.map_or("timeout".to_string(), |c| c.to_string());
        self.mark(&[mark::DOCTOR, mode.name(), &code, &exit.millis.to_string()]);
        for l in lines {
            self.mark(&[mark::DOCTOR_LINE, mode.name(), &l]);
        }
    }

    fn auto(&mut self, mode: Mode) {
        let bin = self.env.interceptor.clone();
        for (i, case) in self.plan.auto.clone().into_iter().enumerate() {
            // --probe: the kernel is asked (a plain dry run loads nothing and does not know).
            let mut args = vec!["apply", "--dry-run", "--probe", "--backend", "auto"];
            args.extend(case.args.iter().map(String::as_str));
            let mut lines = Vec::new();
            let exit = self.exec(mode, &bin, &args, 300, |l| lines.push(l.to_string()));
            let chosen = lines
                .iter()
                .find_map(|l| l.strip_prefix("# backend: "))
                .map(|rest| match rest.split_once(' ') {
                    Some((b, why)) => (
                        b.to_lowercase(),
                        why.trim()
                            .strip_prefix('(')
                            .and_then(|w| w.strip_suffix(')'))
                            .unwrap_or(why)
                            .to_string(),
                    ),
                    None => (rest.to_lowercase(), String::new()),
                });
            let (backend, why) = match (chosen, exit.code) {
                (Some(c), Some(0)) => c,
                (_, code) => (
                    "error".to_string(),
                    format!(
                        "exit {}: {}",
                        code.map_or("timeout".into(), |c| c.to_string()),
                        lines.last().map(String::as_str).unwrap_or("")
                    ),
                ),
            };
            if i == 0 {
                self.auto_first.push((mode, backend.clone(), why.clone()));
            }
            self.mark(&[mark::AUTO, mode.name(), &case.label, &backend, &why]);
        }
    }

    fn test_run(&mut self, run: &Run) -> bool {
        if run.when != When::Always {
            let chosen = self.auto_first.iter().find(|(m, _, _)| *m == run.mode);
            let (backend, why) = match chosen {
                Some((_, b, w)) => (b.clone(), w.clone()),
                None => (
                    "unknown".to_string(),
                    "no auto case ran in this mode".to_string(),
                ),
            };
            let ebpf = backend == "ebpf";
            if ebpf != (run.when == When::AutoEbpf) {
                // A sibling run of the same id (the other variant) reports instead.
                let sibling = self
                    .plan
                    .runs
                    .iter()
                    .any(|r| r.id == run.id && r.when != run.when);
                if !sibling {
                    let note = format!("auto chose {backend} here ({why})");
                    println!("[{}] skipped: {note}", run.id);
                    #[rustfmt::skip]
                    self.mark(&[mark::RUN, &run.id, "skipped", "", "0", "0", "0", "0", &note]);
                }
                return true;
            }
        }
        let note = if run.when == When::AutoNotEbpf {
            "auto does not pick eBPF here: tests that need eBPF skipped"
        } else {
            ""
        };
        println!("=== {} ({}) ===", run.id, run.mode.describe());
        let bin = self.env.tests.join(&run.bin);
        let args: Vec<&str> = run.args.iter().map(String::as_str).collect();
        let (mut passed, mut failed, mut ignored) = (0u32, 0u32, 0u32);
        let mut cases = Vec::new();
        let mut fail_out = Vec::new();
        let mut in_failures = false;
        // Runs of the fallback selection say so, for tests that want to skip eBPF cases.
        let fallback = run.when == When::AutoNotEbpf || run.mode != Mode::Normal;
        self.extra_env = if fallback {
            vec![("INTERCEPTOR_TESTS_NO_EBPF".into(), "1".into())]
        } else {
            Vec::new()
        };
        let exit = self.exec(run.mode, &bin, &args, run.timeout_secs, |l| {
            if let Some(rest) = l.strip_prefix("test ") {
                if let Some((name, result)) = rest.rsplit_once(" ... ") {
                    let result = result.split(',').next().unwrap_or(result).trim();
                    match result {
                        "ok" => passed += 1,
                        "FAILED" => failed += 1,
                        "ignored" => ignored += 1,
                        _ => return,
                    }
                    cases.push((name.to_string(), result.to_string()));
                    return;
                }
            }
            if l == "failures:" {
                in_failures = true;
            } else if l.starts_with("test result:") {
                in_failures = false;
            }
            if in_failures && fail_out.len() < 400 {
                fail_out.push(l.to_string());
            }
        });
        for (name, result) in &cases {
            self.mark(&[mark::CASE, &run.id, name, result]);
        }
        for l in &fail_out {
            self.mark(&[mark::FAIL_OUT, &run.id, l]);
        }
        let status = match exit.code {
            None => "timeout",
            Some(0) => "ok",
            Some(_) if failed > 0 => "failed",
            Some(_) => "error",
        };
        let code = exit.code.map_or(String::new(), |c| c.to_string());
        self.mark(&[
            mark::RUN,
            &run.id,
            status,
            &code,
            &passed.to_string(),
            &failed.to_string(),
            &ignored.to_string(),
            &exit.millis.to_string(),
            note,
        ]);
        println!(
            "[{}] {status}: {passed} passed, {failed} failed, {ignored} ignored, {} ms",
            run.id, exit.millis
        );
        status == "ok"
    }

    /// Runs `program args` in `mode` with the plan's environment, its stdout and stderr merged
    /// and handed to `on_line` line by line (and echoed when asked); kills its whole process
    /// group when it exits or after `timeout_secs`.
    pub fn exec(
        &self,
        mode: Mode,
        program: &std::path::Path,
        args: &[&str],
        timeout_secs: u64,
        mut on_line: impl FnMut(&str),
    ) -> Exit {
        let t = Instant::now();
        let failed = |what: String, on_line: &mut dyn FnMut(&str)| {
            println!("{what}");
            on_line(&what);
            Exit {
                code: Some(127),
                millis: t.elapsed().as_millis(),
            }
        };
        let (rd, wr) = match pipe() {
            Ok(p) => p,
            Err(e) => return failed(format!("pipe: {e}"), &mut on_line),
        };
        let wr2 = match wr.try_clone() {
            Ok(w) => w,
            Err(e) => return failed(format!("dup: {e}"), &mut on_line),
        };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .env("PATH", &self.env.path)
            .env("HOME", "/root")
            .env("TMPDIR", "/tmp")
            .env("LANG", "C")
            .env("RUST_BACKTRACE", "1")
            .env("INTERCEPTOR_BIN", &self.env.interceptor)
            .current_dir(&self.env.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(wr))
            .stderr(Stdio::from(wr2))
            .process_group(0);
        for (k, v) in self.plan.env.iter().chain(&self.extra_env) {
            cmd.env(k, v);
        }
        let userns = self.userns.as_ref().map(privs::UserNs::raw_fd);
        // SAFETY: the closure only makes raw syscalls (prctl, capset, setns, unshare).
        unsafe {
            cmd.pre_exec(move || privs::apply(mode, userns));
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return failed(
                    format!("cannot run {}: {e}", program.display()),
                    &mut on_line,
                )
            }
        };
        drop(cmd); // closes our copies of the pipe's write end
        let pid = child.id() as libc::pid_t;
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            let reader = BufReader::new(File::from(rd));
            for l in reader.split(b'\n') {
                let Ok(l) = l else { break };
                let s = String::from_utf8_lossy(&l)
                    .trim_end_matches('\r')
                    .to_string();
                if tx.send(s).is_err() {
                    break;
                }
            }
        });
        let deadline = t + Duration::from_secs(timeout_secs.max(1));
        let mut code = None;
        let mut exited = false;
        let mut eof = false;
        let mut drain_until = None;
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(l) => {
                    if self.env.echo {
                        println!("  {l}");
                    }
                    on_line(&l);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => eof = true,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if !exited {
                if let Some(c) = self.reap(pid) {
                    code = Some(c);
                    exited = true;
                    // Stray grandchildren (servers a test left) would keep the pipe open.
                    // SAFETY: the child's own process group.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                    drain_until = Some(Instant::now() + Duration::from_secs(2));
                } else if Instant::now() > deadline {
                    println!(
                        "{} timed out after {timeout_secs} s; killing it",
                        program.display()
                    );
                    // SAFETY: as above.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                    while self.reap(pid).is_none() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    exited = true;
                    drain_until = Some(Instant::now() + Duration::from_secs(2));
                }
            }
            if exited && (eof || drain_until.is_some_and(|d| Instant::now() > d)) {
                break;
            }
        }
        Exit {
            code,
            millis: t.elapsed().as_millis(),
        }
    }

    /// `pid`'s exit code (128+signal when killed) once it has exited; as PID 1 also reaps
    /// every orphan.
    fn reap(&self, pid: libc::pid_t) -> Option<i32> {
        let mut found = None;
        loop {
            let mut status = 0;
            let who = if self.env.reap_all { -1 } else { pid };
            // SAFETY: non-blocking waitpid.
            let r = unsafe { libc::waitpid(who, &mut status, libc::WNOHANG) };
            if r <= 0 {
                break;
            }
            if r == pid {
                found = Some(if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                });
                if !self.env.reap_all {
                    break;
                }
            }
        }
        found
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 into a two-element array; both fds are then owned.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
    }
}
