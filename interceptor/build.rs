// Builds interceptor-ebpf for bpfel-unknown-none with the nightly toolchain and leaves the object in
// OUT_DIR, where src/backend/ebpf.rs embeds it (aya-template's flow).
fn main() -> anyhow::Result<()> {
    // Read at run time, not baked in with env!: a target directory copied from another
    // checkout would otherwise keep building that checkout's eBPF crate.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .expect("workspace root")
        .join("interceptor-ebpf");
    let root = root.to_str().expect("utf-8 path");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "interceptor-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
