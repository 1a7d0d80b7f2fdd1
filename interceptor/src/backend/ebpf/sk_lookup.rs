//! The per-pod sk_lookup program. sk_lookup cannot read the netns cookie and attaches per
//! network namespace, so each pod netns gets a program of its own, built here instruction by
//! instruction with the pod's id as an immediate: it copies `POD_NETNS[id]` (the pod's netns
//! cookie) to `INBOUND_NETNS[0]` (per CPU) and tail-calls the shared `ic_sk_lookup` through
//! `INBOUND_PROG[0]`, which finds the pod's policy by that cookie. Inbound capture then no longer
//! depends on the pod's addresses: an address added after registration, a second interface or
//! the IPv6 link-local address is captured like the registered one (as ISTIO_INBOUND does).
//! If the tail call fails (no target), the program drops the connection: fail closed.
//!
//! Why the id and not the cookie (as before): ids are known before their pods, so a `Pool` of
//! programs for the next free ids is loaded ahead of time, and the verifier and JIT (most of a
//! third of a millisecond) are off the pod-add path. Links pinned by the cookie-carrying
//! programs of earlier versions keep working: they write `INBOUND_NETNS[0]` themselves.
//!
//! The program is 24 instructions known at registration time, built here; aya loads programs
//! from an object file only, so loading, attaching and pinning go through `sys`.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::pod_ids::PodIds;
use super::sys::{self, Insn, BPF_PROG_TYPE_SK_LOOKUP, BPF_SK_LOOKUP};

/// The per-pod program's name (at most 15 bytes), as `bpftool prog` shows it.
pub const PROGRAM_NAME: &str = "ic_inbound";

const BPF_PSEUDO_MAP_FD: u8 = 1;
const FN_MAP_LOOKUP_ELEM: i32 = 1;
const FN_TAIL_CALL: i32 = 12;
/// `SK_DROP`.
const SK_DROP: i32 = 0;

/// The maps a per-pod program refers to, by fd.
#[derive(Clone, Copy)]
pub struct ProgramMaps<'a> {
    /// `POD_NETNS`: id → netns cookie.
    pub pod_netns: BorrowedFd<'a>,
    /// `INBOUND_NETNS`: the per-CPU slot `ic_sk_lookup` reads the cookie from.
    pub slot: BorrowedFd<'a>,
    /// `INBOUND_PROG`: `ic_sk_lookup`.
    pub target: BorrowedFd<'a>,
}

/// The per-pod program: `INBOUND_NETNS[0] = POD_NETNS[pod_id]; tail_call(ctx, INBOUND_PROG, 0);
/// return SK_DROP`.
fn program(maps: ProgramMaps<'_>, pod_id: u32) -> Vec<Insn> {
    const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
    const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
    const ADD64_K: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
    const ST_W: u8 = 0x62; // BPF_ST | BPF_MEM | BPF_W
    const LDX_DW: u8 = 0x79; // BPF_LDX | BPF_MEM | BPF_DW
    const STX_DW: u8 = 0x7b; // BPF_STX | BPF_MEM | BPF_DW
    const JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    let fd = |f: BorrowedFd<'_>| f.as_raw_fd() as u32 as u64;
    // r0 = &map[key], key at r10-4; `skip` instructions ahead (to the SK_DROP) when missing.
    let lookup = |map: u64, key: u32, skip: i16| {
        let mut v = vec![Insn::new(ST_W, 10, 0, -4, key as i32)];
        v.extend(Insn::ld_imm64(1, BPF_PSEUDO_MAP_FD, map));
        v.extend([
            Insn::new(MOV64_X, 2, 10, 0, 0),
            Insn::new(ADD64_K, 2, 0, 0, -4),
            Insn::new(CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM),
            Insn::new(JEQ_K, 0, 0, skip, 0),
        ]);
        v
    };
    let mut p = vec![Insn::new(MOV64_X, 6, 1, 0, 0)]; // r6 = ctx
    p.extend(lookup(fd(maps.pod_netns), pod_id, 14));
    p.push(Insn::new(LDX_DW, 7, 0, 0, 0)); // r7 = POD_NETNS[pod_id]
    p.extend(lookup(fd(maps.slot), 0, 6));
    p.push(Insn::new(STX_DW, 0, 7, 0, 0)); // INBOUND_NETNS[0] = r7
    p.push(Insn::new(MOV64_X, 1, 6, 0, 0));
    p.extend(Insn::ld_imm64(2, BPF_PSEUDO_MAP_FD, fd(maps.target)));
    p.extend([
        Insn::new(MOV64_K, 3, 0, 0, 0),
        Insn::new(CALL, 0, 0, 0, FN_TAIL_CALL),
        // Reached when the tail call failed, or a lookup above found nothing.
        Insn::new(MOV64_K, 0, 0, 0, SK_DROP),
        Insn::new(EXIT, 0, 0, 0, 0),
    ]);
    p
}

/// Loads the program of pod id `pod_id`; on a verifier rejection the error carries the
/// verifier's log.
pub fn load(maps: ProgramMaps<'_>, pod_id: u32) -> io::Result<OwnedFd> {
    let insns = program(maps, pod_id);
    let attempt = |log: Option<&mut [u8]>| {
        sys::prog_load(
            BPF_PROG_TYPE_SK_LOOKUP,
            BPF_SK_LOOKUP,
            &insns,
            PROGRAM_NAME,
            log,
        )
    };
    match attempt(None) {
        Ok(fd) => Ok(fd),
        Err(e)
            if e.raw_os_error() == Some(libc::EACCES) || e.raw_os_error() == Some(libc::EINVAL) =>
        {
            // Again with the verifier's log, to say why.
            let mut log = vec![0u8; 64 * 1024];
            let again = attempt(Some(&mut log));
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]).trim().to_string();
            match again {
                Ok(fd) => Ok(fd),
                Err(e2) => Err(io::Error::new(
                    e2.kind(),
                    format!("loading the per-pod sk_lookup program: {e2}; verifier log: {text}"),
                )),
            }
        }
        Err(e) => Err(e),
    }
}

/// Per-pod programs loaded ahead of time, by pod id. A registration `take`s its id's program
/// (or loads it then, when none is ready); `fill` loads the next ones, off the pod-add path (the
/// daemon calls it from a thread of its own after each add). The pool holds its own map fds, so
/// filling needs no lock on the registry.
pub struct Pool {
    pod_netns: OwnedFd,
    slot: OwnedFd,
    target: OwnedFd,
    /// Which ids are free (the registry's own record).
    ids: Arc<PodIds>,
    ready: Mutex<BTreeMap<u32, OwnedFd>>,
}

impl Pool {
    pub fn new(pod_netns: OwnedFd, slot: OwnedFd, target: OwnedFd, ids: Arc<PodIds>) -> Self {
        Self {
            pod_netns,
            slot,
            target,
            ids,
            ready: Mutex::new(BTreeMap::new()),
        }
    }

    /// The `n` smallest free pod ids: the ids the next registrations take.
    pub fn next_free_ids(&self, n: usize) -> Vec<u32> {
        self.ids.lowest_free(n)
    }

    /// Keeps programs ready for the `n` next free ids, and only for them. Returns how many it
    /// loaded.
    pub fn top_up(&self, n: usize) -> io::Result<usize> {
        let ids = self.next_free_ids(n);
        self.ready().retain(|id, _| ids.contains(id));
        self.fill(&ids)
    }

    fn maps(&self) -> ProgramMaps<'_> {
        ProgramMaps {
            pod_netns: self.pod_netns.as_fd(),
            slot: self.slot.as_fd(),
            target: self.target.as_fd(),
        }
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, OwnedFd>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The program of `pod_id`: a ready one, or loaded now.
    pub fn take(&self, pod_id: u32) -> io::Result<OwnedFd> {
        if let Some(fd) = self.ready().remove(&pod_id) {
            return Ok(fd);
        }
        load(self.maps(), pod_id)
    }

    /// Loads the programs of `ids` that are not ready yet (the loads run unlocked: a `take` of
    /// one of them meanwhile loads its own). Returns how many it loaded.
    pub fn fill(&self, ids: &[u32]) -> io::Result<usize> {
        let mut n = 0;
        for &id in ids {
            if self.ready().contains_key(&id) {
                continue;
            }
            let fd = load(self.maps(), id)?;
            self.ready().entry(id).or_insert(fd);
            n += 1;
        }
        Ok(n)
    }

    /// Ids with a program ready, in order.
    pub fn ready_ids(&self) -> Vec<u32> {
        self.ready().keys().copied().collect()
    }
}

/// Attaches `prog` to the netns of `netns` (BPF_LINK_CREATE); the link detaches when its last
/// reference (fd or pin) goes.
pub fn attach(prog: BorrowedFd<'_>, netns: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    sys::link_create(prog, netns, BPF_SK_LOOKUP)
}

/// Pins the pod's link at `path` on a bpffs.
pub fn pin(link: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    sys::obj_pin(link, path)
}

/// For `doctor`: puts `ic_sk_lookup` of a loaded (not attached) object into its `INBOUND_PROG`
/// and loads a per-pod program against the object's maps, as registration does, without
/// attaching anything. Err says which step the kernel refused.
pub fn probe(ebpf: &mut aya::Ebpf, target: &str) -> Result<(), String> {
    use aya::maps::{Map, ProgramArray};
    use interceptor_common::maps::names;
    let prog = ebpf
        .program(target)
        .ok_or_else(|| format!("{target} is not in the object"))?
        .fd()
        .map_err(|e| format!("{target} did not load: {e}"))?
        .try_clone()
        .map_err(|e| e.to_string())?;
    let slot = match ebpf.take_map(names::INBOUND_NETNS) {
        Some(Map::PerCpuArray(m)) => m,
        _ => {
            return Err(format!(
                "no per-CPU array {} in the object",
                names::INBOUND_NETNS
            ))
        }
    };
    let pod_netns = match ebpf.take_map(names::POD_NETNS) {
        Some(Map::Array(m)) => m,
        _ => return Err(format!("no array {} in the object", names::POD_NETNS)),
    };
    let table = match ebpf.take_map(names::INBOUND_PROG) {
        Some(Map::ProgramArray(m)) => m,
        _ => {
            return Err(format!(
                "no program array {} in the object",
                names::INBOUND_PROG
            ))
        }
    };
    let table_fd = table
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| e.to_string())?;
    let mut array = ProgramArray::try_from(Map::ProgramArray(table)).map_err(|e| e.to_string())?;
    array
        .set(0, &prog, 0)
        .map_err(|e| format!("{target} as the tail call target: {e}"))?;
    let maps = ProgramMaps {
        pod_netns: pod_netns.fd().as_fd(),
        slot: slot.fd().as_fd(),
        target: table_fd.as_fd(),
    };
    load(maps, 0).map(drop).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_layout() {
        // Any open fds do: only their numbers go into the instructions.
        let files: Vec<std::fs::File> = (0..3).map(|_| std::fs::File::open("/").unwrap()).collect();
        let maps = ProgramMaps {
            pod_netns: files[0].as_fd(),
            slot: files[1].as_fd(),
            target: files[2].as_fd(),
        };
        let p = program(maps, 0x0102_0304);
        assert_eq!(p.len(), 24);
        let drop_at = p
            .iter()
            .position(|i| *i == Insn::new(0xb7, 0, 0, 0, SK_DROP))
            .unwrap();
        // Both null checks jump exactly to `r0 = SK_DROP`.
        let jumps: Vec<usize> = p
            .iter()
            .enumerate()
            .filter(|(_, i)| i.code == 0x15)
            .map(|(at, i)| at + 1 + i.off as usize)
            .collect();
        assert_eq!(jumps, [drop_at, drop_at]);
        // The pod id is the first lookup's key.
        assert_eq!(p[1], Insn::new(0x62, 10, 0, -4, 0x0102_0304));
        // The map references are map fds (src register BPF_PSEUDO_MAP_FD), in order.
        let refs: Vec<i32> = p
            .iter()
            .filter(|i| i.code == 0x18 && i.regs >> 4 == BPF_PSEUDO_MAP_FD)
            .map(|i| i.imm)
            .collect();
        let raw: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
        assert_eq!(refs, raw);
        assert_eq!(p.last().unwrap().code, 0x95);
    }
}
