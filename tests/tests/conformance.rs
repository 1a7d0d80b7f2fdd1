//! Conformance with Istio's own goldens: our emitters must reproduce istio-iptables' restore
//! documents (27 cases) and istio-nftables' transactions (28 cases) exactly, compared as Istio's
//! own tests compare (both sides trimmed, then an exact match), except that our interface names
//! are quoted where Istio's are not (see `unquote_interfaces`): such a case must also be the same
//! rules to the tools (ours and the golden applied by iptables-nft/nft in scratch netns and listed
//! back; root needed).

use interceptor::backend::{iptables, nftables};
use interceptor_common::config::Config;
use interceptor_tests::{conformance, netfilter, shared_dir};

/// The iptables golden is a command trace: the two `*-save` state probes, the v4 restore
/// document, the v6 one when IPv6 is on, then the final `*-save` dump.
fn iptables_trace(docs: &iptables::RestoreDocs) -> String {
    let mut out = String::from("iptables-save\nip6tables-save\n");
    out.push_str(&docs.v4);
    if let Some(v6) = &docs.v6 {
        out.push_str(v6);
    }
    out.push_str("iptables-save\n");
    if docs.v6.is_some() {
        out.push_str("ip6tables-save\n");
    }
    out
}

/// Our emitters always quote configured interface names (`-i "eth0"`, `iifname "eth0"`:
/// names come from pod annotations); Istio's goldens do not. iptables-restore and nft parse
/// both spellings into the same rule (a quoted token is the same string), so a case also
/// matches when the golden equals our output with exactly those quotes removed.
fn unquote_interfaces(doc: &str) -> String {
    let line = |l: &str| {
        let words: Vec<&str> = l.split(' ').collect();
        let mut out = Vec::with_capacity(words.len());
        for (i, w) in words.iter().enumerate() {
            let after_if = i > 0 && matches!(words[i - 1], "-i" | "-o" | "iifname" | "oifname");
            let inner = w.strip_prefix('"').and_then(|w| w.strip_suffix('"'));
            out.push(match (after_if, inner) {
                (true, Some(inner)) => inner,
                _ => w,
            });
        }
        out.join(" ")
    };
    doc.lines().map(line).collect::<Vec<_>>().join("\n")
}

/// Compares every case, printing a diff for each mismatch; returns (matched, total).
/// A case whose only difference from its golden is our quoting must also be the same to the
/// tool: `same_parsed(config, golden)` applies both in scratch netns and compares the listings.
fn run(
    kind: &str,
    cases: Vec<conformance::Case>,
    render: impl Fn(&interceptor_common::config::Config) -> String,
    same_parsed: impl Fn(&interceptor_common::config::Config, &str) -> Result<(), String>,
) -> Option<(usize, usize)> {
    let dir = shared_dir()?.join("conformance/istio").join(kind);
    let total = cases.len();
    let mut ok = 0;
    for case in cases {
        let path = dir.join(format!("{}.golden", case.name));
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let cfg = case
            .raw
            .parse()
            .unwrap_or_else(|e| panic!("{}: config rejected: {e}", case.name));
        // A panicking renderer counts as a mismatch of that case, not an abort of the run.
        let got = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| render(&cfg))) {
            Ok(got) => got,
            Err(_) => {
                eprintln!("--- {kind}/{}: renderer panicked", case.name);
                continue;
            }
        };
        if got.trim() == want.trim() {
            ok += 1;
        } else if unquote_interfaces(got.trim()) == want.trim() {
            match same_parsed(&cfg, &want) {
                Ok(()) => {
                    ok += 1;
                    *QUOTED_ONLY.lock().unwrap() += 1;
                }
                Err(e) => eprintln!(
                    "--- {kind}/{}: quoting-only, but parsed differently: {e}",
                    case.name
                ),
            }
        } else {
            eprintln!("--- {kind}/{}: MISMATCH", case.name);
            let got = unquote_interfaces(got.trim());
            let (w, g): (Vec<_>, Vec<_>) = (want.trim().lines().collect(), got.lines().collect());
            for i in 0..w.len().max(g.len()) {
                let (a, b) = (
                    w.get(i).copied().unwrap_or("<none>"),
                    g.get(i).copied().unwrap_or("<none>"),
                );
                if a != b {
                    eprintln!("  line {}: want {a:?}\n  line {}:  got {b:?}", i + 1, i + 1);
                }
            }
        }
    }
    Some((ok, total))
}

/// Cases that matched only through [`unquote_interfaces`] and then through the tools.
static QUOTED_ONLY: std::sync::Mutex<usize> = std::sync::Mutex::new(0);

/// Our v4 and v6 restore documents and the golden trace's, applied by iptables-nft and listed
/// back, are the same. The trace is the two documents between `*-save` probe lines; ours tell
/// where the v4 one ends (same line count, as the texts differ only in quotes).
fn iptables_same_parsed(cfg: &Config, golden: &str) -> Result<(), String> {
    let docs = iptables::render(cfg);
    let body: Vec<&str> = golden
        .trim()
        .lines()
        .filter(|l| *l != "iptables-save" && *l != "ip6tables-save")
        .collect();
    let n4 = docs.v4.lines().count().min(body.len());
    let golden_v4 = body[..n4].join("\n") + "\n";
    let golden_v6 = body[n4..].join("\n") + "\n";
    let mut pairs = vec![(docs.v4.clone(), golden_v4, false)];
    if let Some(v6) = &docs.v6 {
        pairs.push((v6.clone(), golden_v6, true));
    }
    for (ours, theirs, v6) in pairs {
        let a = netfilter::iptables_listing(&ours, v6).map_err(|e| format!("ours: {e:#}"))?;
        let b = netfilter::iptables_listing(&theirs, v6).map_err(|e| format!("golden: {e:#}"))?;
        // An empty listing on both sides would compare equal without proving anything.
        if a != b || !a.contains("ISTIO_") {
            return Err(format!("ours lists as\n{a}\nthe golden as\n{b}"));
        }
    }
    Ok(())
}

fn nft_same_parsed(cfg: &Config, golden: &str) -> Result<(), String> {
    let a = netfilter::nft_listing(&nftables::render(cfg)).map_err(|e| format!("ours: {e:#}"))?;
    let b = netfilter::nft_listing(golden).map_err(|e| format!("golden: {e:#}"))?;
    if a == b && a.contains("istio-proxy-nat") {
        Ok(())
    } else {
        Err(format!("ours lists as\n{a}\nthe golden as\n{b}"))
    }
}

#[test]
fn istio_goldens() {
    let Some((ipt_ok, ipt_total)) = run(
        "iptables",
        conformance::iptables_cases(),
        |c| iptables_trace(&iptables::render(c)),
        iptables_same_parsed,
    ) else {
        return;
    };
    let (nft_ok, nft_total) = run(
        "nftables",
        conformance::nftables_cases(),
        nftables::render,
        nft_same_parsed,
    )
    .expect("shared dir present");
    println!("iptables goldens: {ipt_ok}/{ipt_total}, nftables goldens: {nft_ok}/{nft_total}");
    println!(
        "of these, {} differ from their golden only by our quoted interface names and were \
         parsed identically by iptables-nft/nft",
        QUOTED_ONLY.lock().unwrap()
    );
    assert_eq!(ipt_total, 27, "expected 27 iptables cases");
    assert_eq!(nft_total, 28, "expected 28 nftables cases");
    assert!(
        ipt_ok == ipt_total && nft_ok == nft_total,
        "not every golden matched (see diffs above)"
    );
}
