//! `interceptor apply`: istio-iptables' flags, validated into a config; the backend chosen and
//! installed by the install service; or printed (dry run), or validated (`--run-validation`).

use std::path::Path;

use anyhow::Result;
use interceptor_common::config::{Config, ConfigError};

use super::args::ApplyArgs;
use super::pod::{self, PodAddArgs, PodCommand};
use crate::backend::ebpf::{Loaded, Pins};
use crate::backend::netfilter::{Mode, Outcome};
use crate::model::BackendKind;
use crate::service::install::{self, Installed, Request};
use crate::service::probe;
use crate::validate;

/// The netns a command targets: the given one, else this process's own.
fn netns_or_self(p: Option<&Path>) -> &Path {
    p.unwrap_or(Path::new("/proc/self/ns/net"))
}

/// The eBPF step of `apply`: loads the programs if needed, then registers (or, with
/// `--cleanup-only`, unregisters) the pod. Says what it did.
fn apply_ebpf(args: &ApplyArgs, cfg: &Config) -> Result<&'static str> {
    let pins = Pins::new(&args.ebpf.bpffs);
    let netns = netns_or_self(args.network_namespace.as_deref());
    if args.cleanup_only {
        if !pins.loaded() {
            return Ok("eBPF programs not loaded; nothing to remove");
        }
        return Ok(if pins.maps()?.remove(netns)? {
            "pod unregistered"
        } else {
            "pod was not registered"
        });
    }
    crate::progress::step(format!(
        "checking the eBPF programs under {}",
        args.ebpf.bpffs.display()
    ));
    let loaded =
        install::load_programs(&pins, &args.ebpf.loading(args.no_counters), args.ebpf_log)?;
    crate::progress::step(format!("registering the pod (netns {})", netns.display()));
    let handle = install::register_ebpf(&pins, netns, cfg, None)?;
    tracing::info!(
        cookie = handle.netns_cookie,
        pod_id = handle.pod_id,
        "pod registered"
    );
    Ok(match loaded {
        Loaded::Fresh => "programs loaded and attached; pod registered",
        Loaded::Upgraded(_) => "programs upgraded in place; pod registered",
        Loaded::Already => "pod registered",
    })
}

/// Runs `apply` after validation. Validation errors come back as `Err(ConfigError)` so that
/// main can exit 2 having applied nothing.
pub fn run(args: &ApplyArgs) -> Result<Result<(), ConfigError>> {
    let cfg = match args.load() {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    if args.probe && !args.dry_run {
        return Ok(Err(ConfigError::new(
            "--probe",
            "true",
            "only means something with --dry-run (a real apply always asks the kernel)",
        )));
    }
    // Acting on the caller's own netns must be asked for: on a node that is the host's.
    let acts = !(args.dry_run || args.run_validation || args.skip_rule_apply);
    if acts && args.network_namespace.is_none() {
        if !args.host {
            return Ok(Err(ConfigError::missing(
                "--network-namespace",
                "apply changes a network namespace's interception: name the pod's \
                 (--network-namespace /var/run/netns/NAME), or pass --host to act on this \
                 process's own (on a node, the host's)",
            )));
        }
        eprintln!(
            "interceptor: --host: acting on this process's OWN network namespace ({}), not a pod's",
            crate::netns::describe_own()
        );
    }
    if args.cni_mode {
        if args.network_namespace.is_none() {
            return Ok(Err(ConfigError::new(
                "--cni-mode",
                "true",
                "needs --network-namespace: the pod's netns as seen from the host",
            )));
        }
        crate::backend::exec::scope_xtables_lock_to_pod_netns();
    }
    if args.dry_run && !args.probe && args.backend == BackendKind::Auto && !args.native_nftables {
        // A dry run loads nothing into the kernel, so `auto` is not probed here.
        if let Some(out) = dry_run_unprobed(args, &cfg)? {
            print!("{out}");
            return Ok(Ok(()));
        }
    }
    let ebpf_missing = || probe::ebpf_missing(&args.ebpf.bpffs, args.ebpf.cgroup.as_deref());
    let mut choice = match install::choose(args.backend, args.native_nftables, ebpf_missing, &cfg) {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    if args.run_validation {
        // Istio's validation mode: check that interception works, apply nothing.
        return match args.validate_params(&cfg) {
            Ok(p) => validate::run(&p),
            Err(e) => Ok(Err(e)),
        };
    }
    if args.dry_run {
        eprintln!("# backend: {} ({})", choice.backend.words(), choice.why);
        print!(
            "{}",
            install::render(choice.backend, &cfg, args.network_namespace.as_deref())?
        );
        return Ok(Ok(()));
    }
    if args.skip_rule_apply {
        eprintln!("--skip-rule-apply: nothing applied");
        return Ok(Ok(()));
    }
    if choice.backend == BackendKind::Ebpf
        && !args.cleanup_only
        && crate::daemon::client::running(&args.socket)
    {
        // A daemon owns the datapath on this node: register through it.
        return via_daemon(args);
    }
    let req = Request {
        requested: args.backend,
        netns: args.network_namespace.as_deref(),
        cfg: &cfg,
        forced: args.force_iptables_binary,
        mode: Mode {
            reconcile: args.reconcile,
            force_apply: args.force_apply,
            cleanup_only: args.cleanup_only,
        },
    };
    let what = match install::install(&req, &mut choice, || apply_ebpf(args, &cfg))? {
        Installed::Ebpf(what) => {
            eprintln!("interceptor: {what} (eBPF backend: {})", choice.why);
            return Ok(Ok(()));
        }
        Installed::Netfilter(Outcome::Applied) => "rules applied",
        Installed::Netfilter(Outcome::AlreadyInPlace) => "rules already in place; nothing to do",
        Installed::Netfilter(Outcome::Reconciled) => "rules replaced",
        Installed::Netfilter(Outcome::Removed) => "rules removed",
        Installed::Netfilter(Outcome::NothingToRemove) => {
            "no rules of ours found; nothing to remove"
        }
    };
    eprintln!(
        "interceptor: {what} ({} backend: {})",
        choice.backend.words(),
        choice.why
    );
    Ok(Ok(()))
}

/// `apply --dry-run --backend auto` without `--probe`: what `auto` can know without loading
/// anything. A config eBPF cannot honour, or a node whose programs are already loaded here,
/// decides it (None: the normal path prints that); otherwise both possible outcomes are
/// printed, eBPF's map entries and then the fallback's rules.
fn dry_run_unprobed(args: &ApplyArgs, cfg: &Config) -> Result<Option<String>> {
    if interceptor_common::policy::ebpf_unsupported(cfg).is_some()
        || Pins::new(&args.ebpf.bpffs).loaded()
    {
        return Ok(None);
    }
    let netns = args.network_namespace.as_deref();
    let fallback = install::netfilter_fallback(String::new()).ok();
    eprintln!(
        "# backend: not probed (a dry run loads nothing into the kernel): eBPF if the kernel \
         accepts the programs at apply time, else {}. `interceptor doctor`, or this dry run \
         with --probe, says which; both follow",
        fallback.as_ref().map_or(
            "no fallback (neither iptables-restore nor nft found)".into(),
            |c| { c.backend.words().to_string() }
        )
    );
    let mut out = String::from("# if eBPF: the pod's map entries\n");
    out.push_str(&install::render(BackendKind::Ebpf, cfg, netns)?);
    if let Some(c) = fallback {
        out.push_str(&format!(
            "# otherwise: the {} fallback's rules\n",
            c.backend.words()
        ));
        out.push_str(&install::render(c.backend, cfg, netns)?);
    }
    Ok(Some(out))
}

fn via_daemon(args: &ApplyArgs) -> Result<Result<(), ConfigError>> {
    let cmd = PodCommand::Add(Box::new(PodAddArgs {
        ips: vec![],
        pod: None,
        apply: args.clone(),
    }));
    eprintln!(
        "interceptor: registering through the daemon at {}",
        args.socket.display()
    );
    pod::run(&cmd)
}
