//! A tiny DNS responder standing in for Istio's DNS proxy (istio-agent on 15053): it answers
//! every A query with `ANSWER` over UDP and TCP, on 127.0.0.1 and [::1], as the proxy uid.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;

use crate::topology::{enter_netns, set_thread_creds};

/// The address every A query resolves to.
pub const ANSWER: Ipv4Addr = Ipv4Addr::new(10, 99, 99, 99);

/// A response to `query`: same id and question, one A record (none for other types).
pub fn answer(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    // Walk the question name to find qtype.
    let mut i = 12;
    while i < query.len() && query[i] != 0 {
        i += 1 + query[i] as usize;
    }
    let end = i + 5;
    if end > query.len() {
        return None;
    }
    let qtype = u16::from_be_bytes([query[i + 1], query[i + 2]]);
    let a = qtype == 1;
    let mut out = Vec::with_capacity(end + 16);
    out.extend_from_slice(&query[..2]);
    out.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(a), 0, 0, 0, 0]);
    out.extend_from_slice(&query[12..end]);
    if a {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        out.extend_from_slice(&ANSWER.octets());
    }
    Some(out)
}

/// The responder; stops when dropped.
pub struct DnsProxy {
    stop: Arc<AtomicBool>,
    clients: Clients,
}

/// Where each query came from, as the proxy saw it.
type Clients = Arc<Mutex<Vec<IpAddr>>>;

impl DnsProxy {
    /// Starts on `port` in the netns, as `uid`/`gid`.
    pub fn start(netns: &Path, port: u16, uid: u32, gid: u32) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = Clients::default();
        let (tx, rx) = std::sync::mpsc::channel();
        for addr in [
            SocketAddr::from(([127, 0, 0, 1], port)),
            SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], port)),
        ] {
            for tcp in [false, true] {
                let (netns, stop, tx) = (netns.to_path_buf(), stop.clone(), tx.clone());
                let clients = clients.clone();
                std::thread::spawn(move || {
                    let setup = enter_netns(&netns).and_then(|_| set_thread_creds(uid, gid));
                    if let Err(e) = setup {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    if tcp {
                        serve_tcp(addr, &stop, &tx, &clients)
                    } else {
                        serve_udp(addr, &stop, &tx, &clients)
                    }
                });
            }
        }
        drop(tx);
        for r in rx.iter().take(4) {
            r?;
        }
        Ok(Self { stop, clients })
    }

    /// The source address of every query answered since the last call (IPv4-mapped shown as
    /// IPv4), oldest first.
    pub fn take_clients(&self) -> Vec<IpAddr> {
        std::mem::take(&mut *self.clients.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn record(clients: &Clients, from: SocketAddr) {
    let mut c = clients.lock().unwrap_or_else(|e| e.into_inner());
    c.push(from.ip().to_canonical());
}

impl Drop for DnsProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_udp(
    addr: SocketAddr,
    stop: &AtomicBool,
    ready: &std::sync::mpsc::Sender<Result<()>>,
    clients: &Clients,
) {
    let sock = match UdpSocket::bind(addr) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = ready.send(Ok(()));
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            if let Some(resp) = answer(&buf[..n]) {
                record(clients, from);
                let _ = sock.send_to(&resp, from);
            }
        }
    }
}

fn serve_tcp(
    addr: SocketAddr,
    stop: &AtomicBool,
    ready: &std::sync::mpsc::Sender<Result<()>>,
    clients: &Clients,
) {
    let l = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    };
    let _ = l.set_nonblocking(true);
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::Relaxed) {
        let Ok((mut s, from)) = l.accept() else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut len = [0u8; 2];
        if s.read_exact(&mut len).is_err() {
            continue;
        }
        let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
        if s.read_exact(&mut q).is_ok() {
            if let Some(resp) = answer(&q) {
                record(clients, from);
                let _ = s.write_all(&(resp.len() as u16).to_be_bytes());
                let _ = s.write_all(&resp);
            }
        }
    }
}
