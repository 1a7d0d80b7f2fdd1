//! Which pod ids are taken, kept in memory. Choosing a new pod's id used to walk every pod's
//! policy in `POD_POLICY` (two `bpf()` calls per pod) on each add, and the program pool walked
//! `POD_NETNS` likewise after each: pod setup grew with the pods on the node. The set is read
//! from the maps once, when they are opened; the registry keeps it current, and checks a chosen
//! id against `POD_NETNS` before it uses it (another process, e.g. `interceptor apply`, may
//! have registered a pod since): a clash re-reads the maps instead of sharing an id.

use std::collections::BTreeSet;
use std::sync::Mutex;

use interceptor_common::maps::capacity::MAX_PODS;

#[derive(Debug, Default)]
pub struct PodIds(Mutex<BTreeSet<u32>>);

impl PodIds {
    pub fn new(taken: impl IntoIterator<Item = u32>) -> Self {
        Self(Mutex::new(taken.into_iter().collect()))
    }

    fn set(&self) -> std::sync::MutexGuard<'_, BTreeSet<u32>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The `n` smallest free ids (ids start at 1, below `MAX_PODS`): the next registrations
    /// take them in this order.
    pub fn lowest_free(&self, n: usize) -> Vec<u32> {
        let taken = self.set();
        (1..MAX_PODS)
            .filter(|id| !taken.contains(id))
            .take(n)
            .collect()
    }

    pub fn take(&self, id: u32) {
        self.set().insert(id);
    }

    pub fn release(&self, id: u32) {
        self.set().remove(&id);
    }

    /// Replaces the set with what the maps say now.
    pub fn reset(&self, taken: impl IntoIterator<Item = u32>) {
        *self.set() = taken.into_iter().collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_fill_the_smallest_gap_from_one() {
        assert_eq!(PodIds::new([]).lowest_free(1), [1]);
        assert_eq!(PodIds::new([1, 2, 3]).lowest_free(2), [4, 5]);
        assert_eq!(PodIds::new([3, 1, 4]).lowest_free(3), [2, 5, 6]);
        let ids = PodIds::new([2]);
        assert_eq!(ids.lowest_free(1), [1]);
        ids.take(1);
        assert_eq!(ids.lowest_free(1), [3]);
        ids.release(2);
        assert_eq!(ids.lowest_free(1), [2]);
        ids.reset([]);
        assert_eq!(ids.lowest_free(1), [1]);
    }

    #[test]
    fn no_id_past_the_map_size() {
        let ids = PodIds::new(1..MAX_PODS);
        assert!(ids.lowest_free(1).is_empty());
    }
}
