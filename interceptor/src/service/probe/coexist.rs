//! Other programs at the cgroup's socket hooks, as `doctor` reports them: each one in the order
//! it runs, ours marked, and what that means for interception.
//!
//! Programs at one hook of one cgroup all run (multi mode), in attach order; those attached at
//! a descendant cgroup (a pod's own) run before those at its ancestors. A program that rewrites
//! the destination of `connect` (or of an unconnected `sendmsg`) before ours runs hides the
//! address the app asked for: we then redirect the rewritten one, and the sidecar sees a
//! backend pod instead of the service it should route by. Connect-time load balancers do
//! exactly that, a known source of broken meshes (Istio's and Merbridge's trackers): Cilium's
//! socket LB in pod namespaces, Calico's connect-time load balancing. They are named here with
//! the fix; any other program found running before ours at those hooks is named with the order
//! we need. Read only: nothing is attached, detached or changed.

use std::path::{Path, PathBuf};

use crate::backend::ebpf::attached::{attached_programs, AttachedProgram};
use crate::backend::ebpf::{detect_cgroup2_root, Pins};

/// The hooks where a program running before ours can rewrite the destination first.
const REWRITING_HOOKS: &[&str] = &[
    "cgroup/connect4",
    "cgroup/connect6",
    "cgroup/sendmsg4",
    "cgroup/sendmsg6",
];

/// What we need of the order, in one sentence (`doctor` prints it; JSON `order_needed`).
pub const ORDER_NEEDED: &str = "interceptor's connect4/connect6 (and sendmsg4/sendmsg6, for DNS) \
must run before any program that rewrites destinations: at one cgroup programs run in the order \
they were attached, and programs attached at a pod's own cgroup run before those at the root, so \
a rewriting program must either be attached after ours at the root or leave meshed pods' sockets \
alone";

/// A connect-time load balancer we know by its program names, and how to make it leave pod
/// sockets to the sidecar.
struct Known {
    /// Full program names; the kernel keeps the first 15 bytes.
    names: &'static [&'static str],
    what: &'static str,
    fix: &'static str,
}

const KNOWN: &[Known] = &[
    Known {
        names: &[
            "cil_sock4_connect",
            "cil_sock6_connect",
            "cil_sock4_sendmsg",
            "cil_sock6_sendmsg",
            // Cilium before 1.12.
            "sock4_connect",
            "sock6_connect",
            "sock4_sendmsg",
            "sock6_sendmsg",
        ],
        what: "Cilium's socket load balancer",
        fix: "run Cilium with socketLB.hostNamespaceOnly=true (Helm; agent option \
bpf-lb-sock-hostns-only: true), so only the host namespace's sockets are balanced at connect \
and pods keep the service address for the sidecar",
    },
    Known {
        names: &[
            "calico_connect_v4",
            "calico_connect_v6",
            "calico_connect_v46",
            "calico_sendmsg_v4",
            "calico_sendmsg_v6",
            "calico_sendmsg_v46",
        ],
        what: "Calico's connect-time load balancer (eBPF data plane)",
        fix: "set the FelixConfiguration's bpfConnectTimeLoadBalancing: Disabled with \
bpfHostNetworkedNATWithoutCTLB: Enabled (older Calico: bpfConnectTimeLoadBalancingEnabled: \
false), so services are translated in the data path after the sidecar, as with kube-proxy",
    },
];

/// The kernel's name of a program whose full name is `full` (at most 15 bytes).
fn kernel_name(full: &str) -> &str {
    &full[..full.len().min(15)]
}

fn known(name: &str) -> Option<&'static Known> {
    KNOWN
        .iter()
        .find(|k| k.names.iter().any(|n| kernel_name(n) == name))
}

/// Where a program runs relative to ours at its hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// One of ours.
    Ours,
    BeforeOurs,
    AfterOurs,
    /// None of ours runs at this hook (not installed under `--bpffs`, or not here).
    OursNotAttached,
}

impl Order {
    pub fn words(self) -> &'static str {
        match self {
            Order::Ours => "ours",
            Order::BeforeOurs => "before ours",
            Order::AfterOurs => "after ours",
            Order::OursNotAttached => "ours not attached",
        }
    }
}

/// One program at one hook, as listed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Program {
    pub hook: &'static str,
    /// Its place in the hook's run order (0 first).
    pub position: usize,
    pub id: u32,
    pub name: String,
    pub ours: bool,
    pub order: Order,
    /// What we know it to be, if anything.
    pub known: Option<&'static str>,
}

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A known load balancer rewrites before us: meshed pods lose their service addresses.
    Conflict,
    /// An unknown program runs before ours where it could rewrite first.
    Order,
    /// Fine today, fragile: a known load balancer that runs after ours.
    Note,
}

impl Kind {
    pub fn words(self) -> &'static str {
        match self {
            Kind::Conflict => "conflict",
            Kind::Order => "order",
            Kind::Note => "note",
        }
    }
}

/// Something an operator should know about a program beside ours.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    pub kind: Kind,
    pub hook: &'static str,
    pub id: u32,
    pub name: String,
    pub order: Order,
    pub what: String,
    pub fix: String,
}

/// The programs at the socket hooks of the cgroup our programs attach to, and the findings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Neighbours {
    pub cgroup: PathBuf,
    pub programs: Vec<Program>,
    pub findings: Vec<Finding>,
    /// Why the programs could not be listed (no cgroup v2, no privilege for BPF_PROG_QUERY).
    pub error: Option<String>,
}

/// Lists what runs at the socket hooks of `cgroup` (the cgroup v2 root when None), ours
/// recognised from the pins under `bpffs`. Never fails: an error is carried in the result.
pub fn neighbours(bpffs: &Path, cgroup: Option<&Path>) -> Neighbours {
    let cgroup = match cgroup {
        Some(c) => c.to_path_buf(),
        None => match detect_cgroup2_root() {
            Ok(c) => c,
            Err(e) => {
                return Neighbours {
                    cgroup: PathBuf::new(),
                    programs: Vec::new(),
                    findings: Vec::new(),
                    error: Some(format!("{e:#}")),
                }
            }
        },
    };
    match attached_programs(&cgroup, &Pins::new(bpffs)) {
        Ok(found) => {
            let programs = classify(&found);
            let findings = findings(&programs);
            Neighbours {
                cgroup,
                programs,
                findings,
                error: None,
            }
        }
        Err(e) => Neighbours {
            cgroup,
            programs: Vec::new(),
            findings: Vec::new(),
            error: Some(format!("{e:#}")),
        },
    }
}

/// Each program with its order relative to ours at its hook and what we know it to be.
fn classify(found: &[AttachedProgram]) -> Vec<Program> {
    found
        .iter()
        .map(|p| {
            let first_ours = found
                .iter()
                .filter(|o| o.hook == p.hook && o.ours)
                .map(|o| o.position)
                .min();
            let order = match first_ours {
                _ if p.ours => Order::Ours,
                Some(o) if p.position < o => Order::BeforeOurs,
                Some(_) => Order::AfterOurs,
                None => Order::OursNotAttached,
            };
            let known = if p.ours {
                None
            } else if p.name.starts_with("ic_") {
                Some("another interceptor installation (not the one under --bpffs)")
            } else {
                known(&p.name).map(|k| k.what)
            };
            Program {
                hook: p.hook,
                position: p.position,
                id: p.id,
                name: p.name.clone(),
                ours: p.ours,
                order,
                known,
            }
        })
        .collect()
}

fn findings(programs: &[Program]) -> Vec<Finding> {
    let mut out = Vec::new();
    for p in programs
        .iter()
        .filter(|p| !p.ours && REWRITING_HOOKS.contains(&p.hook))
    {
        let finding = |kind: Kind, what: String, fix: &str| Finding {
            kind,
            hook: p.hook,
            id: p.id,
            name: p.name.clone(),
            order: p.order,
            what,
            fix: fix.to_string(),
        };
        let hook = p.hook;
        if let Some(k) = known(&p.name) {
            out.push(match p.order {
                Order::AfterOurs => finding(
                    Kind::Note,
                    format!(
                        "{} runs after our {hook} today, so meshed pods keep their service \
addresses; it runs first again if ours is reattached (cleanup, then apply) or where it is \
attached at a pod's own cgroup",
                        k.what
                    ),
                    k.fix,
                ),
                Order::BeforeOurs => finding(
                    Kind::Conflict,
                    format!(
                        "{} runs before our {hook}: service addresses are rewritten to a backend \
pod before interception, so the sidecar sees the pod, not the service (routing, retries and \
policy by service break)",
                        k.what
                    ),
                    k.fix,
                ),
                _ => finding(
                    Kind::Conflict,
                    format!(
                        "{} is attached at {hook}; ours, attached after it, would run second: \
service addresses would be rewritten to a backend pod before interception",
                        k.what
                    ),
                    k.fix,
                ),
            });
        } else if p.order == Order::BeforeOurs && !p.name.starts_with("ic_") {
            out.push(finding(
                Kind::Order,
                format!(
                    "runs before our {hook}: if it rewrites destinations, we redirect the \
rewritten one and the sidecar never sees the address the app asked for"
                ),
                "attach it after ours at this cgroup, or have it leave meshed pods' sockets alone",
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(hook: &'static str, position: usize, id: u32, name: &str, ours: bool) -> AttachedProgram {
        AttachedProgram {
            hook,
            position,
            id,
            name: name.into(),
            ours,
        }
    }

    #[test]
    fn cilium_before_ours_is_a_conflict_with_the_fix() {
        let found = [
            at("cgroup/connect4", 0, 7, "cil_sock4_conne", false),
            at("cgroup/connect4", 1, 9, "ic_connect4", true),
            at("cgroup/recvmsg4", 0, 8, "cil_sock4_recvm", false),
        ];
        let programs = classify(&found);
        assert_eq!(programs[0].order, Order::BeforeOurs);
        assert_eq!(programs[0].known, Some("Cilium's socket load balancer"));
        assert_eq!(programs[1].order, Order::Ours);
        // Not at a hook where it can rewrite before us: listed, no finding.
        assert_eq!(programs[2].order, Order::OursNotAttached);
        let f = findings(&programs);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!((f[0].kind, f[0].id), (Kind::Conflict, 7));
        assert!(
            f[0].fix.contains("socketLB.hostNamespaceOnly=true"),
            "{}",
            f[0].fix
        );
    }

    #[test]
    fn calico_after_ours_is_a_note_and_before_an_unattached_ours_a_conflict() {
        let found = [
            at("cgroup/connect4", 0, 1, "ic_connect4", true),
            at("cgroup/connect4", 1, 2, "calico_connect_", false),
            at("cgroup/sendmsg6", 0, 3, "calico_sendmsg_", false),
        ];
        let f = findings(&classify(&found));
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!((f[0].kind, f[0].order), (Kind::Note, Order::AfterOurs));
        assert_eq!(
            (f[1].kind, f[1].order),
            (Kind::Conflict, Order::OursNotAttached)
        );
        assert!(f[1].fix.contains("bpfConnectTimeLoadBalancing: Disabled"));
    }

    #[test]
    fn unknown_programs_only_matter_before_ours_at_rewriting_hooks() {
        let found = [
            at("cgroup/connect6", 0, 1, "lb6", false),
            at("cgroup/connect6", 1, 2, "ic_connect6", true),
            at("cgroup/connect6", 2, 3, "after6", false),
            at("sock_ops", 0, 4, "tuner", false),
            at("sock_ops", 1, 5, "ic_sockops", true),
            // Another installation's program before ours: acts only on its own pods.
            at("cgroup/connect4", 0, 6, "ic_connect4", false),
            at("cgroup/connect4", 1, 7, "ic_connect4", true),
        ];
        let programs = classify(&found);
        assert_eq!(programs[2].order, Order::AfterOurs);
        assert_eq!(programs[3].order, Order::BeforeOurs);
        assert!(programs[5].known.unwrap().contains("another interceptor"));
        let f = findings(&programs);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(
            (f[0].kind, f[0].id, f[0].hook),
            (Kind::Order, 1, "cgroup/connect6")
        );
    }

    #[test]
    fn kernel_names_are_cut_at_15_bytes() {
        assert_eq!(kernel_name("cil_sock6_connect"), "cil_sock6_conne");
        assert!(known("cil_sock6_conne").is_some());
        assert!(known("sock4_connect").is_some());
        assert!(known("calico_connect_").is_some());
        assert!(known("cil_sock4_recvm").is_none());
    }
}
