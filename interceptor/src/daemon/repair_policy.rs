//! What repair of pods that escaped setup is set to do (`--repair`, its interval and grace), and
//! what it shares with the rest of the daemon: its counts (metrics), the PodInfo requests of
//! CNI ADDs under way and the netns cookies DELs took away (control socket). Apart from the
//! repair loop (`repair.rs`), which uses the daemon's registry, so the registry does not import
//! its way back.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The label Istio's repair controller sets on a broken pod (its `--broken-pod-label-key` and
/// `--broken-pod-label-value` defaults), set by the `label` policy.
pub const LABEL_KEY: &str = "cni.istio.io/uninitialized";
pub const LABEL_VALUE: &str = "true";

/// A pod whose PodInfo the CNI plugin asked for this recently has an ADD in flight.
const IN_FLIGHT: Duration = Duration::from_secs(60);

/// Cookies of netns whose pod a remove (CNI DEL) unregistered, kept this many: never repaired.
const REMEMBERED_REMOVALS: usize = 4096;

/// What the daemon does with a pod that escaped setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Repair,
    Label,
    Delete,
    Off,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Repair => "repair",
            Policy::Label => "label",
            Policy::Delete => "delete",
            Policy::Off => "off",
        }
    }
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "repair" => Ok(Policy::Repair),
            "label" => Ok(Policy::Label),
            "delete" => Ok(Policy::Delete),
            "off" => Ok(Policy::Off),
            _ => Err(format!(
                "invalid repair policy {s:?}: want repair, label, delete or off"
            )),
        }
    }
}

/// The daemon's repair settings (`--repair`, `--repair-interval`, `--repair-grace`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub policy: Policy,
    /// The longest time between passes (a resync, even without watcher events).
    pub interval: Duration,
    /// A pod is acted on only once its oldest process has run this long (a CNI ADD under way
    /// is never raced; see the repair loop).
    pub grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            policy: Policy::Repair,
            interval: Duration::from_secs(30),
            grace: Duration::from_secs(30),
        }
    }
}

/// What repair shares with the rest of the daemon: counts for the metrics, and what the
/// control socket tells it about CNI calls.
#[derive(Default)]
pub struct Shared {
    /// (action, result) → how many times.
    counts: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Pod uid → when the CNI plugin last asked for its PodInfo (an ADD in flight).
    asked: Mutex<HashMap<String, Instant>>,
    /// Netns cookies a remove unregistered (oldest first).
    removed: Mutex<VecDeque<u64>>,
}

impl Shared {
    pub(super) fn count(&self, action: &'static str, result: &'static str) {
        *lock(&self.counts).entry((action, result)).or_default() += 1;
    }

    /// (action, result, count), for the metrics.
    pub fn counts(&self) -> Vec<(&'static str, &'static str, u64)> {
        lock(&self.counts)
            .iter()
            .map(|((a, r), n)| (*a, *r, *n))
            .collect()
    }

    /// The CNI plugin asked for this pod's annotations: its ADD is under way.
    pub(super) fn note_asked(&self, uid: &str) {
        let mut asked = lock(&self.asked);
        asked.retain(|_, t| t.elapsed() < IN_FLIGHT);
        asked.insert(uid.to_string(), Instant::now());
    }

    pub(super) fn in_flight(&self, uid: &str) -> bool {
        lock(&self.asked)
            .get(uid)
            .is_some_and(|t| t.elapsed() < IN_FLIGHT)
    }

    /// A remove unregistered the pod of this netns: it is being torn down.
    pub(super) fn note_removed(&self, cookie: u64) {
        let mut removed = lock(&self.removed);
        if removed.len() >= REMEMBERED_REMOVALS {
            removed.pop_front();
        }
        removed.push_back(cookie);
    }

    pub(super) fn was_removed(&self, cookie: u64) -> bool {
        lock(&self.removed).contains(&cookie)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
