//! `interceptor validate`: checks that a pod's interception really works, as Istio's
//! `istio-validation` init container does (the Istio CNI plugin runs it in place of istio-init).
//!
//! Everything runs as the proxy's uid/gid with no capabilities, even when started as root: the
//! socket work happens on dedicated threads that first enter the pod's netns and then change
//! their *own* credentials with raw `setresgid`/`setresuid` syscalls (glibc's wrappers would
//! change every thread of the process) and drop every capability with `capset`. Two checks:
//!
//! 1. **inbound redirect** (Istio's own check): listeners on 127.0.0.1:`-p` and 127.0.0.1:`-z`
//!    (plus `[::1]` when IPv6 loopback is up in the netns); a connection from 127.0.0.1 to
//!    127.0.0.6:`--iptables-probe-port`, made as the proxy uid, must be accepted on `-z` with
//!    `SO_ORIGINAL_DST` = 127.0.0.6:probe port. That is the `-o lo ! -d 127.0.0.1 --uid-owner
//!    PROXY -j ISTIO_IN_REDIRECT` rule (or the eBPF decision it models).
//! 2. **outbound redirect**: a connection to 192.0.2.1:probe port (TEST-NET-1, as Linkerd's
//!    network validator dials) made as a *non-proxy* uid (65534, nobody, or the next free id
//!    below it: the proxy's own connections are never redirected outbound) must be accepted on
//!    `-p` with `SO_ORIGINAL_DST` = 192.0.2.1:probe port. The address is fixed: if the pod's
//!    config does not capture it (`-i` not `*` and not covering it, or `-x` excluding it) this
//!    check fails by design. When it is not captured the SYN follows the pod's own route, to a
//!    documentation address nobody answers. Without the privilege to switch to that uid (started
//!    as the proxy uid itself, as Istio's validation container is) the check is skipped.
//!
//! Both are probed every second until `--probe-timeout`. Success exits 0 and prints what was
//! verified; a failed check exits 126 (Istio's validation error code) naming the check and what
//! was seen; bad flags exit 2 like the rest of the CLI.

mod creds;
mod probe_loop;
mod sockets;

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use interceptor_common::config::ConfigError;

use creds::{become_unprivileged, enter_netns};
use probe_loop::probe_loop;
use sockets::{dial, Dial};

use crate::cli::ValidateArgs;

/// Exit code of a failed validation (Istio's `constants.ValidationErrorCode`).
pub const EXIT_VALIDATION_FAILED: i32 = 126;
/// Where the inbound probe connects: Envoy's passthrough address, on `lo` but not 127.0.0.1.
pub const INBOUND_PROBE_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// The inbound probe's source address.
pub const INBOUND_PROBE_SRC: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Where the outbound probe connects: TEST-NET-1 (RFC 5737), never a real host.
pub const OUTBOUND_PROBE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The outbound probe's uid/gid: the first of these that is neither the proxy uid nor its gid.
const APP_ID_CANDIDATES: [u32; 3] = [65534, 65533, 65532];
/// Istio probes once a second.
const TICK: Duration = Duration::from_secs(1);
/// A probe client socket not accepted by then is closed.
const PROBE_KEEP: Duration = Duration::from_secs(3);

/// The validated command line.
#[derive(Debug, Clone)]
pub struct Params {
    pub netns: Option<PathBuf>,
    pub proxy_port: u16,
    pub inbound_capture_port: u16,
    pub probe_port: u16,
    pub timeout: Duration,
    /// `--probe-timeout` as given, for messages.
    pub timeout_text: String,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
}

fn port(flag: &'static str, s: &str) -> Result<u16, ConfigError> {
    s.trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ConfigError::new(flag, s, "not a port number (1-65535)"))
}

fn id(flag: &'static str, s: &str) -> Result<u32, ConfigError> {
    s.trim()
        .parse::<u32>()
        .map_err(|_| ConfigError::new(flag, s, "not a numeric id (0-4294967295)"))
}

/// Checks the flags; bad input is a `ConfigError` (exit 2), nothing is probed.
pub fn params(a: &ValidateArgs) -> Result<Params, ConfigError> {
    if let Some(ns) = &a.network_namespace {
        crate::config::check_netns(ns)?;
    }
    let proxy_port = port("--envoy-port", &a.envoy_port)?;
    let inbound_capture_port = port("--inbound-capture-port", &a.inbound_capture_port)?;
    if inbound_capture_port == proxy_port {
        return Err(ConfigError::new(
            "--inbound-capture-port",
            &a.inbound_capture_port,
            "must differ from --envoy-port (the checks tell the two listeners apart)",
        ));
    }
    let probe_port = port("--iptables-probe-port", &a.iptables_probe_port)?;
    let timeout = crate::config::parse_go_duration(&a.probe_timeout)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            ConfigError::new(
                "--probe-timeout",
                &a.probe_timeout,
                "not a positive duration such as 5s or 500ms",
            )
        })?;
    let proxy_uid = id("--proxy-uid", &a.proxy_uid)?;
    let proxy_gid = match &a.proxy_gid {
        Some(g) => id("--proxy-gid", g)?,
        None => proxy_uid,
    };
    Ok(Params {
        netns: a.network_namespace.clone(),
        proxy_port,
        inbound_capture_port,
        probe_port,
        timeout,
        timeout_text: a.probe_timeout.trim().to_string(),
        proxy_uid,
        proxy_gid,
    })
}

/// The two checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Inbound,
    Outbound,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Check::Inbound => "inbound redirect check",
            Check::Outbound => "outbound redirect check",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed(String),
    Failed(String),
    Skipped(String),
}

/// What a validation run found.
#[derive(Debug, Clone)]
pub struct Report {
    /// Where and as whom the checks ran.
    pub context: Vec<String>,
    pub results: Vec<(Check, Outcome)>,
}

impl Report {
    pub fn passed(&self) -> bool {
        !self
            .results
            .iter()
            .any(|(_, o)| matches!(o, Outcome::Failed(_)))
    }
}

/// `interceptor validate`: exit 0 when every check passed, 126 when one failed, 2 on bad flags.
pub fn run(args: &ValidateArgs) -> Result<Result<(), ConfigError>> {
    let p = match params(args) {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    let report = match validate(&p) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("interceptor validate: FAILED: {e:#}");
            std::process::exit(EXIT_VALIDATION_FAILED);
        }
    };
    for line in &report.context {
        println!("{line}");
    }
    for (check, outcome) in &report.results {
        match outcome {
            Outcome::Passed(m) => println!("ok: {check}: {m}"),
            Outcome::Skipped(m) => println!("skipped: {check}: {m}"),
            Outcome::Failed(m) => eprintln!("FAILED: {check}: {m}"),
        }
    }
    if report.passed() {
        println!("validation passed");
        return Ok(Ok(()));
    }
    let failed: Vec<String> = report
        .results
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Failed(_)))
        .map(|(c, _)| c.to_string())
        .collect();
    eprintln!(
        "interceptor validate: validation failed ({}); exit {EXIT_VALIDATION_FAILED}",
        failed.join(", ")
    );
    let _ = io::stdout().flush();
    std::process::exit(EXIT_VALIDATION_FAILED);
}

/// The first candidate id that is neither the proxy uid nor its gid.
fn app_id(p: &Params) -> u32 {
    APP_ID_CANDIDATES
        .into_iter()
        .find(|i| *i != p.proxy_uid && *i != p.proxy_gid)
        .unwrap_or(APP_ID_CANDIDATES[0])
}

/// Runs both checks; `Err` only when they could not run at all (netns, credentials, listeners).
pub fn validate(p: &Params) -> Result<Report> {
    let ns_file = p
        .netns
        .as_deref()
        .map(|path| File::open(path).with_context(|| format!("opening {}", path.display())))
        .transpose()?;
    let started_as_root = nix::unistd::geteuid().is_root();
    let app = app_id(p);
    let outbound_dst = SocketAddrV4::new(OUTBOUND_PROBE_IP, p.probe_port);
    let ns_ref = ns_file.as_ref();
    std::thread::scope(|s| {
        let (req_tx, req_rx) = mpsc::channel::<()>();
        let (resp_tx, resp_rx) = mpsc::channel::<Result<Dial>>();
        let (ready_tx, ready_rx) = mpsc::channel::<std::result::Result<(), String>>();
        // The outbound client: a non-proxy uid, dialing on request.
        std::thread::Builder::new()
            .name("validate-app".into())
            .spawn_scoped(s, move || {
                let setup = enter_netns(ns_ref).and_then(|()| become_unprivileged(app, app));
                let ok = setup.is_ok();
                let _ = ready_tx.send(setup.map_err(|e| format!("{e:#}")));
                if !ok {
                    return;
                }
                for () in req_rx {
                    if resp_tx.send(dial(None, outbound_dst)).is_err() {
                        break;
                    }
                }
            })
            .context("spawning the outbound client thread")?;
        // The proxy side: listeners, inbound client, and the probe loop.
        let proxy = std::thread::Builder::new()
            .name("validate-proxy".into())
            .spawn_scoped(s, move || -> Result<Report> {
                enter_netns(ns_ref)?;
                become_unprivileged(p.proxy_uid, p.proxy_gid).with_context(|| {
                    format!(
                        "running as the proxy uid {} gid {}",
                        p.proxy_uid, p.proxy_gid
                    )
                })?;
                let app_ready = ready_rx
                    .recv_timeout(Duration::from_secs(10))
                    .unwrap_or_else(|_| Err("the client thread did not start".into()));
                probe_loop(p, started_as_root, app, app_ready, req_tx, resp_rx)
            })
            .context("spawning the proxy thread")?;
        proxy
            .join()
            .map_err(|_| anyhow!("the validation thread panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Params, ConfigError> {
        let mut argv = vec!["interceptor", "validate"];
        argv.extend_from_slice(args);
        let cli = crate::cli::Cli::try_parse_from(argv).expect("clap");
        match cli.command {
            crate::cli::Command::Validate(a) => params(&a),
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_are_istios() {
        let p = parse(&[]).unwrap();
        assert_eq!(
            (p.proxy_port, p.inbound_capture_port, p.probe_port),
            (15001, 15006, 15002)
        );
        assert_eq!(p.timeout, Duration::from_secs(5));
        assert_eq!((p.proxy_uid, p.proxy_gid), (1337, 1337));
        assert_eq!(app_id(&p), 65534);
    }

    #[test]
    fn flags() {
        let p = parse(&[
            "-p",
            "16001",
            "-z",
            "16006",
            "--iptables-probe-port",
            "16002",
            "--probe-timeout",
            "500ms",
            "--proxy-uid",
            "65534",
        ])
        .unwrap();
        assert_eq!(
            (p.proxy_port, p.inbound_capture_port, p.probe_port),
            (16001, 16006, 16002)
        );
        assert_eq!(p.timeout, Duration::from_millis(500));
        assert_eq!((p.proxy_uid, p.proxy_gid), (65534, 65534));
        assert_eq!(app_id(&p), 65533);
    }

    #[test]
    fn bad_flags_name_the_flag() {
        for (args, flag) in [
            (&["-p", "0"][..], "--envoy-port"),
            (&["-z", "x"][..], "--inbound-capture-port"),
            (&["-z", "15001"][..], "--inbound-capture-port"),
            (
                &["--iptables-probe-port", "70000"][..],
                "--iptables-probe-port",
            ),
            (&["--probe-timeout", "5"][..], "--probe-timeout"),
            (&["--probe-timeout", "0s"][..], "--probe-timeout"),
            (&["--proxy-uid=-1"][..], "--proxy-uid"),
            (&["--proxy-gid", "abc"][..], "--proxy-gid"),
            (
                &["--network-namespace", "/nonexistent/netns"][..],
                "--network-namespace",
            ),
            (
                &["--network-namespace", "/etc/hostname"][..],
                "--network-namespace",
            ),
        ] {
            let e = parse(args).expect_err(&format!("{args:?} accepted"));
            assert_eq!(e.flag, flag, "{args:?}");
        }
    }
}
