//! Field parsing for the config: Istio's list split, ports, ids, CIDRs, interface names and owner
//! groups, each checked against its list limit; every error names the flag and the bad value.

use ipnet::IpNet;

/// A validation error: which flag, which value (or that it is missing), and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.sentence())]
pub struct ConfigError {
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
    /// The flag was needed and not given (`value` is empty then).
    pub missing: bool,
}

impl ConfigError {
    pub fn new(flag: &'static str, value: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            flag,
            value: value.into(),
            reason: reason.into(),
            missing: false,
        }
    }

    /// A flag the command needs here and did not get.
    pub fn missing(flag: &'static str, reason: impl Into<String>) -> Self {
        Self {
            missing: true,
            ..Self::new(flag, "", reason)
        }
    }

    fn sentence(&self) -> String {
        if self.missing {
            format!("missing {}: {}", self.flag, self.reason)
        } else {
            format!(
                "invalid value {:?} for {}: {}",
                self.value, self.flag, self.reason
            )
        }
    }
}

/// Istio's list split: on commas, items trimmed, empty items dropped.
pub fn split_list(s: &str) -> Vec<&str> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

pub(crate) fn parse_port(
    flag: &'static str,
    s: &str,
    allow_zero: bool,
) -> Result<u16, ConfigError> {
    match s.trim().parse::<u16>() {
        Ok(0) if !allow_zero => Err(ConfigError::new(flag, s, "port must be 1-65535")),
        Ok(p) => Ok(p),
        Err(_) => Err(ConfigError::new(flag, s, "not a port number (1-65535)")),
    }
}

/// Limits on every list of a pod's config. The eBPF maps holding these lists are shared by
/// every pod on the node and sized for `limits::MAX_PODS` pods at these limits, so no pod's
/// lists can crowd another out (see `maps::capacity`). Istio has no limits; real configs use a
/// handful of entries per list.
pub mod limits {
    /// Ports per list (`-b`, `-d`, `-q`, `-o`, `--bind-guard-ports`).
    pub const MAX_PORTS: usize = 64;
    /// CIDRs per list (`-i`, `-x`).
    pub const MAX_CIDRS: usize = 1024;
    /// Interface names per list (`-c`, `-k`).
    pub const MAX_INTERFACES: usize = 16;
    /// Proxy uids or gids (`-u`, `-g`).
    pub const MAX_IDS: usize = 16;
    /// DNS servers (v4 and v6 together).
    pub const MAX_DNS_SERVERS: usize = 16;
    /// Owner groups, included or excluded (Istio caps the include list at 64: one rule's
    /// match list).
    pub const MAX_OWNER_GROUPS: usize = 64;
    /// Port entries of one pod in all lists together (`-b`/`-d` inbound, `-q`, `-o` and the
    /// guarded ports with the proxy's own three): what `maps::capacity::PORTS_PER_POD` holds.
    pub const MAX_PORT_ENTRIES: usize = crate::maps::capacity::PORTS_PER_POD as usize;
}

/// A list too long to quote in an error: its start only.
pub(crate) fn shorten(value: &str) -> String {
    let shown: String = value.chars().take(64).collect();
    if shown.len() < value.len() {
        format!("{shown}...")
    } else {
        shown
    }
}

/// Checks a list's length against its limit; the error names the flag, the limit and the count.
pub(crate) fn check_len<T>(
    flag: &'static str,
    value: &str,
    items: Vec<T>,
    limit: usize,
    what: &str,
) -> Result<Vec<T>, ConfigError> {
    if items.len() > limit {
        return Err(ConfigError::new(
            flag,
            shorten(value),
            format!(
                "too many {what}: {} given, the limit is {limit}",
                items.len()
            ),
        ));
    }
    Ok(items)
}

pub(crate) fn parse_ports(flag: &'static str, s: &str) -> Result<Vec<u16>, ConfigError> {
    let ports = parse_port_items(flag, s)?;
    check_len(flag, s, ports, limits::MAX_PORTS, "ports")
}

pub(crate) fn parse_port_items(flag: &'static str, s: &str) -> Result<Vec<u16>, ConfigError> {
    split_list(s)
        .into_iter()
        .map(|item| {
            parse_port(flag, item, false).map_err(|e| ConfigError {
                value: item.into(),
                ..e
            })
        })
        .collect()
}

pub(crate) fn parse_ids(flag: &'static str, s: &str) -> Result<Vec<u32>, ConfigError> {
    let ids = split_list(s)
        .into_iter()
        .map(|item| {
            item.parse::<u32>()
                .map_err(|_| ConfigError::new(flag, item, "not a numeric id (0-4294967295)"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ids.is_empty() {
        return Err(ConfigError::new(flag, s, "at least one id is required"));
    }
    check_len(flag, s, ids, limits::MAX_IDS, "ids")
}

pub(crate) fn parse_cidr(flag: &'static str, item: &str) -> Result<IpNet, ConfigError> {
    // As istio-iptables (netip.ParsePrefix): a prefix length is required.
    item.parse::<IpNet>()
        .map_err(|_| ConfigError::new(flag, item, "not a CIDR (a.b.c.d/n or v6/n)"))
}

pub(crate) fn parse_cidrs(flag: &'static str, s: &str) -> Result<Vec<IpNet>, ConfigError> {
    let cidrs = split_list(s)
        .into_iter()
        .map(|item| parse_cidr(flag, item))
        .collect::<Result<Vec<_>, _>>()?;
    check_len(flag, s, cidrs, limits::MAX_CIDRS, "CIDRs")
}

pub(crate) fn parse_interfaces(flag: &'static str, s: &str) -> Result<Vec<String>, ConfigError> {
    split_list(s)
        .into_iter()
        .map(|item| match crate::ifname::interface_name_problem(item) {
            Some(why) => Err(ConfigError::new(
                flag,
                item,
                format!("not a valid interface name: {why}"),
            )),
            None => Ok(item.to_string()),
        })
        .collect()
}

/// An owner-group entry's gid when the entry is a number, read as iptables' `--gid-owner` and
/// nft's `skgid` read it (C's strtoul with base 0): `0x` hexadecimal, a leading `0` octal, else
/// decimal. `Err` for an all-digit entry that is no such number (`08`): the tools would look it
/// up as a group name and fail at apply time. `Ok(None)` for a group name.
pub fn group_number(entry: &str) -> Result<Option<u32>, std::num::ParseIntError> {
    let (digits, radix) = if let Some(hex) = entry
        .strip_prefix("0x")
        .or_else(|| entry.strip_prefix("0X"))
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()))
    {
        (hex, 16)
    } else if entry.is_empty() || !entry.chars().all(|c| c.is_ascii_digit()) {
        return Ok(None);
    } else if entry.len() > 1 && entry.starts_with('0') {
        (&entry[1..], 8)
    } else {
        (entry, 10)
    };
    u32::from_str_radix(digits, radix).map(Some)
}

pub(crate) fn parse_groups(flag: &'static str, s: &str) -> Result<Vec<String>, ConfigError> {
    let groups = split_list(s)
        .into_iter()
        .map(|item| {
            if !item
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                Err(ConfigError::new(flag, item, "not a group name or id"))
            } else if group_number(item).is_err() {
                Err(ConfigError::new(
                    flag,
                    item,
                    "not a group id: iptables and nft read a leading 0 as octal and 0x as hexadecimal",
                ))
            } else {
                Ok(item.to_string())
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_len(flag, s, groups, limits::MAX_OWNER_GROUPS, "groups")
}
