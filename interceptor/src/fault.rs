//! Test-only fault injection and map sizing, read from the environment of the process that
//! loads the programs or registers pods (the CLI, or the daemon). Nothing sets them in
//! production; they exist so the fault tests can make one step fail for real.
//!
//! - `INTERCEPTOR_FAULT`: comma-separated faults, each optionally `@<text>` to apply only to
//!   pods whose netns path contains `<text>`:
//!   - `map-write:<n>`: the n-th map write (1-based) of a pod's registration fails;
//!   - `attach:sk_lookup`: attaching sk_lookup to the pod's netns fails;
//!   - `attach:<program>`: attaching that cgroup program at load fails;
//!   - `store:<port>`: the loaded programs behave as if storing the original destination of a
//!     redirected connection to destination port `<port>` failed (a frozen global, pruned by the
//!     verifier when unset).
//!   - `map-layout:<MAP>`: an upgrade sees this binary's `<MAP>` with a value one byte larger
//!     than the pinned one (as if its layout had changed), so it must refuse.
//!   - `kernel:5.10`: as on a kernel before 5.14: the programs are loaded without the netns
//!     cookie helper outside sock_addr (`NETNS_HELPER` 0), and netns cookies are read through
//!     the bind6 cookie probe, not SO_NETNS_COOKIE.
//! - `INTERCEPTOR_TEST_MAP_ENTRIES`: `MAP=N,…`, max_entries of maps created at load (the maps are
//!   pinned, so this only takes effect for a fresh bpffs folder); `TUPLE_QUOTA=N` sets the
//!   per-pod quota of app→proxy connections waiting for the proxy (frozen at load too).
//!
//! Only with the `fault-injection` cargo feature (the tests crate enables it). Without it —
//! release builds, `cargo build -p interceptor` — every knob below is a constant "no fault",
//! the environment is never read and the compiler drops the fault paths of the callers.

/// Environment variable with the faults to inject.
pub const FAULT_ENV: &str = "INTERCEPTOR_FAULT";
/// Environment variable with map sizes for tests.
pub const MAP_ENTRIES_ENV: &str = "INTERCEPTOR_TEST_MAP_ENTRIES";

#[cfg(not(feature = "fault-injection"))]
pub use off::*;
#[cfg(feature = "fault-injection")]
pub use on::*;

/// Built without the feature: no fault, the real sizes and quota.
#[cfg(not(feature = "fault-injection"))]
mod off {
    use std::path::Path;

    pub fn map_write_fails(_netns: &Path, _nth: u32) -> bool {
        false
    }
    pub fn attach_fails(_program: &str, _netns: Option<&Path>) -> bool {
        false
    }
    pub fn store_port() -> u16 {
        0
    }
    pub fn map_layout_differs(_map: &str) -> bool {
        false
    }
    pub fn map_entries() -> Vec<(String, u32)> {
        Vec::new()
    }
    pub fn tuple_quota() -> u32 {
        interceptor_common::maps::capacity::TUPLE_QUOTA
    }
    pub fn like_5_10() -> bool {
        false
    }
}

#[cfg(feature = "fault-injection")]
mod on {
    use std::path::Path;

    use super::{FAULT_ENV, MAP_ENTRIES_ENV};

    fn faults() -> Vec<(String, Option<String>)> {
        std::env::var(FAULT_ENV)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .map(|f| match f.split_once('@') {
                Some((what, ns)) => (what.to_string(), Some(ns.to_string())),
                None => (f.to_string(), None),
            })
            .collect()
    }

    fn applies(scope: &Option<String>, netns: Option<&Path>) -> bool {
        match (scope, netns) {
            (None, _) => true,
            (Some(s), Some(ns)) => ns.to_string_lossy().contains(s.as_str()),
            (Some(_), None) => false,
        }
    }

    /// Whether the `nth` map write of the registration of the pod at `netns` is to fail.
    pub fn map_write_fails(netns: &Path, nth: u32) -> bool {
        faults().iter().any(|(what, scope)| {
            what.strip_prefix("map-write:")
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n == nth)
                && applies(scope, Some(netns))
        })
    }

    /// Whether attaching `program` (for the pod at `netns`, if per pod) is to fail.
    pub fn attach_fails(program: &str, netns: Option<&Path>) -> bool {
        faults().iter().any(|(what, scope)| {
            what.strip_prefix("attach:").is_some_and(|p| {
                p == program
                    || format!("ic_{p}") == program
                    || p == program.trim_start_matches("ic_")
            }) && applies(scope, netns)
        })
    }

    /// The destination port whose original-destination store the programs fail (0: none).
    pub fn store_port() -> u16 {
        faults()
            .iter()
            .find_map(|(what, _)| what.strip_prefix("store:")?.parse().ok())
            .unwrap_or(0)
    }

    /// Whether an upgrade is to see `map`'s layout in this binary as changed.
    pub fn map_layout_differs(map: &str) -> bool {
        faults()
            .iter()
            .any(|(what, _)| what.strip_prefix("map-layout:") == Some(map))
    }

    /// Whether to behave as on a kernel without the netns cookie outside sock_addr (5.10).
    pub fn like_5_10() -> bool {
        faults().iter().any(|(what, _)| what == "kernel:5.10")
    }

    /// `(map, max_entries)` overrides for maps created at load.
    pub fn map_entries() -> Vec<(String, u32)> {
        map_entries_env()
            .into_iter()
            .filter(|(k, _)| k != TUPLE_QUOTA)
            .collect()
    }

    const TUPLE_QUOTA: &str = "TUPLE_QUOTA";

    /// The per-pod tuple quota the programs are loaded with: `TUPLE_QUOTA=N` from
    /// `INTERCEPTOR_TEST_MAP_ENTRIES`, else `capacity::TUPLE_QUOTA`.
    pub fn tuple_quota() -> u32 {
        map_entries_env()
            .into_iter()
            .find(|(k, _)| k == TUPLE_QUOTA)
            .map_or(interceptor_common::maps::capacity::TUPLE_QUOTA, |(_, v)| v)
    }

    fn map_entries_env() -> Vec<(String, u32)> {
        std::env::var(MAP_ENTRIES_ENV)
            .unwrap_or_default()
            .split(',')
            .filter_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                Some((k.trim().to_string(), v.trim().parse().ok()?))
            })
            .collect()
    }
}

#[cfg(all(test, feature = "fault-injection"))]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn parses_scoped_faults() {
        // One test touches the variable, so parallel unit tests do not race on it.
        std::env::set_var(
            FAULT_ENV,
            "map-write:3@podA, attach:sk_lookup@podB,store:7777",
        );
        assert!(map_write_fails(Path::new("/run/netns/podA"), 3));
        assert!(!map_write_fails(Path::new("/run/netns/podA"), 2));
        assert!(!map_write_fails(Path::new("/run/netns/podC"), 3));
        assert!(attach_fails("ic_sk_lookup", Some(Path::new("/x/podB"))));
        assert!(!attach_fails("ic_sk_lookup", Some(Path::new("/x/podA"))));
        assert!(!attach_fails("ic_connect4", None));
        assert_eq!(store_port(), 7777);
        std::env::remove_var(FAULT_ENV);
        assert_eq!(store_port(), 0);
    }
}
