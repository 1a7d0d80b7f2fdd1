//! Running the rule tools (iptables-restore, nft, …) inside a pod's netns or a scratch netns.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use anyhow::{anyhow, bail, Context, Result};

use crate::netns;

/// Runs `program args` with `stdin`, returning stdout; a non-zero exit is an error with stderr.
pub fn run(
    netns: Option<&Path>,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String> {
    let mut cmd = netns::command(netns, program)?;
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
