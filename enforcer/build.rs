//! Builds the eBPF object (enforcer-ebpf) with the nightly toolchain and embeds it.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let meta = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = meta.parent().ok_or_else(|| anyhow!("enforcer has no parent directory"))?;
    let ebpf = root.join("enforcer-ebpf");
    let ebpf = ebpf.to_str().context("non-UTF-8 path")?;
    println!("cargo:rerun-if-changed={}", root.join("enforcer-common").display());
    aya_build::build_ebpf(
        [Package { name: "enforcer-ebpf", root_dir: ebpf, no_default_features: false, features: &[] }],
        Toolchain::Custom("nightly"),
    )
}
