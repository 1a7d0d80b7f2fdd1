//! The eBPF backend: loads interceptor-ebpf's programs once, attaches them at a cgroup v2 root
//! and pins programs, links and maps under a bpffs folder of ours so they outlive the process;
//! pods are registered (by netns cookie) with a few map writes.
//!
//! Layout under the bpffs folder: `maps/<MAP>`, `links/<program>` (bpf_link pins: unpinning
//! detaches), `links/sk_lookup-<netns cookie>` (each pod's own sk_lookup program, see
//! `sk_lookup.rs`), `progs/<program>`. aya 0.14 cannot turn a cgroup-sockopt link into a
//! pinnable `FdLink`, so getsockopt is attached with `BPF_PROG_ATTACH` (multi mode), which
//! lives until `cleanup` detaches it. `ic_sk_msg` (acceleration) is attached to the pinned
//! `ACCEL` SockHash with `BPF_PROG_ATTACH` too: the attachment lives as long as the map.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{lpm_trie::Key, HashMap, LpmTrie, Map, MapData};
use aya::maps::{Array, PerCpuArray, PerCpuValues, ProgramArray, SkStorage, SockHash};
use aya::programs::{links::FdLink, CgroupAttachMode, CgroupSockopt, Program, SkLookup, SkMsg};
use aya::{Ebpf, EbpfLoader};
use interceptor_common::config::Config;
use interceptor_common::decision::PodPolicy;
use interceptor_common::maps::stat;
use interceptor_common::maps::{
    mapped_v4, names, AddrKey, Cidr4Data, Cidr6Data, GroupKey, PortKey, SockKey, SockOrig,
    TupleKey, ADDR_DNS, ADDR_LOCAL, PORT_EXCLUDED, PORT_GUARDED, PORT_INBOUND, PORT_INCLUDED,
};
use interceptor_common::policy;
use ipnet::IpNet;

use crate::netns;

#[path = "reserved_ports.rs"]
pub mod reserved_ports;

/// The object built by build.rs from interceptor-ebpf.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor"));

/// Programs attached with a pinnable bpf_link.
pub const LINKED_PROGRAMS: &[&str] = &[
    "ic_connect4",
    "ic_connect6",
    "ic_sendmsg4",
    "ic_sendmsg6",
    "ic_recvmsg4",
    "ic_recvmsg6",
    "ic_bind4",
    "ic_bind6",
    "ic_sockops",
    "ic_getpeername4",
    "ic_getpeername6",
];
/// Programs of earlier versions: their link pins are removed with the others.
const LEGACY_PROGRAMS: &[&str] = &["ic_sock_release"];
/// The inbound program, pinned at load and put into `INBOUND_PROG[0]`: each pod netns gets a
/// program of its own at registration that tail-calls it (`sk_lookup.rs`).
pub const SK_LOOKUP_PROGRAM: &str = "ic_sk_lookup";
/// The program attached with BPF_PROG_ATTACH (see the module docs).
pub const GETSOCKOPT_PROGRAM: &str = "ic_getsockopt";
/// Attached to the `ACCEL` SockHash with BPF_PROG_ATTACH.
pub const SK_MSG_PROGRAM: &str = "ic_sk_msg";
/// Every map the programs use.
pub const MAPS: &[&str] = &[
    names::POD_POLICY,
    names::PORTS,
    names::ADDRS,
    names::GROUPS,
    names::CIDR4_EXCL,
    names::CIDR4_INCL,
    names::CIDR6_EXCL,
    names::CIDR6_INCL,
    names::ORIG_BY_TUPLE,
    names::TUPLE_COUNT,
    names::SK_ORIG,
    names::SK_PROXY,
    names::SK_ACCEL,
    names::INBOUND_NETNS,
    names::INBOUND_PROG,
    names::LISTENERS,
    names::STATS,
    names::ACCEL,
    names::ACCEL_ON,
];

/// Maps of earlier versions, unpinned on load and cleanup (`POD_BY_ADDR`: inbound by address,
/// replaced by the per-pod sk_lookup program).
const LEGACY_MAPS: &[&str] = &["POD_BY_ADDR"];

const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_CGROUP_GETSOCKOPT: u32 = 21;
const BPF_SK_MSG_VERDICT: u32 = 7;
const BPF_F_ALLOW_MULTI: u32 = 2;

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

/// SO_NETNS_COOKIE of a socket created inside the netns at `path`.
pub fn netns_cookie(path: Option<&Path>) -> Result<u64> {
    netns::run_in(path, netns_cookie_here)
}

/// The cookie of the caller's own netns.
pub fn netns_cookie_here() -> Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .context("creating a socket to read the netns cookie")?;
    socket_netns_cookie(sock.as_fd()).context("getsockopt(SO_NETNS_COOKIE)")
}

/// A netns's identity for the daemon's records: its cookie, or where SO_NETNS_COOKIE is missing
/// (before 5.14, where the eBPF backend is unavailable anyway) its nsfs inode with the top bit
/// set, so it can never equal a cookie. Inodes can be reused once a netns is gone; cookies not.
pub fn netns_identity(path: &Path) -> Result<u64> {
    match netns_cookie(Some(path)) {
        Ok(c) => Ok(c),
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.raw_os_error() == Some(libc::ENOPROTOOPT))
            }) =>
        {
            use std::os::unix::fs::MetadataExt;
            let meta =
                std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
            Ok(1 << 63 | meta.ino())
        }
        Err(e) => Err(e),
    }
}

/// SO_NETNS_COOKIE (Linux 5.14+) of a socket: the cookie of the netns it was created in.
pub fn socket_netns_cookie(sock: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            71,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

fn prog_attach(
    cmd: libc::c_long,
    target: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    attach_type: u32,
    flags: u32,
) -> std::io::Result<()> {
    // union bpf_attr for BPF_PROG_ATTACH/DETACH: target_fd, attach_bpf_fd, attach_type, attach_flags.
    let mut attr = [0u32; 8];
    attr[0] = target.as_raw_fd() as u32;
    attr[1] = prog.as_raw_fd() as u32;
    attr[2] = attach_type;
    attr[3] = flags;
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
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
    fn map(&self, name: &str) -> PathBuf {
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
    fn sk_lookup_link(&self, netns_cookie: u64) -> PathBuf {
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
        prog_attach(
            BPF_PROG_ATTACH,
            cg.as_fd(),
            fd,
            BPF_CGROUP_GETSOCKOPT,
            BPF_F_ALLOW_MULTI,
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
            if let (Ok(cg), Ok(fd)) = (File::open(cg), prog.fd()) {
                let _ = prog_attach(
                    BPF_PROG_DETACH,
                    cg.as_fd(),
                    fd.as_fd(),
                    BPF_CGROUP_GETSOCKOPT,
                    0,
                );
            }
        }
        let _ = std::fs::remove_file(pin);
        let pin = self.prog(SK_MSG_PROGRAM);
        if let (Ok(prog), Ok(map)) = (
            SkMsg::from_pin(&pin),
            MapData::from_pin(self.map(names::ACCEL)),
        ) {
            if let Ok(fd) = prog.fd() {
                let _ = prog_attach(
                    BPF_PROG_DETACH,
                    map.fd().as_fd(),
                    fd.as_fd(),
                    BPF_SK_MSG_VERDICT,
                    0,
                );
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

    /// Attaches the pod's own sk_lookup program (its netns cookie baked in, tail-calling
    /// `ic_sk_lookup`) to the pod's netns, once, and pins the link; returns the pin when it was
    /// made now.
    fn attach_sk_lookup(&self, netns: &Path, cookie: u64) -> Result<Option<PathBuf>> {
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
        let slot = open_map(self, names::INBOUND_NETNS)?;
        let target = open_map(self, names::INBOUND_PROG)?;
        let prog = super::sk_lookup::load(slot.fd().as_fd(), target.fd().as_fd(), cookie)
            .context("loading the pod's sk_lookup program")?;
        let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        let link = super::sk_lookup::attach(prog.as_fd(), ns.as_fd())
            .context("attaching sk_lookup to the pod netns")?;
        super::sk_lookup::pin(link.as_fd(), &pin).context("pinning the sk_lookup link")?;
        Ok(Some(pin))
    }

    /// Detaches and unpins everything of ours, maps included.
    pub fn cleanup(&self, cgroup: &Path) -> Result<bool> {
        if !self.dir.exists() {
            return Ok(false);
        }
        // The pods' reserved ports first: the record of which are ours is in the maps.
        if self.loaded() {
            if let Err(e) = self.maps().and_then(|m| m.release_all_reserved()) {
                tracing::warn!("releasing reserved ports: {e:#}");
            }
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

    /// Opens the pinned maps for writing pod entries.
    pub fn maps(&self) -> Result<PodMaps> {
        if !self.loaded() {
            bail!(
                "the eBPF programs are not loaded under {}",
                self.dir.display()
            );
        }
        PodMaps::open(self)
    }
}

fn open_map(pins: &Pins, name: &str) -> Result<MapData> {
    let path = pins.map(name);
    MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))
}

/// The maps a pod's registration writes, opened from their pins.
pub struct PodMaps {
    pins: Pins,
    stats: PerCpuArray<MapData, u64>,
    listeners: SockHash<MapData, u32>,
    policy: HashMap<MapData, u64, PodPolicy>,
    ports: HashMap<MapData, PortKey, u8>,
    addrs: HashMap<MapData, AddrKey, u8>,
    groups: HashMap<MapData, GroupKey, u8>,
    cidr4: [LpmTrie<MapData, Cidr4Data, u8>; 2],
    cidr6: [LpmTrie<MapData, Cidr6Data, u8>; 2],
    by_tuple: HashMap<MapData, TupleKey, SockOrig>,
    tuple_count: Array<MapData, u64>,
    sk_proxy: SkStorage<MapData, u32>,
    accel: SockHash<MapData, SockKey>,
    accel_on: Array<MapData, u32>,
}

fn v4_cidr_key(pod_id: u32, net: &ipnet::Ipv4Net) -> Key<Cidr4Data> {
    let id = pod_id.to_be_bytes();
    let a = net.network().octets();
    Key::new(
        32 + u32::from(net.prefix_len()),
        [id[0], id[1], id[2], id[3], a[0], a[1], a[2], a[3]],
    )
}

fn v6_cidr_key(pod_id: u32, net: &ipnet::Ipv6Net) -> Key<Cidr6Data> {
    let mut d = [0u8; 20];
    d[..4].copy_from_slice(&pod_id.to_be_bytes());
    d[4..].copy_from_slice(&net.network().octets());
    Key::new(32 + u32::from(net.prefix_len()), d)
}

fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => mapped_v4(u32::from_ne_bytes(a.octets())),
        IpAddr::V6(a) => a.octets(),
    }
}

/// A registered pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodHandle {
    pub netns_cookie: u64,
    pub pod_id: u32,
}

impl PodMaps {
    fn open(pins: &Pins) -> Result<Self> {
        Ok(Self {
            pins: pins.clone(),
            stats: PerCpuArray::try_from(Map::PerCpuArray(open_map(pins, names::STATS)?))?,
            listeners: SockHash::try_from(Map::SockHash(open_map(pins, names::LISTENERS)?))?,
            policy: HashMap::try_from(Map::HashMap(open_map(pins, names::POD_POLICY)?))?,
            ports: HashMap::try_from(Map::HashMap(open_map(pins, names::PORTS)?))?,
            addrs: HashMap::try_from(Map::HashMap(open_map(pins, names::ADDRS)?))?,
            groups: HashMap::try_from(Map::HashMap(open_map(pins, names::GROUPS)?))?,
            cidr4: [
                LpmTrie::try_from(Map::LpmTrie(open_map(pins, names::CIDR4_EXCL)?))?,
                LpmTrie::try_from(Map::LpmTrie(open_map(pins, names::CIDR4_INCL)?))?,
            ],
            cidr6: [
                LpmTrie::try_from(Map::LpmTrie(open_map(pins, names::CIDR6_EXCL)?))?,
                LpmTrie::try_from(Map::LpmTrie(open_map(pins, names::CIDR6_INCL)?))?,
            ],
            by_tuple: HashMap::try_from(Map::HashMap(open_map(pins, names::ORIG_BY_TUPLE)?))?,
            tuple_count: Array::try_from(Map::Array(open_map(pins, names::TUPLE_COUNT)?))?,
            sk_proxy: SkStorage::try_from(Map::SkStorage(open_map(pins, names::SK_PROXY)?))?,
            accel: SockHash::try_from(Map::SockHash(open_map(pins, names::ACCEL)?))?,
            accel_on: Array::try_from(Map::Array(open_map(pins, names::ACCEL_ON)?))?,
        })
    }

    /// Registers (or re-registers) the pod whose netns is at `netns`: set entries, the pod's
    /// sk_lookup program and an existing proxy listener first, the policy last (so a
    /// connect never sees half a pod), then stale entries of an earlier registration are
    /// removed. The pod keeps its id across re-registrations.
    ///
    /// All or nothing: if any step fails, every write of this call is undone (a new pod leaves
    /// no entry, pin or listener behind; a re-registered one keeps its earlier registration)
    /// and the error is returned.
    pub fn register(
        &mut self,
        netns: &Path,
        facts: &netns::PodNetns,
        cfg: &Config,
        local: &[IpAddr],
        groups: &[u32],
    ) -> Result<PodHandle> {
        if let Some(why) = policy::ebpf_unsupported(cfg) {
            bail!("the eBPF backend cannot honour this config: {why}");
        }
        // ADDRS is sized for every pod at this many addresses (maps::capacity).
        let max_local = interceptor_common::maps::capacity::LOCAL_ADDRS_PER_POD as usize;
        if local.len() > max_local {
            bail!(
                "the pod netns has {} addresses; the eBPF backend's limit is {max_local} per pod",
                local.len()
            );
        }
        let cookie = facts.cookie;
        let old = self.policy.get(&cookie, 0).ok();
        let pod_id = match old {
            Some(p) => p.pod_id,
            None => {
                // The smallest free id keeps ids (and the counter array they index) bounded by
                // the number of pods on the node.
                let used: std::collections::HashSet<u32> = self
                    .policy
                    .iter()
                    .filter_map(|r| r.ok())
                    .map(|(_, p)| p.pod_id)
                    .collect();
                (1..).find(|id| !used.contains(id)).expect("a free pod id")
            }
        };
        let mut undo = Vec::new();
        let mut w = Writes {
            netns,
            n: 0,
            undo: &mut undo,
        };
        let result = self.register_steps(&mut w, facts, cfg, local, groups, pod_id, old);
        match result {
            Ok(()) => Ok(PodHandle {
                netns_cookie: cookie,
                pod_id,
            }),
            Err(e) => {
                let n = undo.len();
                if let Err(u) = self.undo(undo) {
                    return Err(e.context(format!(
                        "registration failed and undoing it failed too: {u:#}"
                    )));
                }
                tracing::warn!(undone = n, "registration failed; its writes were undone");
                // The gate may have counted the undone policy (best effort: it only gates work).
                let _ = self.update_accel_on();
                Err(e.context(format!(
                    "registering {} (nothing was left registered for it)",
                    netns.display()
                )))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn register_steps(
        &mut self,
        w: &mut Writes,
        facts: &netns::PodNetns,
        cfg: &Config,
        local: &[IpAddr],
        groups: &[u32],
        pod_id: u32,
        old: Option<PodPolicy>,
    ) -> Result<()> {
        let (netns, cookie) = (w.netns, facts.cookie);
        // Own link-local addresses are local for outbound decisions (ADDRS) only: several pods
        // may share one, so they never key a pod (POD_BY_ADDR, which uses `local`).
        let mut own = local.to_vec();
        own.extend(facts.link_local.iter().filter(|a| !local.contains(a)));
        let tables = policy::MemTables::new(cfg, &own, groups);
        let mut keys = Keys::of(pod_id, &tables);
        let (reserved, unreserve) = self.reserve_guarded(w, pod_id, &tables.guarded_ports)?;
        keys.ports.extend(reserved);
        for k in &keys.ports {
            w.step()?;
            if set_insert(self.ports.insert(k, 1, BPF_NOEXIST))? {
                w.undo.push(Undo::Port(*k));
            }
        }
        for k in &keys.addrs {
            w.step()?;
            if set_insert(self.addrs.insert(k, 1, BPF_NOEXIST))? {
                w.undo.push(Undo::Addr(*k));
            }
        }
        for k in &keys.groups {
            w.step()?;
            if set_insert(self.groups.insert(k, 1, BPF_NOEXIST))? {
                w.undo.push(Undo::Group(*k));
            }
        }
        for (i, nets) in [&tables.cidrs_excluded, &tables.cidrs_included]
            .into_iter()
            .enumerate()
        {
            for net in nets {
                w.step()?;
                match net {
                    IpNet::V4(n) => {
                        let k = v4_cidr_key(pod_id, n);
                        if set_insert(self.cidr4[i].insert(&k, 1, BPF_NOEXIST))? {
                            w.undo.push(Undo::Cidr4(i, k));
                        }
                    }
                    IpNet::V6(n) => {
                        let k = v6_cidr_key(pod_id, n);
                        if set_insert(self.cidr6[i].insert(&k, 1, BPF_NOEXIST))? {
                            w.undo.push(Undo::Cidr6(i, k));
                        }
                    }
                }
            }
        }
        let t = std::time::Instant::now();
        if let Some(pin) = self.pins.attach_sk_lookup(netns, cookie)? {
            w.undo.push(Undo::Pin(pin));
        }
        tracing::debug!(
            micros = t.elapsed().as_micros() as u64,
            "sk_lookup attached"
        );
        if old.is_none() {
            self.reset_tuples(cookie, pod_id)?;
        }
        self.mark_proxy_listeners(facts, cfg)?;
        if !tables.inbound_ports.is_empty() || !cfg.inbound_ports_include.is_empty() {
            let t = std::time::Instant::now();
            self.adopt_listener(w, facts, cfg, pod_id, old.is_none())?;
            tracing::debug!(micros = t.elapsed().as_micros() as u64, "listener adoption");
        }
        w.step()?;
        self.policy
            .insert(cookie, policy::pod_policy(cfg, pod_id), 0)?;
        w.undo.push(Undo::Policy(cookie, old));
        self.update_accel_on()?;
        if old.is_some() {
            // Only a re-registration can leave stale entries behind.
            self.purge(pod_id, Some((&keys, &tables)), Some(&mut *w.undo))?;
        }
        if let Err(e) = reserved_ports::release(netns, unreserve) {
            // The registration stands; a port stays reserved that no longer needs to be.
            tracing::warn!("{e:#}");
        }
        Ok(())
    }

    /// Reverts a failed registration's writes, newest first.
    fn undo(&mut self, undo: Vec<Undo>) -> Result<()> {
        let mut first_err = None;
        for u in undo.into_iter().rev() {
            let r: Result<()> = match u {
                Undo::Port(k) => self.ports.remove(&k).map_err(Into::into),
                Undo::Addr(k) => self.addrs.remove(&k).map_err(Into::into),
                Undo::Group(k) => self.groups.remove(&k).map_err(Into::into),
                Undo::Cidr4(i, k) => self.cidr4[i].remove(&k).map_err(Into::into),
                Undo::Cidr6(i, k) => self.cidr6[i].remove(&k).map_err(Into::into),
                Undo::Restore(r) => match r {
                    Removed::Port(k) => self.ports.insert(k, 1, 0).map_err(Into::into),
                    Removed::Addr(k) => self.addrs.insert(k, 1, 0).map_err(Into::into),
                    Removed::Group(k) => self.groups.insert(k, 1, 0).map_err(Into::into),
                    Removed::Cidr4(i, k) => self.cidr4[i].insert(&k, 1, 0).map_err(Into::into),
                    Removed::Cidr6(i, k) => self.cidr6[i].insert(&k, 1, 0).map_err(Into::into),
                },
                Undo::Policy(c, Some(p)) => self.policy.insert(c, p, 0).map_err(Into::into),
                Undo::Policy(c, None) => self.policy.remove(&c).map_err(Into::into),
                Undo::Listener(k) => self.listeners.remove(&k).map_err(Into::into),
                Undo::Unreserve(ns, ports) => reserved_ports::release(&ns, ports),
                Undo::Pin(p) => {
                    std::fs::remove_file(&p).with_context(|| format!("unpinning {}", p.display()))
                }
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// A proxy listener that existed before we attached never went through sockops' listen
    /// callback: find it in the netns and take a duplicate of its fd with pidfd_getfd.
    /// `new_pod`: the entries are this registration's own, to be removed if it fails (a
    /// re-registration only refreshes the proxy's listener, which stays valid).
    fn adopt_listener(
        &mut self,
        w: &mut Writes,
        facts: &netns::PodNetns,
        cfg: &Config,
        pod_id: u32,
        new_pod: bool,
    ) -> Result<()> {
        let port = cfg.inbound_capture_port;
        for (fd, v6) in
            crate::listener::find_proxy_listeners(&facts.listening, port, &cfg.proxy_uid)?
        {
            let key = pod_id * 2 + u32::from(v6);
            w.step()?;
            self.listeners
                .insert(key, std::os::fd::AsRawFd::as_raw_fd(&fd), 0)
                .context("adding the existing proxy listener")?;
            if new_pod {
                w.undo.push(Undo::Listener(key));
            }
        }
        Ok(())
    }

    /// Unregisters the pod of `netns`; returns whether it was registered.
    pub fn remove(&mut self, netns: &Path) -> Result<bool> {
        let cookie = netns_cookie(Some(netns))?;
        self.remove_cookie_in(cookie, Some(netns))
    }

    /// Unregisters a pod by netns cookie (the policy first, so connects stop at once).
    pub fn remove_cookie(&mut self, cookie: u64) -> Result<bool> {
        self.remove_cookie_in(cookie, None)
    }

    /// `remove_cookie`, releasing the ports the pod reserved in its netns at `netns` (if the
    /// netns is gone, so is its reservation).
    pub fn remove_cookie_in(&mut self, cookie: u64, netns: Option<&Path>) -> Result<bool> {
        let Ok(p) = self.policy.get(&cookie, 0) else {
            return Ok(false);
        };
        self.release_reserved(p.pod_id, cookie, netns)?;
        // The policy entry goes last: a removal cut short leaves it, so a retry (or the daemon's
        // restart) finds the pod and completes the removal instead of leaking the rest.
        self.purge(p.pod_id, None, None)?;
        self.reset_counters(p.pod_id)?;
        self.reset_tuples(cookie, p.pod_id)?;
        let _ = self.listeners.remove(&(p.pod_id * 2));
        let _ = self.listeners.remove(&(p.pod_id * 2 + 1));
        let _ = std::fs::remove_file(self.pins.sk_lookup_link(cookie));
        self.policy.remove(&cookie)?;
        self.update_accel_on()?;
        Ok(true)
    }

    /// `ACCEL_ON[0]` = how many pods asked for acceleration (0 spares everybody else the
    /// per-connection policy lookup in sockops).
    fn update_accel_on(&mut self) -> Result<()> {
        let n = self
            .policy
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, p)| p.has(interceptor_common::decision::flags::ACCELERATE))
            .count() as u32;
        self.accel_on.set(0, n, 0).context("updating ACCEL_ON")?;
        Ok(())
    }

    /// Sockets in the acceleration map (both ends of every accelerated connection open now).
    pub fn accel_entries(&self) -> usize {
        self.accel.keys().count()
    }

    /// Deletes the set entries of `pod_id`, except those of `keep` (the current registration).
    /// With `journal`, each removal is recorded so a failed re-registration can restore it.
    fn purge(
        &mut self,
        pod_id: u32,
        keep: Option<(&Keys, &policy::MemTables)>,
        mut journal: Option<&mut Vec<Undo>>,
    ) -> Result<()> {
        let mut note = |u: Undo| {
            if let Some(j) = journal.as_deref_mut() {
                j.push(u);
            }
        };
        let stale_ports: Vec<PortKey> = self
            .ports
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.pod_id == pod_id && !keep.is_some_and(|(keys, _)| keys.ports.contains(k)))
            .collect();
        for k in stale_ports {
            self.ports.remove(&k)?;
            note(Undo::Restore(Removed::Port(k)));
        }
        let stale_addrs: Vec<AddrKey> = self
            .addrs
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.pod_id == pod_id && !keep.is_some_and(|(keys, _)| keys.addrs.contains(k)))
            .collect();
        for k in stale_addrs {
            self.addrs.remove(&k)?;
            note(Undo::Restore(Removed::Addr(k)));
        }
        let stale_groups: Vec<GroupKey> = self
            .groups
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| {
                k.pod_id == pod_id && !keep.is_some_and(|(keys, _)| keys.groups.contains(k))
            })
            .collect();
        for k in stale_groups {
            self.groups.remove(&k)?;
            note(Undo::Restore(Removed::Group(k)));
        }
        let id = pod_id.to_be_bytes();
        let (keep4, keep6): (Vec<Key<Cidr4Data>>, Vec<Key<Cidr6Data>>) = match keep {
            None => (vec![], vec![]),
            Some((_, t)) => {
                let nets = t.cidrs_excluded.iter().chain(&t.cidrs_included);
                let k4 = nets.clone().filter_map(|n| {
                    if let IpNet::V4(n) = n {
                        Some(v4_cidr_key(pod_id, n))
                    } else {
                        None
                    }
                });
                let k6 = nets.filter_map(|n| {
                    if let IpNet::V6(n) = n {
                        Some(v6_cidr_key(pod_id, n))
                    } else {
                        None
                    }
                });
                (k4.collect(), k6.collect())
            }
        };
        let same4 = |a: &Key<Cidr4Data>, b: &Key<Cidr4Data>| {
            a.prefix_len() == b.prefix_len() && a.data() == b.data()
        };
        let same6 = |a: &Key<Cidr6Data>, b: &Key<Cidr6Data>| {
            a.prefix_len() == b.prefix_len() && a.data() == b.data()
        };
        for (i, t) in self.cidr4.iter_mut().enumerate() {
            let stale: Vec<_> = t
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.data()[..4] == id && !keep4.iter().any(|x| same4(x, k)))
                .collect();
            for k in stale {
                t.remove(&k)?;
                note(Undo::Restore(Removed::Cidr4(i, k)));
            }
        }
        for (i, t) in self.cidr6.iter_mut().enumerate() {
            let stale: Vec<_> = t
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.data()[..4] == id && !keep6.iter().any(|x| same6(x, k)))
                .collect();
            for k in stale {
                t.remove(&k)?;
                note(Undo::Restore(Removed::Cidr6(i, k)));
            }
        }
        Ok(())
    }

    /// A pod's counters, summed over CPUs (`maps::stat` names the indices).
    pub fn counters(&self, pod_id: u32) -> Vec<u64> {
        (0..stat::PER_POD)
            .map(|c| match stat::index(pod_id, c) {
                Some(i) => self.stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0),
                None => 0,
            })
            .collect()
    }

    /// Zeroes a pod's counters so a later pod with the same id starts from 0.
    fn reset_counters(&mut self, pod_id: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        for c in 0..stat::PER_POD {
            if let Some(i) = stat::index(pod_id, c) {
                self.stats
                    .set(i, PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
            }
        }
        Ok(())
    }

    /// Entries in use and capacity of each map that grows with pods or connections.
    pub fn occupancy(&self) -> Vec<(&'static str, usize, u32)> {
        let cap = |name: &str| {
            aya::maps::MapInfo::from_pin(self.pins.map(name))
                .map(|i| i.max_entries())
                .unwrap_or(0)
        };
        let mut out = vec![
            (names::POD_POLICY, self.policy.keys().count()),
            (names::PORTS, self.ports.keys().count()),
            (names::ADDRS, self.addrs.keys().count()),
            (names::GROUPS, self.groups.keys().count()),
            (names::ORIG_BY_TUPLE, self.by_tuple.keys().count()),
            (names::ACCEL, self.accel.keys().count()),
            (names::LISTENERS, self.listeners.keys().count()),
            (names::CIDR4_EXCL, self.cidr4[0].keys().count()),
            (names::CIDR4_INCL, self.cidr4[1].keys().count()),
            (names::CIDR6_EXCL, self.cidr6[0].keys().count()),
            (names::CIDR6_INCL, self.cidr6[1].keys().count()),
        ];
        out.sort_by_key(|(n, _)| *n);
        out.into_iter().map(|(n, c)| (n, c, cap(n))).collect()
    }

    /// Registered pods: netns cookie → policy.
    pub fn pods(&self) -> Vec<(u64, PodPolicy)> {
        self.policy.iter().filter_map(|r| r.ok()).collect()
    }

    /// The per-connection state in shared maps: (`ORIG_BY_TUPLE` entries, their count summed
    /// over `TUPLE_COUNT`). Both return to their baseline once connections are accepted or
    /// closed (everything else per connection is socket-local storage, freed with the socket).
    pub fn connection_entries(&self) -> (usize, usize) {
        let counted: u64 = self.tuple_count.iter().filter_map(|r| r.ok()).sum();
        (self.by_tuple.keys().count(), counted as usize)
    }

    /// A pod's `ORIG_BY_TUPLE` entries (its `TUPLE_COUNT`), against `tuple_quota`.
    pub fn tuple_entries(&self, pod_id: u32) -> u64 {
        self.tuple_count.get(&pod_id, 0).unwrap_or(0)
    }

    /// Removes a pod's tuple entries and zeroes its count, so its id starts clean for a later
    /// pod (an app socket closing after this finds no entry and gives nothing back).
    fn reset_tuples(&mut self, netns: u64, pod_id: u32) -> Result<()> {
        let keys: Vec<TupleKey> = self
            .by_tuple
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.netns == netns)
            .collect();
        for k in keys {
            let _ = self.by_tuple.remove(&k);
        }
        if pod_id < interceptor_common::maps::capacity::MAX_PODS {
            self.tuple_count
                .set(pod_id, 0, 0)
                .context("zeroing TUPLE_COUNT")?;
        }
        Ok(())
    }

    /// Marks the proxy's listening sockets that predate our programs (they never went
    /// through `bind4/6`) as the proxy's in `SK_PROXY`, so SO_ORIGINAL_DST is answered on what
    /// they accept (the kernel clones the mark). Found by owner uid on the proxy's ports, duplicated
    /// with pidfd_getfd.
    fn mark_proxy_listeners(&mut self, facts: &netns::PodNetns, cfg: &Config) -> Result<()> {
        for port in [cfg.proxy_port, cfg.inbound_capture_port] {
            for (fd, _) in
                crate::listener::find_proxy_listeners(&facts.listening, port, &cfg.proxy_uid)?
            {
                self.sk_proxy
                    .insert(&fd, 1, 0)
                    .with_context(|| format!("marking the proxy's listener on port {port}"))?;
            }
        }
        Ok(())
    }
}

const BPF_NOEXIST: u64 = 1;

/// A set-map insert with BPF_NOEXIST: Ok(true) if this call added the key, Ok(false) if it was
/// there already (nothing to undo).
fn set_insert(r: Result<(), aya::maps::MapError>) -> Result<bool> {
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
struct Writes<'a> {
    netns: &'a Path,
    n: u32,
    undo: &'a mut Vec<Undo>,
}

impl Writes<'_> {
    /// Before each map write: fails it if a test injected a fault there.
    fn step(&mut self) -> Result<()> {
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
enum Undo {
    Port(PortKey),
    Addr(AddrKey),
    Group(GroupKey),
    Cidr4(usize, Key<Cidr4Data>),
    Cidr6(usize, Key<Cidr6Data>),
    /// A stale entry the re-registration removed.
    Restore(Removed),
    Policy(u64, Option<PodPolicy>),
    Listener(u32),
    Pin(PathBuf),
    /// Ports this registration added to the netns's reserved ports.
    Unreserve(PathBuf, Vec<u16>),
}

enum Removed {
    Port(PortKey),
    Addr(AddrKey),
    Group(GroupKey),
    Cidr4(usize, Key<Cidr4Data>),
    Cidr6(usize, Key<Cidr6Data>),
}

/// The hash-map keys one pod's registration writes.
struct Keys {
    ports: Vec<PortKey>,
    addrs: Vec<AddrKey>,
    groups: Vec<GroupKey>,
}

impl Keys {
    fn of(pod_id: u32, t: &policy::MemTables) -> Self {
        let port = |kind| {
            move |p: &u16| PortKey {
                pod_id,
                port: *p,
                kind,
            }
        };
        let ports = t
            .ports_excluded
            .iter()
            .map(port(PORT_EXCLUDED))
            .chain(t.ports_included.iter().map(port(PORT_INCLUDED)))
            .chain(t.inbound_ports.iter().map(port(PORT_INBOUND)))
            .chain(t.guarded_ports.iter().map(port(PORT_GUARDED)))
            .collect();
        let addr = |kind| {
            move |a: &IpAddr| AddrKey {
                pod_id,
                kind,
                addr: addr16(*a),
            }
        };
        let addrs = t
            .local
            .iter()
            .map(addr(ADDR_LOCAL))
            .chain(t.dns_servers.iter().map(addr(ADDR_DNS)))
            .collect();
        let groups = t
            .groups
            .iter()
            .map(|gid| GroupKey { pod_id, gid: *gid })
            .collect();
        Self {
            ports,
            addrs,
            groups,
        }
    }
}
