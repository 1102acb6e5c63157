//! System packages and tools, installed only when missing.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::step;

/// Debian packages the full build needs, with a file each one provides (to skip dpkg queries).
const PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "/usr/bin/rustc"),
    ("cargo-web", "/usr/bin/cargo"),
    (
        "rust-web-src",
        "/usr/lib/rustlib/src/rust/library/core/Cargo.toml",
    ),
    ("linux-source-6.12", "/usr/src/linux-source-6.12.tar.xz"),
    ("clang-19", "/usr/bin/clang-19"),
    ("lld-19", "/usr/bin/ld.lld-19"),
    ("llvm-19", "/usr/bin/llvm-ar-19"),
    ("libclang-19-dev", "/usr/lib/llvm-19/lib/libclang.so"),
    ("libelf-dev", "/usr/include/libelf.h"),
    ("libssl-dev", "/usr/include/openssl/ssl.h"),
    ("bc", "/usr/bin/bc"),
    ("flex", "/usr/bin/flex"),
    ("bison", "/usr/bin/bison"),
    ("cpio", "/usr/bin/cpio"),
    ("bochs", "/usr/bin/bochs-bin"),
    ("bochsbios", "/usr/share/bochs/BIOS-bochs-latest"),
    ("vgabios", "/usr/share/vgabios/vgabios.bin"),
    ("busybox-static", "/bin/busybox"),
    ("isolinux", "/usr/lib/ISOLINUX/isolinux.bin"),
    (
        "syslinux-common",
        "/usr/lib/syslinux/modules/bios/ldlinux.c32",
    ),
    ("xorriso", "/usr/bin/xorriso"),
    ("osslsigncode", "/usr/bin/osslsigncode"),
    ("openssl", "/usr/bin/openssl"),
    // KVM's selftests (xtask/src/selftests.rs): static glibc binaries; headers_install.
    ("gcc", "/usr/bin/gcc"),
    ("make", "/usr/bin/make"),
    ("libc6-dev", "/usr/lib/x86_64-linux-gnu/libc.a"),
    ("rsync", "/usr/bin/rsync"),
];

/// Where builds that outlive a clone are cached (the kernel, bindgen, the test certificate).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("SMUDGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/smudge"))
}

/// bindgen-cli 0.70.1 (Debian's 0.60 is too old for Linux 6.12).
pub fn bindgen() -> PathBuf {
    cache_dir().join("tools/bindgen-0.70.1/bin/bindgen")
}

/// Installs every missing package and tool.
pub fn ensure_all() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, f)| !Path::new(f).exists())
        .map(|(p, _)| *p)
        .collect();
    if !missing.is_empty() {
        step(&format!(
            "installing Debian packages: {}",
            missing.join(" ")
        ));
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !bindgen().exists() {
        step("installing bindgen-cli 0.70.1 (about 1.5 minutes)");
        run(Command::new("cargo")
            .args(["install", "--locked", "bindgen-cli@0.70.1", "--root"])
            .arg(cache_dir().join("tools/bindgen-0.70.1")))?;
    }
    Ok(())
}

/// Runs a command, streaming its output, and fails with its status.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// A command that uses Debian's Rust 1.96 (full library source, build-std, kernel builds).
pub fn debian_cargo() -> Command {
    let mut c = Command::new("/usr/bin/cargo");
    let path = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("/usr/bin:{path}"))
        .env("RUSTC", "/usr/bin/rustc")
        .env("RUSTDOC", "/usr/bin/rustdoc")
        .env("RUSTC_BOOTSTRAP", "1")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET");
    c
}
