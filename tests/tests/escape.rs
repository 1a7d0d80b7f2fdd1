//! The escape suite: every way out of a meshed pod we know of, tried on the iptables fallback
//! (iptables-nft, Istio's own rules) and on the eBPF datapath side by side. For each scenario the
//! eBPF path must catch exactly what the iptables rules catch, or refuse (fail closed): a
//! connection that reaches the app or an upstream without passing the proxy on eBPF while
//! iptables sends it to the proxy is an escape, and fails the test.
//!
//! One file per area under `escape/`; each scenario is a `#[test]` named for what it tries.
//! The scenario count (SECURITY.md) is the number of `#[test]`s here.

#[path = "escape/common.rs"]
mod common;

#[path = "escape/inbound.rs"]
mod inbound;

#[path = "escape/state.rs"]
mod state;

#[path = "escape/semantics.rs"]
mod semantics;

#[path = "escape/netfilter.rs"]
mod netfilter;

#[path = "escape/userns.rs"]
mod userns;

#[path = "escape/raw.rs"]
mod raw;
