//! Build the test guest with its own cargo invocation and target directory,
//! so its freestanding link flags never reach the host crates.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.join("../..").canonicalize().unwrap();
    let guest = root.join("guest");
    for p in ["src", "link.ld", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", guest.join(p).display());
    }
    println!("cargo:rerun-if-changed={}", root.join("crates/staunch-guestproto/src").display());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("guest-target");
    let flags = [
        "-C",
        "link-arg=-nostartfiles",
        "-C",
        "link-arg=-nostdlib",
        "-C",
        "link-arg=-static",
        "-C",
        "link-arg=-no-pie",
        "-C",
        &format!("link-arg=-Wl,-T,{},--build-id=none", guest.join("link.ld").display()),
        "-C",
        "relocation-model=static",
        "-C",
        "no-redzone=yes",
        "-C",
        "target-cpu=x86-64",
        // Ring-0 code may run under an instruction emulator (KVM-PVM) that
        // lacks most SSE forms: keep the compiler from vectorizing.
        "-C",
        "llvm-args=-vectorize-loops=false",
        "-C",
        "llvm-args=-vectorize-slp=false",
    ]
    .join("\x1f");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&guest)
        .args(["build", "--release", "--target-dir"])
        .arg(&out)
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .expect("run cargo for the test guest");
    assert!(status.success(), "building the test guest failed");
    let elf = out.join("release/staunch-testguest");
    println!("cargo:rustc-env=STAUNCH_GUEST_ELF={}", elf.display());
}
