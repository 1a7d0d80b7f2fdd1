//! Raw kernel feature probes of the guest (`/init probe`): each one loads a two- or
//! three-instruction program of the hook's type through the bpf() syscall, attaches it where
//! the hook lives (a scratch cgroup, the netns, a sockmap) and detaches it again. Independent
//! of aya and of interceptor's own doctor, so the matrix shows what the kernel itself accepts.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

// bpf() commands.
const MAP_CREATE: u32 = 0;
const PROG_LOAD: u32 = 5;
const OBJ_PIN: u32 = 6;
const PROG_ATTACH: u32 = 8;
const PROG_DETACH: u32 = 9;
const LINK_CREATE: u32 = 28;

// Program types.
const PT_CGROUP_SOCK: u32 = 9;
const PT_SOCK_OPS: u32 = 13;
const PT_SK_MSG: u32 = 16;
const PT_CGROUP_SOCK_ADDR: u32 = 18;
const PT_CGROUP_SOCKOPT: u32 = 25;
const PT_SK_LOOKUP: u32 = 30;

// Attach types.
const AT_CGROUP_SOCK_OPS: u32 = 3;
const AT_SK_MSG_VERDICT: u32 = 7;
const AT_INET4_BIND: u32 = 8;
const AT_INET6_BIND: u32 = 9;
const AT_INET4_CONNECT: u32 = 10;
const AT_INET6_CONNECT: u32 = 11;
const AT_UDP4_SENDMSG: u32 = 14;
const AT_UDP6_SENDMSG: u32 = 15;
const AT_UDP4_RECVMSG: u32 = 19;
const AT_UDP6_RECVMSG: u32 = 20;
const AT_GETSOCKOPT: u32 = 21;
const AT_INET4_GETPEERNAME: u32 = 29;
const AT_INET6_GETPEERNAME: u32 = 30;
const AT_SOCK_RELEASE: u32 = 34;
const AT_SK_LOOKUP: u32 = 36;

// Map types.
const MT_HASH: u32 = 1;
const MT_ARRAY: u32 = 2;
const MT_LRU_HASH: u32 = 9;
const MT_LPM_TRIE: u32 = 11;
const MT_SOCKMAP: u32 = 15;
const MT_RINGBUF: u32 = 27;

// Helpers.
const H_GET_CURRENT_UID_GID: i32 = 15;
const H_GET_SOCKET_COOKIE: i32 = 46;
const H_SOCK_OPS_CB_FLAGS_SET: i32 = 59;
const H_GET_NETNS_COOKIE: i32 = 122;
const H_SK_ASSIGN: i32 = 124;

const BPF_F_ALLOW_MULTI: u32 = 2;
const BPF_F_NO_PREALLOC: u32 = 1;
const SO_NETNS_COOKIE: libc::c_int = 71;

/// `union bpf_attr`, zero-filled beyond what a command uses (the kernel insists on that).
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32(mut self, off: usize, v: u32) -> Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, off: usize, v: u64) -> Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn call(mut self, cmd: u32) -> io::Result<i64> {
        // SAFETY: the attr buffer outlives the call and its size is passed along.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd as libc::c_long,
                self.0.as_mut_ptr(),
                self.0.len() as libc::c_long,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }
    fn fd(self, cmd: u32) -> io::Result<OwnedFd> {
        let r = self.call(cmd)?;
        // SAFETY: these commands return a new file descriptor that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
    }
}

fn insn(code: u8, dst: u8, src: u8, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | (dst & 0x0f);
    b[4..].copy_from_slice(&imm.to_ne_bytes());
    b
}
fn mov_imm(dst: u8, imm: i32) -> [u8; 8] {
    insn(0xb7, dst, 0, imm)
}
fn call(helper: i32) -> [u8; 8] {
    insn(0x85, 0, 0, helper)
}
fn exit() -> [u8; 8] {
    insn(0x95, 0, 0, 0)
}

/// `r0 = ret; exit`, optionally after a helper call (r1 = ctx as on entry; r2, r3 = 0).
fn program(helper: Option<i32>, ret: i32) -> Vec<u8> {
    let mut p = Vec::new();
    if let Some(h) = helper {
        p.extend(mov_imm(2, 0));
        p.extend(mov_imm(3, 0));
        p.extend(call(h));
    }
    p.extend(mov_imm(0, ret));
    p.extend(exit());
    p
}

/// Loads a program; on failure the error carries the verifier's last words.
fn load(prog_type: u32, attach: u32, insns: &[u8]) -> Result<OwnedFd, String> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let attr = Attr::new()
        .u32(0, prog_type)
        .u32(4, (insns.len() / 8) as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .u32(68, attach);
    attr.fd(PROG_LOAD).map_err(|e| {
        let text = String::from_utf8_lossy(&log);
        let text = text.trim_end_matches('\0');
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty() && !l.starts_with("processed"))
            .unwrap_or("");
        if last.is_empty() {
            format!("load: {}", errno_text(&e))
        } else {
            format!("load: {} ({})", errno_text(&e), last.trim())
        }
    })
}

fn errno_text(e: &io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM",
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::EACCES) => "EACCES",
        Some(libc::ENOTSUP) => "ENOTSUPP",
        Some(524) => "ENOTSUPP",
        Some(libc::E2BIG) => "E2BIG",
        Some(libc::ENOSYS) => "ENOSYS",
        Some(libc::EBADF) => "EBADF",
        Some(libc::ENOENT) => "ENOENT",
        Some(libc::EEXIST) => "EEXIST",
        _ => "",
    };
    if name.is_empty() {
        e.to_string()
    } else {
        format!("{name}: {e}")
    }
}

fn map_create(ty: u32, key: u32, value: u32, max: u32, flags: u32) -> io::Result<OwnedFd> {
    Attr::new()
        .u32(0, ty)
        .u32(4, key)
        .u32(8, value)
        .u32(12, max)
        .u32(16, flags)
        .fd(MAP_CREATE)
}

fn link_create(prog: &OwnedFd, target: RawFd, attach: u32) -> io::Result<OwnedFd> {
    Attr::new()
        .u32(0, prog.as_raw_fd() as u32)
        .u32(4, target as u32)
        .u32(8, attach)
        .fd(LINK_CREATE)
}

fn prog_attach(prog: &OwnedFd, target: RawFd, attach: u32, flags: u32) -> io::Result<()> {
    Attr::new()
        .u32(0, target as u32)
        .u32(4, prog.as_raw_fd() as u32)
        .u32(8, attach)
        .u32(12, flags)
        .call(PROG_ATTACH)
        .map(|_| ())
}

fn prog_detach(prog: &OwnedFd, target: RawFd, attach: u32) -> io::Result<()> {
    Attr::new()
        .u32(0, target as u32)
        .u32(4, prog.as_raw_fd() as u32)
        .u32(8, attach)
        .call(PROG_DETACH)
        .map(|_| ())
}

/// A scratch cgroup v2 directory to attach to (removed on drop); the root when none can be
/// made.
struct ScratchCgroup {
    path: Option<PathBuf>,
    fd: OwnedFd,
}

impl ScratchCgroup {
    fn new() -> io::Result<Self> {
        // The cgroup v2 mount, wherever it is (a hybrid host has it below /sys/fs/cgroup).
        let mounts = std::fs::read_to_string("/proc/mounts")?;
        let root = mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[2] == "cgroup2")
            .map(|f| PathBuf::from(f[1]))
            .ok_or_else(|| io::Error::other("no cgroup v2 mounted"))?;
        let dir = root.join(format!("vm-probe-{}", std::process::id()));
        let path = std::fs::create_dir(&dir).ok().map(|_| dir);
        let open = path.as_deref().unwrap_or(&root);
        let fd = std::fs::File::open(open)?.into();
        Ok(Self { path, fd })
    }
}

impl Drop for ScratchCgroup {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_dir(p);
        }
    }
}

/// One probe's outcome: `Ok(detail)` or `Err(why)`.
pub type Outcome = Result<String, String>;

/// Loads a `ret`-returning program of `prog_type` (expected attach type `load_at`) and attaches
/// it to the scratch cgroup as `attach`: with a bpf_link when the kernel has them, else with
/// BPF_PROG_ATTACH (and detaches it again).
fn cgroup_hook(
    cg: &Option<ScratchCgroup>,
    prog_type: u32,
    load_at: u32,
    attach: u32,
    ret: i32,
) -> Outcome {
    let prog = load(prog_type, load_at, &program(None, ret))?;
    let cg = cg.as_ref().ok_or("no cgroup v2 to attach to")?;
    match link_create(&prog, cg.fd.as_raw_fd(), attach) {
        Ok(_link) => Ok("loaded, attached with bpf_link".into()),
        Err(le) => {
            prog_attach(&prog, cg.fd.as_raw_fd(), attach, BPF_F_ALLOW_MULTI)
                .map_err(|e| format!("attach: {}", errno_text(&e)))?;
            let _ = prog_detach(&prog, cg.fd.as_raw_fd(), attach);
            Ok(format!(
                "loaded, attached with BPF_PROG_ATTACH (bpf_link: {})",
                errno_text(&le)
            ))
        }
    }
}

fn helper(prog_type: u32, attach: u32, helper: i32, ret: i32) -> Outcome {
    load(prog_type, attach, &program(Some(helper), ret)).map(|_| "verifier accepts the call".into())
}

fn map(ty: u32, key: u32, value: u32, max: u32, flags: u32) -> Outcome {
    map_create(ty, key, value, max, flags)
        .map(|_| "created".into())
        .map_err(|e| errno_text(&e))
}

fn sk_lookup() -> Outcome {
    let prog = load(PT_SK_LOOKUP, AT_SK_LOOKUP, &program(None, 1))?;
    let netns = std::fs::File::open("/proc/self/ns/net").map_err(|e| e.to_string())?;
    link_create(&prog, netns.as_raw_fd(), AT_SK_LOOKUP)
        .map(|_| "loaded, attached to the netns with bpf_link".into())
        .map_err(|e| format!("attach: {}", errno_text(&e)))
}

fn sk_msg() -> Outcome {
    let prog = load(PT_SK_MSG, AT_SK_MSG_VERDICT, &program(None, 1))?;
    let sockmap = map_create(MT_SOCKMAP, 4, 4, 1, 0).map_err(|e| format!("sockmap: {e}"))?;
    prog_attach(&prog, sockmap.as_raw_fd(), AT_SK_MSG_VERDICT, 0)
        .map_err(|e| format!("attach: {}", errno_text(&e)))?;
    let _ = prog_detach(&prog, sockmap.as_raw_fd(), AT_SK_MSG_VERDICT);
    Ok("loaded, attached to a sockmap".into())
}

fn link_pinning(cg: &Option<ScratchCgroup>) -> Outcome {
    let prog = load(PT_CGROUP_SOCK_ADDR, AT_INET4_CONNECT, &program(None, 1))?;
    let cg = cg.as_ref().ok_or("no cgroup v2 to attach to")?;
    let link = link_create(&prog, cg.fd.as_raw_fd(), AT_INET4_CONNECT)
        .map_err(|e| format!("bpf_link: {}", errno_text(&e)))?;
    let path = format!("/sys/fs/bpf/vm-probe-link-{}", std::process::id());
    let c = CString::new(path.clone()).expect("no NUL");
    let r = Attr::new()
        .u64(0, c.as_ptr() as u64)
        .u32(8, link.as_raw_fd() as u32)
        .call(OBJ_PIN);
    let _ = std::fs::remove_file(&path);
    r.map(|_| "link pinned in bpffs".into())
        .map_err(|e| format!("pin: {}", errno_text(&e)))
}

fn so_netns_cookie() -> Outcome {
    // SAFETY: plain socket/getsockopt calls on a socket we own.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if s < 0 {
            return Err(io::Error::last_os_error().to_string());
        }
        let s = OwnedFd::from_raw_fd(s);
        let mut v: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let r = libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        );
        if r < 0 {
            Err(errno_text(&io::Error::last_os_error()))
        } else {
            Ok(format!("cookie {v}"))
        }
    }
}

/// Every probe, in display order: (feature, outcome).
pub fn run_all() -> Vec<(&'static str, Outcome)> {
    let mut out: Vec<(&'static str, Outcome)> = Vec::new();
    let bpf = map(MT_ARRAY, 4, 4, 1, 0);
    let usable = bpf.is_ok();
    out.push(("bpf() syscall", bpf));
    out.push((
        "BTF (vmlinux)",
        if std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            Ok("/sys/kernel/btf/vmlinux".into())
        } else {
            Err("no /sys/kernel/btf/vmlinux".into())
        },
    ));
    out.push(("SO_NETNS_COOKIE", so_netns_cookie()));
    if !usable {
        // Everything below needs bpf(); its error is the one above.
        return out;
    }
    let cg = ScratchCgroup::new().ok();
    // (feature, program type, expected attach type at load, attach type). sock_ops programs
    // load without an attach type.
    let hooks: [(&str, u32, u32, u32); 13] = [
        (
            "cgroup/connect4",
            PT_CGROUP_SOCK_ADDR,
            AT_INET4_CONNECT,
            AT_INET4_CONNECT,
        ),
        (
            "cgroup/connect6",
            PT_CGROUP_SOCK_ADDR,
            AT_INET6_CONNECT,
            AT_INET6_CONNECT,
        ),
        (
            "cgroup/getpeername4",
            PT_CGROUP_SOCK_ADDR,
            AT_INET4_GETPEERNAME,
            AT_INET4_GETPEERNAME,
        ),
        (
            "cgroup/getpeername6",
            PT_CGROUP_SOCK_ADDR,
            AT_INET6_GETPEERNAME,
            AT_INET6_GETPEERNAME,
        ),
        (
            "cgroup/sendmsg4",
            PT_CGROUP_SOCK_ADDR,
            AT_UDP4_SENDMSG,
            AT_UDP4_SENDMSG,
        ),
        (
            "cgroup/sendmsg6",
            PT_CGROUP_SOCK_ADDR,
            AT_UDP6_SENDMSG,
            AT_UDP6_SENDMSG,
        ),
        (
            "cgroup/recvmsg4",
            PT_CGROUP_SOCK_ADDR,
            AT_UDP4_RECVMSG,
            AT_UDP4_RECVMSG,
        ),
        (
            "cgroup/recvmsg6",
            PT_CGROUP_SOCK_ADDR,
            AT_UDP6_RECVMSG,
            AT_UDP6_RECVMSG,
        ),
        (
            "cgroup/bind4",
            PT_CGROUP_SOCK_ADDR,
            AT_INET4_BIND,
            AT_INET4_BIND,
        ),
        (
            "cgroup/bind6",
            PT_CGROUP_SOCK_ADDR,
            AT_INET6_BIND,
            AT_INET6_BIND,
        ),
        (
            "cgroup/sock_release",
            PT_CGROUP_SOCK,
            AT_SOCK_RELEASE,
            AT_SOCK_RELEASE,
        ),
        ("sock_ops", PT_SOCK_OPS, 0, AT_CGROUP_SOCK_OPS),
        (
            "cgroup/getsockopt",
            PT_CGROUP_SOCKOPT,
            AT_GETSOCKOPT,
            AT_GETSOCKOPT,
        ),
    ];
    for (name, ty, load_at, at) in hooks {
        out.push((name, cgroup_hook(&cg, ty, load_at, at, 1)));
    }
    out.push(("sk_lookup", sk_lookup()));
    out.push(("sk_msg", sk_msg()));
    out.push(("bpf_link pinning", link_pinning(&cg)));
    let helpers: [(&str, u32, u32, i32, i32); 9] = [
        (
            "netns cookie in sock_addr",
            PT_CGROUP_SOCK_ADDR,
            AT_INET4_CONNECT,
            H_GET_NETNS_COOKIE,
            1,
        ),
        (
            "netns cookie in sock_ops",
            PT_SOCK_OPS,
            0,
            H_GET_NETNS_COOKIE,
            1,
        ),
        (
            "netns cookie in sockopt",
            PT_CGROUP_SOCKOPT,
            AT_GETSOCKOPT,
            H_GET_NETNS_COOKIE,
            1,
        ),
        (
            "socket cookie in sock_addr",
            PT_CGROUP_SOCK_ADDR,
            AT_INET4_CONNECT,
            H_GET_SOCKET_COOKIE,
            1,
        ),
        (
            "socket cookie in sock_ops",
            PT_SOCK_OPS,
            0,
            H_GET_SOCKET_COOKIE,
            1,
        ),
        (
            "uid/gid in sock_addr",
            PT_CGROUP_SOCK_ADDR,
            AT_INET4_CONNECT,
            H_GET_CURRENT_UID_GID,
            1,
        ),
        (
            "uid/gid in sock_ops",
            PT_SOCK_OPS,
            0,
            H_GET_CURRENT_UID_GID,
            1,
        ),
        (
            "cb_flags_set in sock_ops",
            PT_SOCK_OPS,
            0,
            H_SOCK_OPS_CB_FLAGS_SET,
            1,
        ),
        (
            "sk_assign in sk_lookup",
            PT_SK_LOOKUP,
            AT_SK_LOOKUP,
            H_SK_ASSIGN,
            1,
        ),
    ];
    for (name, ty, at, h, ret) in helpers {
        out.push((name, helper(ty, at, h, ret)));
    }
    out.push(("map: hash", map(MT_HASH, 8, 8, 16, 0)));
    out.push(("map: LRU hash", map(MT_LRU_HASH, 8, 8, 16, 0)));
    out.push((
        "map: LPM trie",
        map(MT_LPM_TRIE, 8, 1, 16, BPF_F_NO_PREALLOC),
    ));
    out.push(("map: ring buffer", map(MT_RINGBUF, 0, 0, 4096, 0)));
    out.push(("map: sockmap", map(MT_SOCKMAP, 4, 4, 1, 0)));
    drop(cg);
    out
}
