//! Loading the object with its globals, attaching its programs at the cgroup root and pinning
//! them, detaching, and the per-pod sk_lookup link. Deciding what to load (fresh, nothing, or
//! replacing pinned programs in place) is `upgrade.rs`.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{MapData, ProgramArray, SockHash};
use aya::programs::{links::FdLink, CgroupAttachMode, CgroupSockopt, Program, SkLookup, SkMsg};
use aya::{Ebpf, EbpfLoader};
use interceptor_common::maps::{names, SockKey};

use super::sys;
use super::{
    sk_lookup, GETSOCKOPT_PROGRAM, LEGACY_PROGRAMS, LINKED_PROGRAMS, LINKED_SINCE_MARKERS, MAPS,
    OBJECT, SK_LOOKUP_PROGRAM, SK_MSG_PROGRAM,
};

/// The cgroup v2 mount point: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones. Read from /proc/mounts rather than guessed.
pub fn detect_cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .min_by_key(|p| p.as_os_str().len())
        .ok_or_else(|| anyhow!("no cgroup v2 mount found in /proc/mounts (cgroup v2 is required)"))
}

/// Whether a bpffs is mounted at or above `dir`.
pub fn bpffs_mounted(dir: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return false;
    };
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        matches!((f.next(), f.next(), f.next()), (Some(_), Some(m), Some("bpf")) if dir.starts_with(m))
    })
}

/// The pinned state of one interceptor installation.
#[derive(Debug, Clone)]
pub struct Pins {
    pub dir: PathBuf,
}

impl Pins {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub(super) fn map(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }
    /// The bpf_link pin of a program.
    pub fn link(&self, prog: &str) -> PathBuf {
        self.dir.join("links").join(prog)
    }
    pub(super) fn prog(&self, prog: &str) -> PathBuf {
        self.dir.join("progs").join(prog)
    }

    /// The sk_lookup link pin of one pod netns.
    pub(super) fn sk_lookup_link(&self, netns_cookie: u64) -> PathBuf {
        self.dir
            .join("links")
            .join(format!("sk_lookup-{netns_cookie}"))
    }

    /// Whether every program is attached (all link pins and the program pins exist).
    pub fn loaded(&self) -> bool {
        LINKED_PROGRAMS.iter().all(|p| self.link(p).exists()) && self.loaded_before_markers()
    }

    /// Whether a complete installation of the release before layout markers (0fd318a) is pinned
    /// here: everything [`loaded`](Self::loaded) asks but the programs added since
    /// (`LINKED_SINCE_MARKERS`), which an upgrade attaches.
    pub(super) fn loaded_before_markers(&self) -> bool {
        LINKED_PROGRAMS
            .iter()
            .filter(|p| !LINKED_SINCE_MARKERS.contains(p))
            .all(|p| self.link(p).exists())
            && self.prog(GETSOCKOPT_PROGRAM).exists()
            && self.prog(SK_LOOKUP_PROGRAM).exists()
            && self.prog(SK_MSG_PROGRAM).exists()
            && self.map(names::INBOUND_PROG).exists()
            && self.map(names::POD_NETNS).exists()
    }

    /// The object with its maps (pinned ones reused, missing ones created and pinned) and this
    /// binary's globals; no program is loaded into the kernel yet.
    pub(super) fn load_object(&self, globals: &Globals) -> Result<Ebpf> {
        let sizes = crate::fault::map_entries();
        let mut loader = EbpfLoader::new();
        for name in MAPS {
            loader.map_pin_path(name, self.map(name));
        }
        for (name, n) in &sizes {
            tracing::warn!(map = %name, max_entries = n, "test-only map size");
            loader.map_max_entries(name, *n);
        }
        globals.set(&mut loader);
        loader.load(OBJECT).context("loading the eBPF object")
    }

    pub(super) fn attach(&self, ebpf: &mut Ebpf, cgroup: &Path) -> Result<()> {
        let cg =
            File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        for name in LINKED_PROGRAMS {
            if crate::fault::attach_fails(name, None) {
                bail!(
                    "attaching {name}: injected fault ({})",
                    crate::fault::FAULT_ENV
                );
            }
            load_cgroup_program(ebpf, name)?;
            let link = attach_cgroup_link(ebpf, name, &cg)?;
            link.pin(self.link(name))
                .with_context(|| format!("pinning the link of {name}"))?;
        }
        let sk_lookup = load_sk_lookup(ebpf)?;
        sk_lookup.pin(self.prog(SK_LOOKUP_PROGRAM))?;
        let target = sk_lookup.fd()?.try_clone()?;
        let mut inbound = ProgramArray::try_from(
            ebpf.map_mut(names::INBOUND_PROG)
                .ok_or_else(|| anyhow!("map {} missing", names::INBOUND_PROG))?,
        )?;
        inbound
            .set(0, &target, 0)
            .with_context(|| format!("putting {SK_LOOKUP_PROGRAM} into INBOUND_PROG"))?;
        let prog = load_getsockopt(ebpf)?;
        prog.pin(self.prog(GETSOCKOPT_PROGRAM))?;
        let fd = prog.fd()?.as_fd();
        sys::prog_attach(
            cg.as_fd(),
            fd,
            sys::BPF_CGROUP_GETSOCKOPT,
            sys::BPF_F_ALLOW_MULTI,
        )
        .with_context(|| format!("attaching {GETSOCKOPT_PROGRAM}"))?;
        let accel_fd = accel_fd(ebpf)?;
        let sk_msg = load_sk_msg(ebpf)?;
        sk_msg.pin(self.prog(SK_MSG_PROGRAM))?;
        let id = sk_msg
            .attach(&accel_fd)
            .with_context(|| format!("attaching {SK_MSG_PROGRAM}"))?;
        // The link's Drop would detach it; the attachment is to live with the pinned map.
        std::mem::forget(sk_msg.take_link(id)?);
        Ok(())
    }

    /// Detaches every program (unpinning links detaches them) and, with `cgroup`, the
    /// getsockopt program. Best effort: used for cleanup and to recover from half-loads.
    pub(super) fn detach_all(&self, cgroup: Option<&Path>) {
        for name in LINKED_PROGRAMS.iter().chain(LEGACY_PROGRAMS) {
            let _ = std::fs::remove_file(self.link(name));
        }
        let pin = self.prog(GETSOCKOPT_PROGRAM);
        if let (Some(cg), Ok(prog)) = (
            cgroup,
            CgroupSockopt::from_pin(&pin, aya::programs::CgroupSockoptAttachType::Get),
        ) {
            if let (Ok(cg), Ok(fd), Ok(info)) = (File::open(cg), prog.fd(), prog.info()) {
                // Only if attached: never another program in its place (see cgroup_prog_detach).
                let (cg, fd) = (cg.as_fd(), fd.as_fd());
                let _ = sys::cgroup_prog_detach(cg, fd, info.id(), sys::BPF_CGROUP_GETSOCKOPT);
            }
        }
        let _ = std::fs::remove_file(pin);
        let pin = self.prog(SK_MSG_PROGRAM);
        if let (Ok(prog), Ok(map)) = (
            SkMsg::from_pin(&pin),
            MapData::from_pin(self.map(names::ACCEL)),
        ) {
            if let Ok(fd) = prog.fd() {
                let _ = sys::prog_detach(map.fd().as_fd(), fd.as_fd(), sys::BPF_SK_MSG_VERDICT);
            }
        }
        let _ = std::fs::remove_file(pin);
        let _ = std::fs::remove_file(self.prog(SK_LOOKUP_PROGRAM));
        // Per-pod sk_lookup links: unpinning detaches them from their netns.
        if let Ok(dir) = std::fs::read_dir(self.dir.join("links")) {
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with("sk_lookup-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Attaches the pod's own sk_lookup program (`program`: it carries the pod's id and
    /// tail-calls `ic_sk_lookup`) to the pod's netns, once, and pins the link; returns the pin
    /// when it was made now.
    pub(super) fn attach_sk_lookup(
        &self,
        netns: &Path,
        ns: std::os::fd::BorrowedFd<'_>,
        cookie: u64,
        program: impl FnOnce() -> std::io::Result<OwnedFd>,
    ) -> Result<Option<PathBuf>> {
        let pin = self.sk_lookup_link(cookie);
        if pin.exists() {
            return Ok(None);
        }
        if crate::fault::attach_fails(SK_LOOKUP_PROGRAM, Some(netns)) {
            bail!(
                "attaching sk_lookup to the pod netns: injected fault ({})",
                crate::fault::FAULT_ENV
            );
        }
        let prog = program().context("loading the pod's sk_lookup program")?;
        let link =
            sk_lookup::attach(prog.as_fd(), ns).context("attaching sk_lookup to the pod netns")?;
        sk_lookup::pin(link.as_fd(), &pin).context("pinning the sk_lookup link")?;
        Ok(Some(pin))
    }

    /// Kernel id of the pinned connect4 program (whose log ring buffer `logs` reads).
    pub fn connect4_program_id(&self) -> Result<u32> {
        let link = aya::programs::links::PinnedLink::from_pin(self.link("ic_connect4"))
            .with_context(|| format!("no programs loaded under {}", self.dir.display()))?;
        Ok(FdLink::from(link).info()?.program_id())
    }
}

/// Each cgroup program type has its own Rust type in aya; the steps are the same.
macro_rules! cgroup_program {
    ($prog:expr, $name:expr, $p:ident => $body:expr) => {
        match $prog {
            Program::CgroupSockAddr($p) => $body,
            Program::SockOps($p) => $body,
            Program::CgroupSock($p) => $body,
            _ => bail!("{}: unexpected program type", $name),
        }
    };
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Program> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))
}

/// Loads the cgroup program `name` (one of `LINKED_PROGRAMS`) into the kernel.
pub(super) fn load_cgroup_program(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    cgroup_program!(program(ebpf, name)?, name, p => p.load().with_context(|| format!("loading {name}"))?);
    Ok(())
}

/// Attaches the loaded cgroup program `name` at `cg` with a bpf_link (multi mode).
pub(super) fn attach_cgroup_link(ebpf: &mut Ebpf, name: &str, cg: &File) -> Result<FdLink> {
    Ok(cgroup_program!(program(ebpf, name)?, name, p => {
        let id = p
            .attach(cg, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name}"))?;
        p.take_link(id)?.try_into()?
    }))
}

pub(super) fn load_sk_lookup(ebpf: &mut Ebpf) -> Result<&mut SkLookup> {
    let p: &mut SkLookup = program(ebpf, SK_LOOKUP_PROGRAM)?.try_into()?;
    p.load()
        .with_context(|| format!("loading {SK_LOOKUP_PROGRAM}"))?;
    Ok(p)
}

pub(super) fn load_getsockopt(ebpf: &mut Ebpf) -> Result<&mut CgroupSockopt> {
    let p: &mut CgroupSockopt = program(ebpf, GETSOCKOPT_PROGRAM)?.try_into()?;
    p.load()
        .with_context(|| format!("loading {GETSOCKOPT_PROGRAM}"))?;
    Ok(p)
}

pub(super) fn load_sk_msg(ebpf: &mut Ebpf) -> Result<&mut SkMsg> {
    let p: &mut SkMsg = program(ebpf, SK_MSG_PROGRAM)?.try_into()?;
    p.load()
        .with_context(|| format!("loading {SK_MSG_PROGRAM}"))?;
    Ok(p)
}

/// A descriptor of the object's `ACCEL` SockHash (the pinned one, reused).
pub(super) fn accel_fd(ebpf: &Ebpf) -> Result<aya::maps::sock::SockMapFd> {
    let accel = SockHash::<_, SockKey>::try_from(
        ebpf.map(names::ACCEL)
            .ok_or_else(|| anyhow!("map {} missing", names::ACCEL))?,
    )?;
    Ok(accel.fd().try_clone()?)
}

/// The globals the object is loaded with (frozen: the verifier prunes what they switch off).
#[derive(Debug, Clone)]
pub struct Globals {
    log: u8,
    count: u8,
    tuple_quota: u64,
    store_port: u16,
    netns_helper: u8,
}

impl Globals {
    /// With decision logging `log`, per-pod counting `count`, and the test knobs of `fault`.
    pub fn new(log: bool, count: bool) -> Self {
        Globals {
            log: u8::from(log),
            count: u8::from(count),
            tuple_quota: u64::from(crate::fault::tuple_quota()),
            store_port: crate::fault::store_port(),
            netns_helper: u8::from(netns_helper()),
        }
    }

    pub fn set<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        loader.override_global("NETNS_HELPER", &self.netns_helper, true);
        loader.override_global("TUPLE_QUOTA", &self.tuple_quota, true);
        loader.override_global("FAULT_STORE_PORT", &self.store_port, true);
        loader.override_global("LOG_ENABLED", &self.log, true);
        loader.override_global("COUNT_ENABLED", &self.count, true);
    }

    /// The program identity: FNV-1a (stable across Rust versions, unlike std's hasher) of the
    /// object and the globals, as 16 hex digits.
    pub fn identity(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(OBJECT);
        eat(b"LOG_ENABLED");
        eat(&[self.log]);
        eat(b"COUNT_ENABLED");
        eat(&[self.count]);
        eat(b"TUPLE_QUOTA");
        eat(&self.tuple_quota.to_le_bytes());
        eat(b"FAULT_STORE_PORT");
        eat(&self.store_port.to_le_bytes());
        eat(b"NETNS_HELPER");
        eat(&[self.netns_helper]);
        format!("{h:016x}")
    }
}

/// Whether sock_ops, getsockopt and sk_msg programs may call bpf_get_netns_cookie here (5.15+;
/// the programs' `NETNS_HELPER`). Probed once: a test load of a tiny program per type.
pub fn netns_helper() -> bool {
    use aya::programs::ProgramType;
    use aya::sys::{is_helper_supported, BpfHelper};
    if crate::fault::like_5_10() {
        return false;
    }
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        [
            ProgramType::SockOps,
            ProgramType::CgroupSockopt,
            ProgramType::SkMsg,
        ]
        .into_iter()
        .all(|ty| is_helper_supported(ty, BpfHelper::BPF_FUNC_get_netns_cookie).unwrap_or(false))
    })
}

pub(super) fn open_map(pins: &Pins, name: &str) -> Result<MapData> {
    let path = pins.map(name);
    MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))
}
