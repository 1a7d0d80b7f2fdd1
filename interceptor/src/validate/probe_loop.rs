//! The probe loop on the proxy thread: listen, probe every second, match each accepted
//! connection to its probe and judge it, until both checks are settled or time is up.

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use nix::errno::Errno;

use super::sockets::{client_status, describe_errno, dial, listen, original_dst, Dial, Probe};
use super::{
    Check, Outcome, Params, Report, INBOUND_PROBE_IP, INBOUND_PROBE_SRC, OUTBOUND_PROBE_IP,
    PROBE_KEEP, TICK,
};

/// Progress of one check across probes.
struct State {
    check: Check,
    want_port: u16,
    want_orig: SocketAddr,
    passed: Option<String>,
    /// The latest connection that reached a listener the wrong way.
    wrong: Option<String>,
    /// The latest probe's client side, when no listener got it.
    client: Option<String>,
    probes: u32,
    skipped: Option<String>,
}

impl State {
    fn new(check: Check, want_port: u16, want_orig: SocketAddr) -> Self {
        State {
            check,
            want_port,
            want_orig,
            passed: None,
            wrong: None,
            client: None,
            probes: 0,
            skipped: None,
        }
    }

    fn open(&self) -> bool {
        self.passed.is_none() && self.skipped.is_none()
    }

    fn outcome(&self, timeout: &str) -> Outcome {
        if let Some(m) = &self.passed {
            return Outcome::Passed(m.clone());
        }
        if let Some(m) = &self.skipped {
            return Outcome::Skipped(m.clone());
        }
        let n = match self.probes {
            1 => "1 probe".to_string(),
            n => format!("{n} probes"),
        };
        if let Some(w) = &self.wrong {
            return Outcome::Failed(format!("{w} (last of {n} in {timeout})"));
        }
        let mut m = format!(
            "no listener received the probe to {} within {timeout} (not captured; {n})",
            self.want_orig
        );
        if let Some(c) = &self.client {
            m.push_str(&format!("; the last probe: {c}"));
        }
        Outcome::Failed(m)
    }

    /// One accepted connection of this check's probe.
    fn observe(
        &mut self,
        listener: SocketAddr,
        peer: SocketAddr,
        orig: std::result::Result<SocketAddr, Errno>,
        who: &str,
    ) {
        let want = self.want_orig;
        if listener.port() != self.want_port {
            self.wrong = Some(format!(
                "connection to {want} was accepted on {listener} instead of {}",
                self.want_port
            ));
            return;
        }
        match orig {
            Ok(o) if o == want => {
                self.passed = Some(format!(
                    "{who} connection from {peer} to {want} was redirected to {listener}, \
                     SO_ORIGINAL_DST {o}"
                ));
            }
            Ok(o) => {
                self.wrong = Some(format!(
                    "connection to {want} was accepted on {listener} but SO_ORIGINAL_DST says {o}"
                ));
            }
            Err(e) => {
                self.wrong = Some(format!(
                    "connection to {want} was accepted on {listener} but SO_ORIGINAL_DST failed \
                     ({e}): the original destination is lost"
                ));
            }
        }
    }
}

/// Listeners on loopback at `-p` and `-z` (and `[::1]` when IPv6 loopback is up), or None when
/// the ports are taken already: the pod's proxy is running.
fn own_listeners(p: &Params) -> Result<Option<Vec<(TcpListener, SocketAddr)>>> {
    let in_use = |e: &anyhow::Error| {
        e.chain().any(|c| {
            c.downcast_ref::<io::Error>()
                .is_some_and(|e| e.raw_os_error() == Some(libc::EADDRINUSE))
        })
    };
    let mut listeners: Vec<(TcpListener, SocketAddr)> = Vec::new();
    for port in [p.proxy_port, p.inbound_capture_port] {
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        match listen(addr, p.proxy_uid) {
            Ok(l) => listeners.push((l, addr)),
            Err(e) if in_use(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    // [::1] too when IPv6 loopback is up here (binding it tells).
    let v6_addr = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), p.proxy_port);
    match TcpListener::bind(v6_addr) {
        Ok(l) => {
            l.set_nonblocking(true)?;
            listeners.push((l, v6_addr));
            let addr = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), p.inbound_capture_port);
            listeners.push((listen(addr, p.proxy_uid)?, addr));
        }
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EADDRNOTAVAIL) | Some(libc::EAFNOSUPPORT)
            ) => {}
        Err(e) => bail!("cannot listen on {v6_addr} as uid {}: {e}", p.proxy_uid),
    }
    Ok(Some(listeners))
}

/// One poll(2) of `fds` for `events`, waiting at most until `until` (and a second): which fds
/// are ready, or None when a signal interrupted the wait (the caller just loops).
fn poll_until(
    fds: &[std::os::fd::RawFd],
    events: libc::c_short,
    until: Instant,
) -> Result<Option<Vec<bool>>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    let wait = until
        .saturating_duration_since(Instant::now())
        .as_millis()
        .clamp(1, 1000) as libc::c_int;
    // SAFETY: a valid array of pollfds (possibly empty, then it only waits).
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, wait) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(None);
        }
        return Err(e).context("poll");
    }
    Ok(Some(pfds.iter().map(|p| p.revents != 0).collect()))
}

/// A running pod: wait (until `tick_end`) for the probes' connects to finish, and judge each
/// finished one by where its far end is — on the check's port, or elsewhere.
fn judge_live(
    probes: &mut VecDeque<Probe>,
    tick_end: Instant,
    inbound: &mut State,
    outbound: &mut State,
    proxy_uid: u32,
    app: u32,
) -> Result<()> {
    while Instant::now() < tick_end && (inbound.open() || outbound.open()) {
        let fds: Vec<_> = probes.iter().map(|pr| pr.fd.as_raw_fd()).collect();
        let Some(ready) = poll_until(&fds, libc::POLLOUT, tick_end)? else {
            continue;
        };
        let mut done = vec![];
        for (i, pr) in probes.iter().enumerate() {
            if !ready[i] {
                continue;
            }
            done.push(i);
            let st = match pr.check {
                Check::Inbound => &mut *inbound,
                Check::Outbound => &mut *outbound,
            };
            let err = nix::sys::socket::getsockopt(&pr.fd, nix::sys::socket::sockopt::SocketError)
                .unwrap_or(libc::EIO);
            let Some(local) = pr.local.filter(|_| err == 0) else {
                st.client = Some(describe_errno(Errno::from_raw(err)));
                continue;
            };
            let who = match pr.check {
                Check::Inbound => format!("uid {proxy_uid}"),
                Check::Outbound => format!("uid {app}"),
            };
            let want = st.want_orig;
            if crate::listener::connected_to(st.want_port, local)? {
                st.passed = Some(format!(
                    "{who} connection from {local} to {want} reached the proxy's port {}",
                    st.want_port
                ));
            } else {
                st.wrong = Some(format!(
                    "{who} connection from {local} to {want} connected, but not to port {}: \
                     something else answered (not captured)",
                    st.want_port
                ));
            }
        }
        for i in done.into_iter().rev() {
            probes.remove(i);
        }
    }
    Ok(())
}

/// On the proxy thread: listen, probe every second until both checks passed or time is up.
pub(super) fn probe_loop(
    p: &Params,
    started_as_root: bool,
    app: u32,
    app_ready: std::result::Result<(), String>,
    req_tx: mpsc::Sender<()>,
    resp_rx: mpsc::Receiver<Result<Dial>>,
) -> Result<Report> {
    // Our own listeners, as istio-validation has before the proxy starts; in a running pod
    // the proxy holds the ports, and the probes are judged from the kernel's socket table.
    let listeners = own_listeners(p)?;
    let live = listeners.is_none();
    let listeners = listeners.unwrap_or_default();

    let inbound_dst = SocketAddrV4::new(INBOUND_PROBE_IP, p.probe_port);
    let mut inbound = State::new(Check::Inbound, p.inbound_capture_port, inbound_dst.into());
    let mut outbound = State::new(
        Check::Outbound,
        p.proxy_port,
        SocketAddr::new(OUTBOUND_PROBE_IP.into(), p.probe_port),
    );
    if let Err(e) = &app_ready {
        let m = format!("cannot run the client as uid {app} gid {app}: {e}");
        if started_as_root {
            bail!("{m}");
        }
        outbound.skipped = Some(format!(
            "{m} (needs root: the proxy uid's own connections are never redirected outbound)"
        ));
    }

    let listen_list: Vec<String> = listeners.iter().map(|(_, a)| a.to_string()).collect();
    let where_ = match &p.netns {
        Some(ns) => format!("netns {}", ns.display()),
        None => "the current netns".into(),
    };
    let mut context = vec![if live {
        format!(
            "validating interception in {where_}, a running pod: its proxy already listens on \
             ports {} and {}, so each probe must reach that port (its far end found in the \
             kernel's socket table); SO_ORIGINAL_DST is the proxy's to read and is not checked. \
             Probes run as uid {} gid {} with no capabilities",
            p.proxy_port, p.inbound_capture_port, p.proxy_uid, p.proxy_gid
        )
    } else {
        format!(
            "validating interception in {where_}: listeners {} as uid {} gid {} with no \
             capabilities",
            listen_list.join(", "),
            p.proxy_uid,
            p.proxy_gid
        )
    }];
    if outbound.skipped.is_none() {
        context.push(format!(
            "outbound probe client runs as uid {app} gid {app} with no capabilities"
        ));
    }

    let mut probes: VecDeque<Probe> = VecDeque::new();
    let deadline = Instant::now() + p.timeout;
    while Instant::now() < deadline && (inbound.open() || outbound.open()) {
        let tick_end = (Instant::now() + TICK).min(deadline);
        if inbound.open() {
            inbound.probes += 1;
            match dial(Some(INBOUND_PROBE_SRC), inbound_dst)? {
                Dial::InFlight(fd, local) => probes.push_back(Probe {
                    check: Check::Inbound,
                    fd,
                    local,
                    sent: Instant::now(),
                }),
                Dial::Failed(e) => inbound.client = Some(describe_errno(e)),
            }
        }
        if outbound.open() {
            outbound.probes += 1;
            req_tx
                .send(())
                .map_err(|_| anyhow!("the outbound client thread is gone"))?;
            match resp_rx.recv_timeout(TICK) {
                Ok(Ok(Dial::InFlight(fd, local))) => probes.push_back(Probe {
                    check: Check::Outbound,
                    fd,
                    local,
                    sent: Instant::now(),
                }),
                Ok(Ok(Dial::Failed(e))) => outbound.client = Some(describe_errno(e)),
                Ok(Err(e)) => return Err(e.context("outbound probe")),
                Err(_) => bail!("the outbound client thread did not answer"),
            }
        }
        if live {
            judge_live(
                &mut probes,
                tick_end,
                &mut inbound,
                &mut outbound,
                p.proxy_uid,
                app,
            )?;
        }
        // Accept until the tick ends (or both checks are settled).
        loop {
            let now = Instant::now();
            if live || now >= tick_end || !(inbound.open() || outbound.open()) {
                break;
            }
            let fds: Vec<_> = listeners.iter().map(|(l, _)| l.as_raw_fd()).collect();
            let Some(ready) = poll_until(&fds, libc::POLLIN, tick_end)? else {
                continue;
            };
            for (i, (l, laddr)) in listeners.iter().enumerate() {
                if !ready[i] {
                    continue;
                }
                loop {
                    let (stream, peer) = match l.accept() {
                        Ok(x) => x,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e).with_context(|| format!("accept on {laddr}")),
                    };
                    let orig = original_dst(&stream, laddr.is_ipv4());
                    // Which probe: by the client's address, else by where it was going.
                    let by_peer = probes.iter().position(|pr| pr.local == Some(peer));
                    let check = match by_peer {
                        Some(i) => probes.remove(i).map(|pr| pr.check),
                        None => match orig {
                            Ok(o) if o == inbound.want_orig => Some(Check::Inbound),
                            Ok(o) if o == outbound.want_orig => Some(Check::Outbound),
                            _ => None,
                        },
                    };
                    match check {
                        Some(Check::Inbound) => {
                            inbound.observe(*laddr, peer, orig, &format!("uid {}", p.proxy_uid))
                        }
                        Some(Check::Outbound) => {
                            outbound.observe(*laddr, peer, orig, &format!("uid {app}"))
                        }
                        None => tracing::debug!(%peer, %laddr, "unrelated connection ignored"),
                    }
                }
            }
        }
        // The latest probe of each open check: what its client saw.
        for st in [&mut inbound, &mut outbound] {
            if let Some(pr) = probes.iter().rev().find(|pr| pr.check == st.check) {
                st.client = Some(client_status(&pr.fd));
            }
        }
        probes.retain(|pr| pr.sent.elapsed() < PROBE_KEEP);
    }
    Ok(Report {
        context,
        results: vec![
            (Check::Inbound, inbound.outcome(&p.timeout_text)),
            (Check::Outbound, outbound.outcome(&p.timeout_text)),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        let want: SocketAddr = "127.0.0.6:15002".parse().unwrap();
        let lo = |port| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        let mut st = State::new(Check::Inbound, 15006, want);
        st.observe(lo(15001), lo(40000), Ok(want), "uid 1337");
        assert!(st.open());
        st.probes = 1;
        let Outcome::Failed(m) = st.outcome("5s") else {
            panic!()
        };
        assert!(
            m.contains(
                "connection to 127.0.0.6:15002 was accepted on 127.0.0.1:15001 instead of 15006"
            ),
            "{m}"
        );
        let mut st = State::new(Check::Inbound, 15006, want);
        st.probes = 5;
        st.client = Some(describe_errno(Errno::ECONNREFUSED));
        let Outcome::Failed(m) = st.outcome("5s") else {
            panic!()
        };
        assert!(
            m.starts_with(
                "no listener received the probe to 127.0.0.6:15002 within 5s (not captured"
            ),
            "{m}"
        );
        st.observe(lo(15006), lo(40000), Ok(want), "uid 1337");
        assert!(matches!(st.outcome("5s"), Outcome::Passed(_)));
    }
}
