//! Progress of long operations, one line per step on stderr (`interceptor: loading …`). Off
//! unless a front end turns it on for a command people run by hand (`apply`, `cleanup`,
//! `cni-install`/`cni-uninstall`): the daemon and the CNI plugin log instead, and output meant
//! for tools stays quiet.

use std::sync::atomic::{AtomicBool, Ordering};

static ON: AtomicBool = AtomicBool::new(false);

/// Turns the step lines on (or off) for this process.
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Says that a step starts, when progress is on.
pub fn step(what: impl std::fmt::Display) {
    if ON.load(Ordering::Relaxed) {
        eprintln!("interceptor: {what}");
    }
}
