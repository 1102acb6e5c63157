//! Host tests and target type-checks.

use anyhow::Result;
use std::process::Command;

use crate::deps::{debian_cargo, run};
use crate::{root, step};

/// `cargo test --workspace` on the host toolchain.
pub fn host_tests() -> Result<()> {
    step("host tests: cargo test --workspace");
    run(Command::new("cargo")
        .current_dir(root())
        .args(["test", "--workspace", "--release"]))
}

/// Type-checks smudge-core and smudge-cli for x86_64-pc-windows-msvc (build-std) and, when
/// asked, for the Linux kernel target (needs the built kernel tree).
pub fn check_targets(kernel: bool) -> Result<()> {
    step("type-check smudge-core for x86_64-pc-windows-msvc (build-std)");
    run(debian_cargo()
        .current_dir(root())
        .args([
            "check",
            "-p",
            "smudge-core",
            "-Zbuild-std=core",
            "--target",
            "x86_64-pc-windows-msvc",
        ])
        .env("CARGO_TARGET_DIR", root().join("target/check-msvc")))?;
    // The user tool's Windows backend (`cli/src/os/windows.rs`) is compiled only for Windows.
    // It needs std; panic_abort too, since the workspace profiles set panic = "abort".
    step("type-check smudge-cli for x86_64-pc-windows-msvc (build-std)");
    run(debian_cargo()
        .current_dir(root())
        .args([
            "check",
            "-p",
            "smudge-cli",
            "-Zbuild-std=std,panic_abort",
            "--target",
            "x86_64-pc-windows-msvc",
        ])
        .env("CARGO_TARGET_DIR", root().join("target/check-cli-msvc")))?;
    if kernel {
        crate::step("(kernel target check runs with `cargo xtask linux`)");
    }
    Ok(())
}
