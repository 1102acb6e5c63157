//! Link arguments of the guest images: no C runtime, static, placed at 1 MiB by `link.ld`.

use std::env;
use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let script = dir.join("link.ld");
    println!("cargo::rerun-if-changed=link.ld");
    println!("cargo::rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");

    // smudge loads ET_EXEC images only; rustc emits one (and passes -no-pie) only with the static
    // relocation model. Say so here instead of leaving a puzzling "not ET_EXEC" for run time.
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let is_static = flags
        .split('\x1f')
        .collect::<Vec<_>>()
        .windows(2)
        .any(|w| w[0] == "-C" && w[1] == "relocation-model=static")
        || flags
            .split('\x1f')
            .any(|f| f == "-Crelocation-model=static");
    if !is_static {
        panic!(
            "smudge guests need `-C relocation-model=static`: build inside guests/ (see .cargo/config.toml) \
             or set CARGO_ENCODED_RUSTFLAGS=-Crelocation-model=static"
        );
    }

    for arg in [
        "-nostartfiles".to_string(),
        "-nostdlib".to_string(),
        "-static".to_string(),
        format!("-Wl,-T,{}", script.display()),
        "-Wl,--build-id=none".to_string(),
    ] {
        println!("cargo::rustc-link-arg-bins={arg}");
    }
}
