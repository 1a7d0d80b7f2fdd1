//! The daemon's front door: the control socket and the metrics endpoint in front of the
//! `Daemon`'s pod registry (a room of its own, so the registry and the metrics do not import
//! each other).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;

use anyhow::{Context, Result};

use super::metrics;
use super::{Daemon, Settings};

/// Runs the daemon until killed. Stopping it leaves interception in place.
pub fn run(args: &Settings) -> Result<()> {
    let d = Daemon::start(args.clone())?;
    if let Some(parent) = args.socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let _ = std::fs::remove_file(&args.socket);
    let listener = UnixListener::bind(&args.socket)
        .with_context(|| format!("binding {}", args.socket.display()))?;
    std::fs::set_permissions(&args.socket, std::fs::Permissions::from_mode(0o600))?;
    if !args.metrics_addr.is_empty() {
        let addr = args
            .metrics_addr
            .parse()
            .with_context(|| format!("--metrics-addr {:?}", args.metrics_addr))?;
        metrics::serve(d.clone(), addr)?;
    }
    tracing::info!(socket = %args.socket.display(), "serving");
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let d = d.clone();
        std::thread::spawn(move || {
            if let Err(e) = d.serve_conn(conn) {
                tracing::warn!(error = %e, "control connection failed");
            }
        });
    }
    Ok(())
}
