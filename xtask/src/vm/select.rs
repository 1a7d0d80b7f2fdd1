//! Which test binaries and tests run in a guest, and in which privilege modes: `--filter`,
//! the binaries and tests that need eBPF, and those that only make sense on the host.

use super::proto::{Mode, Run, When};
use super::Args;

/// Test binaries whose every test forces `--backend ebpf` (they cannot pass where eBPF is
/// unavailable).
const EBPF_BINS: &[&str] = &[
    "ebpf_e2e",
    "bind_guard",
    "inbound_e2e",
    "load",
    "faults",
    "escape",
    "accel_e2e",
    "coexistence",
    "upgrade",
];
/// Test binaries about the host rather than the kernel: they need this checkout (its sources,
/// the fuzz corpus, its cargo for the image build) or a container runtime, which guests do not
/// have. Selected only when
/// named (`--filter containerd_e2e`).
const HOST_ONLY_BINS: &[&str] = &["containerd_e2e", "image", "architecture", "fuzz_parsers"];
/// libtest `--skip` patterns for the other tests that force eBPF or assert that it is
/// available here. Such runs also get `INTERCEPTOR_TESTS_NO_EBPF=1` in their environment.
const EBPF_SKIPS: &[&str] = &[
    "ebpf",
    "every_needed_hook_is_present_here",
    "probe_agrees_with_the_loader",
    "fifty_pods_through_the_daemon",
    "a_failing_removal_does_not_stop_the_daemon",
    "an_unreadable_record_keeps_its_pod_intercepted",
    "backend_switch_is_make_before_break",
];

/// A `--filter` entry.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Filter {
    Bin(String),
    BinTest(String, String),
    Test(String),
}

pub(super) fn parse_filters(raw: &[String], bins: &[String]) -> Vec<Filter> {
    raw.iter()
        .filter(|f| !f.is_empty())
        .map(|f| match f.split_once('/') {
            Some((b, t)) => Filter::BinTest(b.into(), t.into()),
            None if bins.contains(f) => Filter::Bin(f.clone()),
            None => Filter::Test(f.clone()),
        })
        .collect()
}

/// The libtest filters of `bin` (empty: all its tests), or None when it is not selected.
pub(super) fn select(bin: &str, filters: &[Filter]) -> Option<Vec<String>> {
    if filters.contains(&Filter::Bin(bin.into())) {
        return Some(Vec::new());
    }
    if HOST_ONLY_BINS.contains(&bin) {
        return None;
    }
    if filters.is_empty() {
        return Some(Vec::new());
    }
    let names: Vec<String> = filters
        .iter()
        .filter_map(|f| match f {
            Filter::BinTest(b, t) if b == bin => Some(t.clone()),
            Filter::Test(t) => Some(t.clone()),
            _ => None,
        })
        .collect();
    (!names.is_empty()).then_some(names)
}

/// Which tests need eBPF.
pub(super) struct EbpfNeeds {
    pub(super) bins: Vec<String>,
    pub(super) skips: Vec<String>,
}

impl EbpfNeeds {
    pub(super) fn new(args: &Args) -> Self {
        let own = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        Self {
            bins: args.ebpf_bins.clone().unwrap_or_else(|| own(EBPF_BINS)),
            skips: args.ebpf_skip.clone().unwrap_or_else(|| own(EBPF_SKIPS)),
        }
    }

    pub(super) fn describe(&self) -> String {
        let skips: Vec<String> = self.skips.iter().map(|s| format!("--skip {s}")).collect();
        format!(
            "every selected test binary except {} (they force the eBPF backend), with libtest \
             `{}` and INTERCEPTOR_TESTS_NO_EBPF=1",
            self.bins.join(", "),
            skips.join(" ")
        )
    }
}

/// The test runs: every selected binary as root (the eBPF ones only where `auto` picks
/// eBPF; elsewhere the others without their eBPF tests), and the fallback selection (no eBPF
/// binary, `--skip ebpf`) in each denied mode.
pub(super) fn runs(
    bins: &[String],
    filters: &[Filter],
    modes: &[Mode],
    timeout: u64,
    needs: &EbpfNeeds,
) -> Vec<Run> {
    let skips: Vec<String> = needs
        .skips
        .iter()
        .flat_map(|s| ["--skip".to_string(), s.to_string()])
        .collect();
    let mut out = Vec::new();
    for mode in modes {
        for bin in bins {
            let Some(names) = select(bin, filters) else {
                continue;
            };
            let ebpf_bin = needs.bins.contains(bin);
            let id = format!("{bin}@{mode}");
            let run = |when, args: Vec<String>| Run {
                id: id.clone(),
                mode: *mode,
                bin: bin.clone(),
                when,
                args,
                timeout_secs: timeout,
            };
            let mut fallback_args = names.clone();
            fallback_args.extend(skips.iter().cloned());
            match (mode, ebpf_bin) {
                (Mode::Normal, true) => out.push(run(When::AutoEbpf, names)),
                (Mode::Normal, false) => {
                    out.push(run(When::AutoEbpf, names));
                    out.push(run(When::AutoNotEbpf, fallback_args));
                }
                (_, true) => {}
                (_, false) => out.push(run(When::Always, fallback_args)),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_select_binaries_and_tests() {
        let bins = vec!["ebpf_e2e".to_string(), "fallback_e2e".to_string()];
        let f = parse_filters(&["fallback_e2e".into(), "ebpf_e2e/traffic".into()], &bins);
        assert_eq!(select("fallback_e2e", &f), Some(vec![]));
        assert_eq!(select("ebpf_e2e", &f), Some(vec!["traffic".to_string()]));
        let f = parse_filters(&["traffic".into()], &bins);
        assert_eq!(select("ebpf_e2e", &f), Some(vec!["traffic".to_string()]));
        let f = parse_filters(&["ebpf_e2e".into()], &bins);
        assert_eq!(select("fallback_e2e", &f), None);
        // Host-only binaries run in a guest only when named.
        assert_eq!(select("containerd_e2e", &[]), None);
        let f = parse_filters(&["containerd_e2e".into()], &["containerd_e2e".into()]);
        assert_eq!(select("containerd_e2e", &f), Some(vec![]));
        let needs = EbpfNeeds {
            bins: vec!["ebpf_e2e".into()],
            skips: vec!["ebpf".into()],
        };
        let r = runs(&bins, &[], &[Mode::Normal, Mode::Seccomp], 60, &needs);
        let ids: Vec<_> = r.iter().map(|r| (r.id.as_str(), r.when)).collect();
        assert_eq!(
            ids,
            [
                ("ebpf_e2e@normal", When::AutoEbpf),
                ("fallback_e2e@normal", When::AutoEbpf),
                ("fallback_e2e@normal", When::AutoNotEbpf),
                ("fallback_e2e@bpf-denied", When::Always),
            ]
        );
    }
}
