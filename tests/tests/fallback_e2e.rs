//! The iptables/nftables fallbacks applied for real inside a test pod netns, for each of
//! iptables-legacy, iptables-nft and nftables: the traffic cases, idempotent re-apply,
//! drift handling and cleanup.

use interceptor_tests::cases::{self, apply, ruleset, Flavor, Pod};

fn traffic(flavor: Flavor) {
    let n = cases::outbound_defaults(flavor).unwrap_or_else(|e| panic!("{flavor:?}: {e:#}"));
    let m = cases::outbound_includes(flavor).unwrap_or_else(|e| panic!("{flavor:?}: {e:#}"));
    println!("{flavor:?}: {} traffic cases passed", n + m);
}

#[test]
fn traffic_iptables_legacy() {
    traffic(Flavor::IptablesLegacy);
}

#[test]
fn traffic_iptables_nft() {
    traffic(Flavor::IptablesNft);
}

#[test]
fn traffic_nftables() {
    traffic(Flavor::Nftables);
}

/// Apply twice is a no-op, drift needs --reconcile, --force-apply re-applies, and
/// --cleanup-only restores the netns's ruleset to what it was.
fn lifecycle(flavor: Flavor) {
    let pod = Pod::new("life").unwrap();
    let t = &pod.topo;
    let before = ruleset(t);
    let flags = ["-i", "*", "-b", "*", "-d", "15020", "--ipv6", "true"];
    let first = apply(&pod, flavor, &flags).unwrap();
    assert!(first.contains("rules applied"), "{flavor:?}: {first}");
    let installed = ruleset(t);
    assert_ne!(installed, before, "{flavor:?}: nothing was installed");
    let second = apply(&pod, flavor, &flags).unwrap();
    assert!(
        second.contains("already in place"),
        "{flavor:?}: second apply was not a no-op: {second}"
    );
    assert_eq!(
        ruleset(t),
        installed,
        "{flavor:?}: second apply changed the ruleset"
    );
    // A different config is drift: refused without --reconcile, replaced with it.
    let drift = ["-i", "*", "-b", "*", "-d", "15021", "--ipv6", "true"];
    assert!(
        apply(&pod, flavor, &drift).is_err(),
        "{flavor:?}: drift applied without --reconcile"
    );
    assert_eq!(
        ruleset(t),
        installed,
        "{flavor:?}: a refused apply changed the ruleset"
    );
    let mut with = drift.to_vec();
    with.push("--reconcile");
    let out = apply(&pod, flavor, &with).unwrap();
    assert!(out.contains("replaced"), "{flavor:?}: {out}");
    assert!(
        ruleset(t).contains("15021"),
        "{flavor:?}: reconcile did not install the new rules"
    );
    let mut force = drift.to_vec();
    force.push("--force-apply");
    assert!(
        apply(&pod, flavor, &force).unwrap().contains("replaced"),
        "{flavor:?}: --force-apply"
    );
    let mut clean = drift.to_vec();
    clean.push("--cleanup-only");
    assert!(
        apply(&pod, flavor, &clean).unwrap().contains("removed"),
        "{flavor:?}: cleanup"
    );
    assert_eq!(
        ruleset(t),
        before,
        "{flavor:?}: cleanup did not restore the ruleset"
    );
    assert!(
        apply(&pod, flavor, &clean)
            .unwrap()
            .contains("nothing to remove"),
        "{flavor:?}: second cleanup"
    );
}

#[test]
fn lifecycle_iptables_legacy() {
    lifecycle(Flavor::IptablesLegacy);
}

#[test]
fn lifecycle_iptables_nft() {
    lifecycle(Flavor::IptablesNft);
}

#[test]
fn lifecycle_nftables() {
    lifecycle(Flavor::Nftables);
}

/// A pod whose netns has IPv6 disabled: detection says IPv4, apply and cleanup succeed.
#[test]
fn ipv6_disabled_node_does_not_fail() {
    let pod = Pod::new("nov6").unwrap();
    let t = &pod.topo;
    t.pod_exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"], None)
        .unwrap();
    for flavor in [Flavor::IptablesNft, Flavor::Nftables] {
        apply(&pod, flavor, &["-i", "*"]).unwrap_or_else(|e| panic!("{flavor:?}: {e:#}"));
        let v6 = t
            .pod_exec("ip6tables-nft-save", &[], None)
            .unwrap_or_default();
        assert!(
            !v6.contains("ISTIO"),
            "{flavor:?}: IPv6 rules installed although IPv6 is off"
        );
        apply(&pod, flavor, &["-i", "*", "--cleanup-only"])
            .unwrap_or_else(|e| panic!("{flavor:?}: {e:#}"));
    }
}
