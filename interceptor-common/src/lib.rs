//! Types shared by the userspace loader and the eBPF programs, and the one decision model
//! ("is this connection redirected, and where") that the programs, the iptables/nftables
//! emitters and `explain` all follow.
//!
//! Without the `user` feature this crate is `no_std` and holds only the `#[repr(C)]` map types.
#![cfg_attr(not(feature = "user"), no_std)]

pub mod maps;

#[cfg(feature = "user")]
pub mod config;

#[cfg(all(test, feature = "user"))]
mod config_tests;

#[cfg(feature = "user")]
pub mod defaults;

#[cfg(feature = "user")]
pub mod parse;

#[cfg(feature = "user")]
pub mod plan;

#[cfg(feature = "user")]
pub mod ifname;

pub mod decision;

#[cfg(feature = "user")]
pub mod entry;

#[cfg(feature = "user")]
pub mod policy;

#[cfg(all(test, feature = "user"))]
mod semantics_tests;

#[cfg(feature = "user")]
pub mod idmap;
