// Builds interceptor-ebpf for bpfel-unknown-none with the pinned nightly (ebpf-toolchain.env) and
// leaves the object in OUT_DIR, where src/backend/ebpf.rs embeds it (aya-template's flow).
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    // Read at run time, not baked in with env!: a target directory copied from another
    // checkout would otherwise keep building that checkout's eBPF crate.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let workspace = std::path::Path::new(&manifest_dir)
        .parent()
        .expect("workspace root");
    let root = workspace.join("interceptor-ebpf");
    let root = root.to_str().expect("utf-8 path");
    let nightly = pinned_nightly(&workspace.join("ebpf-toolchain.env"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "interceptor-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&nightly),
    )
    .with_context(|| {
        format!("building interceptor-ebpf with {nightly} (scripts/setup.sh installs it)")
    })
}

/// `EBPF_NIGHTLY` from the pin file: the eBPF crate is built with that nightly and no other
/// (`nightly` would be whatever a machine last updated to).
fn pinned_nightly(pins: &std::path::Path) -> anyhow::Result<String> {
    println!("cargo:rerun-if-changed={}", pins.display());
    let text = std::fs::read_to_string(pins)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", pins.display()))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("EBPF_NIGHTLY="))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| anyhow::anyhow!("no EBPF_NIGHTLY= line in {}", pins.display()))
}
