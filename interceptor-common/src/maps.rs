//! `#[repr(C)]` values stored in the eBPF maps. Layouts are shared byte for byte with the programs.

/// Proxy ports and identities of one meshed pod, keyed in `POD_CONFIG` by netns cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodConfig {
    /// Outbound redirect target (`-p`), host byte order.
    pub proxy_port: u16,
    /// Inbound capture port (`-z`), host byte order.
    pub inbound_capture_port: u16,
    /// Bit flags, see `POD_FLAG_*`.
    pub flags: u32,
}

/// Original destination of a redirected connection, keyed by socket cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv4 address in network byte order (as in `bpf_sock_addr.user_ip4`).
    pub ip4: u32,
    /// Port in network byte order.
    pub port: u16,
    pub _pad: u16,
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: plain old data, no padding holes that the kernel would read uninitialised.
    unsafe impl aya::Pod for super::PodConfig {}
    unsafe impl aya::Pod for super::OrigDst {}
}
