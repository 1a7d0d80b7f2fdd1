// Rebuild when bpf-linker changes: the link step depends on it, but cargo cannot see that.
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
