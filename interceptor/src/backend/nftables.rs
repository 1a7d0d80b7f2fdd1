//! The nftables backend: one `nft -f -` transaction identical to istio-nftables' output.

use interceptor_common::config::Config;

/// Renders the nft transaction istio-iptables --native-nftables would apply.
pub fn render(_cfg: &Config) -> String {
    unimplemented!("nftables emitter")
}

/// The tables this backend owns.
pub const TABLES: &[&str] = &["istio-proxy-nat", "istio-proxy-mangle", "istio-proxy-raw"];
