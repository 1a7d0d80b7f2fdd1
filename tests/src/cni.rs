//! Running the `interceptor` binary as a container runtime runs a CNI plugin: `CNI_*`
//! environment, the network config on stdin, the spec's result or error object on stdout.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// One plugin run as the runtime does it: returns (success, stdout, stderr).
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} / {}", self.stdout, self.stderr))
    }
    /// The CNI error object of a failed run.
    pub fn error(&self) -> Value {
        assert!(
            !self.ok,
            "expected a failure: {} / {}",
            self.stdout, self.stderr
        );
        let v = self.json();
        assert!(v["code"].is_u64() && v["msg"].is_string(), "{v}");
        v
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ok={} stdout={} stderr={}",
            self.ok, self.stdout, self.stderr
        )
    }
}

pub struct Invocation<'a> {
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: Option<&'a Path>,
    pub ifname: &'a str,
    pub args: &'a str,
    pub cni_path: &'a Path,
    /// Run under `ip netns exec` (plugins that create links in the node).
    pub in_netns: Option<&'a str>,
}

pub fn invoke(binary: &Path, inv: &Invocation<'_>, stdin: &[u8]) -> Run {
    let mut cmd = match inv.in_netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(binary);
            c
        }
        None => Command::new(binary),
    };
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", inv.command)
        .env("CNI_CONTAINERID", inv.container_id)
        .env(
            "CNI_NETNS",
            inv.netns.map(|p| p.as_os_str()).unwrap_or_default(),
        )
        .env("CNI_IFNAME", inv.ifname)
        .env("CNI_ARGS", inv.args)
        .env("CNI_PATH", inv.cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning plugin");
    {
        use std::io::Write;
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(stdin).unwrap();
    }
    let out: Output = child.wait_with_output().unwrap();
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}
