//! `interceptor remove` (one pod off the eBPF datapath) and `interceptor cleanup` (everything).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use super::args::EbpfArgs;
use crate::backend::ebpf::Pins;
use crate::model::EbpfSettings;
use crate::service::install::cgroup_of;

#[derive(Args, Debug, Clone)]
pub struct RemoveArgs {
    /// The pod's network namespace.
    #[arg(long, env = "NETWORK_NAMESPACE")]
    pub network_namespace: PathBuf,
    #[command(flatten)]
    pub ebpf: EbpfArgs,
}

/// `interceptor remove`: unregisters a pod from the eBPF datapath.
pub fn remove(args: &RemoveArgs) -> Result<()> {
    let pins = Pins::new(&args.ebpf.bpffs);
    if !pins.loaded() {
        bail!(
            "the eBPF programs are not loaded under {}",
            args.ebpf.bpffs.display()
        );
    }
    let removed = pins.maps()?.remove(&args.network_namespace)?;
    eprintln!(
        "interceptor: {}",
        if removed {
            "pod unregistered"
        } else {
            "pod was not registered"
        }
    );
    Ok(())
}

/// `interceptor cleanup`: detaches and unpins every program, link and map of ours.
pub fn cleanup(args: &EbpfSettings) -> Result<()> {
    let removed = Pins::new(&args.bpffs).cleanup(&cgroup_of(args)?)?;
    eprintln!(
        "interceptor: {}",
        if removed {
            "eBPF programs detached and unpinned"
        } else {
            "nothing to clean up"
        }
    );
    Ok(())
}
