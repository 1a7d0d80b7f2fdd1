//! Every raw `bpf()` call of the backend, and nothing else: aya covers loading the object and
//! its maps, these are the commands it does not (attaching getsockopt and sk_msg with
//! `BPF_PROG_ATTACH`, the per-pod sk_lookup program built at registration, its link and pin,
//! the doctor's cgroup-link probe, `BPF_PROG_QUERY`: what is attached at a cgroup, and the
//! upgrade's swaps: `BPF_LINK_UPDATE`, `BPF_PROG_ATTACH` with `BPF_F_REPLACE`, and the lookups
//! they need). Each builds its `union bpf_attr` from typed arguments, so the only pointers the
//! kernel sees are to memory borrowed for the call.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `enum bpf_prog_type` BPF_PROG_TYPE_SK_LOOKUP.
pub const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
/// `enum bpf_attach_type` values we attach with.
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_SK_MSG_VERDICT: u32 = 7;
pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;
pub const BPF_SK_LOOKUP: u32 = 36;
/// `BPF_PROG_ATTACH` flag: several programs on one cgroup.
pub const BPF_F_ALLOW_MULTI: u32 = 2;
/// `BPF_PROG_ATTACH`/`BPF_LINK_UPDATE` flag: replace the program named, only if it is the one
/// attached (so two upgrades racing cannot replace each other's program unseen).
const BPF_F_REPLACE: u32 = 4;
/// `BPF_PROG_QUERY` flag: the programs that run for the cgroup (its own and its ancestors'),
/// in the order they run, rather than those attached to it.
pub const BPF_F_QUERY_EFFECTIVE: u32 = 1;

/// One eBPF instruction as the kernel reads it: opcode, dst/src registers, offset, immediate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    pub code: u8,
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    /// One instruction: `code`, registers `dst` and `src`, offset and immediate.
    pub fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Self {
        Insn {
            code,
            regs: (src << 4) | (dst & 0x0f),
            off,
            imm,
        }
    }

    /// `dst = imm64` (two instruction slots); `src` = 1 (BPF_PSEUDO_MAP_FD) makes it a map fd.
    pub fn ld_imm64(dst: u8, src: u8, imm: u64) -> [Insn; 2] {
        [
            Insn::new(0x18, dst, src, 0, imm as u32 as i32),
            Insn::new(0, 0, 0, 0, (imm >> 32) as u32 as i32),
        ]
    }
}

/// `bpf(cmd, attr, sizeof attr)`: private, since `attr` may hold pointers; each public function
/// below fills it from borrowed data that outlives the call.
fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> io::Result<i64> {
    // SAFETY: `attr` is a zeroed `union bpf_attr` prefix of the length passed, laid out for
    // `cmd` by the callers in this file; any pointer in it is to memory they borrow for the
    // duration of the call, sized as the attr says. The kernel touches nothing else.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn put_u32(attr: &mut [u8], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut [u8], at: usize, v: u64) {
    attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: `fd` is a new descriptor the kernel just returned to us; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// BPF_PROG_LOAD of `insns` (license GPL) as a program of `prog_type`, named `name` (at most 15
/// bytes, as `bpftool prog` shows it). With `log`, the verifier writes its log there.
pub fn prog_load(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[Insn],
    name: &str,
    log: Option<&mut [u8]>,
) -> io::Result<OwnedFd> {
    let license = c"GPL";
    // BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, log_level, log_size, log_buf,
    // kern_version, prog_flags, prog_name[16], prog_ifindex, expected_attach_type.
    let mut attr = [0u8; 72];
    put_u32(&mut attr, 0, prog_type);
    put_u32(&mut attr, 4, insns.len() as u32);
    put_u64(&mut attr, 8, insns.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    if let Some(log) = log {
        put_u32(&mut attr, 24, 1);
        put_u32(&mut attr, 28, log.len() as u32);
        put_u64(&mut attr, 32, log.as_mut_ptr() as u64);
    }
    let name = &name.as_bytes()[..name.len().min(15)];
    attr[48..48 + name.len()].copy_from_slice(name);
    put_u32(&mut attr, 68, expected_attach_type);
    bpf(BPF_PROG_LOAD, &mut attr).map(owned)
}

fn link_create_raw(prog: BorrowedFd<'_>, target: RawFd, attach_type: u32) -> io::Result<OwnedFd> {
    // BPF_LINK_CREATE: prog_fd, target_fd, attach_type, flags.
    let mut attr = [0u8; 64];
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 4, target as u32);
    put_u32(&mut attr, 8, attach_type);
    bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

/// BPF_LINK_CREATE: attaches `prog` to `target`; the link lives while its fd or a pin does.
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    link_create_raw(prog, target.as_raw_fd(), attach_type)
}

/// BPF_LINK_CREATE with an invalid target fd (-1): attaches nothing, and the errno tells how
/// far the kernel got (EBADF: it looked the target up, so the link type exists).
pub fn link_create_without_target(prog: BorrowedFd<'_>, attach_type: u32) -> io::Result<()> {
    link_create_raw(prog, -1, attach_type).map(drop)
}

/// BPF_OBJ_PIN: pins a bpf object (program, map or link) at `path` on a bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in pin path"))?;
    // BPF_OBJ_PIN: pathname, bpf_fd, file_flags.
    let mut attr = [0u8; 16];
    put_u64(&mut attr, 0, path.as_ptr() as u64);
    put_u32(&mut attr, 8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

fn prog_attach_cmd(
    cmd: libc::c_long,
    target: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    attach_type: u32,
    flags: u32,
) -> io::Result<()> {
    // BPF_PROG_ATTACH/DETACH: target_fd, attach_bpf_fd, attach_type, attach_flags.
    let mut attr = [0u8; 32];
    put_u32(&mut attr, 0, target.as_raw_fd() as u32);
    put_u32(&mut attr, 4, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 8, attach_type);
    put_u32(&mut attr, 12, flags);
    bpf(cmd, &mut attr).map(drop)
}

/// BPF_PROG_ATTACH of `prog` to `target` (a cgroup or a map): lives until detached (or the
/// map goes), not tied to any fd of ours.
pub fn prog_attach(
    target: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    attach_type: u32,
    flags: u32,
) -> io::Result<()> {
    prog_attach_cmd(BPF_PROG_ATTACH, target, prog, attach_type, flags)
}

/// BPF_PROG_ATTACH of `prog` to the cgroup `target` in its multi-mode list in place of `old`,
/// atomically (`BPF_F_ALLOW_MULTI | BPF_F_REPLACE`): the hook runs one or the other, never
/// neither. Fails (ENOENT) when `old` is not attached there.
pub fn prog_attach_replace(
    target: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    old: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<()> {
    // BPF_PROG_ATTACH: target_fd, attach_bpf_fd, attach_type, attach_flags, replace_bpf_fd.
    let mut attr = [0u8; 32];
    put_u32(&mut attr, 0, target.as_raw_fd() as u32);
    put_u32(&mut attr, 4, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 8, attach_type);
    put_u32(&mut attr, 12, BPF_F_ALLOW_MULTI | BPF_F_REPLACE);
    put_u32(&mut attr, 16, old.as_raw_fd() as u32);
    bpf(BPF_PROG_ATTACH, &mut attr).map(drop)
}

/// BPF_LINK_UPDATE: the link runs `prog` from now on, atomically; with `old`, only if `old` is
/// what it runs (`BPF_F_REPLACE`, else EPERM).
pub fn link_update(
    link: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    old: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    // BPF_LINK_UPDATE: link_fd, new_prog_fd, flags, old_prog_fd.
    let mut attr = [0u8; 16];
    put_u32(&mut attr, 0, link.as_raw_fd() as u32);
    put_u32(&mut attr, 4, prog.as_raw_fd() as u32);
    if let Some(old) = old {
        put_u32(&mut attr, 8, BPF_F_REPLACE);
        put_u32(&mut attr, 12, old.as_raw_fd() as u32);
    }
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// BPF_OBJ_GET: opens the bpf object (program, map or link) pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in pin path"))?;
    // BPF_OBJ_GET: pathname, bpf_fd (0), file_flags (0: read-write).
    let mut attr = [0u8; 16];
    put_u64(&mut attr, 0, path.as_ptr() as u64);
    bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

/// BPF_PROG_GET_FD_BY_ID: a descriptor of the loaded program `id`.
pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    // BPF_PROG_GET_FD_BY_ID: prog_id, next_id, open_flags.
    let mut attr = [0u8; 12];
    put_u32(&mut attr, 0, id);
    bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).map(owned)
}

/// BPF_OBJ_GET_INFO_BY_FD into `info` (its first bytes, as many as the kernel has).
fn obj_info(fd: BorrowedFd<'_>, info: &mut [u8]) -> io::Result<()> {
    // BPF_OBJ_GET_INFO_BY_FD: bpf_fd, info_len, info.
    let mut attr = [0u8; 16];
    put_u32(&mut attr, 0, fd.as_raw_fd() as u32);
    put_u32(&mut attr, 4, info.len() as u32);
    put_u64(&mut attr, 8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The id of the program a link runs (`bpf_link_info.prog_id`).
pub fn link_prog_id(link: BorrowedFd<'_>) -> io::Result<u32> {
    // bpf_link_info: type, id, prog_id.
    let mut info = [0u8; 16];
    obj_info(link, &mut info)?;
    Ok(u32_at(&info, 8))
}

/// What a map holds, as the kernel created it: what a program relies on when it reuses the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    /// `enum bpf_map_type`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

/// The layout of the map `map` (`bpf_map_info`).
pub fn map_layout(map: BorrowedFd<'_>) -> io::Result<MapLayout> {
    // bpf_map_info: type, id, key_size, value_size, max_entries, map_flags.
    let mut info = [0u8; 24];
    obj_info(map, &mut info)?;
    Ok(MapLayout {
        map_type: u32_at(&info, 0),
        key_size: u32_at(&info, 8),
        value_size: u32_at(&info, 12),
        max_entries: u32_at(&info, 16),
    })
}

/// BPF_PROG_DETACH of `prog` (kernel id `prog_id`) from the cgroup `target`, only if it is
/// attached there; returns whether it was. The kernel's own detach is not that careful: where
/// the programs of `attach_type` were attached without BPF_F_ALLOW_MULTI (by someone else, so
/// ours could not be attached there), it detaches whichever one is attached, whatever fd is
/// named.
pub fn cgroup_prog_detach(
    target: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    prog_id: u32,
    attach_type: u32,
) -> io::Result<bool> {
    if !prog_query(target, attach_type, 0)?.contains(&prog_id) {
        return Ok(false);
    }
    prog_detach(target, prog, attach_type).map(|()| true)
}

/// BPF_PROG_DETACH: undoes [`prog_attach`]. On a cgroup, use [`cgroup_prog_detach`].
pub fn prog_detach(
    target: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<()> {
    prog_attach_cmd(BPF_PROG_DETACH, target, prog, attach_type, 0)
}

/// BPF_MAP_CREATE of a map without BTF: `map_type`, key and value sizes, capacity.
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    // BPF_MAP_CREATE: map_type, key_size, value_size, max_entries.
    let mut attr = [0u8; 16];
    put_u32(&mut attr, 0, map_type);
    put_u32(&mut attr, 4, key_size);
    put_u32(&mut attr, 8, value_size);
    put_u32(&mut attr, 12, max_entries);
    bpf(BPF_MAP_CREATE, &mut attr).map(owned)
}

/// BPF_MAP_LOOKUP_ELEM: copies the value at `key` into `value`, both the map's sizes.
pub fn map_lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<()> {
    // BPF_MAP_LOOKUP_ELEM: map_fd, key, value.
    let mut attr = [0u8; 32];
    put_u32(&mut attr, 0, map.as_raw_fd() as u32);
    put_u64(&mut attr, 8, key.as_ptr() as u64);
    put_u64(&mut attr, 16, value.as_mut_ptr() as u64);
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).map(drop)
}

/// The kernel id of the program `prog` (`bpf_prog_info.id`, BPF_OBJ_GET_INFO_BY_FD).
pub fn prog_id(prog: BorrowedFd<'_>) -> io::Result<u32> {
    // bpf_prog_info up to and including its name: type, id, tag, ..., name[16] at 64.
    let mut info = [0u8; 80];
    obj_info(prog, &mut info)?;
    Ok(u32_at(&info, 4))
}

/// BPF_PROG_QUERY: the ids of the programs attached to `target` (a cgroup) for `attach_type`,
/// with [`BPF_F_QUERY_EFFECTIVE`] those that run, in the order they run. Empty when none are.
pub fn prog_query(target: BorrowedFd<'_>, attach_type: u32, flags: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    loop {
        // BPF_PROG_QUERY: target_fd, attach_type, query_flags, attach_flags (out), prog_ids,
        // prog_cnt (in: room, out: how many).
        let mut attr = [0u8; 32];
        put_u32(&mut attr, 0, target.as_raw_fd() as u32);
        put_u32(&mut attr, 4, attach_type);
        put_u32(&mut attr, 8, flags);
        put_u64(&mut attr, 16, ids.as_mut_ptr() as u64);
        put_u32(&mut attr, 24, ids.len() as u32);
        let r = bpf(BPF_PROG_QUERY, &mut attr);
        let count = u32::from_ne_bytes(attr[24..28].try_into().expect("4 bytes")) as usize;
        match r {
            Ok(_) => {
                ids.truncate(count.min(ids.len()));
                return Ok(ids);
            }
            // More than there was room for: the kernel said how many; again with that room.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && count > ids.len() => {
                ids = vec![0u32; count];
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insn_is_the_kernels_8_bytes() {
        assert_eq!(std::mem::size_of::<Insn>(), 8);
    }

    #[test]
    fn pin_path_with_nul_is_refused_before_the_syscall() {
        let f = std::fs::File::open("/dev/null").unwrap();
        use std::os::fd::AsFd;
        let e = obj_pin(f.as_fd(), Path::new("/sys/fs/bpf/a\0b")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
