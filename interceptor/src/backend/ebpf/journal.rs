//! What a registration would undo: each map write is counted (for the fault knob) and journaled;
//! a failure makes `registry` revert the journal newest first.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use aya::maps::lpm_trie::Key;
use interceptor_common::decision::{PodPolicy, PodSrc};
use interceptor_common::maps::{AddrKey, Cidr4Data, Cidr6Data, GroupKey, PortKey};

pub(super) const BPF_NOEXIST: u64 = 1;

/// A set-map insert with BPF_NOEXIST: Ok(true) if this call added the key, Ok(false) if it was
/// there already (nothing to undo).
pub(super) fn set_insert(r: Result<(), aya::maps::MapError>) -> Result<bool> {
    match r {
        Ok(()) => Ok(true),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
        {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// One registration's map writes: counted (for `INTERCEPTOR_FAULT=map-write:<n>`) and
/// journaled, so a failure can undo them.
pub(super) struct Writes<'a> {
    pub(super) netns: &'a Path,
    pub(super) n: u32,
    pub(super) undo: &'a mut Vec<Undo>,
}

impl Writes<'_> {
    /// Before each map write: fails it if a test injected a fault there.
    pub(super) fn step(&mut self) -> Result<()> {
        self.n += 1;
        if crate::fault::map_write_fails(self.netns, self.n) {
            bail!(
                "map write {} of the registration failed: injected fault ({})",
                self.n,
                crate::fault::FAULT_ENV
            );
        }
        Ok(())
    }
}

/// How to revert one write of a registration.
pub(super) enum Undo {
    Port(PortKey),
    Addr(AddrKey),
    Group(GroupKey),
    Cidr4(usize, Key<Cidr4Data>),
    Cidr6(usize, Key<Cidr6Data>),
    /// A stale entry the re-registration removed.
    Restore(Removed),
    Policy(u64, Option<PodPolicy>),
    Listener(u32),
    /// `POD_NETNS[id]` and its value before.
    PodNetns(u32, u64),
    /// `POD_SRC[id]` and its value before.
    PodSrc(u32, PodSrc),
    Pin(PathBuf),
    /// Ports this registration added to the netns's reserved ports.
    Unreserve(PathBuf, Vec<u16>),
}

pub(super) enum Removed {
    Port(PortKey),
    Addr(AddrKey),
    Group(GroupKey),
    Cidr4(usize, Key<Cidr4Data>),
    Cidr6(usize, Key<Cidr6Data>),
}

#[cfg(test)]
mod tests {
    use aya::maps::MapError;
    use aya::sys::SyscallError;

    use super::*;

    fn failed(errno: i32) -> Result<(), MapError> {
        Err(MapError::SyscallError(SyscallError {
            call: "bpf_map_update_elem",
            io_error: std::io::Error::from_raw_os_error(errno),
        }))
    }

    #[test]
    fn an_existing_key_is_not_ours_to_undo() {
        assert!(set_insert(Ok(())).unwrap());
        assert!(!set_insert(failed(libc::EEXIST)).unwrap());
        let e = set_insert(failed(libc::E2BIG)).unwrap_err();
        assert!(format!("{e:#}").contains("bpf_map_update_elem"), "{e:#}");
    }
}
