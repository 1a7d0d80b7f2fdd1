//! Backends that install one pod's interception.

pub mod exec;
pub mod iptables;
pub mod netfilter;
pub mod nftables;
pub mod ebpf;
