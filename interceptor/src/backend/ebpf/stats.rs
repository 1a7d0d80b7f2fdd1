//! The kernel's own accounting of our programs: run count and run time per program, summed by
//! name (each pod's sk_lookup program shares one). The kernel counts only while run-time
//! statistics are on: `kernel.bpf_stats_enabled=1`, or while someone holds the fd
//! `BPF_ENABLE_STATS` returns (`StatsOn`), which turns them off again when the last holder
//! closes it and leaves the sysctl as it was.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;

use anyhow::{Context, Result};

use super::{attached::all_program_ids, Pins};

/// Run count and total run time (ns) of each of our programs, by the kernel's name for it.
pub type Snapshot = BTreeMap<String, (u64, u64)>;

/// The counters of every program loaded under `pins` now (zero for runs while statistics were
/// off).
pub fn snapshot(pins: &Pins) -> Snapshot {
    let ids = all_program_ids(pins);
    let mut s = Snapshot::new();
    for p in aya::programs::loaded_programs().flatten() {
        if ids.contains(&p.id()) {
            let name = String::from_utf8_lossy(p.name()).into_owned();
            let e = s.entry(name).or_default();
            e.0 += p.run_count();
            e.1 += p.run_time().as_nanos() as u64;
        }
    }
    s
}

/// Run-time statistics on for as long as this lives.
pub struct StatsOn {
    _fd: OwnedFd,
}

/// Turns run-time statistics on (Linux 5.8+) until the returned guard is dropped.
pub fn stats_on() -> Result<StatsOn> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map(|fd| StatsOn { _fd: fd })
        .context("BPF_ENABLE_STATS (run-time statistics of BPF programs, Linux 5.8+)")
}

/// Whether run-time statistics are on node-wide (`kernel.bpf_stats_enabled`).
pub fn stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|v| v.trim() == "1")
}
