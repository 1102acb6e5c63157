//! Bounded coverage-guided fuzzing of smudge-core (libFuzzer through cargo-fuzz), host only,
//! over the mock platform. The targets live in `fuzz/` (its own workspace, excluded from the
//! root one); the checked-in corpus `fuzz/corpus/<target>/` holds the seeds and every crash ever
//! found (regressions), and is replayed first by every run.
//!
//! cargo-fuzz asks for nightly flags (`-Zsanitizer=address`); the stable toolchain accepts them
//! with `RUSTC_BOOTSTRAP=1` because the ASan runtime ships with it (TOOLCHAIN.md).

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

use crate::deps::{cache_dir, run};
use crate::{root, step};

/// The fuzz targets, in run order.
pub const TARGETS: [&str; 3] = ["abi_decode", "vm_ops", "ept_ops"];

/// cargo-fuzz, installed into the cache that outlives clones.
pub fn cargo_fuzz() -> PathBuf {
    cache_dir().join("tools/cargo-fuzz/bin/cargo-fuzz")
}

/// What one target did.
#[derive(Debug)]
pub struct TargetReport {
    /// Target name.
    pub name: &'static str,
    /// Inputs executed (libFuzzer's `stat::number_of_executed_units`).
    pub execs: u64,
    /// Executions per second (`stat::average_exec_per_sec`).
    pub execs_per_sec: u64,
    /// Crash, timeout and OOM inputs written by this run.
    pub crashes: Vec<PathBuf>,
}

/// What a bounded run did.
#[derive(Debug)]
pub struct FuzzReport {
    /// Per target.
    pub targets: Vec<TargetReport>,
}

impl FuzzReport {
    /// Prints one line per target; fails if any target crashed.
    pub fn check(&self) -> Result<()> {
        for t in &self.targets {
            step(&format!(
                "fuzz {}: {} executions ({}/s), {} crashes{}",
                t.name,
                t.execs,
                t.execs_per_sec,
                t.crashes.len(),
                t.crashes
                    .iter()
                    .map(|c| format!("\n    {}", c.display()))
                    .collect::<String>()
            ));
        }
        let crashed: Vec<&str> = self
            .targets
            .iter()
            .filter(|t| !t.crashes.is_empty())
            .map(|t| t.name)
            .collect();
        if !crashed.is_empty() {
            bail!(
                "fuzz targets crashed: {} (reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET ARTIFACT; \
                 then keep the input in fuzz/corpus/TARGET/ as a regression)",
                crashed.join(", ")
            );
        }
        Ok(())
    }
}

fn ensure_cargo_fuzz() -> Result<()> {
    if !cargo_fuzz().exists() {
        step("installing cargo-fuzz (about 1 minute)");
        run(Command::new("cargo")
            .args(["install", "--locked", "cargo-fuzz", "--root"])
            .arg(cache_dir().join("tools/cargo-fuzz")))?;
    }
    Ok(())
}

fn stat(log: &str, key: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.strip_prefix(key))
        .filter_map(|v| v.trim_start_matches(':').trim().parse().ok())
        .last()
        .unwrap_or(0)
}

/// Builds the targets, then fuzzes each for `seconds_per_target` seconds, starting from the
/// checked-in corpus. New inputs go to `target/fuzz-work/corpus/<target>` (not the repository);
/// crash inputs to `target/fuzz-work/artifacts/<target>/`.
pub fn bounded(seconds_per_target: u64) -> Result<FuzzReport> {
    ensure_cargo_fuzz()?;
    let fuzz_dir = root().join("fuzz");
    let work = root().join("target/fuzz-work");
    let target_dir = root().join("target/fuzz");
    let cargo_fuzz_cmd = || {
        let mut c = Command::new(cargo_fuzz());
        // `cargo-fuzz` is a cargo subcommand: its first argument is its own name.
        c.arg("fuzz")
            .current_dir(&fuzz_dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_ENCODED_RUSTFLAGS");
        c
    };
    step("fuzz: building the targets (cargo fuzz build, ASan, overflow checks)");
    run(cargo_fuzz_cmd()
        .arg("build")
        .arg("--target-dir")
        .arg(&target_dir))?;
    let mut targets = Vec::new();
    for name in TARGETS {
        let corpus = work.join("corpus").join(name);
        let artifacts = work.join("artifacts").join(name);
        std::fs::create_dir_all(&corpus)?;
        // Only this run's crashes count.
        let _ = std::fs::remove_dir_all(&artifacts);
        std::fs::create_dir_all(&artifacts)?;
        step(&format!("fuzz {name}: {seconds_per_target} s"));
        let out = cargo_fuzz_cmd()
            .args(["run", "--target-dir"])
            .arg(&target_dir)
            .arg(name)
            .arg(&corpus)
            .arg(fuzz_dir.join("corpus").join(name))
            .arg("--")
            .arg(format!("-max_total_time={seconds_per_target}"))
            .arg("-print_final_stats=1")
            .arg("-max_len=4096")
            .arg("-timeout=20")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .output()
            .with_context(|| format!("cannot run cargo fuzz for {name}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let crashes: Vec<PathBuf> = std::fs::read_dir(&artifacts)?
            .flatten()
            .map(|e| e.path())
            .collect();
        if !out.status.success() && crashes.is_empty() {
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            bail!(
                "cargo fuzz run {name} failed without a crash input:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if !crashes.is_empty() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        targets.push(TargetReport {
            name,
            execs: stat(&log, "stat::number_of_executed_units"),
            execs_per_sec: stat(&log, "stat::average_exec_per_sec"),
            crashes,
        });
    }
    Ok(FuzzReport { targets })
}
