//! The per-pod sk_lookup program. sk_lookup cannot read the netns cookie and attaches per
//! network namespace, so each pod netns gets a program of its own, built here instruction by
//! instruction with the pod's netns cookie as an immediate: it stores the cookie in
//! `INBOUND_NETNS[0]` (per CPU) and tail-calls the shared `ic_sk_lookup` through
//! `INBOUND_PROG[0]`, which finds the pod's policy by that cookie. Inbound capture then no longer
//! depends on the pod's addresses: an address added after registration, a second interface or
//! the IPv6 link-local address is captured like the registered one (as ISTIO_INBOUND does).
//! If the tail call fails (no target), the program drops the connection: fail closed.
//!
//! The program is 18 instructions known at registration time, built here; aya loads programs
//! from an object file only, so loading, attaching and pinning go through `sys`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use super::sys::{self, Insn, BPF_PROG_TYPE_SK_LOOKUP, BPF_SK_LOOKUP};

/// The per-pod program's name (at most 15 bytes), as `bpftool prog` shows it.
pub const PROGRAM_NAME: &str = "ic_inbound";

const BPF_PSEUDO_MAP_FD: u8 = 1;
const FN_MAP_LOOKUP_ELEM: i32 = 1;
const FN_TAIL_CALL: i32 = 12;
/// `SK_DROP`.
const SK_DROP: i32 = 0;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

/// `dst = imm64` (two instruction slots); `src` = BPF_PSEUDO_MAP_FD makes it a map fd.
fn ld_imm64(dst: u8, src: u8, imm: u64) -> [Insn; 2] {
    [
        insn(0x18, dst, src, 0, imm as u32 as i32),
        insn(0, 0, 0, 0, (imm >> 32) as u32 as i32),
    ]
}

/// The per-pod program: `INBOUND_NETNS[0] = cookie; tail_call(ctx, INBOUND_PROG, 0);
/// return SK_DROP`.
fn program(netns_map: i32, prog_array: i32, cookie: u64) -> Vec<Insn> {
    const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
    const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
    const ADD64_K: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
    const ST_W: u8 = 0x62; // BPF_ST | BPF_MEM | BPF_W
    const STX_DW: u8 = 0x7b; // BPF_STX | BPF_MEM | BPF_DW
    const JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    let mut p = vec![
        insn(MOV64_X, 6, 1, 0, 0), // r6 = ctx
        insn(ST_W, 10, 0, -4, 0),  // key 0 on the stack
    ];
    p.extend(ld_imm64(1, BPF_PSEUDO_MAP_FD, netns_map as u32 as u64));
    p.extend([
        insn(MOV64_X, 2, 10, 0, 0),
        insn(ADD64_K, 2, 0, 0, -4),
        insn(CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM),
        // r0 == NULL: to the SK_DROP below (8 instructions ahead).
        insn(JEQ_K, 0, 0, 8, 0),
    ]);
    p.extend(ld_imm64(1, 0, cookie));
    p.extend([
        insn(STX_DW, 0, 1, 0, 0), // *(u64 *)r0 = cookie
        insn(MOV64_X, 1, 6, 0, 0),
    ]);
    p.extend(ld_imm64(2, BPF_PSEUDO_MAP_FD, prog_array as u32 as u64));
    p.extend([
        insn(MOV64_K, 3, 0, 0, 0),
        insn(CALL, 0, 0, 0, FN_TAIL_CALL),
        // Only reached when the tail call failed.
        insn(MOV64_K, 0, 0, 0, SK_DROP),
        insn(EXIT, 0, 0, 0, 0),
    ]);
    p
}

/// Loads the pod's program; on a verifier rejection the error carries the verifier's log.
pub fn load(
    netns_map: BorrowedFd<'_>,
    prog_array: BorrowedFd<'_>,
    cookie: u64,
) -> io::Result<OwnedFd> {
    let insns = program(netns_map.as_raw_fd(), prog_array.as_raw_fd(), cookie);
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
    use std::os::fd::AsFd;
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
    load(slot.fd().as_fd(), table_fd.as_fd(), 0)
        .map(drop)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_layout() {
        let p = program(7, 9, 0x1122_3344_5566_7788);
        assert_eq!(p.len(), 18);
        // The null check jumps exactly to `r0 = SK_DROP`.
        let jeq = p.iter().position(|i| i.code == 0x15).unwrap();
        assert_eq!(
            p[jeq + 1 + p[jeq].off as usize],
            insn(0xb7, 0, 0, 0, SK_DROP)
        );
        // The cookie, split over the two halves of its ld_imm64.
        let ld = p
            .iter()
            .position(|i| i.code == 0x18 && i.regs == 1 && i.imm == 0x5566_7788)
            .unwrap();
        assert_eq!(p[ld + 1].imm, 0x1122_3344);
        // Both map references are map fds (src register BPF_PSEUDO_MAP_FD).
        let maps: Vec<i32> = p
            .iter()
            .filter(|i| i.code == 0x18 && i.regs >> 4 == BPF_PSEUDO_MAP_FD)
            .map(|i| i.imm)
            .collect();
        assert_eq!(maps, [7, 9]);
        assert_eq!(p.last().unwrap().code, 0x95);
    }
}
