//! Conformance with Istio's own goldens: our emitters must reproduce istio-iptables' restore
//! documents (27 cases) and istio-nftables' transactions (28 cases) exactly, compared as Istio's
//! own tests compare (both sides trimmed, then an exact match), except that our interface names
//! are quoted where Istio's are not (see `unquote_interfaces`).

use interceptor::backend::{iptables, nftables};
use interceptor_tests::{conformance, shared_dir};

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
fn run(
    kind: &str,
    cases: Vec<conformance::Case>,
    render: impl Fn(&interceptor_common::config::Config) -> String,
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
        if got.trim() == want.trim() || unquote_interfaces(got.trim()) == want.trim() {
            ok += 1;
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

#[test]
fn istio_goldens() {
    let Some((ipt_ok, ipt_total)) = run("iptables", conformance::iptables_cases(), |c| {
        iptables_trace(&iptables::render(c))
    }) else {
        return;
    };
    let (nft_ok, nft_total) = run("nftables", conformance::nftables_cases(), nftables::render)
        .expect("shared dir present");
    println!("iptables goldens: {ipt_ok}/{ipt_total}, nftables goldens: {nft_ok}/{nft_total}");
    assert_eq!(ipt_total, 27, "expected 27 iptables cases");
    assert_eq!(nft_total, 28, "expected 28 nftables cases");
    assert!(
        ipt_ok == ipt_total && nft_ok == nft_total,
        "not every golden matched (see diffs above)"
    );
}
