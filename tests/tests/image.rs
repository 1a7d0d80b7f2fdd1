//! `cargo xtask image`, the node image: built twice, the second time offline from the cache,
//! it has the same digest and the same archive bytes; its one layer (read back by GNU tar) has
//! fixed owners and times and exactly the intended contents; and in a chroot of that layer the
//! fallback's tools and the binary run, so no library is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use interceptor_tests::image;

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn blob(out: &Path, digest: &str) -> PathBuf {
    out.join("oci/blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn builds_offline_twice_with_the_same_digest_and_its_tools_run() {
    let tmp = TempDir(std::env::temp_dir().join(format!("ic-image-{}", std::process::id())));
    let (a, b) = (tmp.0.join("a"), tmp.0.join("b"));
    let Some(first) = image::build(&a, false) else {
        return;
    };
    let second = image::build(&b, true).expect("the second build");
    println!("digests: {first} / {second}");
    assert_eq!(first, second, "the same inputs gave another image");
    assert_eq!(
        std::fs::read(image::archive(&a)).unwrap(),
        std::fs::read(image::archive(&b)).unwrap(),
        "the archives differ"
    );

    // index → manifest → config and the one layer.
    let index = json(&a.join("oci/index.json"));
    let desc = &index["manifests"][0];
    assert_eq!(
        desc["annotations"]["io.containerd.image.name"],
        image::containerd_name()
    );
    let manifest = json(&blob(&a, &first));
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    let layer = blob(&a, layers[0]["digest"].as_str().unwrap());
    let config = json(&blob(&a, manifest["config"]["digest"].as_str().unwrap()));
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/interceptor"])
    );

    // GNU tar reads the layer: every entry 0/0 at one time, sorted, and what the fallback needs.
    let listing = run(Command::new("tar")
        .args(["--numeric-owner", "--full-time", "-tvzf"])
        .arg(&layer));
    let mut paths = Vec::new();
    let mut times = std::collections::BTreeSet::new();
    for line in listing.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f[1], "0/0", "{line}");
        times.insert(format!("{} {}", f[3], f[4]));
        paths.push(f[5].trim_end_matches('/').to_string());
    }
    assert_eq!(times.len(), 1, "more than one mtime: {times:?}");
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted, "entries not in order");
    for want in [
        "usr/local/bin/interceptor",
        "usr/sbin/xtables-nft-multi",
        "usr/sbin/xtables-legacy-multi",
        "usr/sbin/iptables",
        "usr/sbin/nft",
        "usr/bin/nsenter",
        "etc/alternatives/iptables-restore",
        "etc/passwd",
    ] {
        assert!(paths.iter().any(|p| p == want), "{want} missing");
    }
    for unwanted in [
        "bin/sh",
        "bin/bash",
        "usr/bin/perl",
        "var/lib/dpkg",
        "usr/share/man",
        "usr/share/locale",
        "usr/bin/mount",
    ] {
        assert!(
            !paths
                .iter()
                .any(|p| p == unwanted || p.starts_with(&format!("{unwanted}/"))),
            "{unwanted} is in the image"
        );
    }
    println!(
        "layer: {} entries, {} bytes compressed",
        paths.len(),
        std::fs::metadata(&layer).unwrap().len()
    );

    // The tools run in a chroot of the layer alone.
    let root = tmp.0.join("rootfs");
    std::fs::create_dir_all(&root).unwrap();
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&layer)
        .arg("-C")
        .arg(&root));
    for (tool, expect) in [
        ("iptables", "nf_tables"),
        ("iptables-legacy", "legacy"),
        ("ip6tables-nft-restore", "nf_tables"),
        ("nft", "nftables"),
        ("nsenter", "util-linux"),
        ("interceptor", "interceptor"),
    ] {
        let out = Command::new("chroot")
            .arg(&root)
            .arg(tool)
            .arg("--version")
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        println!("{tool} --version: {}", text.trim());
        assert!(
            out.status.success() && text.contains(expect),
            "{tool} does not run in the image: {text}"
        );
    }
}
