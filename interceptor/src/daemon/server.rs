//! The daemon's front door: the control socket and the metrics endpoint in front of the
//! `Daemon`'s pod registry (a room of its own, so the registry and the metrics do not import
//! each other).
//!
//! The control socket's connections: threads wait in `accept` themselves and serve the
//! connection they got, instead of one accepting thread spawning a thread per connection: the
//! spawn and the extra cross-CPU wake-up were part of every CNI ADD's round trip. A connection
//! that takes the last waiting thread makes it start another one first, so a client that holds
//! its connection open never keeps the others waiting; threads beyond `SPARE` waiting ones exit.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};

use super::metrics;
use super::protocol::{Request, Response};
use super::{Daemon, Settings};

/// Threads kept waiting in `accept` (the main thread is one of them, for good).
const SPARE: usize = 2;

struct Pool {
    daemon: Arc<Daemon>,
    listener: UnixListener,
    /// Threads waiting in `accept` (or about to).
    waiting: AtomicUsize,
}

/// Runs the daemon until killed. Stopping it leaves interception in place.
pub fn run(args: &Settings) -> Result<()> {
    let d = Daemon::start(args.clone())?;
    super::repair::start(&d).context("starting the repair thread")?;
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
    serve(d, listener)
}

/// Serves connections on `listener` until the process ends (the calling thread serves too).
pub fn serve(daemon: Arc<Daemon>, listener: UnixListener) -> Result<()> {
    let pool = Arc::new(Pool {
        daemon,
        listener,
        waiting: AtomicUsize::new(1),
    });
    for _ in 1..SPARE {
        pool.waiting.fetch_add(1, Ordering::SeqCst);
        spawn(&pool)?;
    }
    accept_loop(&pool, true);
    Ok(())
}

fn spawn(pool: &Arc<Pool>) -> Result<()> {
    let pool = pool.clone();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || accept_loop(&pool, false))?;
    Ok(())
}

/// Accepts and serves connections one at a time. A thread that is not `permanent` exits after a
/// connection when `SPARE` others are already waiting.
fn accept_loop(pool: &Arc<Pool>, permanent: bool) {
    loop {
        // As before: a failed accept (a peer gone already, no fds left) is skipped.
        let Ok((conn, _)) = pool.listener.accept() else {
            continue;
        };
        if pool.waiting.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Nobody is left accepting while this connection is served.
            pool.waiting.fetch_add(1, Ordering::SeqCst);
            if let Err(e) = spawn(pool) {
                pool.waiting.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!(error = %e, "starting a control connection thread");
            }
        }
        if let Err(e) = serve_conn(&pool.daemon, conn) {
            tracing::warn!(error = %e, "control connection failed");
        }
        let rejoined = if permanent {
            pool.waiting.fetch_add(1, Ordering::SeqCst);
            true
        } else {
            pool.waiting
                .try_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n < SPARE).then_some(n + 1)
                })
                .is_ok()
        };
        if !rejoined {
            return;
        }
    }
}

/// One connection: JSON request lines in, one JSON response line out for each.
fn serve_conn(d: &Daemon, s: UnixStream) -> Result<()> {
    // Root only: the socket file is 0600, and peers are checked here too.
    let cred = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)?;
    let mut w = &s;
    if cred.uid() != 0 {
        tracing::warn!(
            uid = cred.uid(),
            pid = cred.pid(),
            "refused a non-root control connection"
        );
        let resp = Response::Error {
            message: "permission denied: root only".into(),
            bad_input: false,
        };
        return send(&mut w, &resp);
    }
    for line in BufReader::new(&s).lines() {
        let line = line?;
        let (resp, changed) = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let changes = matches!(req, Request::Add(_) | Request::Remove { .. });
                (d.handle(req), changes)
            }
            Err(e) => (
                Response::Error {
                    message: format!("malformed request: {e}"),
                    bad_input: true,
                },
                false,
            ),
        };
        send(&mut w, &resp)?;
        // Work that can wait until the client has its answer.
        if changed {
            d.after_change();
        }
    }
    Ok(())
}

/// Writes a response line in one write (the client reads up to the newline).
fn send(w: &mut impl Write, resp: &Response) -> Result<()> {
    let mut line = serde_json::to_vec(resp)?;
    line.push(b'\n');
    w.write_all(&line)?;
    Ok(())
}
