//! Builds the device component (`guest-device/`) for `wasm32-wasip2` so that a
//! plain `cargo build` / `cargo test` from a fresh clone has it.
//!
//! Three builds of the same crate:
//! - `sandnic_device.wasm`: the shipped device (state version 1), embedded in
//!   the `sandnic` binary;
//! - `sandnic_device_v2.wasm`: device version 2 (feature `v2`), used by the
//!   hot-swap and cross-version tests;
//! - `sandnic_device_hostile.wasm`: misbehaving on purpose (feature
//!   `hostile`), used by the containment tests only.
//!
//! The child cargo gets its own target directory (sharing ours would deadlock
//! on cargo's build lock) and a clean environment: flags meant for the host
//! build (RUSTFLAGS, a build target, wrappers) must not leak into a wasm build.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const VARIANTS: [(&str, &str); 3] = [
    ("sandnic_device.wasm", ""),
    ("sandnic_device_v2.wasm", "v2"),
    ("sandnic_device_hostile.wasm", "hostile"),
];

const LEAKY_ENV: [&str; 10] = [
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_MAKEFLAGS",
    // The guest is always built by the toolchain rust-toolchain.toml pins
    // (which has the wasm32-wasip2 target), even when the host is built by
    // another one (cargo +nightly fuzz): rustup's cargo picks it when these
    // do not point elsewhere.
    "RUSTUP_TOOLCHAIN",
    "RUSTC",
];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest_dir.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let guest_target = guest_target_dir(&out_dir, &workspace);

    for path in [
        "guest-device/src",
        "guest-device/Cargo.toml",
        "wit",
        "Cargo.lock",
        "Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(path).display());
    }

    for (file, features) in VARIANTS {
        build_guest(&workspace, &guest_target, features);
        let built = guest_target.join("wasm32-wasip2/release/sandnic_device.wasm");
        let dest = out_dir.join(file);
        std::fs::copy(&built, &dest)
            .unwrap_or_else(|e| panic!("copying {} to {}: {e}", built.display(), dest.display()));
    }
    println!(
        "cargo:rustc-env=SANDNIC_COMPONENT_DIR={}",
        out_dir.display()
    );
}

/// `<target>/guest`, next to the profile directories, so debug and release
/// host builds share one guest build.
fn guest_target_dir(out_dir: &Path, workspace: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "build"))
        .and_then(|build| build.parent()?.parent())
        .map(|target| target.join("guest"))
        .unwrap_or_else(|| workspace.join("target/guest"))
}

fn build_guest(workspace: &Path, target_dir: &Path, features: &str) {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "sandnic-device",
            "--target",
            "wasm32-wasip2",
        ])
        .arg("--target-dir")
        .arg(target_dir);
    if !features.is_empty() {
        cmd.args(["--features", features]);
    }
    for var in LEAKY_ENV {
        cmd.env_remove(var);
    }
    // Measured: opt-level 3 with LTO is 3-4x faster than s/z for save/load;
    // keep function names so traps have readable backtraces.
    cmd.env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "3")
        .env("CARGO_PROFILE_RELEASE_LTO", "true")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo");
    let status = cmd
        .status()
        .expect("running cargo for the wasm32-wasip2 device component");
    if !status.success() {
        panic!(
            "building the device component failed (features {features:?}). \
             Is the target installed? Run: rustup target add wasm32-wasip2"
        );
    }
}
