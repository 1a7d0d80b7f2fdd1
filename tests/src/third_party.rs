//! Another vendor's cgroup BPF programs, for the coexistence suite: built here instruction by
//! instruction and loaded with the bpf() syscall, with no part of our object, as a CNI's or an
//! observability agent's would be.
//!
//! - a **connect-time load balancer** (`cgroup/connect4`): a connect to its VIP:port goes to a
//!   backend instead (what Cilium's socket LB and Calico's CTLB do for a service), counted;
//! - a **sock_ops tuner**: in one netns (by cookie) it counts every callback by op and, on each
//!   active connect, adds the RTT callback to the socket's flags (read, OR, set: as a
//!   well-behaved program does), so RTT callbacks arrive only while nobody resets the flags;
//! - a **getsockopt** program that allows everything, for attaching in the exclusive
//!   (non-multi) mode old tools use.
//!
//! Attachments are bpf_links held by fd (or, for the exclusive one, detached on drop): dropping
//! the [`ThirdParty`] detaches everything, also when a test fails.

use std::net::SocketAddrV4;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use anyhow::{Context, Result};
use interceptor::backend::ebpf::sys::{self, Insn};

const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_PROG_TYPE_CGROUP_SOCKOPT: u32 = 25;
const BPF_CGROUP_SOCK_OPS: u32 = 3;

/// Counter slots of the map: the load balancer's rewrites, then one per sock_ops op.
pub const SLOT_REWRITES: u32 = 0;
const SLOT_OPS: u32 = 16;
const SLOTS: u32 = SLOT_OPS + 16;
/// sock_ops callbacks counted per op.
pub const OP_TCP_CONNECT: u32 = 3;
pub const OP_STATE: u32 = 10;
pub const OP_RTT: u32 = 12;
/// `BPF_SOCK_OPS_RTT_CB_FLAG`: the callback the tuner asks for.
const RTT_CB_FLAG: i32 = 8;

/// An array of u64 counters.
pub struct Counters {
    fd: OwnedFd,
}

impl Counters {
    fn new() -> Result<Self> {
        let fd =
            sys::map_create(BPF_MAP_TYPE_ARRAY, 4, 8, SLOTS).context("creating the counters")?;
        Ok(Self { fd })
    }

    /// The value of `slot`.
    pub fn get(&self, slot: u32) -> u64 {
        let mut value = [0u8; 8];
        sys::map_lookup(self.fd.as_fd(), &slot.to_ne_bytes(), &mut value).expect("array lookup");
        u64::from_ne_bytes(value)
    }

    /// How many times the sock_ops tuner ran for `op`.
    pub fn op(&self, op: u32) -> u64 {
        self.get(SLOT_OPS + op)
    }
}

/// The kernel id of the program behind `fd`.
fn prog_id(fd: BorrowedFd<'_>) -> Result<u32> {
    sys::prog_id(fd).context("BPF_OBJ_GET_INFO_BY_FD")
}

// Opcodes (class | op | source).
const MOV64_X: u8 = 0xbf;
const MOV64_K: u8 = 0xb7;
const MOV32_K: u8 = 0xb4;
const ADD64_K: u8 = 0x07;
const OR64_K: u8 = 0x47;
const LDX_W: u8 = 0x61;
const STX_W: u8 = 0x63;
/// BPF_STX | BPF_ATOMIC | BPF_DW with imm BPF_ADD: `lock *(u64 *)(dst + off) += src`.
const ATOMIC_ADD_DW: u8 = 0xdb;
const JNE32_K: u8 = 0x56;
const JNE_X: u8 = 0x5d;
const JNE_K: u8 = 0x55;
const JGT_K: u8 = 0x25;
const JEQ_K: u8 = 0x15;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const FN_MAP_LOOKUP_ELEM: i32 = 1;
const FN_SOCK_OPS_CB_FLAGS_SET: i32 = 59;
const FN_GET_NETNS_COOKIE: i32 = 122;
const PSEUDO_MAP_FD: u8 = 1;

fn i(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn::new(code, dst, src, off, imm)
}

/// `counters[r2] += 1` with the slot already in r2; clobbers r0-r5; 9 instructions.
fn count_slot_in_r2(map: i32) -> Vec<Insn> {
    let mut p = vec![
        i(STX_W, 10, 2, -4, 0),
        i(MOV64_X, 2, 10, 0, 0),
        i(ADD64_K, 2, 0, 0, -4),
    ];
    p.extend(Insn::ld_imm64(1, PSEUDO_MAP_FD, map as u32 as u64));
    p.extend([
        i(CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM),
        i(JEQ_K, 0, 0, 2, 0),
        i(MOV64_K, 1, 0, 0, 1),
        i(ATOMIC_ADD_DW, 0, 1, 0, 0),
    ]);
    p
}

/// The jump offset from instruction `from` to `to` (BPF counts from the next instruction).
fn off(from: usize, to: usize) -> i16 {
    (to as isize - from as isize - 1) as i16
}

/// connect4: `vip` → `backend`, each rewrite counted in [`SLOT_REWRITES`].
fn load_balancer(map: i32, vip: SocketAddrV4, backend: SocketAddrV4) -> Vec<Insn> {
    // ctx fields (struct bpf_sock_addr): user_ip4 at 4, user_port at 24, both as the kernel
    // keeps them, in network byte order; read as native u32s they are these.
    let ip = |a: SocketAddrV4| u32::from_ne_bytes(a.ip().octets()) as i32;
    let port = |a: SocketAddrV4| i32::from(u16::from_ne_bytes(a.port().to_be_bytes()));
    let mut p = vec![
        i(MOV64_X, 6, 1, 0, 0),
        i(LDX_W, 2, 6, 4, 0),
        i(JNE32_K, 2, 0, 0, ip(vip)), // patched: to `out`
        i(LDX_W, 2, 6, 24, 0),
        i(JNE32_K, 2, 0, 0, port(vip)), // patched: to `out`
        i(MOV32_K, 2, 0, 0, ip(backend)),
        i(STX_W, 6, 2, 4, 0),
        i(MOV32_K, 2, 0, 0, port(backend)),
        i(STX_W, 6, 2, 24, 0),
        i(MOV64_K, 2, 0, 0, SLOT_REWRITES as i32),
    ];
    p.extend(count_slot_in_r2(map));
    let out = p.len();
    p[2].off = off(2, out);
    p[4].off = off(4, out);
    p.extend([i(MOV64_K, 0, 0, 0, 1), i(EXIT, 0, 0, 0, 0)]);
    p
}

/// Which sockets the tuner acts on.
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    /// Those of the netns with this cookie (sock_ops reads it from 5.15 on).
    Netns(u64),
    /// Those whose local address is this one: before 5.15, the pod's address stands in for its
    /// netns (its app's connections leave from it).
    LocalV4(std::net::Ipv4Addr),
}

/// sock_ops: for the sockets of `scope` only, counts each op and on an active connect adds
/// `RTT_CB_FLAG` to the socket's callback flags.
fn tuner(map: i32, scope: Scope) -> Vec<Insn> {
    let mut p = vec![i(MOV64_X, 6, 1, 0, 0)];
    match scope {
        Scope::Netns(cookie) => {
            p.push(i(CALL, 0, 0, 0, FN_GET_NETNS_COOKIE));
            p.extend(Insn::ld_imm64(1, 0, cookie));
        }
        Scope::LocalV4(a) => {
            // local_ip4 (offset 28), network byte order as the kernel keeps it.
            p.push(i(LDX_W, 0, 6, 28, 0));
            p.push(i(MOV32_K, 1, 0, 0, u32::from_ne_bytes(a.octets()) as i32));
        }
    }
    let not_ours = p.len();
    p.extend([
        i(JNE_X, 0, 1, 0, 0), // patched: to `out`
        i(LDX_W, 7, 6, 0, 0), // r7 = op
    ]);
    let too_big = p.len();
    p.extend([
        i(JGT_K, 7, 0, 0, 15), // patched: to `flags`
        i(MOV64_X, 2, 7, 0, 0),
        i(ADD64_K, 2, 0, 0, SLOT_OPS as i32),
    ]);
    p.extend(count_slot_in_r2(map));
    let flags = p.len();
    p.extend([
        i(JNE_K, 7, 0, 0, OP_TCP_CONNECT as i32), // patched: to `out`
        // bpf_sock_ops_cb_flags (offset 84) | RTT, set.
        i(LDX_W, 2, 6, 84, 0),
        i(OR64_K, 2, 0, 0, RTT_CB_FLAG),
        i(MOV64_X, 1, 6, 0, 0),
        i(CALL, 0, 0, 0, FN_SOCK_OPS_CB_FLAGS_SET),
    ]);
    let out = p.len();
    p[not_ours].off = off(not_ours, out);
    p[too_big].off = off(too_big, flags);
    p[flags].off = off(flags, out);
    p.extend([i(MOV64_K, 0, 0, 0, 1), i(EXIT, 0, 0, 0, 0)]);
    p
}

fn load(prog_type: u32, attach_type: u32, insns: &[Insn], name: &str) -> Result<OwnedFd> {
    match sys::prog_load(prog_type, attach_type, insns, name, None) {
        Ok(fd) => Ok(fd),
        Err(_) => {
            let mut log = vec![0u8; 64 * 1024];
            let e = sys::prog_load(prog_type, attach_type, insns, name, Some(&mut log))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            anyhow::bail!(
                "loading {name}: {e}; verifier log:\n{}",
                String::from_utf8_lossy(&log[..end])
            )
        }
    }
}

/// The load balancer and the tuner, loaded; attached at a cgroup by [`ThirdParty::attach`].
pub struct ThirdParty {
    pub counters: Counters,
    lb: OwnedFd,
    tuner: OwnedFd,
    links: Vec<OwnedFd>,
}

impl ThirdParty {
    /// Loads a load balancer sending `vip` to `backend` and a tuner for the sockets of `scope`;
    /// `tag` (a few letters) makes the program names unique: `tp_lb_<tag>`, `tp_ops_<tag>`.
    pub fn load(vip: SocketAddrV4, backend: SocketAddrV4, scope: Scope, tag: &str) -> Result<Self> {
        let counters = Counters::new()?;
        let map = counters.fd.as_raw_fd();
        let lb = load(
            BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            sys::BPF_CGROUP_INET4_CONNECT,
            &load_balancer(map, vip, backend),
            &format!("tp_lb_{tag}"),
        )?;
        let tuner = load(
            BPF_PROG_TYPE_SOCK_OPS,
            BPF_CGROUP_SOCK_OPS,
            &tuner(map, scope),
            &format!("tp_ops_{tag}"),
        )?;
        Ok(Self {
            counters,
            lb,
            tuner,
            links: Vec::new(),
        })
    }

    /// Attaches both at `cgroup` (bpf_links, multi mode: after whatever is attached there).
    pub fn attach(&mut self, cgroup: &std::path::Path) -> Result<()> {
        let cg = std::fs::File::open(cgroup)?;
        for (prog, attach_type) in [
            (&self.lb, sys::BPF_CGROUP_INET4_CONNECT),
            (&self.tuner, BPF_CGROUP_SOCK_OPS),
        ] {
            let link = sys::link_create(prog.as_fd(), cg.as_fd(), attach_type)
                .context("attaching a third-party program")?;
            self.links.push(link);
        }
        Ok(())
    }

    /// The kernel ids of the load balancer and the tuner.
    pub fn ids(&self) -> Result<(u32, u32)> {
        Ok((prog_id(self.lb.as_fd())?, prog_id(self.tuner.as_fd())?))
    }
}

/// A getsockopt program attached in exclusive mode (`BPF_PROG_ATTACH` without
/// BPF_F_ALLOW_MULTI), as old tools attach; detached on drop.
pub struct ExclusiveGetsockopt {
    prog: OwnedFd,
    cgroup: std::fs::File,
}

impl ExclusiveGetsockopt {
    pub fn attach(cgroup: &std::path::Path) -> Result<Self> {
        let allow = [i(MOV64_K, 0, 0, 0, 1), i(EXIT, 0, 0, 0, 0)];
        let prog = load(
            BPF_PROG_TYPE_CGROUP_SOCKOPT,
            sys::BPF_CGROUP_GETSOCKOPT,
            &allow,
            "tp_sockopt",
        )?;
        let cgroup = std::fs::File::open(cgroup)?;
        sys::prog_attach(cgroup.as_fd(), prog.as_fd(), sys::BPF_CGROUP_GETSOCKOPT, 0)
            .context("attaching getsockopt without BPF_F_ALLOW_MULTI")?;
        Ok(Self { prog, cgroup })
    }

    pub fn id(&self) -> Result<u32> {
        prog_id(self.prog.as_fd())
    }
}

impl Drop for ExclusiveGetsockopt {
    fn drop(&mut self) {
        let _ = sys::prog_detach(
            self.cgroup.as_fd(),
            self.prog.as_fd(),
            sys::BPF_CGROUP_GETSOCKOPT,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every patched jump lands inside the program, on the instruction meant.
    #[test]
    fn jumps_land_on_their_targets() {
        let vip = "198.18.1.10:80".parse().unwrap();
        let backend = "10.200.1.2:8080".parse().unwrap();
        let lb = load_balancer(3, vip, backend);
        let exit = lb.len() - 2;
        assert_eq!(2 + 1 + lb[2].off as usize, exit);
        assert_eq!(4 + 1 + lb[4].off as usize, exit);
        for t in [
            tuner(3, Scope::Netns(42)),
            tuner(3, Scope::LocalV4("10.200.1.1".parse().unwrap())),
        ] {
            let exit = t.len() - 2;
            for (k, insn) in t.iter().enumerate() {
                if matches!(insn.code, JNE_X | JGT_K | JNE_K) {
                    let to = k + 1 + insn.off as usize;
                    assert!(to <= exit, "jump at {k} to {to}");
                }
            }
            assert_eq!(t[exit], i(MOV64_K, 0, 0, 0, 1));
        }
    }
}
