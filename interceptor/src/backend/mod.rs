//! Backends that install one pod's interception.

pub mod iptables;
pub mod nftables;
