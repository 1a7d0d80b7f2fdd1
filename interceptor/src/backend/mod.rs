//! Backends that install one pod's interception.

pub mod ebpf;
pub mod exec;
pub mod iptables;
pub mod netfilter;
pub mod nftables;
