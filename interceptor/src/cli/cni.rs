//! `interceptor cni-install` / `cni-uninstall`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::cni::install::Dirs;

/// Where `cni-install` / `cni-uninstall` work.
#[derive(Args, Debug, Clone)]
pub struct CniInstallArgs {
    /// The folder the container runtime runs CNI plugins from.
    #[arg(long, env = "INTERCEPTOR_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The folder the container runtime reads network configs from.
    #[arg(
        long,
        env = "INTERCEPTOR_CNI_CONF_DIR",
        default_value = "/etc/cni/net.d"
    )]
    pub cni_conf_dir: PathBuf,
    /// The daemon's control socket, written into our conflist entry.
    #[arg(
        long,
        env = "INTERCEPTOR_SOCKET",
        default_value = "/run/interceptor/interceptor.sock"
    )]
    pub socket: PathBuf,
}

impl CniInstallArgs {
    fn dirs(&self) -> Dirs {
        Dirs {
            bin: self.cni_bin_dir.clone(),
            conf: self.cni_conf_dir.clone(),
            socket: self.socket.clone(),
        }
    }
}

/// `interceptor cni-install`.
pub fn install(args: &CniInstallArgs) -> Result<()> {
    crate::cni::install::run_install(&args.dirs())
}

/// `interceptor cni-uninstall`.
pub fn uninstall(args: &CniInstallArgs) -> Result<()> {
    crate::cni::install::run_uninstall(&args.dirs())
}
