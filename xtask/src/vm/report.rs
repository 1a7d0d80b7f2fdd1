//! Reading the guests' (and the host's) marker lines back, and the kernel × feature × result
//! matrix made from them, as Markdown. Nothing here is assumed: every cell comes from what ran.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use super::proto::{mark, Mode};

#[derive(Debug, Clone, Default)]
pub struct RunResult {
    pub id: String,
    pub status: String,
    pub exit: String,
    pub passed: u32,
    pub failed: u32,
    pub ignored: u32,
    pub millis: u64,
    pub note: String,
    /// (test, result) for every test that did not pass.
    pub bad_cases: Vec<(String, String)>,
    pub fail_out: Vec<String>,
}

/// One doctor row: check, status, why.
#[derive(Debug, Clone)]
pub struct DoctorRow {
    pub check: String,
    pub status: String,
    pub why: String,
}

#[derive(Debug, Clone, Default)]
pub struct Doctor {
    pub exit: String,
    pub millis: u64,
    pub lines: Vec<String>,
}

impl Doctor {
    /// The `check  status  why` table, by the header's column positions.
    pub fn rows(&self) -> Vec<DoctorRow> {
        let mut rows = Vec::new();
        let mut cols: Option<(usize, usize)> = None;
        for l in &self.lines {
            if let Some((s, _)) = cols {
                if l.trim().is_empty() || l.starts_with("auto backend:") || l.len() <= s {
                    cols = None;
                    continue;
                }
                let (Some(check), Some(rest)) = (l.get(..s), l.get(s..)) else {
                    continue;
                };
                let rest = rest.trim_start();
                let (status, why) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
                rows.push(DoctorRow {
                    check: check.trim().to_string(),
                    status: status.to_string(),
                    why: why.trim().to_string(),
                });
            } else if l.starts_with("check") {
                if let (Some(s), Some(w)) = (l.find("status"), l.find("why")) {
                    cols = Some((s, w));
                }
            }
        }
        rows
    }

    pub fn auto_line(&self) -> Option<&str> {
        self.lines
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("auto backend: "))
    }
}

/// Everything one guest (or the host) reported.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Column label: the series (`6.1`) or `host`.
    pub label: String,
    /// e.g. `linux-image-6.1.0-56-cloud-amd64 6.1.192-2 (bookworm-security)`.
    pub source: String,
    pub release: String,
    pub modules: Option<(u32, u32, u64)>,
    pub modfail: Vec<(String, String)>,
    pub probes: BTreeMap<Mode, Vec<(String, bool, String)>>,
    pub doctor: BTreeMap<Mode, Doctor>,
    /// mode → (case label, backend, why)
    pub auto: BTreeMap<Mode, Vec<(String, String, String)>>,
    pub runs: Vec<RunResult>,
    pub done: Option<(bool, u64)>,
    pub notes: Vec<String>,
    pub elapsed: Duration,
    pub timed_out: bool,
    /// Where the console log is, or what went wrong before the guest could run.
    pub log: String,
    pub error: Option<String>,
}

impl Report {
    pub fn parse(label: &str, text: &str) -> Report {
        let mut r = Report {
            label: label.to_string(),
            ..Default::default()
        };
        let mut runs: BTreeMap<String, RunResult> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut run_entry = |runs: &mut BTreeMap<String, RunResult>, id: &str| {
            if !runs.contains_key(id) {
                order.push(id.to_string());
            }
            runs.entry(id.to_string())
                .or_insert_with(|| RunResult {
                    id: id.to_string(),
                    ..Default::default()
                })
                .id
                .clone()
        };
        for l in text.lines() {
            let f: Vec<&str> = l.split('\t').collect();
            let get = |i: usize| f.get(i).copied().unwrap_or("");
            let mode = || Mode::parse(get(1)).unwrap_or(Mode::Normal);
            match f[0] {
                mark::READY => r.release = get(1).to_string(),
                mark::MODULES => {
                    r.modules = Some((
                        get(1).parse().unwrap_or(0),
                        get(2).parse().unwrap_or(0),
                        get(3).parse().unwrap_or(0),
                    ))
                }
                mark::MODFAIL => r.modfail.push((get(1).into(), get(2).into())),
                mark::PROBE => r.probes.entry(mode()).or_default().push((
                    get(2).into(),
                    get(3) == "ok",
                    get(4).into(),
                )),
                mark::DOCTOR => {
                    let d = r.doctor.entry(mode()).or_default();
                    d.exit = get(2).into();
                    d.millis = get(3).parse().unwrap_or(0);
                }
                mark::DOCTOR_LINE => r
                    .doctor
                    .entry(mode())
                    .or_default()
                    .lines
                    .push(get(2).into()),
                mark::AUTO => r.auto.entry(mode()).or_default().push((
                    get(2).into(),
                    get(3).into(),
                    get(4).into(),
                )),
                mark::CASE => {
                    let id = run_entry(&mut runs, get(1));
                    if get(3) != "ok" && get(3) != "ignored" {
                        let e = runs.get_mut(&id).expect("entry");
                        e.bad_cases.push((get(2).into(), get(3).into()));
                    }
                }
                mark::FAIL_OUT => {
                    let id = run_entry(&mut runs, get(1));
                    runs.get_mut(&id)
                        .expect("entry")
                        .fail_out
                        .push(get(2).into());
                }
                mark::RUN => {
                    let id = run_entry(&mut runs, get(1));
                    let e = runs.get_mut(&id).expect("entry");
                    e.status = get(2).into();
                    e.exit = get(3).into();
                    e.passed = get(4).parse().unwrap_or(0);
                    e.failed = get(5).parse().unwrap_or(0);
                    e.ignored = get(6).parse().unwrap_or(0);
                    e.millis = get(7).parse().unwrap_or(0);
                    e.note = get(8).into();
                }
                mark::NOTE => r.notes.push(get(1).into()),
                mark::DONE => r.done = Some((get(1) == "success", get(2).parse().unwrap_or(0))),
                _ => {}
            }
        }
        r.runs = order
            .into_iter()
            .filter_map(|id| runs.remove(&id))
            .collect();
        for run in &mut r.runs {
            if run.status.is_empty() {
                run.status = "unfinished".into();
            }
        }
        r
    }

    pub fn ok(&self) -> bool {
        self.error.is_none()
            && !self.timed_out
            && self.done.is_some_and(|(ok, _)| ok)
            && self
                .runs
                .iter()
                .all(|r| r.status == "ok" || r.status == "skipped")
    }

    pub fn verdict(&self) -> String {
        if let Some(e) = &self.error {
            return format!("error: {e}");
        }
        if self.timed_out {
            return "TIMEOUT".into();
        }
        match self.done {
            None => "no result (guest died?)".into(),
            Some(_) if self.ok() => "pass".into(),
            Some(_) => {
                let bad = self
                    .runs
                    .iter()
                    .filter(|r| r.status != "ok" && r.status != "skipped")
                    .count();
                format!("FAIL ({bad} runs)")
            }
        }
    }
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn short(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

fn table(out: &mut String, head: &[String], rows: &[Vec<String>]) {
    let _ = writeln!(
        out,
        "| {} |",
        head.iter().map(|h| cell(h)).collect::<Vec<_>>().join(" | ")
    );
    let _ = writeln!(out, "|{}", "---|".repeat(head.len()));
    for r in rows {
        let _ = writeln!(
            out,
            "| {} |",
            r.iter().map(|c| cell(c)).collect::<Vec<_>>().join(" | ")
        );
    }
    out.push('\n');
}

/// Row names in order of first appearance over all reports.
fn union(lists: impl Iterator<Item = Vec<String>>) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for l in lists {
        for n in l {
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    names
}

pub struct Meta {
    pub command: String,
    pub accel: String,
    pub date: String,
    pub wall: Duration,
    pub denied_selection: String,
}

/// The matrix (the part also printed to the terminal).
pub fn matrix(reports: &[Report]) -> String {
    let mut out = String::new();
    let mut head = vec!["".to_string()];
    head.extend(reports.iter().map(|r| r.label.clone()));

    out.push_str("### Kernels\n\n");
    let mut rows = vec![
        vec!["source".to_string()],
        vec!["uname -r".to_string()],
        vec!["time".to_string()],
        vec!["modules loaded / failed".to_string()],
        vec!["result".to_string()],
    ];
    for r in reports {
        rows[0].push(r.source.clone());
        rows[1].push(r.release.clone());
        rows[2].push(format!("{:.0} s", r.elapsed.as_secs_f64()));
        rows[3].push(r.modules.map_or("-".into(), |(l, f, ms)| {
            format!("{l} / {f} ({:.1} s)", ms as f64 / 1000.0)
        }));
        rows[4].push(r.verdict());
    }
    table(&mut out, &head, &rows);

    out.push_str("### Kernel features (raw bpf() probes by the guest init, as root)\n\n");
    let names = union(reports.iter().map(|r| {
        r.probes
            .get(&Mode::Normal)
            .map(|p| p.iter().map(|(n, _, _)| n.clone()).collect())
            .unwrap_or_default()
    }));
    let rows: Vec<Vec<String>> = names
        .iter()
        .map(|n| {
            let mut row = vec![n.clone()];
            for r in reports {
                let p = r
                    .probes
                    .get(&Mode::Normal)
                    .and_then(|p| p.iter().find(|(x, _, _)| x == n));
                row.push(match p {
                    None => "-".into(),
                    Some((_, true, _)) => "yes".into(),
                    Some((_, false, why)) => format!("**no**: {}", short(why, 90)),
                });
            }
            row
        })
        .collect();
    table(&mut out, &head, &rows);

    out.push_str("### `interceptor doctor` (as root)\n\n");
    let names = union(reports.iter().map(|r| {
        r.doctor
            .get(&Mode::Normal)
            .map(|d| d.rows().into_iter().map(|x| x.check).collect())
            .unwrap_or_default()
    }));
    let mut rows: Vec<Vec<String>> = names
        .iter()
        .map(|n| {
            let mut row = vec![n.clone()];
            for r in reports {
                let rows = r
                    .doctor
                    .get(&Mode::Normal)
                    .map(|d| d.rows())
                    .unwrap_or_default();
                row.push(match rows.iter().find(|x| &x.check == n) {
                    None => "-".into(),
                    Some(x) if x.status == "present" => "present".into(),
                    Some(x) => format!("**{}**: {}", x.status, short(&x.why, 90)),
                });
            }
            row
        })
        .collect();
    let mut auto_row = vec!["**auto backend**".to_string()];
    for r in reports {
        let d = r.doctor.get(&Mode::Normal);
        auto_row.push(match d {
            None => "-".into(),
            Some(d) => match d.auto_line() {
                Some(a) => short(a, 120),
                None => format!("(no verdict; exit {})", d.exit),
            },
        });
    }
    rows.push(auto_row);
    table(&mut out, &head, &rows);

    out.push_str(
        "### What `apply --backend auto` chose, per pod config and privilege mode \
         (full reasons under Details)\n\n",
    );
    let mut keys: Vec<(Mode, String)> = Vec::new();
    for r in reports {
        for (m, cases) in &r.auto {
            for (label, _, _) in cases {
                if !keys.contains(&(*m, label.clone())) {
                    keys.push((*m, label.clone()));
                }
            }
        }
    }
    keys.sort_by_key(|(m, _)| *m);
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|(m, label)| {
            let mut row = vec![format!("{m}: `{label}`")];
            for r in reports {
                let c = r
                    .auto
                    .get(m)
                    .and_then(|c| c.iter().find(|(l, _, _)| l == label));
                row.push(match c {
                    None => "-".into(),
                    Some((_, b, _)) if b == "ebpf" => "ebpf".into(),
                    Some((_, b, why)) => format!("**{b}**: {}", short(why, 70)),
                });
            }
            row
        })
        .collect();
    table(&mut out, &head, &rows);

    out.push_str("### e2e runs (test binary @ privilege mode: passed/total)\n\n");
    let mut ids = union(
        reports
            .iter()
            .map(|r| r.runs.iter().map(|x| x.id.clone()).collect()),
    );
    // By mode (in the order of Mode::ALL), then binary.
    let rank = |id: &str| {
        let mode = id.rsplit_once('@').and_then(|(_, m)| Mode::parse(m));
        let pos = mode.and_then(|m| Mode::ALL.iter().position(|x| *x == m));
        (pos.unwrap_or(usize::MAX), id.to_string())
    };
    ids.sort_by_key(|id| rank(id));
    let rows: Vec<Vec<String>> = ids
        .iter()
        .map(|id| {
            let mut row = vec![id.clone()];
            for r in reports {
                row.push(match r.runs.iter().find(|x| &x.id == id) {
                    None => "-".into(),
                    Some(x) => {
                        let total = x.passed + x.failed;
                        match x.status.as_str() {
                            "ok" => format!(
                                "ok {}/{} ({:.0} s)",
                                x.passed,
                                total,
                                x.millis as f64 / 1000.0
                            ),
                            "skipped" => "skipped (auto ≠ ebpf)".to_string(),
                            s => format!(
                                "**{s}** {}/{} ({:.0} s)",
                                x.passed,
                                total,
                                x.millis as f64 / 1000.0
                            ),
                        }
                    }
                });
            }
            row
        })
        .collect();
    table(&mut out, &head, &rows);
    out
}

/// The full Markdown document: the matrix and, per guest, the details (doctor output in
/// every mode, failures, module load failures).
pub fn markdown(reports: &[Report], meta: &Meta) -> String {
    let mut out = String::new();
    out.push_str("# Kernel matrix\n\n");
    let _ = writeln!(
        out,
        "Generated by `{}` on {} (accelerator: {}; wall time {:.0} s). Every cell comes from \
         what ran in the guests (and on the host): nothing is assumed from kernel versions.\n",
        meta.command,
        meta.date,
        meta.accel,
        meta.wall.as_secs_f64()
    );
    out.push_str("Privilege modes: ");
    let modes: Vec<String> = Mode::ALL
        .iter()
        .map(|m| format!("`{m}` = {}", m.describe()))
        .collect();
    out.push_str(&modes.join("; "));
    out.push_str(".\n\n");
    let _ = writeln!(
        out,
        "BPF-denied runs (`bpf-denied`, `userns`): {}\n",
        meta.denied_selection
    );
    out.push_str(&matrix(reports));
    out.push_str("## Details\n\n");
    for r in reports {
        let _ = writeln!(out, "### {} — {}\n", r.label, r.source);
        if let Some(e) = &r.error {
            let _ = writeln!(out, "Error: {e}\n");
        }
        if !r.log.is_empty() {
            let _ = writeln!(out, "Console log: `{}`\n", r.log);
        }
        for n in &r.notes {
            let _ = writeln!(out, "- note: {n}");
        }
        if !r.modfail.is_empty() {
            let list: Vec<String> = r
                .modfail
                .iter()
                .map(|(m, e)| format!("{m} ({e})"))
                .collect();
            let _ = writeln!(out, "- modules that failed to load: {}\n", list.join(", "));
        }
        for (mode, d) in &r.doctor {
            let _ = writeln!(
                out,
                "`interceptor doctor` in mode `{mode}` (exit {}, {:.1} s):\n\n```text\n{}\n```\n",
                d.exit,
                d.millis as f64 / 1000.0,
                d.lines.join("\n")
            );
        }
        for (mode, cases) in &r.auto {
            for (label, backend, why) in cases {
                let _ = writeln!(out, "- auto, `{mode}`, `{label}`: **{backend}** — {why}");
            }
        }
        out.push('\n');
        for run in r
            .runs
            .iter()
            .filter(|x| x.status != "ok" && x.status != "skipped")
        {
            let _ = writeln!(
                out,
                "Run `{}`: {} (exit {}), {} passed, {} failed{}\n",
                run.id,
                run.status,
                run.exit,
                run.passed,
                run.failed,
                if run.note.is_empty() {
                    String::new()
                } else {
                    format!(" — {}", run.note)
                }
            );
            for (t, res) in &run.bad_cases {
                let _ = writeln!(out, "- `{t}`: {res}");
            }
            if !run.fail_out.is_empty() {
                let _ = writeln!(out, "\n```text\n{}\n```\n", run.fail_out.join("\n"));
            }
        }
        for run in r.runs.iter().filter(|x| x.status == "skipped") {
            let _ = writeln!(out, "- `{}` skipped: {}", run.id, run.note);
        }
        out.push('\n');
    }
    out
}
