//! Shared pieces of the escape suite.
#![allow(dead_code)]

use interceptor_tests::cases::Flavor;

/// The two backends compared in every scenario: Istio's rules (iptables-nft) and eBPF.
pub const BACKENDS: [Flavor; 2] = [Flavor::IptablesNft, Flavor::Ebpf];
