//! A validation run: the outbound client and the proxy side on threads of their own in the
//! pod's netns and credentials, the probe loop, then the report printed and the exit code.

use std::fs::File;
use std::io::{self, Write};
use std::net::SocketAddrV4;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use interceptor_common::config::ConfigError;

use super::creds::{become_unprivileged, enter_netns};
use super::probe_loop::probe_loop;
use super::sockets::{dial, Dial};
use super::{Outcome, Params, Report, EXIT_VALIDATION_FAILED, OUTBOUND_PROBE_IP};

/// The outbound probe's uid/gid: the first of these that is neither the proxy uid nor its gid.
const APP_ID_CANDIDATES: [u32; 3] = [65534, 65533, 65532];

/// `interceptor validate` with checked params: exit 0 when every check passed, 126 when one
/// failed.
pub fn run(p: &Params) -> Result<Result<(), ConfigError>> {
    let report = match validate(p) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("interceptor validate: FAILED: {e:#}");
            std::process::exit(EXIT_VALIDATION_FAILED);
        }
    };
    for line in &report.context {
        println!("{line}");
    }
    for (check, outcome) in &report.results {
        match outcome {
            Outcome::Passed(m) => println!("ok: {check}: {m}"),
            Outcome::Skipped(m) => println!("skipped: {check}: {m}"),
            Outcome::Failed(m) => eprintln!("FAILED: {check}: {m}"),
        }
    }
    if report.passed() {
        println!("validation passed");
        return Ok(Ok(()));
    }
    let failed: Vec<String> = report
        .results
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Failed(_)))
        .map(|(c, _)| c.to_string())
        .collect();
    eprintln!(
        "interceptor validate: validation failed ({}); exit {EXIT_VALIDATION_FAILED}",
        failed.join(", ")
    );
    let _ = io::stdout().flush();
    std::process::exit(EXIT_VALIDATION_FAILED);
}

/// The first candidate id that is neither the proxy uid nor its gid.
fn app_id(p: &Params) -> u32 {
    APP_ID_CANDIDATES
        .into_iter()
        .find(|i| *i != p.proxy_uid && *i != p.proxy_gid)
        .unwrap_or(APP_ID_CANDIDATES[0])
}

/// Runs both checks; `Err` only when they could not run at all (netns, credentials, listeners).
pub fn validate(p: &Params) -> Result<Report> {
    let ns_file = p
        .netns
        .as_deref()
        .map(|path| File::open(path).with_context(|| format!("opening {}", path.display())))
        .transpose()?;
    let started_as_root = nix::unistd::geteuid().is_root();
    let app = app_id(p);
    let outbound_dst = SocketAddrV4::new(OUTBOUND_PROBE_IP, p.probe_port);
    let ns_ref = ns_file.as_ref();
    std::thread::scope(|s| {
        let (req_tx, req_rx) = mpsc::channel::<()>();
        let (resp_tx, resp_rx) = mpsc::channel::<Result<Dial>>();
        let (ready_tx, ready_rx) = mpsc::channel::<std::result::Result<(), String>>();
        // The outbound client: a non-proxy uid, dialing on request.
        std::thread::Builder::new()
            .name("validate-app".into())
            .spawn_scoped(s, move || {
                let setup = enter_netns(ns_ref).and_then(|()| become_unprivileged(app, app));
                let ok = setup.is_ok();
                let _ = ready_tx.send(setup.map_err(|e| format!("{e:#}")));
                if !ok {
                    return;
                }
                for () in req_rx {
                    if resp_tx.send(dial(None, outbound_dst)).is_err() {
                        break;
                    }
                }
            })
            .context("spawning the outbound client thread")?;
        // The proxy side: listeners, inbound client, and the probe loop.
        let proxy = std::thread::Builder::new()
            .name("validate-proxy".into())
            .spawn_scoped(s, move || -> Result<Report> {
                enter_netns(ns_ref)?;
                become_unprivileged(p.proxy_uid, p.proxy_gid).with_context(|| {
                    format!(
                        "running as the proxy uid {} gid {}",
                        p.proxy_uid, p.proxy_gid
                    )
                })?;
                let app_ready = ready_rx
                    .recv_timeout(Duration::from_secs(10))
                    .unwrap_or_else(|_| Err("the client thread did not start".into()));
                probe_loop(p, started_as_root, app, app_ready, req_tx, resp_rx)
            })
            .context("spawning the proxy thread")?;
        proxy
            .join()
            .map_err(|_| anyhow!("the validation thread panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(proxy_uid: u32, proxy_gid: u32) -> Params {
        Params {
            netns: None,
            proxy_port: 15001,
            inbound_capture_port: 15006,
            probe_port: 15002,
            timeout: Duration::from_secs(5),
            timeout_text: "5s".into(),
            proxy_uid,
            proxy_gid,
        }
    }

    #[test]
    fn the_app_id_is_neither_proxy_id() {
        assert_eq!(app_id(&params(1337, 1337)), 65534);
        assert_eq!(app_id(&params(65534, 65534)), 65533);
        assert_eq!(app_id(&params(65534, 65533)), 65532);
    }
}
