//! The open handles on the pinned maps a pod's registration writes, and the handle of a
//! registered pod: the type `registry` (writes), `journal`'s undo, `reserved_ports` and
//! `inspect` (reads) all work on, in a room of its own so their edges point one way.

use anyhow::{bail, Result};
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, SkStorage, SockHash};
use interceptor_common::decision::{PodPolicy, PodSrc};
use interceptor_common::maps::{
    names, AddrKey, Cidr4Data, Cidr6Data, GroupKey, PortKey, SockKey, SockOrig, TupleKey,
};

use std::os::fd::AsFd;
use std::sync::Arc;

use super::pins::{open_map, Pins};
use super::pod_ids::PodIds;
use super::sk_lookup::Pool;

/// The maps a pod's registration writes, opened from their pins.
pub struct PodMaps {
    pub(super) pins: Pins,
    pub(super) stats: PerCpuArray<MapData, u64>,
    pub(super) listeners: SockHash<MapData, u32>,
    pub(super) policy: HashMap<MapData, u64, PodPolicy>,
    pub(super) ports: HashMap<MapData, PortKey, u8>,
    pub(super) addrs: HashMap<MapData, AddrKey, u8>,
    pub(super) groups: HashMap<MapData, GroupKey, u8>,
    pub(super) cidr4: [LpmTrie<MapData, Cidr4Data, u8>; 2],
    pub(super) cidr6: [LpmTrie<MapData, Cidr6Data, u8>; 2],
    pub(super) by_tuple: HashMap<MapData, TupleKey, SockOrig>,
    pub(super) tuple_count: Array<MapData, u64>,
    pub(super) sk_proxy: SkStorage<MapData, u32>,
    pub(super) accel: SockHash<MapData, SockKey>,
    pub(super) accel_on: Array<MapData, u32>,
    /// `POD_NETNS`: pod id → netns cookie, read by the pod's sk_lookup program.
    pub(super) pod_netns: Array<MapData, u64>,
    /// `POD_SRC`: pod id → its own addresses, the source of its redirected connections.
    pub(super) pod_src: Array<MapData, PodSrc>,
    /// Per-pod sk_lookup programs loaded ahead of time.
    pub(super) programs: Arc<Pool>,
    /// The pod ids in use.
    pub(super) ids: Arc<PodIds>,
}

/// A registered pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodHandle {
    pub netns_cookie: u64,
    pub pod_id: u32,
}

impl PodMaps {
    pub(super) fn open(pins: &Pins) -> Result<Self> {
        let pod_netns = open_map(pins, names::POD_NETNS)?;
        let fd = |m: &MapData| m.fd().as_fd().try_clone_to_owned();
        let policy = HashMap::try_from(Map::HashMap(open_map(pins, names::POD_POLICY)?))?;
        let ids = Arc::new(PodIds::new(taken_ids(&policy)));
        let programs = Arc::new(Pool::new(
            fd(&pod_netns)?,
            fd(&open_map(pins, names::INBOUND_NETNS)?)?,
            fd(&open_map(pins, names::INBOUND_PROG)?)?,
            ids.clone(),
        ));
        Ok(Self {
            pins: pins.clone(),
            stats: PerCpuArray::try_from(Map::PerCpuArray(open_map(pins, names::STATS)?))?,
            listeners: SockHash::try_from(Map::SockHash(open_map(pins, names::LISTENERS)?))?,
            policy,
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
            pod_netns: Array::try_from(Map::Array(pod_netns))?,
            pod_src: Array::try_from(Map::Array(open_map(pins, names::POD_SRC)?))?,
            programs,
            ids,
        })
    }

    /// Re-reads which ids are taken from the maps (another process registered a pod).
    pub(super) fn reread_ids(&self) {
        self.ids.reset(taken_ids(&self.policy));
    }
}

/// The ids of every pod's policy. (A registration under way in another process has written its
/// id's `POD_NETNS` entry before its policy: `register` checks that entry before using an id.)
fn taken_ids(policy: &HashMap<MapData, u64, PodPolicy>) -> Vec<u32> {
    policy
        .iter()
        .filter_map(|r| r.ok())
        .map(|(_, p)| p.pod_id)
        .collect()
}

impl PodMaps {
    /// The pool of per-pod sk_lookup programs, for filling off the pod-add path.
    pub fn program_pool(&self) -> Arc<Pool> {
        self.programs.clone()
    }
}

impl Pins {
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
