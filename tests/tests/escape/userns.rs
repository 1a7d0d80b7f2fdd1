//! Escape scenarios: pods with their own user namespace (Kubernetes `hostUsers: false`). The
//! pod netns is owned by a user namespace mapping ids 0..65536 to host 100000.., the proxy runs
//! as in-namespace uid/gid 1337 (host 101337) and the app as 1000 (host 101000); see
//! `interceptor_tests::userns` for why host ids are how the kernel sees such processes.
//! Interception is installed before the proxy starts, as the CNI plugin does, so the proxy's
//! own binds of 15001/15006 go through the bind guard.
//!
//! Each scenario runs on iptables-nft (Istio's rules, written from inside the pod's user
//! namespace as istio-init would) and on eBPF, and both must behave as in an ordinary pod.

use std::net::{IpAddr, SocketAddr};

use anyhow::{ensure, Context, Result};
use interceptor_tests::cases::{apply_in, Flavor, APP_PORT, UPSTREAM_PORT};
use interceptor_tests::dns::{DnsProxy, ANSWER};
use interceptor_tests::ebpf::EbpfInstall;
use interceptor_tests::sidecar::{Sidecar, SidecarConfig, TagServer};
use interceptor_tests::topology::{connect_as, enter_netns, set_thread_creds, Topology};
use interceptor_tests::topology::{inbound_connect, DEFAULT_TIMEOUT};
use interceptor_tests::userns::host;

use super::common::BACKENDS;

/// In-namespace ids of the proxy and the app.
const PROXY: u32 = 1337;
const APP: u32 = 1000;

/// Istio's injected sidecar flags (outbound and inbound capture, v4 and v6).
const ISTIO_FLAGS: &[&str] = &[
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
    "--ipv6",
    "true",
];

/// A user-namespaced pod, interception installed by one backend, then the proxy, the app and
/// an upstream started. Dropped servers first, then the eBPF installation, then the netns.
struct UsernsPod {
    sidecar: Sidecar,
    _app: TagServer,
    _upstream: TagServer,
    _ebpf: EbpfInstall,
    topo: Topology,
}

impl UsernsPod {
    fn new(tag: &str, flavor: Flavor, extra: &[&str]) -> Result<Self> {
        let topo = Topology::with_userns_pod(tag)?;
        let ebpf = EbpfInstall::new(tag);
        let mut flags = ISTIO_FLAGS.to_vec();
        flags.extend_from_slice(extra);
        apply_in(topo.pod_netns(), ebpf.dir(), flavor, &flags)
            .with_context(|| format!("{flavor:?}: installing interception"))?;
        let sidecar = Sidecar::with_config(
            topo.pod_netns(),
            SidecarConfig {
                creds: Some((host(PROXY), host(PROXY))),
                ..SidecarConfig::default()
            },
        )
        .with_context(|| format!("{flavor:?}: the proxy (in-namespace uid {PROXY}) starting"))?;
        let app = TagServer::spawn(
            topo.pod_netns(),
            "app",
            &[APP_PORT],
            Some((host(APP), host(APP))),
        )?;
        let upstream = TagServer::upstream(&topo, UPSTREAM_PORT)?;
        Ok(Self {
            sidecar,
            _app: app,
            _upstream: upstream,
            _ebpf: ebpf,
            topo,
        })
    }

    fn upstreams(&self) -> [SocketAddr; 2] {
        [
            SocketAddr::new(self.topo.upstream_v4().into(), UPSTREAM_PORT),
            SocketAddr::new(self.topo.upstream_v6().into(), UPSTREAM_PORT),
        ]
    }

    /// Who answers an outbound connection from in-namespace uid/gid `id`, and the original
    /// destination the sidecar read, if it answered.
    fn outbound(&self, id: u32, dst: SocketAddr) -> Result<(String, Option<SocketAddr>)> {
        self.sidecar.take_records();
        let out = connect_as(
            self.topo.pod_netns(),
            host(id),
            host(id),
            dst,
            None,
            DEFAULT_TIMEOUT,
        )
        .with_context(|| format!("connect to {dst} as in-namespace {id}"))?;
        let rec = self.sidecar.take_records();
        Ok((out.reply, rec.first().and_then(|r| r.original_dst)))
    }
}

/// Runs `check` on a fresh pod per backend; every backend must pass (messages name it).
fn on_both(tag: &str, extra: &[&str], check: impl Fn(&UsernsPod, Flavor) -> Result<()>) {
    let mut failures = Vec::new();
    for flavor in BACKENDS {
        let r = UsernsPod::new(tag, flavor, extra).and_then(|pod| check(&pod, flavor));
        if let Err(e) = r {
            failures.push(format!("{flavor:?}: {e:#}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn userns_outbound_is_captured() {
    on_both("usout", &[], |pod, flavor| {
        for up in pod.upstreams() {
            let (who, orig) = pod.outbound(APP, up)?;
            ensure!(who == "sidecar:15001", "app → {up} answered by {who}");
            ensure!(
                orig == Some(up),
                "{flavor:?}: SO_ORIGINAL_DST {orig:?}, want {up}"
            );
        }
        Ok(())
    });
}

#[test]
fn userns_proxy_upstream_is_not_redirected() {
    on_both("usprx", &[], |pod, _| {
        for up in pod.upstreams() {
            let (who, _) = pod.outbound(PROXY, up)?;
            ensure!(
                who == format!("upstream:{UPSTREAM_PORT}"),
                "proxy → {up} answered by {who} (redirected to itself)"
            );
        }
        Ok(())
    });
}

#[test]
fn userns_inbound_is_captured() {
    on_both("usin", &[], |pod, _| {
        let t = &pod.topo;
        for ip in [IpAddr::from(t.pod_v4()), t.pod_v6().into()] {
            let dst = SocketAddr::new(ip, APP_PORT);
            pod.sidecar.take_records();
            let out = inbound_connect(t, dst, None).with_context(|| format!("inbound to {dst}"))?;
            ensure!(
                out.reply == "sidecar:15006",
                "inbound {dst} answered by {}",
                out.reply
            );
            let rec = pod.sidecar.take_records();
            ensure!(
                rec.first().and_then(|r| r.original_dst) == Some(dst),
                "inbound {dst}: original dst {:?}",
                rec.first().map(|r| r.original_dst)
            );
        }
        Ok(())
    });
}

/// `dig` in the pod netns as in-namespace uid/gid `id`: Some(answer) or None.
fn dig(topo: &Topology, id: u32, server: IpAddr, tcp: bool) -> Option<String> {
    let (uid, gid) = (
        format!("--reuid={}", host(id)),
        format!("--regid={}", host(id)),
    );
    let server = format!("@{server}");
    let mut args = vec![
        "netns",
        "exec",
        topo.pod_ns_name(),
        "setpriv",
        &uid,
        &gid,
        "--clear-groups",
        "dig",
        &server,
        "svc.test",
        "A",
        "+short",
        "+time=1",
        "+tries=1",
    ];
    if tcp {
        args.push("+tcp");
    }
    let out = std::process::Command::new("ip").args(&args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && text == ANSWER.to_string()).then_some(text)
}

#[test]
fn userns_dns_is_captured() {
    // --dns-servers names the upstream address, where nothing answers DNS: an answer can only
    // come from the DNS proxy (in-namespace 1337 on 15053).
    let mut failures = Vec::new();
    for flavor in BACKENDS {
        let r = (|| -> Result<()> {
            let topo = Topology::with_userns_pod("usdns")?;
            let ebpf = EbpfInstall::new("usdns");
            let (s4, s6): (IpAddr, IpAddr) = (topo.upstream_v4().into(), topo.upstream_v6().into());
            let list = format!("{s4},{s6}");
            let mut flags = ISTIO_FLAGS.to_vec();
            flags.extend_from_slice(&["--redirect-dns", "--dns-servers", &list]);
            apply_in(topo.pod_netns(), ebpf.dir(), flavor, &flags)?;
            let _proxy = DnsProxy::start(topo.pod_netns(), 15053, host(PROXY), host(PROXY))
                .context("the DNS proxy (in-namespace 1337) starting")?;
            for server in [s4, s6] {
                for tcp in [false, true] {
                    ensure!(
                        dig(&topo, APP, server, tcp).is_some(),
                        "app's query to {server} (tcp={tcp}) got no answer: not captured"
                    );
                }
                // The proxy's own queries go out (nothing answers there).
                ensure!(
                    dig(&topo, PROXY, server, false).is_none(),
                    "the proxy's own query to {server} was answered: captured"
                );
            }
            drop(ebpf);
            Ok(())
        })();
        if let Err(e) = r {
            failures.push(format!("{flavor:?}: {e:#}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Binds TCP `port` (v4 wildcard) in the netns as host uid/gid `id`; the errno on failure.
fn bind_as(topo: &Topology, id: u32, port: u16) -> Result<(), i32> {
    let netns = topo.pod_netns().to_path_buf();
    std::thread::spawn(move || {
        enter_netns(&netns).map_err(|_| -1)?;
        set_thread_creds(host(id), host(id)).map_err(|_| -1)?;
        std::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))
            .map(drop)
            .map_err(|e| e.raw_os_error().unwrap_or(-1))
    })
    .join()
    .unwrap_or(Err(-1))
}

#[test]
fn userns_bind_guard_lets_the_proxy_in_and_keeps_the_app_out() {
    on_both("usbind", &[], |pod, flavor| {
        // The proxy already bound 15001/15006 (UsernsPod::new); it may bind its other ports.
        for port in [15008, 15053, 15090, 15021, 15020] {
            ensure!(
                bind_as(&pod.topo, PROXY, port).is_ok(),
                "the proxy (in-namespace {PROXY}) may not bind its port {port}"
            );
        }
        if flavor == Flavor::Ebpf {
            // Istio's rules have no bind guard; on eBPF the app must not take a proxy port.
            for port in [15008, 15090] {
                let r = bind_as(&pod.topo, APP, port);
                ensure!(
                    matches!(r, Err(e) if e == libc::EPERM || e == libc::EACCES),
                    "the app bound proxy port {port}: {r:?}"
                );
            }
            ensure!(
                bind_as(&pod.topo, APP, 8081).is_ok(),
                "the app may not bind 8081"
            );
        }
        Ok(())
    });
}

#[test]
fn userns_unmapped_proxy_uid_is_refused() {
    // uid 70000 is outside the pod's map: no process of the pod can have it. Both backends
    // must refuse (and leave the pod unintercepted by them) rather than guess a host id.
    for flavor in BACKENDS {
        let topo = Topology::with_userns_pod("usunm").unwrap();
        let ebpf = EbpfInstall::new("usunm");
        let r = apply_in(
            topo.pod_netns(),
            ebpf.dir(),
            flavor,
            &["-i", "*", "-u", "70000"],
        );
        let err = format!("{:#}", r.expect_err("an unmapped proxy uid was accepted"));
        if flavor == Flavor::Ebpf {
            assert!(err.contains("proxy uid 70000"), "{flavor:?}: {err}");
        }
    }
}

/// Registered through the daemon (the CNI plugin's path) on each backend: the app is captured,
/// the proxy's own connection is not, and `pod show` (text and JSON) and `explain` name the
/// mapping (`proxy uid: 1337 (host 101337)`); an ordinary pod shows none.
#[test]
fn userns_through_the_daemon_shows_the_mapping() {
    let d = interceptor_tests::daemon::DaemonProc::start("usd").unwrap();
    for flavor in BACKENDS {
        let backend = if flavor == Flavor::Ebpf {
            "ebpf"
        } else {
            "iptables"
        };
        let topo = Topology::with_userns_pod("usd").unwrap();
        let ns = topo.pod_netns().to_str().unwrap().to_string();
        let mut add = vec!["add", "--network-namespace", &ns, "--backend", backend];
        add.extend_from_slice(ISTIO_FLAGS);
        d.pod_ok(&add);
        let sidecar = Sidecar::with_config(
            topo.pod_netns(),
            SidecarConfig {
                creds: Some((host(PROXY), host(PROXY))),
                ..SidecarConfig::default()
            },
        )
        .unwrap_or_else(|e| panic!("{flavor:?}: the proxy could not start: {e:#}"));
        let _up = TagServer::upstream(&topo, UPSTREAM_PORT).unwrap();
        let up = SocketAddr::new(topo.upstream_v4().into(), UPSTREAM_PORT);
        for (id, want) in [
            (APP, "sidecar:15001".to_string()),
            (PROXY, format!("upstream:{UPSTREAM_PORT}")),
        ] {
            let out = connect_as(
                topo.pod_netns(),
                host(id),
                host(id),
                up,
                None,
                DEFAULT_TIMEOUT,
            )
            .unwrap_or_else(|e| panic!("{flavor:?}: connect as {id}: {e:#}"));
            assert_eq!(out.reply, want, "{flavor:?}: in-namespace {id} → {up}");
        }
        drop(sidecar);
        let text = d.pod_ok(&["show", "--network-namespace", &ns, "-o", "text"]);
        assert!(
            text.contains("proxy uid: 1337 (host 101337)")
                && text.contains("uid_map 0 100000 65536"),
            "{flavor:?}: pod show -o text:\n{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&d.pod_ok(&["show", "-o", "json", "--network-namespace", &ns]))
                .unwrap();
        assert_eq!(json["userns"]["proxy_gid"], "1337 (host 101337)", "{json}");
        assert_eq!(json["userns"]["uid_map"][0]["outside"], 100000, "{json}");
        let out = interceptor_tests::bin::run(
            &[
                "explain",
                "--network-namespace",
                &ns,
                "--uid",
                "1337",
                "--dst",
                "10.0.0.1:80",
                "-u",
                "1337",
                "-i",
                "*",
            ],
            &[],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && text.contains("verdict: pass")
                && text.contains("proxy uid 1337 (host 101337)"),
            "explain: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        d.pod_ok(&["remove", "--network-namespace", &ns]);
    }
    // An ordinary pod: the node's user namespace, no translation shown.
    let topo = Topology::new("usdo").unwrap();
    let ns = topo.pod_netns().to_str().unwrap().to_string();
    d.pod_ok(&["add", "--network-namespace", &ns, "-i", "*"]);
    let text = d.pod_ok(&["show", "--network-namespace", &ns, "-o", "text"]);
    assert!(text.contains("user namespace: the node's"), "{text}");
    assert!(!d
        .pod_ok(&["show", "-o", "json", "--network-namespace", &ns])
        .contains("userns"));
    d.pod_ok(&["remove", "--network-namespace", &ns]);
}

/// The nftables fallback too writes its rules from inside the pod's user namespace (nft's
/// `meta skuid` compares in-namespace ids): app captured, proxy not, inbound captured.
#[test]
fn userns_nftables_fallback_matches() {
    let pod = UsernsPod::new("usnft", Flavor::Nftables, &[]).unwrap();
    for up in pod.upstreams() {
        let (who, orig) = pod.outbound(APP, up).unwrap();
        assert_eq!(
            (who.as_str(), orig),
            ("sidecar:15001", Some(up)),
            "app → {up}"
        );
        let (who, _) = pod.outbound(PROXY, up).unwrap();
        assert_eq!(who, format!("upstream:{UPSTREAM_PORT}"), "proxy → {up}");
    }
    let dst = SocketAddr::new(pod.topo.pod_v4().into(), APP_PORT);
    let out = inbound_connect(&pod.topo, dst, None).unwrap();
    assert_eq!(out.reply, "sidecar:15006", "inbound {dst}");
}
