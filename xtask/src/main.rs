//! `cargo xtask`: builds every artifact of smudge, installs what the build needs, boots the
//! emulated VT-x machine (Bochs) and runs the tests.

mod bochs;
mod deps;
mod e2e;
mod e2e_hostile;
mod fuzz;
mod guests;
mod host;
mod linux;
mod selftests;
mod windows;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, test and demo smudge")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build every artifact and run every test (what CI runs).
    BuildAndTest {
        /// Only the host tests and the windows-msvc type-check (no kernel, no Bochs).
        #[arg(long)]
        host_only: bool,
    },
    /// Type-check smudge-core for the Linux kernel and x86_64-pc-windows-msvc targets.
    CheckTargets {
        /// Skip the kernel target (it needs the built kernel tree).
        #[arg(long)]
        no_kernel: bool,
    },
    /// Install the system packages and tools the build needs (idempotent).
    Deps,
    /// Build, sign and verify smudge.sys into target/windows/.
    Windows,
    /// Build Linux 6.12 with Rust (cached outside the clone, keyed by its inputs).
    Kernel,
    /// Build smudge.ko, the static smudge tool and the test guests.
    Linux,
    /// Boot the emulated VT-x machine with smudge.ko loaded and run CMD in it.
    Bochs(bochs::BochsArgs),
    /// The main job: `smudge explain` and a dirty-log run on an emulated VT-x machine.
    Demo,
    /// Only the end-to-end suite under Bochs.
    E2e,
    /// Only its hostile-input-and-faults boot (xtask/src/e2e_hostile.rs).
    E2eHostile,
    /// KVM's dirty-log selftests, built from linux-source-6.12 (cached), under Bochs.
    Selftests,
    /// The shims' sizes against their ceilings (lines of code: no blank or comment lines).
    Sizes,
    /// Bounded coverage-guided fuzzing of the core (libFuzzer, mock platform), host only.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Every command starts by installing what is missing (cheap when everything is there), so
    // that any of them, `demo` first, works on a fresh machine.
    deps::ensure_all()?;
    match cli.cmd {
        Cmd::BuildAndTest { host_only } => build_and_test(host_only),
        Cmd::CheckTargets { no_kernel } => host::check_targets(!no_kernel),
        Cmd::Deps => deps::ensure_all(),
        Cmd::Windows => windows::build_and_verify(),
        Cmd::Kernel => linux::kernel().map(|p| step(&format!("kernel tree: {}", p.display()))),
        Cmd::Linux => {
            let ko = linux::module()?;
            let (tool, guests) = linux::tools()?;
            step(&format!(
                "built {}, {}, guests in {}",
                ko.display(),
                tool.display(),
                guests.display()
            ));
            Ok(())
        }
        Cmd::Bochs(a) => bochs::run_cli(a),
        Cmd::Demo => bochs::demo(),
        Cmd::E2e => e2e::suite(),
        Cmd::E2eHostile => e2e_hostile::suite(&bochs::Artifacts::build()?),
        Cmd::Selftests => selftests::run_cli(),
        Cmd::Sizes => host::shim_sizes(),
        Cmd::Fuzz { seconds } => fuzz::bounded(seconds)?.check(),
    }
}

fn build_and_test(host_only: bool) -> Result<()> {
    host::host_tests()?;
    host::shim_sizes()?;
    fuzz::bounded(20)?.check()?;
    host::check_targets(false)?;
    windows::build_and_verify()?;
    if host_only {
        step("host-only run finished");
        return Ok(());
    }
    step("type-check smudge-core for the Linux kernel target (part of building smudge.ko)");
    e2e::suite()?;
    step("build-and-test finished");
    Ok(())
}

/// Prints a progress line.
pub fn step(msg: &str) {
    eprintln!("\x1b[1m[xtask]\x1b[0m {msg}");
}

/// The workspace root.
pub fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default()
}
