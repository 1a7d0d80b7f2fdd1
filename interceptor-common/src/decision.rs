//! The outbound decision model: Istio's `ISTIO_OUTPUT` chain as one pure function.
//!
//! `decide` walks the chain in istio-iptables' emission order. It is `no_std` and generic over
//! `PodTables` (the set lookups: ports, CIDRs, local addresses, groups) so that the eBPF
//! programs call it with map-backed lookups and userspace (`explain`, tests) with in-memory
//! sets: there is exactly one implementation of "is this connection redirected, and where".

/// Most proxy uids (or gids) one pod may list; Istio injects one.
pub const MAX_IDS: usize = 8;

/// `PodPolicy::flags` bits.
pub mod flags {
    /// IPv6 rules are installed (istio-iptables' EnableIPv6).
    pub const IPV6: u32 = 1 << 0;
    /// DNS capture is on and has something to capture (servers known, or capture-all).
    pub const DNS: u32 = 1 << 1;
    /// Capture DNS to every server, not only the resolv.conf ones.
    pub const DNS_CAPTURE_ALL: u32 = 1 << 2;
    /// `-i '*'`: every destination not returned earlier is redirected.
    pub const INCLUDE_ALL: u32 = 1 << 3;
    /// An include CIDR is loopback (Go's `IsLoopback`: 127/8, ::1, ::ffff:127.x; see
    /// `plan::is_loopback`): Istio then omits the "app over lo → RETURN" rule.
    pub const LOOPBACK_INCLUDED: u32 = 1 << 4;
    /// Owner groups: only listed groups are captured.
    pub const GROUPS_INCLUDE: u32 = 1 << 5;
    /// Owner groups: listed groups are not captured.
    pub const GROUPS_EXCLUDE: u32 = 1 << 6;
    /// `-b '*'`: every inbound port is captured except `-d` ports and the tunnel port.
    pub const INBOUND_ALL: u32 = 1 << 7;
    /// `-b LIST`: only the listed inbound ports are captured.
    pub const INBOUND_LIST: u32 = 1 << 8;
    /// Only the proxy uid/gid may bind the proxy's own ports.
    pub const BIND_GUARD: u32 = 1 << 9;
    /// `--accelerate`: app↔proxy loopback connections skip the TCP stack (sockops + sk_msg).
    pub const ACCELERATE: u32 = 1 << 10;
}

/// One pod's interception policy: the scalar part of `Config`; the set-valued parts live in
/// lookups keyed by `pod_id`. Stored in the eBPF `POD_POLICY` map keyed by netns cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodPolicy {
    pub pod_id: u32,
    pub flags: u32,
    pub proxy_port: u16,
    pub inbound_capture_port: u16,
    pub inbound_tunnel_port: u16,
    pub dns_port: u16,
    /// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`, host byte order.
    pub loopback_v4_addr: u32,
    pub loopback_v4_prefix: u32,
    pub n_uids: u32,
    pub uids: [u32; MAX_IDS],
    pub n_gids: u32,
    pub gids: [u32; MAX_IDS],
}

impl PodPolicy {
    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

/// A destination or source address, always in IPv6 form: IPv4 is `::ffff:a.b.c.d`. One fully
/// initialised representation (no enum with undefined payload bytes, which the eBPF verifier
/// rejects when LLVM speculates on them), and `::ffff:a.b.c.d` from an AF_INET6 socket is
/// decided as the IPv4 address it is on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addr(pub [u8; 16]);

const MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

impl Addr {
    /// IPv4 from its host-order value.
    #[inline(always)]
    pub const fn v4(host: u32) -> Addr {
        let b = host.to_be_bytes();
        Addr([
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
        ])
    }

    /// IPv6 (or v4-mapped) from its 16 bytes.
    #[inline(always)]
    pub const fn v6(bytes: [u8; 16]) -> Addr {
        Addr(bytes)
    }

    #[inline(always)]
    pub fn is_v4(self) -> bool {
        self.0[..12] == MAPPED_PREFIX
    }

    /// The IPv4 address in host order, if this is one.
    #[inline(always)]
    pub fn v4_host(self) -> Option<u32> {
        self.is_v4()
            .then(|| u32::from_be_bytes([self.0[12], self.0[13], self.0[14], self.0[15]]))
    }

    /// Loopback in the kernel's sense (127.0.0.0/8, ::1): always routed over `lo`.
    #[inline(always)]
    pub fn is_loopback(self) -> bool {
        if self.is_v4() {
            self.0[12] == 127
        } else {
            self.0 == V6_LOOPBACK
        }
    }

    /// The unspecified address (0.0.0.0 or ::).
    #[inline(always)]
    pub fn is_unspecified(self) -> bool {
        self.0 == [0; 16] || self.v4_host() == Some(0)
    }
}

const V6_LOOPBACK: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// Envoy's inbound passthrough source, 127.0.0.6 / ::6 (the netfilter rules' `-s`, through
/// `plan::Plan::passthrough`).
pub const PASSTHROUGH_V4: Addr = Addr::v4(0x7f00_0006);
pub const PASSTHROUGH_V6: Addr = Addr([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6]);
/// The port DNS capture matches.
pub const DNS_PORT: u16 = 53;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// The connection being decided, as the connect hook sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conn {
    pub proto: Proto,
    pub dst: Addr,
    pub dport: u16,
    /// The socket's bound source address, if it was bound before connect.
    pub src: Option<Addr>,
    pub uid: u32,
    pub gid: u32,
}

/// The set-valued parts of a pod's config. All lookups are O(1) or O(prefix length), so the
/// cost of a decision does not grow with the number of configured ports or CIDRs.
pub trait PodTables {
    /// `-o`: outbound ports never redirected.
    fn port_excluded(&self, port: u16) -> bool;
    /// `-q`: outbound ports always redirected.
    fn port_included(&self, port: u16) -> bool;
    /// `-x`: destination inside an excluded CIDR.
    fn cidr_excluded(&self, dst: Addr) -> bool;
    /// `-i` list: destination inside an included CIDR.
    fn cidr_included(&self, dst: Addr) -> bool;
    /// The destination is one of the pod's own addresses (the route goes over `lo`).
    fn is_local(&self, dst: Addr) -> bool;
    /// The destination is one of the resolv.conf DNS servers.
    fn is_dns_server(&self, dst: Addr) -> bool;
    /// The gid is in the owner-groups list (include or exclude, per the policy flags).
    fn group_listed(&self, gid: u32) -> bool;
    /// `-d` (with `-b '*'`) or `-b` list membership, per the policy flags.
    fn inbound_port_listed(&self, port: u16) -> bool;
    /// One of the proxy's own ports (only the proxy may bind them).
    fn proxy_port_guarded(&self, port: u16) -> bool;
}

/// Which rule of the chain decided (or that none matched).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Reason {
    /// No rule matched: the connection leaves untouched.
    NoMatch = 0,
    /// IPv6 destination while the pod's IPv6 rules are off.
    Ipv6Disabled,
    /// `-o` excluded port.
    ExcludedPort,
    /// Source 127.0.0.6 over lo (Envoy's inbound passthrough).
    PassthroughSource,
    /// Proxy uid over lo to a non-loopback-CIDR address: through inbound handling.
    ProxyUidToLocal,
    /// Proxy gid over lo to a non-loopback-CIDR address: through inbound handling.
    ProxyGidToLocal,
    /// A non-proxy uid talking over lo.
    AppOverLoopbackUid,
    /// A non-proxy gid talking over lo.
    AppOverLoopbackGid,
    /// The proxy's own uid.
    ProxyUid,
    /// The proxy's own gid.
    ProxyGid,
    /// The socket's group is not captured (owner groups).
    OwnerGroup,
    /// DNS capture.
    Dns,
    /// Destination in the loopback CIDR.
    LoopbackCidr,
    /// `-x` excluded CIDR.
    ExcludedCidr,
    /// `-q` included port.
    IncludedPort,
    /// `-i '*'`.
    IncludeAll,
    /// `-i` included CIDR.
    IncludedCidr,
    /// Not TCP (and not captured DNS).
    NotTcp,
    /// Inbound: the pod captures no inbound ports (`-b ''`).
    NoInboundCapture,
    /// Inbound: the HBONE tunnel port is never captured.
    TunnelPort,
    /// Inbound: a `-d` excluded port.
    ExcludedInboundPort,
    /// Inbound: not in the `-b` list.
    NotIncludedInboundPort,
    /// Inbound: the peer is the pod itself (the proxy's own connection to the app, over lo),
    /// or the destination is loopback.
    LocalPeer,
    /// Inbound: a port in the `-b` list / not excluded: to the proxy's inbound port.
    InboundCaptured,
    /// Bind guard: a non-proxy process tried to bind a proxy port.
    ProxyPortGuarded,
    /// Bind guard: the proxy's own uid/gid, or not a guarded port.
    BindAllowed,
}

impl Reason {
    /// Every reason, indexed by its value (for naming counters).
    pub const ALL: [Reason; 26] = [
        Reason::NoMatch,
        Reason::Ipv6Disabled,
        Reason::ExcludedPort,
        Reason::PassthroughSource,
        Reason::ProxyUidToLocal,
        Reason::ProxyGidToLocal,
        Reason::AppOverLoopbackUid,
        Reason::AppOverLoopbackGid,
        Reason::ProxyUid,
        Reason::ProxyGid,
        Reason::OwnerGroup,
        Reason::Dns,
        Reason::LoopbackCidr,
        Reason::ExcludedCidr,
        Reason::IncludedPort,
        Reason::IncludeAll,
        Reason::IncludedCidr,
        Reason::NotTcp,
        Reason::NoInboundCapture,
        Reason::TunnelPort,
        Reason::ExcludedInboundPort,
        Reason::NotIncludedInboundPort,
        Reason::LocalPeer,
        Reason::InboundCaptured,
        Reason::ProxyPortGuarded,
        Reason::BindAllowed,
    ];

    /// The rule's stable name for tools (`explain --output json`, scripts): snake_case words,
    /// never the Rust variant name.
    pub const fn id(self) -> &'static str {
        match self {
            Reason::NoMatch => "no_match",
            Reason::Ipv6Disabled => "ipv6_disabled",
            Reason::ExcludedPort => "excluded_port",
            Reason::PassthroughSource => "passthrough_source",
            Reason::ProxyUidToLocal => "proxy_uid_to_local",
            Reason::ProxyGidToLocal => "proxy_gid_to_local",
            Reason::AppOverLoopbackUid => "app_over_loopback_uid",
            Reason::AppOverLoopbackGid => "app_over_loopback_gid",
            Reason::ProxyUid => "proxy_uid",
            Reason::ProxyGid => "proxy_gid",
            Reason::OwnerGroup => "owner_group",
            Reason::Dns => "dns",
            Reason::LoopbackCidr => "loopback_cidr",
            Reason::ExcludedCidr => "excluded_cidr",
            Reason::IncludedPort => "included_port",
            Reason::IncludeAll => "include_all",
            Reason::IncludedCidr => "included_cidr",
            Reason::NotTcp => "not_tcp",
            Reason::NoInboundCapture => "no_inbound_capture",
            Reason::TunnelPort => "tunnel_port",
            Reason::ExcludedInboundPort => "excluded_inbound_port",
            Reason::NotIncludedInboundPort => "not_included_inbound_port",
            Reason::LocalPeer => "local_peer",
            Reason::InboundCaptured => "inbound_captured",
            Reason::ProxyPortGuarded => "proxy_port_guarded",
            Reason::BindAllowed => "bind_allowed",
        }
    }
}

/// Serialized as its stable `id`.
#[cfg(feature = "user")]
impl serde::Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.id())
    }
}

/// What happens to the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Leave the destination alone.
    Pass(Reason),
    /// Rewrite the destination to loopback at this port.
    Redirect { port: u16, reason: Reason },
}

impl Verdict {
    pub fn reason(self) -> Reason {
        match self {
            Verdict::Pass(r) | Verdict::Redirect { reason: r, .. } => r,
        }
    }
}

fn in_v4_cidr(addr: u32, net: u32, prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix.min(32))
    };
    addr & mask == net & mask
}

/// Where the kernel really sends a connection addressed to `dst` from a socket bound to `src`.
/// The unspecified address means "this host", and the connect/sendmsg hooks see it before the
/// kernel replaces it: `0.0.0.0` becomes the bound source, or 127.0.0.1 when unbound
/// (`ip_route_output_key`); `::` becomes `::1`, or `::ffff:127.0.0.1` on a socket bound to an
/// IPv4-mapped address (`tcp_v6_connect`, `ip6_datagram_connect`, `udpv6_sendmsg`). Either
/// way the route is `lo`, which is what Istio's `-o lo` rules see, with this destination.
#[inline(always)]
pub fn kernel_dst(dst: Addr, src: Option<Addr>) -> Addr {
    const LOOPBACK_V4: Addr = Addr::v4(0x7f00_0001);
    if dst.v4_host() == Some(0) {
        match src {
            Some(s) if s.is_v4() && !s.is_unspecified() => s,
            _ => LOOPBACK_V4,
        }
    } else if dst.0 == [0; 16] {
        match src {
            Some(s) if s.is_v4() => LOOPBACK_V4,
            _ => Addr(V6_LOOPBACK),
        }
    } else {
        dst
    }
}

/// `POD_SRC[pod_id]`: the pod's own address per family, which a redirected connection is bound
/// to (`decision::redirect_source`). Zero: none of that family. `netns` guards against an entry
/// an earlier pod with the same id left behind (the programs use it only for this netns).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodSrc {
    pub netns: u64,
    /// IPv4 as `::ffff:a.b.c.d` (the layout of `decision::Addr`).
    pub v4: [u8; 16],
    pub v6: [u8; 16],
}

/// The source a redirected connection is bound to before it goes to the proxy, so the proxy
/// sees the peer a REDIRECT would have shown it: the address the kernel picks for the original
/// destination `dst` (as `kernel_dst` gives it). Without it the connection would come from
/// loopback, the proxy's own address. None: leave the source to the kernel, which is already
/// right — the app bound one (`bound`; Envoy's 127.0.0.6 is one), or `dst` is loopback.
/// A destination that is one of the pod's own addresses is its own source (the local route's
/// preferred source); anything else leaves by the pod's address of its family (`pod`), if the
/// pod has one.
#[inline(always)]
pub fn redirect_source(pod: &PodSrc, route: Route, bound: Option<Addr>) -> Option<Addr> {
    let dst = route.dst;
    if bound.is_some() || dst.is_loopback() || dst.is_unspecified() {
        return None;
    }
    if route.own {
        return Some(dst);
    }
    let a = Addr(if dst.is_v4() { pod.v4 } else { pod.v6 });
    (!a.is_unspecified()).then_some(a)
}

/// Where the kernel sends a connection, as far as the decision goes: its destination as the
/// kernel takes it (`kernel_dst`), and whether that is one of the pod's own addresses (the
/// route to it is `lo`). Looked up once: `decide` and `redirect_source` both need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: Addr,
    /// One of the pod's own addresses (never loopback: that is known without a lookup).
    pub own: bool,
}

impl Route {
    #[inline(always)]
    pub fn of<T: PodTables>(t: &T, c: &Conn) -> Route {
        let dst = kernel_dst(c.dst, c.src);
        Route {
            dst,
            own: !dst.is_loopback() && t.is_local(dst),
        }
    }

    /// "-o lo": the route to a loopback or own address is the loopback device.
    #[inline(always)]
    pub fn over_lo(self) -> bool {
        self.dst.is_loopback() || self.own
    }
}

/// Istio's `ISTIO_OUTPUT` chain for one outbound connect, in rule order. The destination is
/// first taken as the kernel will route it (`kernel_dst`).
#[inline(always)]
pub fn decide<T: PodTables>(p: &PodPolicy, t: &T, c: &Conn) -> Verdict {
    decide_routed(p, t, c, Route::of(t, c))
}

/// `decide` with the route already looked up (`Route::of(t, c)`).
#[inline(always)]
pub fn decide_routed<T: PodTables>(p: &PodPolicy, t: &T, c: &Conn, route: Route) -> Verdict {
    let dst = route.dst;
    if !dst.is_v4() && !p.has(flags::IPV6) {
        return Verdict::Pass(Reason::Ipv6Disabled);
    }
    let tcp = c.proto == Proto::Tcp;
    let over_lo = route.over_lo();
    let in_lo_cidr = match dst.v4_host() {
        Some(a) => in_v4_cidr(a, p.loopback_v4_addr, p.loopback_v4_prefix),
        None => dst.0 == V6_LOOPBACK,
    };
    let dns = p.has(flags::DNS);

    if t.port_excluded(c.dport) {
        return Verdict::Pass(Reason::ExcludedPort);
    }
    let passthrough_src = matches!(c.src, Some(s) if s == PASSTHROUGH_V4 || s == PASSTHROUGH_V6);
    if over_lo && passthrough_src {
        return Verdict::Pass(Reason::PassthroughSource);
    }
    // The proxy calling its own pod IP (or any local address outside the loopback CIDR) goes
    // through inbound handling. Istio's uid rule also skips port 53 when DNS is on; its gid rule
    // does not.
    let to_inbound_gid = over_lo && !in_lo_cidr && tcp && c.dport != p.inbound_tunnel_port;
    let to_inbound_uid = to_inbound_gid && !(dns && c.dport == DNS_PORT);
    // Apps talking over lo are left alone; with DNS on only TCP to ports other than 53 is
    // ("-p tcp ! --dport 53"), and an include CIDR inside 127/8 drops the rule altogether.
    let app_lo_exempt =
        over_lo && !p.has(flags::LOOPBACK_INCLUDED) && (!dns || (tcp && c.dport != DNS_PORT));
    let mut i = 0;
    while i < MAX_IDS && i < p.n_uids as usize {
        let u = p.uids[i];
        if to_inbound_uid && c.uid == u {
            return Verdict::Redirect {
                port: p.inbound_capture_port,
                reason: Reason::ProxyUidToLocal,
            };
        }
        if app_lo_exempt && c.uid != u {
            return Verdict::Pass(Reason::AppOverLoopbackUid);
        }
        if c.uid == u {
            return Verdict::Pass(Reason::ProxyUid);
        }
        i += 1;
    }
    let mut i = 0;
    while i < MAX_IDS && i < p.n_gids as usize {
        let g = p.gids[i];
        if to_inbound_gid && c.gid == g {
            return Verdict::Redirect {
                port: p.inbound_capture_port,
                reason: Reason::ProxyGidToLocal,
            };
        }
        if app_lo_exempt && c.gid != g {
            return Verdict::Pass(Reason::AppOverLoopbackGid);
        }
        if c.gid == g {
            return Verdict::Pass(Reason::ProxyGid);
        }
        i += 1;
    }
    if p.has(flags::GROUPS_INCLUDE) && !t.group_listed(c.gid) {
        return Verdict::Pass(Reason::OwnerGroup);
    }
    if p.has(flags::GROUPS_EXCLUDE) && t.group_listed(c.gid) {
        return Verdict::Pass(Reason::OwnerGroup);
    }
    if dns && c.dport == DNS_PORT && (p.has(flags::DNS_CAPTURE_ALL) || t.is_dns_server(dst)) {
        return Verdict::Redirect {
            port: p.dns_port,
            reason: Reason::Dns,
        };
    }
    if in_lo_cidr {
        return Verdict::Pass(Reason::LoopbackCidr);
    }
    if t.cidr_excluded(dst) {
        return Verdict::Pass(Reason::ExcludedCidr);
    }
    // Everything below jumps to ISTIO_REDIRECT, which only redirects TCP.
    if !tcp {
        return Verdict::Pass(Reason::NotTcp);
    }
    if t.port_included(c.dport) {
        return Verdict::Redirect {
            port: p.proxy_port,
            reason: Reason::IncludedPort,
        };
    }
    if p.has(flags::INCLUDE_ALL) {
        return Verdict::Redirect {
            port: p.proxy_port,
            reason: Reason::IncludeAll,
        };
    }
    if t.cidr_included(dst) {
        return Verdict::Redirect {
            port: p.proxy_port,
            reason: Reason::IncludedCidr,
        };
    }
    Verdict::Pass(Reason::NoMatch)
}

/// Istio's inbound capture (nat PREROUTING → ISTIO_INBOUND) for a TCP connection arriving at
/// `local` (one of the pod's addresses) on `port` from `remote`. Connections the pod makes to
/// itself never traverse PREROUTING's NAT decision (their conntrack entry starts in OUTPUT), so
/// they are never captured: the proxy's own connections to the app reach the app.
#[inline(always)]
pub fn decide_inbound<T: PodTables>(
    p: &PodPolicy,
    t: &T,
    local: Addr,
    port: u16,
    remote: Addr,
) -> Verdict {
    if !local.is_v4() && !p.has(flags::IPV6) {
        return Verdict::Pass(Reason::Ipv6Disabled);
    }
    if !p.has(flags::INBOUND_ALL) && !p.has(flags::INBOUND_LIST) {
        return Verdict::Pass(Reason::NoInboundCapture);
    }
    // A loopback destination (127/8, ::1, ::ffff:127/104) can only be reached from inside the
    // pod; any other local address is captured, whether or not it was known at registration.
    if local.is_loopback() || remote.is_loopback() || remote == local || t.is_local(remote) {
        return Verdict::Pass(Reason::LocalPeer);
    }
    if port == p.inbound_tunnel_port {
        return Verdict::Pass(Reason::TunnelPort);
    }
    let listed = t.inbound_port_listed(port);
    if p.has(flags::INBOUND_ALL) && listed {
        return Verdict::Pass(Reason::ExcludedInboundPort);
    }
    if p.has(flags::INBOUND_LIST) && !listed {
        return Verdict::Pass(Reason::NotIncludedInboundPort);
    }
    Verdict::Redirect {
        port: p.inbound_capture_port,
        reason: Reason::InboundCaptured,
    }
}

/// The bind guard: in a meshed pod only the proxy's uids/gids may bind the proxy's ports, so an
/// app cannot impersonate the proxy. `Pass` = allowed.
#[inline(always)]
pub fn bind_allowed<T: PodTables>(p: &PodPolicy, t: &T, port: u16, uid: u32, gid: u32) -> bool {
    !p.has(flags::BIND_GUARD) || !t.proxy_port_guarded(port) || is_proxy(p, uid, gid)
}

/// Raw IP sockets (`socket(AF_INET[6], SOCK_RAW, …)`, with CAP_NET_RAW, which container runtimes
/// grant by default): their hand-made packets pass no connect hook, while Istio's nat OUTPUT
/// chain rewrites them like any packet (TCP to the proxy, DNS to 15053). A socket hook cannot
/// redirect a packet, so in a meshed pod the eBPF path refuses the socket itself to everyone but
/// the proxy. Every raw socket can carry TCP (`IPPROTO_RAW`, or `IP_HDRINCL` on an ICMP one), so
/// the protocol does not matter. IPv6 ones only where the pod's IPv6 rules are on: otherwise
/// istio-iptables installs no ip6tables rules and lets them through. Ping keeps working through
/// unprivileged ICMP sockets (`SOCK_DGRAM`), which send nothing but ICMP echo.
#[inline(always)]
pub fn raw_socket_allowed(p: &PodPolicy, v6: bool, uid: u32, gid: u32) -> bool {
    (v6 && !p.has(flags::IPV6)) || is_proxy(p, uid, gid)
}

/// Whether an established TCP connection of this pod is accelerated (`--accelerate`): both of
/// its sockets go into the sk_msg SockHash and hand their data straight to each other.
#[inline(always)]
pub fn accelerated(p: &PodPolicy, local: Addr, remote: Addr) -> bool {
    // A loopback end (or both ends on one address) means both sockets live in this netns:
    // the app↔proxy hops (app → 127.0.0.1:15001, proxy 127.0.0.6 → pod IP), never the
    // proxy's upstream leg over the veth.
    p.has(flags::ACCELERATE) && (local.is_loopback() || remote.is_loopback() || local == remote)
}

/// Whether a process with these ids is the pod's proxy (Istio's owner match: a uid or a gid).
#[inline(always)]
pub fn is_proxy(p: &PodPolicy, uid: u32, gid: u32) -> bool {
    let mut i = 0;
    while i < MAX_IDS && i < p.n_uids as usize {
        if p.uids[i] == uid {
            return true;
        }
        i += 1;
    }
    let mut i = 0;
    while i < MAX_IDS && i < p.n_gids as usize {
        if p.gids[i] == gid {
            return true;
        }
        i += 1;
    }
    false
}

#[cfg(test)]
mod reason_tests {
    use super::Reason;

    #[test]
    fn all_is_indexed_by_value() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }

    /// Ids are unique snake_case words (tools key on them).
    #[test]
    fn ids_are_unique_snake_case() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            let id = r.id();
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{id}"
            );
            assert!(Reason::ALL[..i].iter().all(|o| o.id() != id), "{id}");
        }
    }
}
