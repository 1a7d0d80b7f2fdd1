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
mod run;
mod sockets;

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use interceptor_common::config::ConfigError;

pub use run::{run, validate};

/// Exit code of a failed validation (Istio's `constants.ValidationErrorCode`).
pub const EXIT_VALIDATION_FAILED: i32 = 126;
/// Where the inbound probe connects: Envoy's passthrough address, on `lo` but not 127.0.0.1.
pub const INBOUND_PROBE_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// The inbound probe's source address.
pub const INBOUND_PROBE_SRC: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Where the outbound probe connects: TEST-NET-1 (RFC 5737), never a real host.
pub const OUTBOUND_PROBE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Istio probes once a second.
const TICK: Duration = Duration::from_secs(1);
/// A probe client socket not accepted by then is closed.
const PROBE_KEEP: Duration = Duration::from_secs(3);

/// What to check, typed (`cli::validate` parses the flags, `apply --run-validation` takes its
/// config's values); `checked` does the checks across fields.
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

impl Params {
    /// The checks across flags, once each is parsed: the two listeners must be told apart and
    /// the timeout must be positive. Bad input is a `ConfigError` (exit 2), nothing is probed.
    pub fn checked(self) -> Result<Self, ConfigError> {
        if self.inbound_capture_port == self.proxy_port {
            return Err(ConfigError::new(
                "--inbound-capture-port",
                self.inbound_capture_port.to_string(),
                "must differ from --envoy-port (the checks tell the two listeners apart)",
            ));
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::new(
                "--probe-timeout",
                &self.timeout_text,
                "not a positive duration such as 5s or 500ms",
            ));
        }
        Ok(self)
    }
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
