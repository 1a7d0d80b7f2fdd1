//! The bench's results: samples, ratios to explicit addressing, the Markdown/JSON report and
//! the issue targets.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use serde_json::json;

use super::{plot, Settings, KINDS};
/// Every sample, keyed by (section, metric, path): one value per round.
#[derive(Default)]
pub(super) struct Results {
    pub(super) samples: BTreeMap<(String, String, String), Vec<f64>>,
    pub(super) units: BTreeMap<String, &'static str>,
    pub(super) extra: serde_json::Map<String, serde_json::Value>,
}

impl Results {
    pub(super) fn push(
        &mut self,
        section: &str,
        metric: &str,
        unit: &'static str,
        path: &str,
        v: f64,
    ) {
        self.units.insert(metric.to_string(), unit);
        self.samples
            .entry((section.into(), metric.into(), path.into()))
            .or_default()
            .push(v);
    }

    pub(super) fn get(&self, section: &str, metric: &str, path: &str) -> Option<&Vec<f64>> {
        self.samples
            .get(&(section.to_string(), metric.to_string(), path.to_string()))
    }

    pub(super) fn median(&self, section: &str, metric: &str, path: &str) -> Option<f64> {
        self.get(section, metric, path).map(|v| median(v))
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn spread(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)))
}

fn machine() -> serde_json::Value {
    let uname = std::process::Command::new("uname")
        .arg("-sr")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    json!({
        "kernel": uname,
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "load average at end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    })
}

/// The sections of the cost part (`cost.rs`).
pub(super) const PURE: &str = "pure interception";
pub(super) const PROGRAMS: &str = "programs, pure interception";
pub(super) const PROGRAMS_UNMESHED: &str = "programs, un-meshed pod";
/// The row of a program section with every program together.
pub(super) const TOTAL: &str = "all programs";

const SECTIONS: &[&str] = &[
    "outbound",
    "outbound unpinned",
    "inbound",
    "hop",
    "scaling excluded CIDRs",
    "scaling excluded ports",
    "scaling pods",
    "setup",
    PURE,
    PROGRAMS,
    PROGRAMS_UNMESHED,
    "programs, eBPF with the sidecar",
    "programs, eBPF+sk_msg with the sidecar",
];

const METRICS: &[&str] = &[
    "connections/s",
    "CPU per connection",
    "RR p50 c=1",
    "RR p99 c=1",
    "CPU per RR",
    "RR p50 c=32",
    "RR p99 c=32",
    "RR/s c=32",
    "bulk",
    "hop RR p50 c=1",
    "hop bulk",
    "runs per connection",
    "ns per run",
    "ns per connection",
];

/// Ratio of a path's median to explicit addressing's, in the same section.
fn ratio(r: &Results, section: &str, metric: &str, path: &str) -> Option<f64> {
    Some(r.median(section, metric, path)? / r.median(section, metric, "explicit")?)
}

/// Median of the per-sample ratios of a path to explicit addressing, sample i against sample
/// i: the samples were taken seconds apart (`measure_connects`), so slow drift of the machine
/// (another tenant, frequency) cancels, which a ratio of medians taken minutes apart does not.
fn paired_ratio(r: &Results, section: &str, metric: &str, path: &str) -> Option<f64> {
    let (p, e) = (
        r.get(section, metric, path)?,
        r.get(section, metric, "explicit")?,
    );
    (p.len() == e.len() && !p.is_empty())
        .then(|| median(&p.iter().zip(e).map(|(a, b)| a / b).collect::<Vec<_>>()))
}

pub(super) fn report(r: &Results, s: &Settings, out: &Path) -> Result<()> {
    let mut md = String::new();
    let m = machine();
    md.push_str(&format!(
        "Machine: {} · {} CPUs · {}. {} rounds × {} s per measurement, paths interleaved.\n\n",
        m["kernel"].as_str().unwrap_or(""),
        m["cpus"],
        m["cpu"].as_str().unwrap_or(""),
        s.rounds,
        s.secs
    ));
    let sections: Vec<String> = {
        let mut v: Vec<String> = r.samples.keys().map(|k| k.0.clone()).collect();
        v.dedup();
        v.sort_by_key(|s| SECTIONS.iter().position(|x| x == s).unwrap_or(99));
        v
    };
    let mut charts = Vec::new();
    for section in &sections {
        let metrics: Vec<String> = {
            let mut v: Vec<String> = r
                .samples
                .keys()
                .filter(|k| &k.0 == section)
                .map(|k| k.1.clone())
                .collect();
            v.dedup();
            // Scaling points numerically, the rest in the table's reading order.
            v.sort_by_key(|m| {
                m.parse::<usize>()
                    .unwrap_or_else(|_| METRICS.iter().position(|x| x == m).unwrap_or(99))
            });
            v
        };
        let paths: Vec<String> = {
            let mut v: Vec<String> = Vec::new();
            for k in r.samples.keys().filter(|k| &k.0 == section) {
                if !v.contains(&k.2) {
                    v.push(k.2.clone());
                }
            }
            // The table's path order: as measured.
            let order = |p: &String| KINDS.iter().position(|k| k.name() == p).unwrap_or(99);
            v.sort_by_key(order);
            v
        };
        md.push_str(&format!(
            "### {section}\n\nmedian (× explicit: median of the per-round ratios, same run) [min–max]\n\n| path |"
        ));
        for m in &metrics {
            md.push_str(&format!(" {m} ({}) |", r.units[m]));
        }
        md.push_str("\n|---|");
        md.push_str(&"---|".repeat(metrics.len()));
        md.push('\n');
        for p in &paths {
            md.push_str(&format!("| {p} |"));
            for m in &metrics {
                match r.get(section, m, p) {
                    Some(v) => {
                        let (lo, hi) = spread(v);
                        let rat = paired_ratio(r, section, m, p)
                            .or_else(|| ratio(r, section, m, p))
                            .map(|x| format!(" (×{x:.2})"))
                            .unwrap_or_default();
                        md.push_str(&format!(" {:.1}{rat} [{lo:.1}–{hi:.1}] |", median(v)));
                    }
                    None => md.push_str(" – |"),
                }
            }
            md.push('\n');
        }
        md.push('\n');
        if section.starts_with("scaling") {
            let series: Vec<(String, Vec<(f64, f64)>)> = paths
                .iter()
                .map(|p| {
                    let pts = metrics
                        .iter()
                        .filter_map(|m| Some((m.parse::<f64>().ok()?, r.median(section, m, p)?)))
                        .collect();
                    (p.clone(), pts)
                })
                .collect();
            let file = format!("{}.svg", slug(section));
            let what = section.trim_start_matches("scaling ");
            plot::lines(
                &out.join(&file),
                &format!("connections/s vs number of {what}"),
                what,
                "conn/s",
                &series,
            )?;
            charts.push(file);
        } else {
            for m in &metrics {
                let bars: Vec<plot::Bar> = paths
                    .iter()
                    .filter_map(|p| {
                        let v = r.get(section, m, p)?;
                        let (min, max) = spread(v);
                        Some(plot::Bar {
                            label: p.clone(),
                            median: median(v),
                            min,
                            max,
                        })
                    })
                    .collect();
                let file = format!("{}-{}.svg", slug(section), slug(m));
                plot::bars(
                    &out.join(&file),
                    &format!("{section}: {m}"),
                    r.units[m],
                    &bars,
                )?;
                charts.push(file);
            }
        }
    }
    md.push_str("### Counts\n\n| what | value |\n|---|---|\n");
    for (k, v) in &r.extra {
        md.push_str(&format!("| {k} | {v} |\n"));
    }
    md.push_str(&targets(r));
    md.push_str("\n### Charts\n\n");
    for c in &charts {
        md.push_str(&format!("![{c}]({c})\n"));
    }
    std::fs::write(out.join("results.md"), &md)?;
    let samples: Vec<serde_json::Value> = r
        .samples
        .iter()
        .map(|((sec, m, p), v)| {
            json!({"section": sec, "metric": m, "unit": r.units[m], "path": p,
                   "rounds": v, "median": median(v), "ratio_to_explicit": ratio(r, sec, m, p),
                   "paired_ratio_to_explicit": paired_ratio(r, sec, m, p)})
        })
        .collect();
    let doc = json!({
        "machine": m,
        "settings": {"secs": s.secs, "rounds": s.rounds},
        "samples": samples,
        "counts": r.extra,
        "charts": charts,
    });
    std::fs::write(out.join("results.json"), serde_json::to_vec_pretty(&doc)?)?;
    println!("{md}");
    eprintln!(
        "bench: wrote {}/results.{{json,md}} and {} charts",
        out.display(),
        charts.len()
    );
    Ok(())
}

/// The targets against this run's numbers.
fn targets(r: &Results) -> String {
    let mut t = String::from("\n### Targets\n\n| target | measured | met |\n|---|---|---|\n");
    let mut row =
        |name: &str, v: Option<f64>, fmt: &dyn Fn(f64) -> String, ok: &dyn Fn(f64) -> bool| {
            let (m, met) = match v {
                Some(x) => (fmt(x), if ok(x) { "yes" } else { "no" }),
                None => ("–".into(), "–"),
            };
            t.push_str(&format!("| {name} | {m} | {met} |\n"));
        };
    let x = |v: f64| format!("×{v:.3}");
    row(
        "eBPF connect rate ≥ 0.97× explicit (median of paired samples)",
        paired_ratio(r, "outbound", "connections/s", "eBPF"),
        &x,
        &|v| v >= 0.97,
    );
    row(
        "eBPF connect rate, ratio of medians (reference)",
        ratio(r, "outbound", "connections/s", "eBPF"),
        &x,
        &|_| true,
    );
    row(
        "iptables-nft connect rate (expected ~0.75×, paired)",
        paired_ratio(r, "outbound", "connections/s", "iptables-nft"),
        &x,
        &|_| true,
    );
    row(
        "eBPF 1-byte RR p50 within 3% of explicit",
        ratio(r, "outbound", "RR p50 c=1", "eBPF"),
        &x,
        &|v| v <= 1.03,
    );
    let hop = r
        .median("hop", "hop RR p50 c=1", "eBPF+sk_msg")
        .zip(r.median("hop", "hop RR p50 c=1", "eBPF"))
        .map(|(a, p)| 1.0 - a / p);
    row(
        "--accelerate: app↔proxy hop RR p50 ≥ 20% faster than loopback TCP",
        hop,
        &|v| format!("{:.1}% faster", v * 100.0),
        &|v| v >= 0.20,
    );
    let flat = |sec: &str, path: &str| -> Option<f64> {
        let sec = format!("scaling {sec}");
        let keys: Vec<usize> = r
            .samples
            .keys()
            .filter(|k| k.0 == sec && k.2 == path)
            .filter_map(|k| k.1.parse().ok())
            .collect();
        let (lo, hi) = (keys.iter().min()?, keys.iter().max()?);
        Some(r.median(&sec, &hi.to_string(), path)? / r.median(&sec, &lo.to_string(), path)? - 1.0)
    };
    let pct = |v: f64| format!("{:+.1}%", v * 100.0);
    for (sec, path) in [
        ("excluded CIDRs", "eBPF"),
        ("excluded ports", "eBPF"),
        ("pods", "eBPF"),
        ("excluded CIDRs", "iptables-nft"),
        ("excluded ports", "iptables-nft"),
    ] {
        let target = path == "eBPF";
        row(
            &format!(
                "{path}: conn/s change from fewest to most {sec}{}",
                if target { " within 3%" } else { " (reference)" }
            ),
            flat(sec, path),
            &pct,
            &|v| !target || v.abs() <= 0.03,
        );
    }
    row(
        "pure interception: eBPF connect rate ≥ 0.99× explicit (paired)",
        paired_ratio(r, PURE, "connections/s", "eBPF"),
        &x,
        &|v| v >= 0.99,
    );
    let ns = |v: f64| format!("{v:.0} ns");
    row(
        "all programs ≤ 1 µs per redirected connection (pure interception)",
        r.median(PROGRAMS, "ns per connection", TOTAL),
        &ns,
        &|v| v <= 1000.0,
    );
    row(
        "all programs ≤ 100 ns per connection of an un-meshed pod",
        r.median(PROGRAMS_UNMESHED, "ns per connection", TOTAL),
        &ns,
        &|v| v <= 100.0,
    );
    let setup = r
        .median("setup", "pod setup", "iptables-restore in netns")
        .zip(r.median("setup", "pod setup", "daemon, eBPF"))
        .map(|(i, e)| i / e);
    row(
        "pod setup via the daemon ≥ 10× faster than iptables-restore in a netns",
        setup,
        &|v| format!("{v:.1}×"),
        &|v| v >= 10.0,
    );
    t
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect::<String>()
        .split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}
