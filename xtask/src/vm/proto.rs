//! What the host tells the guest (`/vm/plan`) and what the guest reports back (marker lines on
//! the second serial port, `/dev/ttyS1`, which carries nothing else: kernel messages and test
//! output go to the console on ttyS0). Both are tab-separated lines; compiled into the host
//! side (xtask) and the guest side (the `vm-init` binary).

use std::fmt;

/// Where the plan lives inside the initramfs.
pub const PLAN_PATH: &str = "/vm/plan";
/// Guest path of the static `interceptor` binary.
pub const INTERCEPTOR: &str = "/vm/bin/interceptor";
/// Guest folder of the test binaries.
pub const TEST_DIR: &str = "/vm/tests";
/// The results port (the guest's side of QEMU's second `-serial`).
#[allow(dead_code)] // guest side only
pub const RESULTS_TTY: &str = "/dev/ttyS1";

/// How a command's privileges are cut down in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// Root with every capability: the normal case.
    Normal,
    /// bpf() denied by a seccomp filter (EPERM), inherited by every child process.
    Seccomp,
    /// CAP_BPF and CAP_SYS_ADMIN dropped (bounding, ambient, effective, permitted,
    /// inheritable). No netns can be made without CAP_SYS_ADMIN, so only the doctor, `auto`
    /// and the raw probes run this way.
    NoCaps,
    /// In an identity-mapped user namespace (with its own mount and network namespaces, as a
    /// rootless container): root with every capability *there*, none in the initial user
    /// namespace, which is where bpf() checks CAP_BPF/CAP_SYS_ADMIN. Network namespaces,
    /// iptables and nft work as in such a container, so the fallback suites run this way.
    UserNs,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Normal, Mode::Seccomp, Mode::NoCaps, Mode::UserNs];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::Seccomp => "bpf-denied",
            Mode::NoCaps => "no-caps",
            Mode::UserNs => "userns",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Mode::Normal => "root, all capabilities",
            Mode::Seccomp => "bpf() denied by seccomp (EPERM)",
            Mode::NoCaps => "CAP_BPF + CAP_SYS_ADMIN dropped",
            Mode::UserNs => "user namespace: no capability in the initial user ns",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == s)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One test-binary run of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Unique within a plan, e.g. `fallback_e2e@bpf-denied`.
    pub id: String,
    pub mode: Mode,
    /// Test binary name (its file under [`TEST_DIR`]).
    pub bin: String,
    /// Whether it runs, by what `auto` chose (for the plan's first auto case) in this mode.
    pub when: When,
    /// libtest arguments (filters, `--skip`, `--exact`, …).
    pub args: Vec<String>,
    pub timeout_secs: u64,
}

/// Condition of a [`Run`] on what `auto` chose in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Always,
    /// The run needs the eBPF backend: only when `auto` picks eBPF there.
    AutoEbpf,
    /// The fallback-only variant of a run: only when `auto` does not pick eBPF.
    AutoNotEbpf,
}

impl When {
    pub fn name(self) -> &'static str {
        match self {
            When::Always => "always",
            When::AutoEbpf => "auto-ebpf",
            When::AutoNotEbpf => "auto-not-ebpf",
        }
    }
    pub fn parse(s: &str) -> Option<When> {
        [When::Always, When::AutoEbpf, When::AutoNotEbpf]
            .into_iter()
            .find(|w| w.name() == s)
    }
}

/// A pod configuration whose `auto` choice is reported (`apply --dry-run`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoCase {
    pub label: String,
    pub args: Vec<String>,
}

/// Everything the guest init does, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub label: String,
    /// Guest paths of modules to load, dependencies first.
    pub modules: Vec<String>,
    /// Environment for every command (besides PATH, INTERCEPTOR_BIN, …).
    pub env: Vec<(String, String)>,
    /// Modes in which probes, `interceptor doctor` and the auto cases run.
    pub probe_modes: Vec<Mode>,
    pub auto: Vec<AutoCase>,
    pub runs: Vec<Run>,
}

// Compiled into both sides: the host renders, the guest parses.
#[allow(dead_code)]
impl Plan {
    pub fn render(&self) -> String {
        let mut out = format!("label\t{}\n", self.label);
        for m in &self.modules {
            out.push_str(&format!("module\t{m}\n"));
        }
        for (k, v) in &self.env {
            out.push_str(&format!("env\t{k}\t{v}\n"));
        }
        for m in &self.probe_modes {
            out.push_str(&format!("probe-mode\t{m}\n"));
        }
        let tail = |args: &[String]| args.iter().map(|a| format!("\t{a}")).collect::<String>();
        for a in &self.auto {
            out.push_str(&format!("auto\t{}{}\n", a.label, tail(&a.args)));
        }
        for r in &self.runs {
            out.push_str(&format!(
                "run\t{}\t{}\t{}\t{}\t{}{}\n",
                r.id,
                r.mode,
                r.bin,
                r.when.name(),
                r.timeout_secs,
                tail(&r.args)
            ));
        }
        out
    }

    pub fn parse(text: &str) -> Result<Plan, String> {
        let mut plan = Plan::default();
        for (n, line) in text.lines().enumerate() {
            let f: Vec<&str> = line.split('\t').collect();
            let bad = || format!("plan line {}: {line:?}", n + 1);
            let mode = |s: &str| Mode::parse(s).ok_or_else(bad);
            match f[0] {
                "" => {}
                "label" => plan.label = f.get(1).unwrap_or(&"").to_string(),
                "module" => plan.modules.push(f.get(1).ok_or_else(bad)?.to_string()),
                "env" if f.len() == 3 => plan.env.push((f[1].into(), f[2].into())),
                "probe-mode" if f.len() == 2 => plan.probe_modes.push(mode(f[1])?),
                "auto" if f.len() >= 2 => plan.auto.push(AutoCase {
                    label: f[1].into(),
                    args: f[2..].iter().map(|a| a.to_string()).collect(),
                }),
                "run" if f.len() >= 6 => plan.runs.push(Run {
                    id: f[1].into(),
                    mode: mode(f[2])?,
                    bin: f[3].into(),
                    when: When::parse(f[4]).ok_or_else(bad)?,
                    timeout_secs: f[5].parse().map_err(|_| bad())?,
                    args: f[6..].iter().map(|a| a.to_string()).collect(),
                }),
                _ => return Err(bad()),
            }
        }
        Ok(plan)
    }
}

/// Marker names (first field of a results line).
pub mod mark {
    /// `ready  <uname -r>  <uname -v>`
    pub const READY: &str = "ready";
    /// `modules  <loaded>  <failed>  <millis>`
    pub const MODULES: &str = "modules";
    /// `modfail  <module>  <error>`
    pub const MODFAIL: &str = "modfail";
    /// `probe  <mode>  <feature>  ok|no  <detail>`
    pub const PROBE: &str = "probe";
    /// `doctor  <mode>  <exit code>  <millis>`
    pub const DOCTOR: &str = "doctor";
    /// `doctorline  <mode>  <line>` (stdout then stderr)
    pub const DOCTOR_LINE: &str = "doctorline";
    /// `auto  <mode>  <case label>  <backend or "error">  <why or error>`
    pub const AUTO: &str = "auto";
    /// `case  <run id>  <test name>  ok|FAILED|ignored`
    pub const CASE: &str = "case";
    /// `failout  <run id>  <line>`: output of failed tests (libtest's failures section).
    pub const FAIL_OUT: &str = "failout";
    /// `run  <run id>  <status>  <exit>  <passed>  <failed>  <ignored>  <millis>  <note>`;
    /// status: ok | failed | timeout | skipped | error
    pub const RUN: &str = "run";
    /// `note  <text>`
    pub const NOTE: &str = "note";
    /// `done  success|failure  <millis since init started>`
    pub const DONE: &str = "done";
}

/// A results line with tabs and newlines inside fields replaced by spaces.
pub fn line(fields: &[&str]) -> String {
    let clean: Vec<String> = fields
        .iter()
        .map(|f| f.replace(['\t', '\n', '\r'], " "))
        .collect();
    format!("{}\n", clean.join("\t"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_roundtrip() {
        let plan = Plan {
            label: "6.1".into(),
            modules: vec!["/lib/modules/k/a.ko".into()],
            env: vec![("CI".into(), "true".into())],
            probe_modes: vec![Mode::Normal, Mode::Seccomp],
            auto: vec![AutoCase {
                label: "default".into(),
                args: vec!["-i".into(), "*".into(), "-b".into(), "".into()],
            }],
            runs: vec![Run {
                id: "x@normal".into(),
                mode: Mode::UserNs,
                bin: "x".into(),
                when: When::AutoEbpf,
                args: vec!["--skip".into(), "ebpf".into()],
                timeout_secs: 60,
            }],
        };
        assert_eq!(Plan::parse(&plan.render()).unwrap(), plan);
        let mut bare = plan.clone();
        bare.auto[0].args.clear();
        bare.runs[0].args.clear();
        assert_eq!(Plan::parse(&bare.render()).unwrap(), bare);
    }
}
