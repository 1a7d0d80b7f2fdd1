//! The iptables backend: restore documents identical to istio-iptables' output.

use interceptor_common::config::Config;

/// The `iptables-restore --noflush` inputs for one config: IPv4 always, IPv6 when enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreDocs {
    pub v4: String,
    pub v6: Option<String>,
}

/// Renders the restore documents istio-iptables would feed to `iptables-restore --noflush`.
pub fn render(_cfg: &Config) -> RestoreDocs {
    unimplemented!("iptables emitter")
}
