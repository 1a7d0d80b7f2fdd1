//! Cutting a child process's privileges down for one [`Mode`], in the guest: called between
//! fork and exec (`CommandExt::pre_exec`), so only async-signal-safe calls are made here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::proto::Mode;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_MODE_FILTER: libc::c_ulong = 2;

#[repr(C)]
struct SockFilter {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}

const fn stmt(code: u16, k: u32) -> SockFilter {
    SockFilter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}
const fn jeq(k: u32, jt: u8, jf: u8) -> SockFilter {
    SockFilter {
        code: 0x15, // BPF_JMP | BPF_JEQ | BPF_K
        jt,
        jf,
        k,
    }
}

/// Classic-BPF seccomp filter: bpf() (x86_64 and x32 numbers) fails with EPERM, everything
/// else is allowed.
static DENY_BPF: [SockFilter; 7] = [
    stmt(0x20, 4), // A = seccomp_data.arch
    jeq(AUDIT_ARCH_X86_64, 0, 4),
    stmt(0x20, 0), // A = seccomp_data.nr
    jeq(libc::SYS_bpf as u32, 1, 0),
    jeq(libc::SYS_bpf as u32 | X32_SYSCALL_BIT, 0, 1),
    stmt(0x06, SECCOMP_RET_ERRNO | libc::EPERM as u32), // BPF_RET | BPF_K
    stmt(0x06, SECCOMP_RET_ALLOW),
];

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Installs the bpf()-denying filter on the calling thread (and so its future children).
pub fn deny_bpf() -> io::Result<()> {
    let prog = SockFprog {
        len: DENY_BPF.len() as u16,
        filter: DENY_BPF.as_ptr(),
    };
    // SAFETY: prctl with a valid, 'static filter program.
    check(unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            SECCOMP_MODE_FILTER,
            &prog as *const SockFprog,
        )
    })
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops CAP_BPF and CAP_SYS_ADMIN from every set, the bounding set included, so that no
/// exec (even of a root-owned binary as uid 0) gets them back.
pub fn drop_bpf_caps() -> io::Result<()> {
    for cap in [CAP_SYS_ADMIN, CAP_BPF] {
        // SAFETY: plain prctl; CAP_BPF is EINVAL before 5.8, where it does not exist.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: plain prctl.
    check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    })?;
    let mut head = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget/capset with a v3 header and two data words, as the ABI wants.
    check(unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut head as *mut CapHeader,
            data.as_mut_ptr(),
        ) as i32
    })?;
    for cap in [CAP_SYS_ADMIN, CAP_BPF] {
        let (word, bit) = ((cap / 32) as usize, 1u32 << (cap % 32));
        data[word].effective &= !bit;
        data[word].permitted &= !bit;
        data[word].inheritable &= !bit;
    }
    // SAFETY: as above.
    check(unsafe {
        libc::syscall(libc::SYS_capset, &mut head as *mut CapHeader, data.as_ptr()) as i32
    })
}

/// An identity-mapped user namespace (uids and gids 0..2^32-1 map to themselves), held open
/// by a file descriptor: processes that join it are root with every capability inside it and
/// none in the initial user namespace.
pub struct UserNs {
    fd: OwnedFd,
}

impl UserNs {
    /// Forks a holder that unshares a user namespace, maps it from here (writing another
    /// process's maps needs CAP_SETUID/CAP_SETGID in the parent namespace, which we have),
    /// keeps a descriptor of it and kills the holder.
    pub fn create() -> io::Result<UserNs> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 into a two-element array.
        check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
        // SAFETY: the child only makes async-signal-safe calls, then pauses until killed.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: async-signal-safe calls only.
            unsafe {
                let ok: u8 = if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                    1
                } else {
                    0
                };
                libc::write(fds[1], (&ok as *const u8).cast(), 1);
                loop {
                    libc::pause();
                }
            }
        }
        // SAFETY: both ends are ours; the write end is closed at once.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(wr);
        let mut ok = 0u8;
        // SAFETY: one-byte read into a local.
        let n = unsafe { libc::read(rd.as_raw_fd(), (&mut ok as *mut u8).cast(), 1) };
        let result = (|| {
            if n != 1 || ok != 1 {
                return Err(io::Error::other(
                    "unshare(CLONE_NEWUSER) failed in the holder",
                ));
            }
            std::fs::write(format!("/proc/{pid}/uid_map"), "0 0 4294967295\n")?;
            std::fs::write(format!("/proc/{pid}/gid_map"), "0 0 4294967295\n")?;
            let f = std::fs::File::open(format!("/proc/{pid}/ns/user"))?;
            Ok(UserNs { fd: f.into() })
        })();
        // SAFETY: our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        result
    }

    /// The descriptor [`apply`] joins (valid while `self` lives).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Joins the user namespace `fd`, then makes a mount and a network namespace of its own,
/// owned by it, as a rootless container has: `ip netns add` mounts, and returns (setns) to the
/// namespace it started in, which needs CAP_SYS_ADMIN over that namespace.
fn enter_userns(fd: RawFd) -> io::Result<()> {
    // SAFETY: setns/unshare in a single-threaded child after fork.
    check(unsafe { libc::setns(fd, libc::CLONE_NEWUSER) })?;
    check(unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWNET) })?;
    loopback_up()
}

/// Sets `lo` up in the calling thread's network namespace (a fresh one has it down, and then
/// even binds to addresses it does not have succeed).
fn loopback_up() -> io::Result<()> {
    // SAFETY: socket/ioctl/close on a zeroed ifreq naming "lo".
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let mut r = libc::ioctl(s, libc::SIOCGIFFLAGS as _, &mut req);
        if r == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            r = libc::ioctl(s, libc::SIOCSIFFLAGS as _, &req);
        }
        let err = io::Error::last_os_error();
        libc::close(s);
        if r < 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// Applies `mode` to the calling (freshly forked) process; `userns` is [`UserNs::raw_fd`].
pub fn apply(mode: Mode, userns: Option<RawFd>) -> io::Result<()> {
    match mode {
        Mode::Normal => Ok(()),
        Mode::Seccomp => deny_bpf(),
        Mode::NoCaps => drop_bpf_caps(),
        Mode::UserNs => match userns {
            Some(fd) => enter_userns(fd),
            None => Err(io::Error::other("no user namespace")),
        },
    }
}
