//! Builds the eBPF object (`xdp-ebpf`) with aya-build; `src/dataplane.rs`
//! embeds it from OUT_DIR. `AYA_BUILD_SKIP=1` skips it for builds that do
//! not need the object (the loader then reports it missing).
//!
//! The object needs `-Z build-std=core`: the nightly toolchain is used where
//! installed, otherwise stable with RUSTC_BOOTSTRAP=1. `XDPLB_EBPF_TOOLCHAIN`
//! overrides the choice.
use std::{env, process::Command};

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn nightly_installed() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .map(|out| out.status.success())
        .unwrap_or(false)
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=XDPLB_EBPF_TOOLCHAIN");
    if matches!(env::var("AYA_BUILD_SKIP").as_deref(), Ok("1" | "true")) {
        // aya-build skips the object; leave an empty one for include_bytes,
        // which the loader reports as missing.
        let out = env::var("OUT_DIR").context("OUT_DIR not set")?;
        std::fs::write(std::path::Path::new(&out).join("xdp-ebpf"), [])?;
    }
    // The eBPF crate sits beside this one in the workspace.
    let root = env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = std::path::Path::new(&root)
        .parent()
        .ok_or_else(|| anyhow!("{root} has no parent"))?
        .join("xdp-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?
        .to_owned();

    let toolchain_name = match env::var("XDPLB_EBPF_TOOLCHAIN") {
        Ok(name) => name,
        Err(_) if nightly_installed() => "nightly".to_owned(),
        Err(_) => "stable".to_owned(),
    };
    if toolchain_name != "nightly" && env::var_os("RUSTC_BOOTSTRAP").is_none() {
        // aya-build reads this to pass -Z build-std to the child cargo; the
        // build script is single-threaded at this point.
        env::set_var("RUSTC_BOOTSTRAP", "1");
    }
    let toolchain = if toolchain_name == "nightly" {
        Toolchain::Nightly
    } else {
        Toolchain::Custom(&toolchain_name)
    };
    aya_build::build_ebpf(
        [Package {
            name: "xdp-ebpf",
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        toolchain,
    )
}
