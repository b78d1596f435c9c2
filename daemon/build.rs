//! Builds chaosd's eBPF programs (ebpf/chaosd-ebpf) for bpfel-unknown-none
//! with the nightly toolchain and bpf-linker, and leaves the object in
//! OUT_DIR for `include_bytes_aligned!`.
//!
//! Not `aya_build::build_ebpf`: that runs `cargo build --package` from this
//! crate's directory, and our programs crate is deliberately its own
//! workspace (nightly-only, BPF target) so that `cargo build --workspace` on
//! stable never tries to build it for the host.
use std::{env, fs, path::PathBuf, process::Command};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let ebpf_dir = manifest_dir.join("../ebpf/chaosd-ebpf").canonicalize().unwrap();
    let common_dir = manifest_dir.join("../ebpf/chaosd-common").canonicalize().unwrap();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    for dir in [&ebpf_dir, &common_dir] {
        println!("cargo:rerun-if-changed={}", dir.join("src").display());
        println!("cargo:rerun-if-changed={}", dir.join("Cargo.toml").display());
    }

    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release", "-Z", "build-std=core"])
        .args(["--target", "bpfel-unknown-none", "--bins"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&ebpf_dir)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["--cfg=bpf_target_arch=\"x86_64\"", "-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
        );
    // The outer cargo's settings must not leak into the nightly build.
    for key in ["RUSTC", "RUSTC_WORKSPACE_WRAPPER", "RUSTUP_TOOLCHAIN", "CARGO_TARGET_DIR", "RUSTFLAGS"] {
        cmd.env_remove(key);
    }
    let output = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run `rustup run nightly cargo` to build the eBPF programs: {e}; run scripts/setup.sh")
    });
    if !output.status.success() {
        panic!(
            "building the eBPF programs failed (is scripts/setup.sh done: nightly, rust-src, bpf-linker?)\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let built = target_dir.join("bpfel-unknown-none/release/chaosd");
    fs::copy(&built, out_dir.join("chaosd.bpf.o")).unwrap_or_else(|e| panic!("copy {}: {e}", built.display()));
}
