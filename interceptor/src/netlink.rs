//! One netlink dump (request, then messages until `NLMSG_DONE`) in the caller's netns, for any
//! rust-netlink message family: the listening sockets (sock_diag) and a netns's addresses
//! (rtnetlink) both use it.

use anyhow::{anyhow, bail, Context, Result};
use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
    NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_sys::{Socket, SocketAddr};

/// A socket of `protocol` (a `netlink_sys::protocols` constant). Not bound: the kernel binds
/// it at the first send (two system calls fewer on the pod-add path).
pub fn socket(protocol: isize) -> Result<Socket> {
    Socket::new(protocol).context("netlink socket")
}

/// Sends `req` as a dump request and returns the kernel's answers, in order.
pub fn dump<M>(socket: &Socket, req: M, what: &str) -> Result<Vec<M>>
where
    M: NetlinkSerializable + NetlinkDeserializable + std::fmt::Debug,
{
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut msg = NetlinkMessage::new(hdr, NetlinkPayload::InnerMessage(req));
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    socket
        .send_to(&buf, &SocketAddr::new(0, 0), 0)
        .with_context(|| format!("{what} request"))?;
    let mut out = Vec::new();
    let mut rx = vec![0u8; 64 * 1024];
    loop {
        let (n, from) = socket
            .recv_from(&mut &mut rx[..], 0)
            .with_context(|| format!("{what} reply"))?;
        // Only the kernel's answers (the socket is not connected, which would filter them).
        if from.port_number() != 0 {
            continue;
        }
        let mut off = 0;
        while off < n {
            let msg = <NetlinkMessage<M>>::deserialize(&rx[off..n])
                .map_err(|e| anyhow!("{what} reply: {e}"))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(m) => out.push(m),
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => bail!("{what}: {e}"),
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += len;
        }
    }
}
