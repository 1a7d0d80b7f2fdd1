//! Running the `interceptor` binary as a container runtime runs a CNI plugin: `CNI_*`
//! environment, the network config on stdin, the spec's result or error object on stdout.
//! [`Runtime`] runs a whole chain as libcni does, for a pod of a test [`Node`].
//!
//! Network safety: the bridge lives in a dedicated "node" netns (`ic-cninode-…-up`; the
//! bridge plugin runs under `ip netns exec <node>`), the pod netns (`ic-cnipod-…-pod`) is
//! created by the test, addressing is a private 10.250.X.0/24 with host-local keeping its
//! state in a temp dir, and traffic only flows between the pod and servers in the node netns.
//! Names follow the topology fixture's pattern so a killed run's leftovers are reaped by
//! `topology::reap_stale`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::Value;

use crate::bin::interceptor_bin;
use crate::topology::reap_stale;

/// Debian's containernetworking-plugins.
pub const CNI_DIR: &str = "/usr/lib/cni";

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

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

/// A "node" netns holding the bridge, and a pod netns; both deleted on drop with the temp dir
/// (`dir`: the node's CNI bin dir `bin/`, host-local's state).
pub struct Node {
    pub node: String,
    pub pod: String,
    pub dir: PathBuf,
    /// The third octet of the node's 10.250.X.0/24.
    x: u8,
}

impl Node {
    /// A node whose CNI bin dir has Debian's loopback, bridge and host-local plugins and this
    /// build's `interceptor`.
    pub fn with_interceptor() -> Self {
        let me = Self::without_interceptor();
        std::os::unix::fs::symlink(interceptor_bin(), me.bin().join("interceptor")).unwrap();
        me
    }

    /// The same without our plugin: `cni-install` puts it in `bin()`.
    pub fn without_interceptor() -> Self {
        reap_stale();
        let (pid, n) = (std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let node = format!("ic-cninode-{pid}-{n}-up");
        let pod = format!("ic-cnipod-{pid}-{n}-pod");
        let dir = std::env::temp_dir().join(format!("ic-cni-{pid}-{n}"));
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        let me = Self {
            node,
            pod,
            dir,
            x: ((pid.wrapping_mul(31).wrapping_add(n)) % 250 + 1) as u8,
        };
        ip(&["netns", "add", &me.node]);
        ip(&["netns", "add", &me.pod]);
        ip(&["-n", &me.node, "link", "set", "lo", "up"]);
        // The runtime finds plugins by `type` in CNI_PATH.
        for p in ["loopback", "bridge", "host-local"] {
            std::os::unix::fs::symlink(Path::new(CNI_DIR).join(p), me.bin().join(p)).unwrap();
        }
        me
    }
    pub fn bin(&self) -> PathBuf {
        self.dir.join("bin")
    }
    pub fn node_path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.node)
    }
    pub fn pod_path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.pod)
    }
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.x, 1)
    }
    pub fn subnet(&self) -> String {
        format!("10.250.{}.0/24", self.x)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.node] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A minimal libcni: runs a conflist's plugins in order for ADD (each gets the previous
/// result as `prevResult`), in reverse for DEL, and all with the cached result for CHECK;
/// `runtimeConfig` is filled for the capabilities a plugin declares.
pub struct Runtime<'a> {
    node: &'a Node,
    container_id: String,
    args: String,
    /// Capability args the runtime offers (e.g. containerd's pod annotations).
    capability_args: Value,
    pub cached: Option<Value>,
}

impl<'a> Runtime<'a> {
    pub fn new(node: &'a Node, args: String, capability_args: Value) -> Self {
        Self {
            node,
            container_id: format!("ctr-{}", node.pod),
            args,
            capability_args,
            cached: None,
        }
    }

    fn stdin_for(&self, list: &Value, plugin: &Value, prev: Option<&Value>) -> Vec<u8> {
        let mut conf = plugin.clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        if let Some(caps) = plugin.get("capabilities").and_then(Value::as_object) {
            let mut rc = serde_json::Map::new();
            for (cap, on) in caps {
                if on.as_bool() == Some(true) {
                    if let Some(v) = self.capability_args.get(cap) {
                        rc.insert(cap.clone(), v.clone());
                    }
                }
            }
            if !rc.is_empty() {
                conf["runtimeConfig"] = Value::Object(rc);
            }
            conf.as_object_mut().unwrap().remove("capabilities");
        }
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        serde_json::to_vec(&conf).unwrap()
    }

    pub fn run_plugin(&self, command: &str, list: &Value, i: usize, prev: Option<&Value>) -> Run {
        let plugin = &list["plugins"][i];
        let ty = plugin["type"].as_str().unwrap();
        let pod = self.node.pod_path();
        let bin = self.node.bin();
        let inv = Invocation {
            command,
            container_id: &self.container_id,
            netns: Some(&pod),
            ifname: "eth0",
            args: &self.args,
            cni_path: &bin,
            // Ours only talks to the daemon's socket; the others build the node's network.
            in_netns: (ty != "interceptor").then_some(self.node.node.as_str()),
        };
        invoke(&bin.join(ty), &inv, &self.stdin_for(list, plugin, prev))
    }

    /// ADD through the whole list; the final result is cached for CHECK and DEL.
    pub fn add(&mut self, list: &Value) -> Result<Value, (usize, Run)> {
        let mut prev: Option<Value> = None;
        for i in 0..list["plugins"].as_array().unwrap().len() {
            let run = self.run_plugin("ADD", list, i, prev.as_ref());
            if !run.ok {
                return Err((i, run));
            }
            println!(
                "  ADD {:<12} -> {}",
                list["plugins"][i]["type"].as_str().unwrap(),
                run.stdout
            );
            prev = Some(run.json());
        }
        self.cached = prev.clone();
        Ok(prev.unwrap())
    }

    pub fn check(&self, list: &Value) -> Vec<Run> {
        (0..list["plugins"].as_array().unwrap().len())
            .map(|i| self.run_plugin("CHECK", list, i, self.cached.as_ref()))
            .collect()
    }

    /// DEL of plugin `i` (the caller walks the list in reverse).
    pub fn del(&self, list: &Value, i: usize) -> Run {
        self.run_plugin("DEL", list, i, self.cached.as_ref())
    }
}
