//! Prometheus metrics on a loopback address: per pod and direction, connections redirected and
//! passed by reason, SO_ORIGINAL_DST answered/missed, DNS captured, bind-guard denials (summed
//! from the programs' per-CPU counters at scrape time), and map occupancy against capacity;
//! served over HTTP (hyper) with `/healthz` beside it for the kubelet's probes.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use interceptor_common::decision::Reason;
use interceptor_common::maps::stat;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;

use super::Daemon;
use crate::model::BackendKind;

type Labels = Vec<(String, String)>;

const REDIRECTED: &str = "interceptor_connections_redirected";
const REDIRECTED_HELP: &str = "Connections sent to the proxy";

/// One scrape's worth of values.
#[derive(Debug, Default)]
struct Snapshot {
    /// (metric, help, labels, value)
    counters: Vec<(&'static str, &'static str, Labels, u64)>,
    gauges: Vec<(&'static str, &'static str, Labels, i64)>,
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut names: Vec<(&str, &str, bool)> = Vec::new();
        for (n, h, _, _) in &self.counters {
            if !names.iter().any(|(x, _, _)| x == n) {
                names.push((n, h, true));
            }
        }
        for (n, h, _, _) in &self.gauges {
            if !names.iter().any(|(x, _, _)| x == n) {
                names.push((n, h, false));
            }
        }
        for (name, help, counter) in names {
            let ty = if counter {
                MetricType::Counter
            } else {
                MetricType::Gauge
            };
            let mut m = encoder.encode_descriptor(name, help, None, ty)?;
            if counter {
                for (_, _, labels, v) in self.counters.iter().filter(|c| c.0 == name) {
                    ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
                }
            } else {
                for (_, _, labels, v) in self.gauges.iter().filter(|c| c.0 == name) {
                    ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
                }
            }
        }
        Ok(())
    }
}

fn snapshot(d: &Daemon) -> Snapshot {
    let mut s = Snapshot::default();
    let (pods, unreadable) = d.inventory();
    s.gauges.push((
        "interceptor_unreadable_records",
        "Pod records the daemon cannot read: their pods keep their interception and nothing unrecorded is purged (see `pod list`)",
        vec![],
        unreadable.len() as i64,
    ));
    s.gauges.push((
        "interceptor_failed_removals",
        "Pods whose removal failed, kept and retried on the next remove or restart (see `pod list`)",
        vec![],
        pods.iter().filter(|p| p.removal_error.is_some()).count() as i64,
    ));
    for (action, result, n) in d.repair.counts() {
        s.counters.push((
            "interceptor_repair",
            "Pods of this node that escaped setup, acted on by the repair policy (--repair): the action and its result (ok, failed, refused)",
            vec![
                ("action".to_string(), action.to_string()),
                ("result".to_string(), result.to_string()),
            ],
            n,
        ));
    }
    if let Some((how, layout)) = &d.programs {
        let (version, identity) = layout.as_ref().map_or((String::new(), String::new()), |l| {
            (
                l.version.to_string(),
                l.identity.clone().unwrap_or_default(),
            )
        });
        s.gauges.push((
            "interceptor_programs_info",
            "The eBPF programs: what this daemon's start did with them (loaded, kept, upgraded in place), the pins' layout version and program identity",
            vec![
                ("start".to_string(), how.to_string()),
                ("layout".to_string(), version),
                ("identity".to_string(), identity),
            ],
            1,
        ));
    }
    program_stats(d, &mut s);
    let pod_label = |p: &super::PodStatus| {
        p.identity.as_ref().map_or_else(
            || p.netns.display().to_string(),
            |i| format!("{}/{}", i.namespace, i.name),
        )
    };
    for backend in [
        BackendKind::Ebpf,
        BackendKind::Iptables,
        BackendKind::Nftables,
    ] {
        s.gauges.push((
            "interceptor_pods",
            "Registered pods, by the backend serving them",
            vec![("backend".to_string(), backend.as_str().to_string())],
            pods.iter().filter(|p| p.backend == backend).count() as i64,
        ));
    }
    // Fallback pods: the redirect counts from their nat rules' own counters.
    for p in pods.iter().filter(|p| p.backend == BackendKind::Iptables) {
        match crate::backend::netfilter::redirect_counters(&p.netns) {
            Ok((out, inb)) => {
                for (dir, v) in [("outbound", out), ("inbound", inb)] {
                    s.counters.push((
                        REDIRECTED,
                        REDIRECTED_HELP,
                        vec![
                            ("pod".to_string(), pod_label(p)),
                            ("direction".to_string(), dir.to_string()),
                        ],
                        v,
                    ));
                }
            }
            Err(e) => tracing::warn!(netns = %p.netns.display(), "reading rule counters: {e:#}"),
        }
    }
    let maps = d.maps.lock().unwrap_or_else(|e| e.into_inner());
    let Some(maps) = maps.as_ref() else { return s };
    for p in pods.iter().filter(|p| p.pod_id != 0) {
        let pod = pod_label(p);
        let c = maps.counters(p.pod_id);
        let l = |dir: &str, extra: &[(&str, &str)]| {
            let mut v = vec![
                ("pod".to_string(), pod.clone()),
                ("direction".to_string(), dir.to_string()),
            ];
            v.extend(extra.iter().map(|(k, x)| (k.to_string(), x.to_string())));
            v
        };
        let (red, red_h) = (REDIRECTED, REDIRECTED_HELP);
        s.counters.push((
            red,
            red_h,
            l("outbound", &[]),
            c[stat::OUT_REDIRECTED as usize],
        ));
        s.counters
            .push((red, red_h, l("inbound", &[]), c[stat::IN_CAPTURED as usize]));
        s.counters.push((
            "interceptor_dns_captured",
            "DNS connections/datagrams sent to the DNS proxy",
            l("outbound", &[]),
            c[stat::OUT_DNS as usize],
        ));
        s.counters.push((
            "interceptor_inbound_refused",
            "Inbound connections reset because the proxy was not listening",
            l("inbound", &[]),
            c[stat::IN_REFUSED as usize],
        ));
        let od = "interceptor_original_dst";
        let od_h = "SO_ORIGINAL_DST requests in the pod, by result";
        s.counters.push((
            od,
            od_h,
            l("inbound", &[("result", "answered")]),
            c[stat::ORIG_DST_ANSWERED as usize],
        ));
        s.counters.push((
            od,
            od_h,
            l("inbound", &[("result", "missed")]),
            c[stat::ORIG_DST_MISSED as usize],
        ));
        s.counters.push((
            "interceptor_redirect_failed",
            "Redirects refused (connect/sendmsg failed with EPERM) because the original destination could not be stored",
            l("outbound", &[]),
            c[stat::OUT_STORE_FAILED as usize],
        ));
        s.counters.push((
            "interceptor_redirect_quota_refused",
            "Redirects refused (connect failed with EPERM) because the pod had its quota of connections waiting for the proxy",
            l("outbound", &[]),
            c[stat::OUT_QUOTA_REFUSED as usize],
        ));
        s.counters.push((
            "interceptor_tuple_store_failed",
            "Redirected connections whose original destination could not be handed to the proxy (it gets no SO_ORIGINAL_DST and closes them)",
            l("outbound", &[]),
            c[stat::TUPLE_STORE_FAILED as usize],
        ));
        s.counters.push((
            "interceptor_source_not_bound",
            "Redirected connections that could not be bound to the pod's address (the proxy sees them from loopback)",
            l("outbound", &[]),
            c[stat::SRC_NOT_BOUND as usize],
        ));
        s.gauges.push((
            "interceptor_tuple_entries",
            "Redirected connections of the pod waiting for the proxy to accept them (against interceptor_tuple_quota)",
            vec![("pod".to_string(), pod.clone())],
            maps.tuple_entries(p.pod_id) as i64,
        ));
        s.counters.push((
            "interceptor_bind_denied",
            "bind() of a proxy port by a non-proxy process, refused",
            l("outbound", &[]),
            c[stat::BIND_DENIED as usize],
        ));
        s.counters.push((
            "interceptor_raw_sockets_denied",
            "Raw IP sockets refused to a non-proxy process (their packets would pass no socket hook)",
            l("outbound", &[]),
            c[stat::RAW_DENIED as usize],
        ));
        for (base, dir) in [(stat::OUT_PASS, "outbound"), (stat::IN_PASS, "inbound")] {
            for r in Reason::ALL {
                let v = c.get((base + r as u32) as usize).copied().unwrap_or(0);
                if v > 0 {
                    let reason = r.id();
                    s.counters.push((
                        "interceptor_connections_passed",
                        "Connections left alone, by the rule that decided",
                        l(dir, &[("reason", reason)]),
                        v,
                    ));
                }
            }
        }
    }
    s.gauges.push((
        "interceptor_tuple_quota",
        "Redirected connections one pod may have waiting for the proxy; past it connect() fails with EPERM",
        vec![],
        i64::from(crate::fault::tuple_quota()),
    ));
    for (name, used, cap) in maps.occupancy() {
        let l = vec![("map".to_string(), name.to_string())];
        s.gauges.push((
            "interceptor_map_entries",
            "Entries in use",
            l.clone(),
            used as i64,
        ));
        s.gauges.push((
            "interceptor_map_capacity",
            "Map capacity (max_entries)",
            l,
            i64::from(cap),
        ));
    }
    s
}

/// Each program's runs and run time, while the kernel counts them (`--program-stats`, or the
/// kernel.bpf_stats_enabled sysctl): what interception costs this node, per program.
fn program_stats(d: &Daemon, s: &mut Snapshot) {
    use crate::backend::ebpf::stats;
    let Some(pins) = &d.pins else { return };
    if d.stats.is_none() && !stats::stats_enabled() {
        return;
    }
    for (name, (runs, ns)) in stats::snapshot(pins) {
        let labels = vec![("program".to_string(), name)];
        s.counters.push((
            "interceptor_program_runs",
            "Runs of each of our BPF programs while run-time statistics are on (--program-stats)",
            labels.clone(),
            runs,
        ));
        s.counters.push((
            "interceptor_program_run_nanoseconds",
            "Time spent in each of our BPF programs while run-time statistics are on (--program-stats)",
            labels,
            ns,
        ));
    }
}

/// The exposition text of one scrape.
pub fn render(d: &Daemon) -> Result<String> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot(d)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// What one client of the endpoint can hold. Prometheus and the kubelet send their few header
/// lines at once and read the answer at once: anything slower is a stuck or hostile client.
mod limits {
    use std::time::Duration;
    /// The request line and headers must have arrived by then (from the connection's start).
    pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
    /// The whole connection, rendering and writing the answer included.
    pub const CONN_TIMEOUT: Duration = Duration::from_secs(30);
    /// Read buffer, so the most header bytes a request may have (hyper's smallest allowed).
    pub const HEADER_BYTES: usize = 8192;
    /// Connections served at once; past it the listener waits (the kernel's backlog holds them).
    pub const CONNS: usize = 256;
    /// Scrapes rendered at once (a render reads every pod's counters, on a blocking thread);
    /// the others wait without a thread, and a client gone meanwhile costs no render.
    pub const RENDERS: usize = 2;
}

/// Serves `GET /metrics` (Prometheus text) and `GET /healthz` (the probes': it answers from
/// the runtime alone, without the pod lock or a render) on `addr`; keep it on loopback, the
/// numbers describe every pod. Connections are served concurrently by a tokio runtime on a
/// thread of its own, so neither a client that sends nothing nor a scrape that waits for the pod
/// lock holds up another one; renders run on the runtime's blocking threads.
pub fn serve(d: Arc<Daemon>, addr: SocketAddr) -> Result<()> {
    let l =
        TcpListener::bind(addr).with_context(|| format!("binding the metrics address {addr}"))?;
    l.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(limits::RENDERS)
        .thread_name("metrics-render")
        .build()
        .context("starting the metrics runtime")?;
    let l = {
        let _in = rt.enter();
        tokio::net::TcpListener::from_std(l)?
    };
    tracing::info!(%addr, "metrics");
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || rt.block_on(accept_loop(Arc::new(Shared::new(d)), l)))
        .context("starting the metrics thread")?;
    Ok(())
}

/// What the connections' tasks share.
struct Shared {
    daemon: Arc<Daemon>,
    renders: Semaphore,
}

impl Shared {
    fn new(daemon: Arc<Daemon>) -> Self {
        Self {
            daemon,
            renders: Semaphore::new(limits::RENDERS),
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, l: tokio::net::TcpListener) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits::HEADER_TIMEOUT)
        .max_buf_size(limits::HEADER_BYTES)
        // One request per connection, as before: no idle keep-alive connections held open.
        .keep_alive(false);
    let slots = Arc::new(Semaphore::new(limits::CONNS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let conn = match l.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                // Out of fds, most likely: wait for some to be closed rather than spin.
                tracing::warn!(error = %e, "accepting a metrics connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let served = http.serve_connection(
            TokioIo::new(conn),
            service_fn(move |req| respond(shared.clone(), req)),
        );
        tokio::spawn(async move {
            // Past the deadline the connection is dropped, and so closed.
            match tokio::time::timeout(limits::CONN_TIMEOUT, served).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection"),
                Err(_) => tracing::debug!("metrics connection past its deadline: closed"),
            }
            drop(slot);
        });
    }
}

type Reply = hyper::Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Reply {
    let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn respond(
    shared: Arc<Shared>,
    req: hyper::Request<Incoming>,
) -> Result<Reply, std::convert::Infallible> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET and HEAD\n".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    // Nothing here takes a body: refuse one instead of reading it.
    if !req.body().is_end_stream() {
        return Ok(reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            TEXT,
            "no request body expected\n".into(),
        ));
    }
    Ok(match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
        "/metrics" => match render_async(shared).await {
            Ok(Ok(body)) => reply(StatusCode::OK, "text/plain; version=0.0.4", body),
            Ok(Err(e)) => reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e:#}\n")),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                format!("rendering the metrics: {e}\n"),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "try /metrics or /healthz\n".into(),
        ),
    })
}

/// One render on a blocking thread (it may wait for the pod lock), one of `RENDERS` at a time.
async fn render_async(shared: Arc<Shared>) -> Result<Result<String>, tokio::task::JoinError> {
    // Held to the end (the semaphore is never closed, so this is the permit).
    let _turn = shared.renders.acquire().await;
    let d = shared.daemon.clone();
    tokio::task::spawn_blocking(move || render(&d)).await
}
