//! Prometheus metrics on a loopback address: per pod and direction, connections redirected and
//! passed by reason, SO_ORIGINAL_DST answered/missed, DNS captured, bind-guard denials (summed
//! from the programs' per-CPU counters at scrape time), and map occupancy against capacity.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use anyhow::{Context, Result};
use interceptor_common::decision::Reason;
use interceptor_common::maps::stat;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

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
    let pods = d.list();
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
            vec![("backend".to_string(), format!("{backend:?}").to_lowercase())],
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
        for (base, dir) in [(stat::OUT_PASS, "outbound"), (stat::IN_PASS, "inbound")] {
            for r in Reason::ALL {
                let v = c.get((base + r as u32) as usize).copied().unwrap_or(0);
                if v > 0 {
                    let reason = format!("{r:?}");
                    s.counters.push((
                        "interceptor_connections_passed",
                        "Connections left alone, by the rule that decided",
                        l(dir, &[("reason", &reason)]),
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

/// The exposition text of one scrape.
pub fn render(d: &Daemon) -> Result<String> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot(d)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// Serves `GET /metrics` on `addr` (keep it on loopback: the numbers describe every pod).
pub fn serve(d: Arc<Daemon>, addr: SocketAddr) -> Result<()> {
    let l =
        TcpListener::bind(addr).with_context(|| format!("binding the metrics address {addr}"))?;
    tracing::info!(%addr, "metrics");
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut line = String::new();
            let _ = BufReader::new(&conn).read_line(&mut line);
            let (status, body) = if line.starts_with("GET /metrics") {
                match render(&d) {
                    Ok(b) => ("200 OK", b),
                    Err(e) => ("500 Internal Server Error", format!("{e:#}\n")),
                }
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(())
}
