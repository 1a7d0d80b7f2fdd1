//! Running the rule tools (iptables-restore, nft, …) inside a pod's netns or a scratch netns.
//!
//! Every run has a deadline: the daemon runs the tools under its one registration lock, so a
//! tool that hangs (a stuck xtables lock holder, a wedged netlink socket) must not stall every
//! pod of the node. On expiry the tool and everything it started are killed and the run fails,
//! naming the tool and the limit; the callers roll back what the tool may have applied.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::netns;

/// Environment variable: the rule tools' time limit in seconds (default [`DEFAULT_TIMEOUT`]).
pub const TIMEOUT_ENV: &str = "INTERCEPTOR_TOOL_TIMEOUT";
/// How long one rule-tool run may take by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The time limit of one rule-tool run: `INTERCEPTOR_TOOL_TIMEOUT` seconds (fractions allowed),
/// else [`DEFAULT_TIMEOUT`]. Read once per process.
pub fn timeout() -> Duration {
    static T: OnceLock<Duration> = OnceLock::new();
    *T.get_or_init(|| {
        std::env::var(TIMEOUT_ENV)
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map_or(DEFAULT_TIMEOUT, Duration::from_secs_f64)
    })
}

static POD_SCOPED_LOCK: AtomicBool = AtomicBool::new(false);

/// Istio's `--cni-mode` (`UsePodScopedXtablesLock`): from now on, iptables runs inside a pod's
/// netns take the xtables lock on that netns's file (`XTABLES_LOCKFILE`, iptables >= 1.8.6)
/// (or, in the scratch netns, the tool's own) instead of the node-wide /run/xtables.lock, so one
/// pod's rules do not wait for kube-proxy or another pod. Only legacy iptables takes the lock; iptables-nft and nft ignore it.
pub fn scope_xtables_lock_to_pod_netns() {
    POD_SCOPED_LOCK.store(true, Ordering::Relaxed);
}

/// The `-w` argument for iptables(-restore): wait for the xtables lock (held by kube-proxy, a
/// CNI, another istio-init) for half the time limit, so a lock held too long fails with the
/// tool's own message before the time limit kills it. Whole seconds, at least 1.
pub fn xtables_wait() -> String {
    (timeout().as_secs() / 2).max(1).to_string()
}

/// Runs `program args` with `stdin`, returning stdout; a non-zero exit is an error with stderr,
/// and so is running past [`timeout`] (the tool and its children are killed first).
pub fn run(
    netns: Option<&Path>,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String> {
    run_for(netns, program, args, stdin, timeout())
}

fn run_for(
    netns: Option<&Path>,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
    limit: Duration,
) -> Result<String> {
    let mut cmd = netns::command(netns, program)?;
    if POD_SCOPED_LOCK.load(Ordering::Relaxed)
        && program.starts_with("ip")
        && program.contains("tables")
    {
        // The pod's netns file, or for a run in the caller's netns (the private scratch netns
        // where the rules are proven first) the tool's own netns.
        let lock = netns.unwrap_or(Path::new("/proc/self/ns/net"));
        cmd.env("XTABLES_LOCKFILE", lock);
    }
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: on expiry the whole group is killed (nsenter, a wrapper
        // script and whatever it started), not just the direct child.
        .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    let pid = child.id();
    // Writer and readers on threads: a tool that stops reading its input or fills a pipe must
    // not block us past the deadline.
    let writer = stdin.map(|input| {
        let mut pipe = child.stdin.take().expect("piped");
        let input = input.to_string();
        std::thread::spawn(move || {
            // A tool that exits (or is killed) early closes the pipe: EPIPE is not our error.
            let _ = pipe.write_all(input.as_bytes());
        })
    });
    let reader = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let out = reader(Box::new(child.stdout.take().expect("piped")));
    let err = reader(Box::new(child.stderr.take().expect("piped")));
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        let _ = tx.send(());
        status
    });
    let timed_out = match rx.recv_timeout(limit) {
        Ok(()) => false,
        Err(_) => {
            // The group leader is not reaped yet (the waiter has not sent), so its pid still
            // names this group.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            true
        }
    };
    let status = waiter
        .join()
        .map_err(|_| anyhow!("waiting for {program} panicked"))??;
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    if let Some(w) = writer {
        let _ = w.join();
    }
    if timed_out {
        bail!(
            "{program} {} did not finish within {:?} and was killed (time limit: {TIMEOUT_ENV})",
            args.join(" "),
            limit
        );
    }
    if !status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            status,
            String::from_utf8_lossy(&err).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Runs `f` on a thread inside a private, fresh netns: commands it starts with `run(None, …)`
/// inherit that netns, which disappears with the thread and its children, leaving nothing.
pub fn in_scratch<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .context("unshare(CLONE_NEWNET)")?;
        f()
    })
    .join()
    .map_err(|_| anyhow!("scratch netns thread panicked"))?
}

/// Whether `program` can be found on PATH.
pub fn available(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hanging_tool_is_killed_at_the_deadline_with_its_children() {
        // A sleep no other process runs, to find leftovers by.
        let marker = format!("sleep 987.{}", std::process::id());
        let t = std::time::Instant::now();
        // The shell starts a child that would outlive it; the whole group must go.
        let script = format!("{marker} & {marker}");
        let err = run_for(
            None,
            "sh",
            &["-c", &script],
            Some("input"),
            Duration::from_millis(300),
        )
        .unwrap_err()
        .to_string();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(
            err.contains("sh -c") && err.contains("300ms") && err.contains("killed"),
            "{err}"
        );
        std::thread::sleep(Duration::from_millis(100));
        let left = std::process::Command::new("pgrep")
            .args(["-f", &marker])
            .output()
            .unwrap();
        assert!(left.stdout.is_empty(), "left running: {:?}", left);
    }

    #[test]
    fn output_errors_and_unread_input_within_the_deadline() {
        let ok = run_for(None, "cat", &[], Some("hello"), Duration::from_secs(5)).unwrap();
        assert_eq!(ok, "hello");
        let err = run_for(
            None,
            "sh",
            &["-c", "echo bad >&2; exit 3"],
            None,
            Duration::from_secs(5),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("bad") && err.contains("3"), "{err}");
        // A tool that never reads a large input: no deadlock on the pipe.
        let big = "x".repeat(1 << 20);
        run_for(None, "true", &[], Some(&big), Duration::from_secs(5)).unwrap();
    }
}
