//! From a pod's Istio annotations and its `istio-proxy` container's env/securityContext to the
//! interception config, with the rules of Istio's CNI plugin in sidecar mode
//! (`cni/pkg/plugin/sidecar_redirect.go` `NewRedirect` and `sidecar_iptables_linux.go`
//! `Program`): the same keys, defaults, validation of each annotation value, the same string
//! handling of the inbound exclude list, then `config.DefaultConfig()` plus those values.
//!
//! Where Istio would only fail later (a value its annotation validator lets through but
//! `istio-iptables` or `iptables-restore` rejects), the whole config is validated here as well
//! ([`Redirect::validated`]), and the error names the annotation the value came from.

use std::collections::BTreeMap;
use std::fmt;

use interceptor_common::config::{ConfigError, RawConfig};
use interceptor_common::defaults;

/// The annotation keys Istio's CNI plugin reads (istio.io/api `annotation`).
pub mod keys {
    pub const INJECT: &str = "sidecar.istio.io/inject";
    pub const STATUS: &str = "sidecar.istio.io/status";
    pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
    pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
    pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
    pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
    pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
    pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
    pub const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
    /// Deprecated; `istio.io/reroute-virtual-interfaces` wins when both are present.
    pub const KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
    pub const REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";
}

/// The `istio-proxy` container env variables Istio's CNI plugin reads.
pub mod env {
    pub const DNS_CAPTURE: &str = "ISTIO_META_DNS_CAPTURE";
    pub const DUAL_STACK: &str = "ISTIO_DUAL_STACK";
    pub const INVALID_DROP: &str = "INVALID_DROP";
    pub const DISABLE_ENVOY: &str = "DISABLE_ENVOY";
}

/// Istio's constants (`sidecar_redirect.go`).
const REDIRECT_MODE_REDIRECT: &str = "REDIRECT";
const REDIRECT_MODE_TPROXY: &str = "TPROXY";
const DEFAULT_REDIRECT_TO_PORT: u16 = defaults::PROXY_PORT;
const DEFAULT_NO_REDIRECT_UID: u32 = defaults::PROXY_UID;
const DEFAULT_NO_REDIRECT_GID: u32 = defaults::PROXY_UID;
const DEFAULT_REDIRECT_IP_CIDR: &str = "*";
const DEFAULT_REDIRECT_EXCLUDE_IP_CIDR: &str = "";
/// The proxy's status port: the default of both exclude-port annotations.
const DEFAULT_REDIRECT_EXCLUDE_PORT: &str = "15020";
const DEFAULT_INCLUDE_INBOUND_PORTS: &str = "*";
const DEFAULT_INCLUDE_OUTBOUND_PORTS: &str = "";
const DEFAULT_VIRTUAL_INTERFACES: &str = "";
const DEFAULT_EXCLUDE_INTERFACES: &str = "";
/// Always appended to the inbound exclude list (status, health, Prometheus ports).
const ALWAYS_EXCLUDED_INBOUND: &str = "15020,15021,15090";

/// What Istio's plugin knows about a pod (`PodInfo`), from wherever it came.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// The pod's annotations; `None` when nobody told us (then Istio's defaults apply and the
    /// pod is not screened for injection).
    pub annotations: Option<BTreeMap<String, String>>,
    /// The `istio-proxy` container's env.
    pub proxy_env: BTreeMap<String, String>,
    /// The `istio-proxy` container's `securityContext.runAsUser` / `runAsGroup`.
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
}

/// A bad value: where it came from (annotation key, env name or field), the value, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationError {
    pub source: String,
    pub value: String,
    pub reason: String,
}

impl AnnotationError {
    fn new(source: &str, value: &str, reason: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for AnnotationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid value {:?} for {}: {}",
            self.value, self.source, self.reason
        )
    }
}

impl std::error::Error for AnnotationError {}

/// Go's `strconv.ParseBool`.
pub fn go_parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Why Istio's plugin would leave this pod alone (pass through without capture), if it would.
/// Only applied when the annotations are known: a pod whose annotations we were not given is
/// captured with the defaults.
pub fn skip_reason(pi: &PodInfo) -> Option<String> {
    if let Some(v) = pi.proxy_env.get(env::DISABLE_ENVOY) {
        if go_parse_bool(v) == Some(true) {
            return Some(format!("{}={v} on istio-proxy", env::DISABLE_ENVOY));
        }
    }
    let annotations = pi.annotations.as_ref()?;
    if let Some(v) = annotations.get(keys::INJECT).filter(|v| !v.is_empty()) {
        if go_parse_bool(v) == Some(false) {
            return Some(format!("annotation {}={v}", keys::INJECT));
        }
    }
    if !annotations.contains_key(keys::STATUS) {
        return Some(format!(
            "no {} annotation (no sidecar was injected)",
            keys::STATUS
        ));
    }
    None
}

// --------------------------------------------------------------------------------------------
// Istio's annotation validators.

fn validate_interception_mode(mode: &str) -> Result<(), String> {
    match mode {
        REDIRECT_MODE_REDIRECT | REDIRECT_MODE_TPROXY => Ok(()),
        _ => Err(format!(
            "interceptionMode invalid: must be {REDIRECT_MODE_REDIRECT} or {REDIRECT_MODE_TPROXY}"
        )),
    }
}

/// Go's `netip.ParsePrefix`: an address (no IPv6 zone), `/`, and a decimal prefix length
/// without sign or leading zero, at most the address's bit length.
fn go_parse_prefix(s: &str) -> Result<(), String> {
    let Some((addr, bits)) = s.rsplit_once('/') else {
        return Err("no '/'".into());
    };
    if addr.contains('%') {
        return Err("IPv6 zones cannot be present in a prefix".into());
    }
    let max = match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => 32,
        Ok(std::net::IpAddr::V6(_)) => 128,
        Err(_) => return Err(format!("ParseAddr({addr:?}): not an IP address")),
    };
    let digits = !bits.is_empty() && bits.bytes().all(|b| b.is_ascii_digit());
    let leading_zero = bits.len() > 1 && bits.starts_with('0');
    match bits.parse::<u32>() {
        Ok(n) if digits && !leading_zero && n <= max => Ok(()),
        _ => Err(format!("bad bits after slash: {bits:?}")),
    }
}

fn validate_cidr_list(cidrs: &str) -> Result<(), String> {
    if cidrs.is_empty() {
        return Ok(());
    }
    // As Istio: split on commas without trimming, so a space or an empty item is an error.
    for cidr in cidrs.split(',') {
        go_parse_prefix(cidr).map_err(|e| format!("failed parsing cidr '{cidr}': {e}"))?;
    }
    Ok(())
}

fn validate_cidr_list_with_wildcard(ranges: &str) -> Result<(), String> {
    if ranges == "*" {
        return Ok(());
    }
    validate_cidr_list(ranges).map_err(|e| format!("IPRanges invalid: {e}"))
}

/// Go's `strconv.ParseUint(strings.TrimSpace(s), 10, 16)`.
fn go_parse_port(s: &str) -> Result<u16, String> {
    let t = s.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("failed parsing port {s:?}: invalid syntax"));
    }
    t.parse::<u16>()
        .map_err(|_| format!("failed parsing port {s:?}: value out of range"))
}

fn validate_port_list(ports: &str) -> Result<(), String> {
    let trimmed = ports.trim();
    if trimmed.is_empty() {
        return Ok(());
    }
    for p in trimmed.split(',') {
        go_parse_port(p).map_err(|e| format!("portList {ports:?} invalid: {e}"))?;
    }
    Ok(())
}

fn validate_port_list_with_wildcard(ports: &str) -> Result<(), String> {
    if ports == "*" {
        return Ok(());
    }
    validate_port_list(ports)
}

/// Istio's `netutil.ValidateInterfaceNames` (excludeInterfaces).
fn validate_interface_names(list: &str) -> Result<(), String> {
    if list.is_empty() {
        return Ok(());
    }
    for name in list.split(',') {
        let name = name.trim();
        if name.is_empty() {
            return Err("empty interface name".into());
        }
        if name.len() > 15 {
            return Err(format!("interface name {name:?} too long (max 15 chars)"));
        }
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
            return Err(format!(
                "interface name {name:?} contains invalid characters"
            ));
        }
    }
    Ok(())
}

fn always_valid(_: &str) -> Result<(), String> {
    Ok(())
}

/// Istio's `getAnnotationOrDefault`: the annotation's value if present (validated), else the
/// default. Returns whether it was found.
fn annotation_or_default(
    annotations: &BTreeMap<String, String>,
    key: &str,
    default: &str,
    validate: fn(&str) -> Result<(), String>,
) -> Result<(bool, String), AnnotationError> {
    match annotations.get(key) {
        Some(v) => {
            validate(v).map_err(|reason| AnnotationError::new(key, v, reason))?;
            Ok((true, v.clone()))
        }
        None => Ok((false, default.to_string())),
    }
}

/// Istio's `dedupPorts(splitPorts(..))`: split on commas, first occurrence wins, no trimming.
fn dedup_ports(list: &str) -> String {
    let mut seen = std::collections::HashSet::new();
    list.split(',')
        .filter(|p| seen.insert(*p))
        .collect::<Vec<_>>()
        .join(",")
}

/// Istio's `Redirect`: the pod's capture settings as strings, before they become a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub target_port: String,
    pub redirect_mode: String,
    pub no_redirect_uid: String,
    pub no_redirect_gid: String,
    pub include_ip_cidrs: String,
    pub exclude_ip_cidrs: String,
    pub exclude_inbound_ports: String,
    pub exclude_outbound_ports: String,
    pub include_inbound_ports: String,
    pub include_outbound_ports: String,
    pub reroute_virtual_interfaces: String,
    /// Which annotation `reroute_virtual_interfaces` came from (for error messages).
    pub reroute_virtual_interfaces_key: &'static str,
    pub exclude_interfaces: String,
    pub dns_redirect: bool,
    pub dual_stack: bool,
    pub invalid_drop: bool,
    /// Env values Istio ignores with a warning (not booleans).
    pub warnings: Vec<String>,
}

fn proxy_id(v: Option<i64>, field: &str, default: u32) -> Result<String, AnnotationError> {
    match v {
        // As Istio: unset or 0 (root) means the default proxy id.
        None | Some(0) => Ok(default.to_string()),
        Some(n) if (1..=i64::from(u32::MAX)).contains(&n) => Ok(n.to_string()),
        Some(n) => Err(AnnotationError::new(
            field,
            &n.to_string(),
            "not a uid/gid (0-4294967295)",
        )),
    }
}

impl Redirect {
    /// Istio's `NewRedirect`.
    pub fn from_pod(pi: &PodInfo) -> Result<Self, AnnotationError> {
        let empty = BTreeMap::new();
        let a = pi.annotations.as_ref().unwrap_or(&empty);
        let get = |key, default, validate| annotation_or_default(a, key, default, validate);

        let (_, redirect_mode) = get(
            keys::INTERCEPTION_MODE,
            REDIRECT_MODE_REDIRECT,
            validate_interception_mode,
        )?;
        let no_redirect_uid = proxy_id(pi.run_as_user, "runAsUser", DEFAULT_NO_REDIRECT_UID)?;
        let no_redirect_gid = proxy_id(pi.run_as_group, "runAsGroup", DEFAULT_NO_REDIRECT_GID)?;
        let (_, include_ip_cidrs) = get(
            keys::INCLUDE_OUTBOUND_IP_RANGES,
            DEFAULT_REDIRECT_IP_CIDR,
            validate_cidr_list_with_wildcard,
        )?;
        let (_, exclude_ip_cidrs) = get(
            keys::EXCLUDE_OUTBOUND_IP_RANGES,
            DEFAULT_REDIRECT_EXCLUDE_IP_CIDR,
            validate_cidr_list,
        )?;
        let (_, exclude_inbound_ports) = get(
            keys::EXCLUDE_INBOUND_PORTS,
            DEFAULT_REDIRECT_EXCLUDE_PORT,
            validate_port_list_with_wildcard,
        )?;
        let (_, include_inbound_ports) = get(
            keys::INCLUDE_INBOUND_PORTS,
            DEFAULT_INCLUDE_INBOUND_PORTS,
            validate_port_list_with_wildcard,
        )?;
        let (_, exclude_outbound_ports) = get(
            keys::EXCLUDE_OUTBOUND_PORTS,
            DEFAULT_REDIRECT_EXCLUDE_PORT,
            validate_port_list_with_wildcard,
        )?;
        let (_, include_outbound_ports) = get(
            keys::INCLUDE_OUTBOUND_PORTS,
            DEFAULT_INCLUDE_OUTBOUND_PORTS,
            validate_port_list_with_wildcard,
        )?;
        // The status, health and Prometheus ports are always excluded (string handling as
        // Istio's: trim, add a separating comma unless one ends the list, dedup).
        let mut exclude_inbound_ports = exclude_inbound_ports.trim().to_string();
        if !exclude_inbound_ports.is_empty() && !exclude_inbound_ports.ends_with(',') {
            exclude_inbound_ports.push(',');
        }
        exclude_inbound_ports.push_str(ALWAYS_EXCLUDED_INBOUND);
        let exclude_inbound_ports = dedup_ports(&exclude_inbound_ports);
        let (_, exclude_interfaces) = get(
            keys::EXCLUDE_INTERFACES,
            DEFAULT_EXCLUDE_INTERFACES,
            validate_interface_names,
        )?;
        let (found, mut reroute_virtual_interfaces) = get(
            keys::REROUTE_VIRTUAL_INTERFACES,
            DEFAULT_VIRTUAL_INTERFACES,
            always_valid,
        )?;
        let mut reroute_virtual_interfaces_key = keys::REROUTE_VIRTUAL_INTERFACES;
        if !found {
            let (found, v) = get(
                keys::KUBEVIRT_INTERFACES,
                DEFAULT_VIRTUAL_INTERFACES,
                always_valid,
            )?;
            reroute_virtual_interfaces = v;
            if found {
                reroute_virtual_interfaces_key = keys::KUBEVIRT_INTERFACES;
            }
        }
        let mut warnings = Vec::new();
        let mut env_bool = |name: &str| match pi.proxy_env.get(name) {
            None => false,
            Some(v) => go_parse_bool(v).unwrap_or_else(|| {
                warnings.push(format!(
                    "cannot parse {name}={v:?} on istio-proxy as a boolean; using false (as Istio)"
                ));
                false
            }),
        };
        let dns_redirect = env_bool(env::DNS_CAPTURE);
        let dual_stack = env_bool(env::DUAL_STACK);
        let invalid_drop = env_bool(env::INVALID_DROP);
        Ok(Self {
            target_port: DEFAULT_REDIRECT_TO_PORT.to_string(),
            redirect_mode,
            no_redirect_uid,
            no_redirect_gid,
            include_ip_cidrs,
            exclude_ip_cidrs,
            exclude_inbound_ports,
            exclude_outbound_ports,
            include_inbound_ports,
            include_outbound_ports,
            reroute_virtual_interfaces,
            reroute_virtual_interfaces_key,
            exclude_interfaces,
            dns_redirect,
            dual_stack,
            invalid_drop,
            warnings,
        })
    }

    /// Istio's `Program`: `config.DefaultConfig()` plus the redirect's values, then what
    /// `FillConfigFromEnvironment` adds (the node-level env, the detected IPv6). DNS capture in
    /// CNI mode is capture-all, so resolv.conf is never read.
    pub fn raw_config(&self, enable_ipv6: bool, node: &NodeEnv) -> RawConfig {
        RawConfig {
            proxy_port: self.target_port.clone(),
            proxy_uid: self.no_redirect_uid.clone(),
            proxy_gid: self.no_redirect_gid.clone(),
            inbound_interception_mode: self.redirect_mode.clone(),
            outbound_ip_ranges_include: self.include_ip_cidrs.clone(),
            inbound_ports_exclude: self.exclude_inbound_ports.clone(),
            inbound_ports_include: self.include_inbound_ports.clone(),
            exclude_interfaces: self.exclude_interfaces.clone(),
            outbound_ports_exclude: self.exclude_outbound_ports.clone(),
            outbound_ports_include: self.include_outbound_ports.clone(),
            outbound_ip_ranges_exclude: self.exclude_ip_cidrs.clone(),
            reroute_virtual_interfaces: self.reroute_virtual_interfaces.clone(),
            redirect_dns: self.dns_redirect,
            capture_all_dns: self.dns_redirect,
            drop_invalid: self.invalid_drop,
            owner_groups_include: node.owner_groups_include.clone(),
            owner_groups_exclude: node.owner_groups_exclude.clone(),
            host_ipv4_loopback_cidr: node.host_ipv4_loopback_cidr.clone(),
            enable_ipv6,
            dns_servers: String::new(),
            ..RawConfig::default()
        }
    }

    /// Where the value a config error names came from.
    pub fn source_of(&self, e: &ConfigError) -> String {
        match e.flag {
            "--istio-inbound-interception-mode" => keys::INTERCEPTION_MODE.into(),
            "--istio-inbound-ports" => keys::INCLUDE_INBOUND_PORTS.into(),
            "--istio-local-exclude-ports" => keys::EXCLUDE_INBOUND_PORTS.into(),
            "--istio-exclude-interfaces" => keys::EXCLUDE_INTERFACES.into(),
            "--istio-service-cidr" => keys::INCLUDE_OUTBOUND_IP_RANGES.into(),
            "--istio-service-exclude-cidr" => keys::EXCLUDE_OUTBOUND_IP_RANGES.into(),
            "--istio-outbound-ports" => keys::INCLUDE_OUTBOUND_PORTS.into(),
            "--istio-local-outbound-ports-exclude" => keys::EXCLUDE_OUTBOUND_PORTS.into(),
            "--kube-virt-interfaces" => self.reroute_virtual_interfaces_key.into(),
            "--proxy-uid" => "runAsUser".into(),
            "--proxy-gid" => "runAsGroup".into(),
            other => other.into(),
        }
    }

    /// [`Redirect::raw_config`], validated as the daemon will validate it; an error names the
    /// annotation (or env variable) the bad value came from.
    pub fn validated(
        &self,
        enable_ipv6: bool,
        node: &NodeEnv,
    ) -> Result<RawConfig, AnnotationError> {
        let raw = self.raw_config(enable_ipv6, node);
        raw.parse().map_err(|e| AnnotationError {
            source: self.source_of(&e),
            value: e.value.clone(),
            reason: e.reason.clone(),
        })?;
        Ok(raw)
    }
}

/// The env-only settings `FillConfigFromEnvironment` reads from the plugin's own process
/// environment (the runtime's): outbound owner groups and the host loopback CIDR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEnv {
    pub owner_groups_include: String,
    pub owner_groups_exclude: String,
    pub host_ipv4_loopback_cidr: String,
}

impl Default for NodeEnv {
    fn default() -> Self {
        Self {
            owner_groups_include: "*".into(),
            owner_groups_exclude: String::new(),
            host_ipv4_loopback_cidr: "127.0.0.1/32".into(),
        }
    }
}

impl NodeEnv {
    pub fn from_process() -> Self {
        let d = Self::default();
        let get = |k: &str, d: String| std::env::var(k).unwrap_or(d);
        Self {
            owner_groups_include: get("ISTIO_OUTBOUND_OWNER_GROUPS", d.owner_groups_include),
            owner_groups_exclude: get(
                "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
                d.owner_groups_exclude,
            ),
            host_ipv4_loopback_cidr: get(
                "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
                d.host_ipv4_loopback_cidr,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotations: &[(&str, &str)]) -> PodInfo {
        let mut a: BTreeMap<String, String> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        a.insert(keys::STATUS.into(), "{}".into());
        PodInfo {
            annotations: Some(a),
            ..Default::default()
        }
    }

    fn redirect(annotations: &[(&str, &str)]) -> Result<Redirect, AnnotationError> {
        Redirect::from_pod(&pod(annotations))
    }

    #[test]
    fn defaults() {
        let r = Redirect::from_pod(&PodInfo::default()).unwrap();
        assert_eq!(r.redirect_mode, "REDIRECT");
        assert_eq!(r.include_ip_cidrs, "*");
        assert_eq!(r.include_inbound_ports, "*");
        assert_eq!(r.exclude_inbound_ports, "15020,15021,15090");
        assert_eq!(r.exclude_outbound_ports, "15020");
        assert_eq!(
            (r.no_redirect_uid.as_str(), r.no_redirect_gid.as_str()),
            ("1337", "1337")
        );
        r.validated(false, &NodeEnv::default()).unwrap();
    }

    #[test]
    fn exclude_inbound_ports_string_handling() {
        let r = redirect(&[(keys::EXCLUDE_INBOUND_PORTS, " 3333,15021 ")]).unwrap();
        assert_eq!(r.exclude_inbound_ports, "3333,15021,15020,15090");
        let r = redirect(&[(keys::EXCLUDE_INBOUND_PORTS, "")]).unwrap();
        assert_eq!(r.exclude_inbound_ports, "15020,15021,15090");
        // Istio validates before trimming the list: a trailing comma is an empty item.
        assert!(redirect(&[(keys::EXCLUDE_INBOUND_PORTS, "3333,")]).is_err());
    }

    #[test]
    fn validation_names_the_annotation_and_value() {
        let e = redirect(&[(keys::INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33")]).unwrap_err();
        assert_eq!(e.source, keys::INCLUDE_OUTBOUND_IP_RANGES);
        assert_eq!(e.value, "10.0.0.0/33");
        assert!(e.to_string().contains("10.0.0.0/33"), "{e}");
        for bad in [
            "10.0.0.0/8, 11.0.0.0/8",
            "10.0.0.0",
            "010.0.0.0/8",
            "10.0.0.0/08",
            "*",
        ] {
            assert!(
                redirect(&[(keys::EXCLUDE_OUTBOUND_IP_RANGES, bad)]).is_err(),
                "{bad}"
            );
        }
        assert!(redirect(&[(keys::INCLUDE_OUTBOUND_IP_RANGES, "*")]).is_ok());
        assert!(redirect(&[(keys::INTERCEPTION_MODE, "tproxy")]).is_err());
        assert!(redirect(&[(keys::INCLUDE_INBOUND_PORTS, "80,70000")]).is_err());
        assert!(redirect(&[(keys::INCLUDE_INBOUND_PORTS, "80, 90")]).is_ok());
        assert!(redirect(&[(keys::INCLUDE_INBOUND_PORTS, "+80")]).is_err());
        assert!(redirect(&[(keys::EXCLUDE_INTERFACES, "eth0,bad/if")]).is_err());
        assert!(redirect(&[(keys::EXCLUDE_INTERFACES, "eth0, net1")]).is_ok());
    }

    #[test]
    fn later_validation_names_the_annotation() {
        // Istio's validator accepts port 0 and any virtual interface name; the config does not.
        let r = redirect(&[(keys::EXCLUDE_OUTBOUND_PORTS, "0")]).unwrap();
        let e = r.validated(false, &NodeEnv::default()).unwrap_err();
        assert_eq!(e.source, keys::EXCLUDE_OUTBOUND_PORTS);
        let r = redirect(&[(keys::KUBEVIRT_INTERFACES, "a/b")]).unwrap();
        let e = r.validated(false, &NodeEnv::default()).unwrap_err();
        assert_eq!(e.source, keys::KUBEVIRT_INTERFACES);
    }

    #[test]
    fn reroute_beats_kubevirt() {
        let r = redirect(&[
            (keys::KUBEVIRT_INTERFACES, "old0"),
            (keys::REROUTE_VIRTUAL_INTERFACES, "new0"),
        ])
        .unwrap();
        assert_eq!(r.reroute_virtual_interfaces, "new0");
        let r = redirect(&[(keys::KUBEVIRT_INTERFACES, "old0")]).unwrap();
        assert_eq!(r.reroute_virtual_interfaces, "old0");
    }

    #[test]
    fn proxy_ids_and_env() {
        let mut pi = pod(&[]);
        pi.run_as_user = Some(0);
        pi.run_as_group = Some(7);
        pi.proxy_env.insert(env::DNS_CAPTURE.into(), "True".into());
        pi.proxy_env.insert(env::INVALID_DROP.into(), "yes".into());
        let r = Redirect::from_pod(&pi).unwrap();
        assert_eq!(
            (r.no_redirect_uid.as_str(), r.no_redirect_gid.as_str()),
            ("1337", "7")
        );
        assert!(r.dns_redirect && !r.invalid_drop);
        assert_eq!(r.warnings.len(), 1);
        pi.run_as_user = Some(-1);
        assert_eq!(Redirect::from_pod(&pi).unwrap_err().source, "runAsUser");
    }

    #[test]
    fn screening() {
        assert!(skip_reason(&PodInfo::default()).is_none());
        assert!(skip_reason(&pod(&[])).is_none());
        assert!(skip_reason(&pod(&[(keys::INJECT, "false")])).is_some());
        assert!(skip_reason(&pod(&[(keys::INJECT, "bogus")])).is_none());
        let no_status = PodInfo {
            annotations: Some(BTreeMap::new()),
            ..Default::default()
        };
        assert!(skip_reason(&no_status).is_some());
        let mut disabled = PodInfo::default();
        disabled
            .proxy_env
            .insert(env::DISABLE_ENVOY.into(), "true".into());
        assert!(skip_reason(&disabled).is_some());
    }
}
