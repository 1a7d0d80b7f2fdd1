//! Services between the front ends (CLI, daemon, CNI) and the backends. `install` chooses a
//! pod's backend and installs it (eBPF with undo, else the netfilter fallback), for `apply` and
//! the daemon alike; `probe` says what the kernel offers (doctor prints it, install consults it);
//! `explain` gives one connection's verdict and the rule that decided it.

mod ebpf_entries;
pub mod explain;
pub mod install;
mod pin_dir;
pub mod probe;
