//! Istio's defaults for the configurable values (`config.DefaultConfig()`, and what the sidecar
//! injector passes: `-p 15001 -z 15006 -u 1337`) and the DNS proxy's fixed port, each spelled
//! once. The config's defaults, the CLI flags, the pod annotations and the netfilter plan read
//! them; nothing here depends on the rest of the crate.

/// `-p`: the proxy's outbound port.
pub const PROXY_PORT: u16 = 15001;
/// `-z`: the proxy's inbound capture port.
pub const INBOUND_CAPTURE_PORT: u16 = 15006;
/// `-e`: the HBONE tunnel port.
pub const INBOUND_TUNNEL_PORT: u16 = 15008;
/// `-u`/`-g`: the proxy's uid (and gid) when `$ENVOY_USER` names no user.
pub const PROXY_UID: u32 = 1337;
/// `-t`: the TPROXY mark.
pub const TPROXY_MARK: u32 = 1337;
/// `-r`: the TPROXY routing table.
pub const TPROXY_ROUTE_TABLE: u32 = 133;
/// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`.
pub const IPV4_LOOPBACK_CIDR: &str = "127.0.0.1/32";
/// The agent's Prometheus, health and status ports.
pub const AGENT_PORTS: [u16; 3] = [15090, 15021, 15020];

/// `--bind-guard-ports`' default: every port a default sidecar listens on (outbound, inbound,
/// tunnel, DNS, then the agent's), comma separated.
pub fn default_bind_guard_ports() -> String {
    let proxy = [
        PROXY_PORT,
        INBOUND_CAPTURE_PORT,
        INBOUND_TUNNEL_PORT,
        DNS_PROXY_PORT,
    ];
    let all: Vec<String> = proxy
        .iter()
        .chain(&AGENT_PORTS)
        .map(u16::to_string)
        .collect();
    all.join(",")
}

/// Where istio-agent's DNS proxy listens (fixed in Istio, not a flag).
pub const DNS_PROXY_PORT: u16 = 15053;
