//! Per-pod sk_lookup programs loaded ahead of time, on a thread of their own: loading one (the
//! verifier and the JIT) was a third of a pod add. After each add or removal the thread tops the
//! pool up to `SPARE` programs for the next free pod ids, while the client already has its answer.

use std::sync::mpsc;
use std::sync::Arc;

use crate::backend::ebpf::sk_lookup::Pool;

/// Programs kept ready: a burst of this many pod adds (a node filling up) pays no load.
const SPARE: usize = 4;

pub struct Prefill {
    poke: mpsc::Sender<()>,
}

impl Prefill {
    /// Starts the thread; it fills the pool once right away.
    pub fn start(pool: Arc<Pool>) -> std::io::Result<Self> {
        let (poke, wake) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("prefill".into())
            .spawn(move || {
                idle_priority();
                loop {
                if let Err(e) = pool.top_up(SPARE) {
                    // Registrations load their own program then; nothing else depends on it.
                    tracing::warn!(error = %e, "loading per-pod sk_lookup programs ahead of time");
                }
                // Gone: the daemon is shutting down. Several pokes: one top-up serves them all.
                if wake.recv().is_err() {
                    return;
                }
                while wake.try_recv().is_ok() {}
                }
            })?;
        poke.send(()).ok();
        Ok(Self { poke })
    }

    /// After an add or removal: the next free ids may have changed.
    pub fn poke(&self) {
        let _ = self.poke.send(());
    }
}

/// This thread runs only when a CPU would otherwise idle: it must never delay a registration (in
/// a burst of adds it may not run at all, and each add then loads its own program).
fn idle_priority() {
    // SAFETY: sched_param is plain integers (musl's has more fields than glibc's), for which all
    // zeroes is valid; SCHED_IDLE takes priority 0.
    let param: libc::sched_param = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for the call.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "SCHED_IDLE for the prefill thread");
    }
}
