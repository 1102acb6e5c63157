//! Link setup for smudge.sys (x86_64-pc-windows-msvc only; host builds of the library need none).
//!
//! 1. `ntoskrnl.def` -> `ntoskrnl.lib` (an import library) with `llvm-dlltool-19`, into OUT_DIR.
//! 2. lld-link arguments that make a kernel driver instead of a console program (TOOLCHAIN.md).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=ntoskrnl.def");
    println!("cargo::rerun-if-env-changed=SMUDGE_DLLTOOL");
    println!("cargo::rerun-if-env-changed=SMUDGE_WINDOWS_MAP");
    if env::var("TARGET").as_deref() != Ok("x86_64-pc-windows-msvc") {
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let dlltool = env::var("SMUDGE_DLLTOOL").unwrap_or_else(|_| "llvm-dlltool-19".into());
    let lib = out.join("ntoskrnl.lib");
    let status = Command::new(&dlltool)
        .args(["-m", "i386:x86-64", "-d"])
        .arg(manifest.join("ntoskrnl.def"))
        .arg("-l")
        .arg(&lib)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {dlltool} (apt install llvm-19): {e}"));
    assert!(
        status.success(),
        "{dlltool} failed on ntoskrnl.def: {status}"
    );
    println!("cargo::rustc-link-search=native={}", out.display());

    // A map file lets `cargo xtask windows` find DriverEntry's RVA independently of the entry field.
    let map = env::var("SMUDGE_WINDOWS_MAP")
        .map(PathBuf::from)
        .unwrap_or_else(|_| out.join("smudge.map"));
    let args = [
        "/DRIVER".to_string(),
        "/SUBSYSTEM:NATIVE,10.0".into(),
        "/ENTRY:DriverEntry".into(),
        "/NODEFAULTLIB".into(),
        "/MACHINE:X64".into(),
        "/BASE:0x140000000".into(),
        // Writes the PE checksum, which the kernel checks for drivers.
        "/RELEASE".into(),
        "/TSAWARE:NO".into(),
        // Relocatable (the loader places drivers anywhere) and W^X data.
        "/DYNAMICBASE".into(),
        "/HIGHENTROPYVA".into(),
        "/NXCOMPAT".into(),
        "/OPT:REF,ICF".into(),
        format!("/MAP:{}", map.display()),
    ];
    for a in args {
        println!("cargo::rustc-link-arg-bins={a}");
    }
}
