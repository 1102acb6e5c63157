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

/// The shims' sizes against issue #12's ceilings: 600 lines of Rust for Linux (besides the C
/// helper), 900 for `windows-driver/src` besides the hand-written ntoskrnl declarations of
/// `nt.rs`. Every line counts, blank and comment lines too; lines of code (neither blank nor a
/// comment) are reported beside them. Above a ceiling the build fails, so logic both drivers need
/// cannot creep back into a shim.
pub fn shim_sizes() -> Result<()> {
    let root = root();
    let windows: Vec<_> = std::fs::read_dir(root.join("windows-driver/src"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "rs") && !p.ends_with("nt.rs"))
        .collect();
    let shims = [
        (
            "linux-driver/smudge_main.rs",
            vec![root.join("linux-driver/smudge_main.rs")],
            600,
        ),
        ("windows-driver/src besides nt.rs", windows, 900),
    ];
    for (name, files, ceiling) in shims {
        let (mut lines, mut code) = (0, 0);
        for f in &files {
            let text = std::fs::read_to_string(f)?;
            lines += text.lines().count();
            code += text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("//"))
                .count();
        }
        step(&format!(
            "{name}: {lines} lines (at most {ceiling}), {code} of them code"
        ));
        anyhow::ensure!(
            lines <= ceiling,
            "{name} holds {lines} lines, above its ceiling of {ceiling}: move what is not \
             OS-specific into core"
        );
    }
    Ok(())
}
