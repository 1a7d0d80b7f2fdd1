//! The eBPF backend: loads interceptor-ebpf's programs, attaches them at a cgroup v2 root and
//! registers pods (by netns cookie) in the maps the programs read.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{lpm_trie::Key, HashMap, LpmTrie, MapData};
use aya::programs::CgroupAttachMode;
use aya::Ebpf;
use interceptor_common::config::Config;
use interceptor_common::decision::PodPolicy;
use interceptor_common::maps::{
    mapped_v4, names, AddrKey, Cidr4Data, Cidr6Data, GroupKey, OrigDst, PortKey, TupleKey,
    ADDR_DNS, ADDR_LOCAL, PORT_EXCLUDED, PORT_INCLUDED,
};
use interceptor_common::policy;
use ipnet::IpNet;

use crate::netns;

/// The object built by build.rs from interceptor-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor"));

/// Every program and the hook it attaches to.
pub const PROGRAMS: &[&str] = &[
    "ic_connect4",
    "ic_connect6",
    "ic_sockops",
    "ic_getsockopt",
    "ic_getpeername4",
    "ic_getpeername6",
];

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

/// SO_NETNS_COOKIE of a socket created inside the netns at `path`.
pub fn netns_cookie(path: Option<&Path>) -> Result<u64> {
    netns::run_in(path, || {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0")
            .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
            .context("creating a socket to read the netns cookie")?;
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SO_NETNS_COOKIE = 71 (Linux 5.14+).
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
            bail!(
                "getsockopt(SO_NETNS_COOKIE): {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(cookie)
    })
}

/// Loaded and attached programs plus their maps, for the life of this value (dropping it
/// detaches everything).
pub struct Datapath {
    ebpf: Ebpf,
    next_pod_id: u32,
}

/// A registered pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodHandle {
    pub netns_cookie: u64,
    pub pod_id: u32,
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

impl Datapath {
    /// Loads every program and attaches it at `cgroup` (a cgroup v2 directory).
    pub fn load_and_attach(cgroup: &Path) -> Result<Self> {
        let mut ebpf = Ebpf::load(OBJECT).context("loading the eBPF object")?;
        let cg =
            File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        for name in PROGRAMS {
            let prog = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?;
            let res = match prog {
                aya::programs::Program::CgroupSockAddr(p) => load_attach(p.load(), || {
                    p.attach(&cg, CgroupAttachMode::Single).map(|_| ())
                }),
                aya::programs::Program::SockOps(p) => load_attach(p.load(), || {
                    p.attach(&cg, CgroupAttachMode::Single).map(|_| ())
                }),
                aya::programs::Program::CgroupSockopt(p) => load_attach(p.load(), || {
                    p.attach(&cg, CgroupAttachMode::Single).map(|_| ())
                }),
                _ => Err(anyhow!("unexpected program type")),
            };
            res.with_context(|| format!("loading/attaching {name}"))?;
        }
        Ok(Self {
            ebpf,
            next_pod_id: 1,
        })
    }

    fn hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
    ) -> Result<HashMap<&mut MapData, K, V>> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing"))?;
        Ok(HashMap::try_from(map)?)
    }

    fn lpm<K: aya::Pod>(&mut self, name: &str) -> Result<LpmTrie<&mut MapData, K, u8>> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing"))?;
        Ok(LpmTrie::try_from(map)?)
    }

    /// Registers the pod whose netns is at `netns` with its config and own addresses. Sets
    /// are written first and the policy last, so a connect never sees half a pod.
    pub fn register_pod(
        &mut self,
        netns: &Path,
        cfg: &Config,
        local: &[IpAddr],
        groups: &[u32],
    ) -> Result<PodHandle> {
        if let Some(why) = policy::ebpf_unsupported(cfg) {
            bail!("the eBPF backend cannot honour this config: {why}");
        }
        let cookie = netns_cookie(Some(netns))?;
        let pod_id = self.next_pod_id;
        self.next_pod_id += 1;
        let tables = policy::MemTables::new(cfg, local, groups);
        {
            let mut ports = self.hash::<PortKey, u8>(names::PORTS)?;
            for p in &tables.ports_excluded {
                ports.insert(
                    PortKey {
                        pod_id,
                        port: *p,
                        kind: PORT_EXCLUDED,
                    },
                    1,
                    0,
                )?;
            }
            for p in &tables.ports_included {
                ports.insert(
                    PortKey {
                        pod_id,
                        port: *p,
                        kind: PORT_INCLUDED,
                    },
                    1,
                    0,
                )?;
            }
        }
        {
            let mut addrs = self.hash::<AddrKey, u8>(names::ADDRS)?;
            for a in &tables.local {
                addrs.insert(
                    AddrKey {
                        pod_id,
                        kind: ADDR_LOCAL,
                        addr: addr16(*a),
                    },
                    1,
                    0,
                )?;
            }
            for a in &tables.dns_servers {
                addrs.insert(
                    AddrKey {
                        pod_id,
                        kind: ADDR_DNS,
                        addr: addr16(*a),
                    },
                    1,
                    0,
                )?;
            }
        }
        {
            let mut g = self.hash::<GroupKey, u8>(names::GROUPS)?;
            for gid in &tables.groups {
                g.insert(GroupKey { pod_id, gid: *gid }, 1, 0)?;
            }
        }
        for (nets, n4, n6) in [
            (&tables.cidrs_excluded, names::CIDR4_EXCL, names::CIDR6_EXCL),
            (&tables.cidrs_included, names::CIDR4_INCL, names::CIDR6_INCL),
        ] {
            for net in nets {
                match net {
                    IpNet::V4(n) => {
                        self.lpm::<Cidr4Data>(n4)?
                            .insert(&v4_cidr_key(pod_id, n), 1, 0)?
                    }
                    IpNet::V6(n) => {
                        self.lpm::<Cidr6Data>(n6)?
                            .insert(&v6_cidr_key(pod_id, n), 1, 0)?
                    }
                }
            }
        }
        let pol: PodPolicy = policy::pod_policy(cfg, pod_id);
        self.hash::<u64, PodPolicy>(names::POD_POLICY)?
            .insert(cookie, pol, 0)?;
        Ok(PodHandle {
            netns_cookie: cookie,
            pod_id,
        })
    }

    /// Entries of the per-connection maps (by cookie, by tuple): they must return to their
    /// baseline once connections close.
    pub fn connection_entries(&mut self) -> Result<(usize, usize)> {
        let by_cookie = self
            .hash::<u64, OrigDst>(names::ORIG_BY_COOKIE)?
            .keys()
            .count();
        let by_tuple = self
            .hash::<TupleKey, OrigDst>(names::ORIG_BY_TUPLE)?
            .keys()
            .count();
        Ok((by_cookie, by_tuple))
    }
}

fn load_attach(
    load: Result<(), aya::programs::ProgramError>,
    attach: impl FnOnce() -> Result<(), aya::programs::ProgramError>,
) -> Result<()> {
    load?;
    attach()?;
    Ok(())
}
