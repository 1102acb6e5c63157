//! The test guests (guests/): static ELF64 images built with the host toolchain.

use anyhow::Result;
use std::path::PathBuf;
use std::process::Command;

use crate::deps::run;
use crate::{root, step};

/// Builds every guest; returns the directory holding the ELF files.
pub fn build() -> Result<PathBuf> {
    let target_dir = root().join("target/guests");
    if !root().join("guests/Cargo.toml").exists()
        || std::env::var_os("SMUDGE_SKIP_GUESTS").is_some()
    {
        std::fs::create_dir_all(&target_dir)?;
        return Ok(target_dir);
    }
    step("building the test guests");
    run(Command::new("cargo")
        .current_dir(root().join("guests"))
        .args(["build", "--release"])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", "-Crelocation-model=static")
        .env_remove("RUSTFLAGS"))?;
    Ok(target_dir.join("x86_64-unknown-linux-gnu/release"))
}
