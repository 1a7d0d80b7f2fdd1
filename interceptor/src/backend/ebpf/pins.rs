//! Loading the object, attaching its programs at the cgroup root and pinning them (versioned:
//! pins of earlier versions are dropped on load and cleanup), detaching, and the per-pod
//! sk_lookup link.

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
    sk_lookup, GETSOCKOPT_PROGRAM, LEGACY_MAPS, LEGACY_PROGRAMS, LINKED_PROGRAMS, MAPS, OBJECT,
    SK_LOOKUP_PROGRAM, SK_MSG_PROGRAM,
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
    fn prog(&self, prog: &str) -> PathBuf {
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
        LINKED_PROGRAMS.iter().all(|p| self.link(p).exists())
            && self.prog(GETSOCKOPT_PROGRAM).exists()
            && self.prog(SK_LOOKUP_PROGRAM).exists()
            && self.prog(SK_MSG_PROGRAM).exists()
            && self.map(names::INBOUND_PROG).exists()
            && self.map(names::POD_NETNS).exists()
    }

    /// Loads the programs and attaches them at `cgroup` unless already loaded; returns whether
    /// it loaded them now. Maps already pinned are reused (their entries survive).
    pub fn ensure_loaded(&self, cgroup: &Path, log: bool) -> Result<bool> {
        self.ensure_loaded_with(cgroup, log, true)
    }

    /// `ensure_loaded`, choosing whether the programs count per pod (`count` false prunes the
    /// counting code; the benchmark uses it to show what counting costs).
    pub fn ensure_loaded_with(&self, cgroup: &Path, log: bool, count: bool) -> Result<bool> {
        if self.loaded() {
            return Ok(false);
        }
        if !bpffs_mounted(&self.dir) {
            bail!(
                "no bpffs mounted above {} (mount -t bpf bpf /sys/fs/bpf)",
                self.dir.display()
            );
        }
        // A half-finished earlier attempt (or an earlier version's installation): start from a
        // clean slate, keeping pinned maps.
        self.detach_all(Some(cgroup));
        for m in LEGACY_MAPS.iter().chain(names::LEGACY) {
            let _ = std::fs::remove_file(self.map(m));
        }
        // Earlier versions pinned ORIG_BY_TUPLE as an LRU: its entries only matter while the
        // programs run, so an old one goes (with the counts that describe it).
        let tuple_pin = self.map(names::ORIG_BY_TUPLE);
        if let Ok(info) = aya::maps::MapInfo::from_pin(&tuple_pin) {
            if !matches!(info.map_type(), Ok(aya::maps::MapType::Hash)) {
                let _ = std::fs::remove_file(&tuple_pin);
                let _ = std::fs::remove_file(self.map(names::TUPLE_COUNT));
            }
        }
        for sub in ["maps", "links", "progs"] {
            std::fs::create_dir_all(self.dir.join(sub))
                .with_context(|| format!("creating {}", self.dir.display()))?;
        }
        let map_paths: Vec<(&str, PathBuf)> = MAPS.iter().map(|m| (*m, self.map(m))).collect();
        let sizes = crate::fault::map_entries();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        for (name, n) in &sizes {
            tracing::warn!(map = %name, max_entries = n, "test-only map size");
            loader.map_max_entries(name, *n);
        }
        let quota = u64::from(crate::fault::tuple_quota());
        loader.override_global("TUPLE_QUOTA", &quota, true);
        let store_port: u16 = crate::fault::store_port();
        loader.override_global("FAULT_STORE_PORT", &store_port, true);
        // Read-only global: with logging off the verifier prunes every log call.
        let log_flag: u8 = u8::from(log);
        loader.override_global("LOG_ENABLED", &log_flag, true);
        let count_flag: u8 = u8::from(count);
        loader.override_global("COUNT_ENABLED", &count_flag, true);
        let mut ebpf = loader.load(OBJECT).context("loading the eBPF object")?;
        let result = self.attach(&mut ebpf, cgroup);
        if result.is_err() {
            self.detach_all(Some(cgroup));
        }
        result.map(|_| true)
    }

    fn attach(&self, ebpf: &mut Ebpf, cgroup: &Path) -> Result<()> {
        let cg =
            File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        for name in LINKED_PROGRAMS {
            let prog = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?;
            if crate::fault::attach_fails(name, None) {
                bail!(
                    "attaching {name}: injected fault ({})",
                    crate::fault::FAULT_ENV
                );
            }
            // Each cgroup program type has its own load/attach/link types; the steps are the same.
            macro_rules! load_attach_link {
                ($p:expr) => {{
                    $p.load().with_context(|| format!("loading {name}"))?;
                    let id = $p
                        .attach(&cg, CgroupAttachMode::Single)
                        .with_context(|| format!("attaching {name}"))?;
                    $p.take_link(id)?.try_into()?
                }};
            }
            let link: FdLink = match prog {
                Program::CgroupSockAddr(p) => load_attach_link!(p),
                Program::SockOps(p) => load_attach_link!(p),
                Program::CgroupSock(p) => load_attach_link!(p),
                _ => bail!("{name}: unexpected program type"),
            };
            link.pin(self.link(name))
                .with_context(|| format!("pinning the link of {name}"))?;
        }
        let sk_lookup: &mut SkLookup = ebpf
            .program_mut(SK_LOOKUP_PROGRAM)
            .ok_or_else(|| anyhow!("program {SK_LOOKUP_PROGRAM} missing"))?
            .try_into()?;
        sk_lookup
            .load()
            .with_context(|| format!("loading {SK_LOOKUP_PROGRAM}"))?;
        sk_lookup.pin(self.prog(SK_LOOKUP_PROGRAM))?;
        let target = sk_lookup.fd()?.try_clone()?;
        let mut inbound = ProgramArray::try_from(
            ebpf.map_mut(names::INBOUND_PROG)
                .ok_or_else(|| anyhow!("map {} missing", names::INBOUND_PROG))?,
        )?;
        inbound
            .set(0, &target, 0)
            .with_context(|| format!("putting {SK_LOOKUP_PROGRAM} into INBOUND_PROG"))?;
        let prog: &mut CgroupSockopt = ebpf
            .program_mut(GETSOCKOPT_PROGRAM)
            .ok_or_else(|| anyhow!("program {GETSOCKOPT_PROGRAM} missing"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("loading {GETSOCKOPT_PROGRAM}"))?;
        prog.pin(self.prog(GETSOCKOPT_PROGRAM))?;
        let fd = prog.fd()?.as_fd();
        sys::prog_attach(
            cg.as_fd(),
            fd,
            sys::BPF_CGROUP_GETSOCKOPT,
            sys::BPF_F_ALLOW_MULTI,
        )
        .with_context(|| format!("attaching {GETSOCKOPT_PROGRAM}"))?;
        let accel = SockHash::<_, SockKey>::try_from(
            ebpf.map(names::ACCEL)
                .ok_or_else(|| anyhow!("map {} missing", names::ACCEL))?,
        )?;
        let accel_fd = accel.fd().try_clone()?;
        let sk_msg: &mut SkMsg = ebpf
            .program_mut(SK_MSG_PROGRAM)
            .ok_or_else(|| anyhow!("program {SK_MSG_PROGRAM} missing"))?
            .try_into()?;
        sk_msg
            .load()
            .with_context(|| format!("loading {SK_MSG_PROGRAM}"))?;
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
    fn detach_all(&self, cgroup: Option<&Path>) {
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

    /// Detaches and unpins everything of ours, maps included (`Pins::cleanup` releases the
    /// pods' reserved ports first).
    pub(super) fn unpin_all(&self, cgroup: &Path) -> Result<bool> {
        if !self.dir.exists() {
            return Ok(false);
        }
        self.detach_all(Some(cgroup));
        for m in MAPS
            .iter()
            .chain(LEGACY_MAPS)
            .chain(names::LEGACY)
            .chain(["AYA_LOGS"].iter())
        {
            let _ = std::fs::remove_file(self.map(m));
        }
        for sub in ["maps", "links", "progs"] {
            let _ = std::fs::remove_dir(self.dir.join(sub));
        }
        std::fs::remove_dir(&self.dir)
            .with_context(|| format!("removing {}", self.dir.display()))?;
        Ok(true)
    }

    /// Kernel id of the pinned connect4 program (whose log ring buffer `logs` reads).
    pub fn connect4_program_id(&self) -> Result<u32> {
        let link = aya::programs::links::PinnedLink::from_pin(self.link("ic_connect4"))
            .with_context(|| format!("no programs loaded under {}", self.dir.display()))?;
        Ok(FdLink::from(link).info()?.program_id())
    }
}

pub(super) fn open_map(pins: &Pins, name: &str) -> Result<MapData> {
    let path = pins.map(name);
    MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))
}
