//! Per-pod counters (`STATS`, summed by the daemon's metrics) and the per-pod count of
//! `ORIG_BY_TUPLE` entries that enforces each pod's tuple quota (`TUPLE_COUNT`).

use core::ptr::read_volatile;

use interceptor_common::maps::{stat, tuple_count_of};

use crate::maps::{count_enabled, STATS, TUPLE_COUNT};

/// Adds one to a pod's counter (`stat::*`) on this CPU. Pods past `stat::MAX_PODS` are not
/// counted.
#[inline(always)]
pub fn count(pod_id: u32, counter: u32) {
    if !count_enabled() {
        return;
    }
    if let Some(i) = stat::index(pod_id, counter) {
        if let Some(v) = STATS.get_ptr_mut(i) {
            // SAFETY: this CPU's value of a per-CPU array, valid for the program run. Only a
            // program interrupting this one on the same CPU could write it meanwhile: at worst
            // one count is lost, no memory is at stake.
            unsafe { *v += 1 };
        }
    }
}

/// `ORIG_BY_TUPLE` entries the pod holds now (a count wrapped below zero reads as zero:
/// `tuple_count_of`).
#[inline(always)]
pub fn tuple_count(pod_id: u32) -> u64 {
    match TUPLE_COUNT.get_ptr(pod_id) {
        // SAFETY: an array value, valid for the program run; writers only add atomically, so
        // an aligned 8-byte load sees some count, never a torn one.
        Some(c) => tuple_count_of(unsafe { read_volatile(c) }),
        None => u64::MAX,
    }
}

/// Adds `delta` (wrapping: `u64::MAX` subtracts one) to the pod's tuple count, atomically.
#[inline(always)]
pub fn tuple_count_add(pod_id: u32, delta: u64) {
    if let Some(c) = TUPLE_COUNT.get_ptr_mut(pod_id) {
        // SAFETY: `c` is an 8-byte aligned array value, valid for the program run; BPF_ATOMIC
        // add (no fetch: any kernel) is what every writer of it uses.
        unsafe {
            core::arch::asm!(
                "lock *(u64 *)({p} + 0) += {d}",
                p = in(reg) c,
                d = in(reg) delta,
                options(nostack),
            )
        };
    }
}
