//! The Linux side: the cached kernel, smudge.ko (smudge-core linked in as Rust, TOOLCHAIN.md
//! approach 3), and the static `smudge` tool for the initramfs.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::deps::{bindgen, cache_dir, debian_cargo, run};
use crate::{root, step};

/// The built kernel tree (`<cache>/kernel-<key>/linux`), building it when missing.
pub fn kernel() -> Result<PathBuf> {
    let scripts = root().join("xtask/kernel");
    let out = Command::new("bash")
        .arg(scripts.join("key.sh"))
        .output()
        .context("kernel key")?;
    if !out.status.success() {
        bail!(
            "xtask/kernel/key.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dir = cache_dir().join(format!("kernel-{key}"));
    let tree = dir.join("linux");
    if tree.join("arch/x86/boot/bzImage").exists() {
        return Ok(tree);
    }
    step(&format!(
        "building Linux 6.12 with Rust into {} (3-8 minutes, cached afterwards)",
        dir.display()
    ));
    run(Command::new("bash")
        .arg(scripts.join("build-kernel.sh"))
        .arg(&dir)
        .arg(bindgen()))?;
    Ok(tree)
}

/// Codegen flags the kernel used for its own `core`, minus those cargo sets itself.
fn kernel_rustflags(kdir: &Path) -> Result<Vec<String>> {
    let cmd = std::fs::read_to_string(kdir.join("rust/.core.o.cmd"))
        .context("reading rust/.core.o.cmd")?;
    let line = cmd.lines().next().unwrap_or_default();
    let rustc_part = line.split(';').next().unwrap_or_default();
    let mut flags = Vec::new();
    for tok in rustc_part.split_whitespace() {
        let keep = (tok.starts_with("-C") || tok.starts_with("-Z"))
            && ![
                "-Cpanic=",
                "-Copt-level=",
                "-Ccodegen-units=",
                "-Cembed-bitcode=",
                "-Clto=",
                "-Zbinary_dep_depinfo",
                "-Zunstable-options",
            ]
            .iter()
            .any(|p| tok.starts_with(p));
        if keep {
            flags.push(tok.to_string());
        }
    }
    flags.push(format!(
        "@{}",
        kdir.join("include/generated/rustc_cfg").display()
    ));
    flags.extend(["-Zunstable-options", "--sysroot=/dev/null", "-L"].map(String::from));
    flags.push(kdir.join("rust").display().to_string());
    flags.push("-Cpanic=abort".into());
    Ok(flags)
}

/// Builds smudge.ko; returns its path.
pub fn module() -> Result<PathBuf> {
    let kdir = kernel()?;
    let target_dir = root().join("target/kernel");
    step("building smudge-core against the kernel's libcore");
    let flags = kernel_rustflags(&kdir)?;
    // The rlibs of this very build, as cargo reports them (the deps directory also keeps those
    // of earlier builds with other dependency sets).
    let out = debian_cargo()
        .current_dir(root())
        .args([
            "-Zjson-target-spec",
            "build",
            "--release",
            "--message-format=json-render-diagnostics",
            "-p",
            "smudge-core",
            "--target",
        ])
        .arg(kdir.join("scripts/target.json"))
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cargo build of smudge-core for the kernel")?;
    if !out.status.success() {
        bail!(
            "cargo build of smudge-core for the kernel failed: {}",
            out.status
        );
    }
    let mut rlibs: Vec<PathBuf> = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        for f in msg["filenames"].as_array().into_iter().flatten() {
            if let Some(f) = f.as_str().filter(|f| f.ends_with(".rlib")) {
                rlibs.push(PathBuf::from(f));
            }
        }
    }
    let rel = target_dir.join("target/release");
    let build = root().join("target/linux-module");
    let lib = build.join("lib");
    let _ = std::fs::remove_dir_all(&build);
    std::fs::create_dir_all(&lib)?;
    for f in ["Kbuild", "helpers.c", "smudge_main.rs"] {
        std::fs::copy(root().join("linux-driver").join(f), build.join(f))
            .with_context(|| format!("copy {f}"))?;
    }
    // Every rlib of the build: smudge-core and its crates.io dependencies.
    let objs = build.join("objs");
    std::fs::create_dir_all(&objs)?;
    for (i, r) in rlibs.iter().enumerate() {
        std::fs::copy(r, lib.join(r.file_name().unwrap_or_default()))?;
        let d = objs.join(i.to_string());
        std::fs::create_dir_all(&d)?;
        run(Command::new("llvm-ar-19").current_dir(&d).arg("x").arg(r))?;
    }
    std::fs::copy(
        rel.join("libsmudge_core.rlib"),
        lib.join("libsmudge_core.rlib"),
    )?;
    let mut o_files = Vec::new();
    for e in walk(&objs)? {
        if e.extension().is_some_and(|x| x == "o") {
            o_files.push(e);
        }
    }
    run(Command::new("ld.lld-19")
        .arg("-r")
        .arg("-o")
        .arg(build.join("smudge_core.o_shipped"))
        .args(&o_files))?;
    step("building smudge.ko (Kbuild)");
    make_module(&kdir, &build, "smudge.ko")
}

/// `make modules` of the external module in `build` against the kernel tree `kdir`; returns
/// the path of `ko`, or the build's output as the error.
fn make_module(kdir: &Path, build: &Path, ko: &str) -> Result<PathBuf> {
    let out = Command::new("make")
        .arg("-C")
        .arg(kdir)
        .arg(format!("M={}", build.display()))
        .args(make_vars())
        .arg("modules")
        .output()
        .with_context(|| format!("make modules ({ko})"))?;
    let path = build.join(ko);
    if !out.status.success() || !path.exists() {
        eprintln!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        bail!("building {ko} failed");
    }
    Ok(path)
}

/// Builds the test image's stub `kvm` module (linux-driver/kvm-stub); returns its path.
pub fn kvm_stub() -> Result<PathBuf> {
    let kdir = kernel()?;
    let build = root().join("target/kvm-stub");
    let _ = std::fs::remove_dir_all(&build);
    std::fs::create_dir_all(&build)?;
    for f in ["Kbuild", "kvm.c"] {
        std::fs::copy(root().join("linux-driver/kvm-stub").join(f), build.join(f))
            .with_context(|| format!("copy {f}"))?;
    }
    make_module(&kdir, &build, "kvm.ko")
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}

/// The make variables of TOOLCHAIN.md.
pub fn make_vars() -> Vec<String> {
    vec![
        "LLVM=-19".into(),
        "RUSTC=/usr/bin/rustc".into(),
        "HOSTRUSTC=/usr/bin/rustc".into(),
        "RUSTDOC=/usr/bin/rustdoc".into(),
        format!("BINDGEN={}", bindgen().display()),
    ]
}

/// Builds the static `smudge` tool, `smudge-hostile` (next to it) and the guest images;
/// returns (tool, guests dir).
pub fn tools() -> Result<(PathBuf, PathBuf)> {
    step("building the static smudge and smudge-hostile tools (glibc, crt-static)");
    let target_dir = root().join("target/static");
    run(Command::new("cargo")
        .current_dir(root())
        .args([
            "build",
            "--release",
            "-p",
            "smudge-cli",
            "-p",
            "smudge-hostile",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static"))?;
    let tool = target_dir.join("x86_64-unknown-linux-gnu/release/smudge");
    let guests = crate::guests::build()?;
    Ok((tool, guests))
}
