//! Read-only views of the registry: counters, map occupancy, registered pods and
//! per-connection state, for metrics, `pod show` and the tests.

use aya::maps::MapInfo;
use interceptor_common::decision::PodPolicy;
use interceptor_common::maps::{names, stat, tuple_count_of};

use super::pod_maps::PodMaps;

impl PodMaps {
    /// Sockets in the acceleration map (both ends of every accelerated connection open now).
    pub fn accel_entries(&self) -> usize {
        self.accel.keys().count()
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

    /// Entries in use and capacity of each map that grows with pods or connections.
    pub fn occupancy(&self) -> Vec<(&'static str, usize, u32)> {
        let cap = |name: &str| {
            MapInfo::from_pin(self.pins.map(name))
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
            // An array: its entries always exist; the pods' ids are the non-zero ones.
            (
                names::POD_NETNS,
                self.pod_netns
                    .iter()
                    .filter(|c| c.as_ref().is_ok_and(|c| *c != 0))
                    .count(),
            ),
            (
                names::POD_SRC,
                self.pod_src
                    .iter()
                    .filter(|s| s.as_ref().is_ok_and(|s| s.netns != 0))
                    .count(),
            ),
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
        let counted: u64 = self
            .tuple_count
            .iter()
            .filter_map(|r| r.ok())
            .map(tuple_count_of)
            .sum();
        (self.by_tuple.keys().count(), counted as usize)
    }

    /// A pod's `ORIG_BY_TUPLE` entries (its `TUPLE_COUNT`), against `tuple_quota`.
    pub fn tuple_entries(&self, pod_id: u32) -> u64 {
        self.tuple_count.get(&pod_id, 0).map_or(0, tuple_count_of)
    }
}
