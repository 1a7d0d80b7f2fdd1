//! `interceptor apply`: validate, choose the backend, then print (dry run) or install.

use anyhow::{bail, Result};
use interceptor_common::config::{Config, ConfigError};

use crate::backend::netfilter::{self, Mode, Outcome};
use crate::backend::{exec, iptables, nftables};
use crate::cli::{ApplyArgs, BackendKind};

/// The backend that will serve the pod, and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub backend: BackendKind,
    pub why: String,
}

/// Resolves `--backend` (and Istio's `--native-nftables`) to a concrete backend.
pub fn choose_backend(args: &ApplyArgs, _cfg: &Config) -> Result<Choice, ConfigError> {
    if args.native_nftables && !matches!(args.backend, BackendKind::Auto | BackendKind::Nftables) {
        return Err(ConfigError::new(
            "--native-nftables",
            "true",
            format!("conflicts with --backend {:?}", args.backend).to_lowercase(),
        ));
    }
    let choice = |backend, why: &str| {
        Ok(Choice {
            backend,
            why: why.to_string(),
        })
    };
    match args.backend {
        BackendKind::Ebpf => Err(ConfigError::new(
            "--backend",
            "ebpf",
            "the eBPF backend is not yet supported by this build; use iptables or nftables",
        )),
        BackendKind::Iptables => choice(BackendKind::Iptables, "requested with --backend iptables"),
        BackendKind::Nftables => choice(BackendKind::Nftables, "requested with --backend nftables"),
        BackendKind::Auto if args.native_nftables => {
            choice(BackendKind::Nftables, "--native-nftables")
        }
        BackendKind::Auto if exec::available("iptables-restore") => choice(
            BackendKind::Iptables,
            "eBPF backend not yet available; iptables-restore found",
        ),
        BackendKind::Auto if exec::available("nft") => choice(
            BackendKind::Nftables,
            "eBPF backend not yet available; nft found",
        ),
        BackendKind::Auto => Err(ConfigError::new(
            "--backend",
            "auto",
            "no usable backend: neither iptables-restore nor nft is installed",
        )),
    }
}

/// What `--dry-run` prints: exactly the documents that would be fed to the tools.
pub fn render(backend: BackendKind, cfg: &Config) -> String {
    match backend {
        BackendKind::Nftables => nftables::render(cfg),
        _ => {
            let docs = iptables::render(cfg);
            let mut out = docs.v4;
            if let Some(v6) = docs.v6 {
                out.push_str(&v6);
            }
            out
        }
    }
}

/// Runs `apply` after validation. Validation errors come back as `Err(ConfigError)` so that
/// main can exit 2 having applied nothing.
pub fn run(args: &ApplyArgs) -> Result<Result<(), ConfigError>> {
    let cfg = match crate::config::load(args) {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    let choice = match choose_backend(args, &cfg) {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    if args.run_validation {
        bail!("--run-validation is not supported yet: interception is not validated by this build");
    }
    if args.dry_run {
        eprintln!("# backend: {:?} ({})", choice.backend, choice.why);
        print!("{}", render(choice.backend, &cfg));
        return Ok(Ok(()));
    }
    if args.skip_rule_apply {
        eprintln!("--skip-rule-apply: nothing applied");
        return Ok(Ok(()));
    }
    let netns = args.network_namespace.as_deref();
    let mode = Mode {
        reconcile: args.reconcile,
        force_apply: args.force_apply,
        cleanup_only: args.cleanup_only,
    };
    let outcome = match choice.backend {
        BackendKind::Nftables => netfilter::apply_nftables(netns, &cfg, mode)?,
        _ => {
            let bin = netfilter::choose_binaries(netns, args.force_iptables_binary);
            netfilter::apply_iptables(netns, &cfg, &bin, mode)?
        }
    };
    let what = match outcome {
        Outcome::Applied => "rules applied",
        Outcome::AlreadyInPlace => "rules already in place; nothing to do",
        Outcome::Reconciled => "rules replaced",
        Outcome::Removed => "rules removed",
        Outcome::NothingToRemove => "no rules of ours found; nothing to remove",
    };
    eprintln!(
        "interceptor: {what} ({:?} backend: {})",
        choice.backend, choice.why
    );
    Ok(Ok(()))
}
