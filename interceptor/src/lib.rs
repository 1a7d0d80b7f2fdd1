//! interceptor: an eBPF replacement for istio-init's iptables traffic interception, with an
//! iptables/nftables fallback that emits exactly what istio-iptables would.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod backend;
pub mod cli;
pub mod cni;
pub mod config;
pub mod daemon;
pub mod fault;
pub mod k8s;
pub mod listener;
pub mod model;
pub mod netlink;
pub mod netns;
pub mod pod_netns;
pub mod progress;
pub mod service;
pub mod tables;
pub mod userns;
pub mod validate;
