//! The command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// smudge: run tiny guests under VT-x and see which pages they dirty (EPT A/D, PML, write-protect).
#[derive(Parser, Debug)]
#[command(name = "smudge", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run a guest; print its dirty pages at every checkpoint and at exit.
    ///
    /// Exit status: 0 when the guest exits with code 0 or executes HLT; 3 when it exits with
    /// another code; 4 MMIO (access beyond RAM); 5 triple fault; 6 VM stopped with an error;
    /// 124 timeout; 1 when smudge itself fails; 2 on a usage error.
    Run(RunArgs),
    /// Run a guest and show, for each page it wrote, the guest PDE, the EPT leaf and the host
    /// page-table entry of the backing page, with their accessed/dirty flags.
    Explain(ExplainArgs),
    /// Decode the VMX capabilities of this CPU (through the driver) or of an MSR dump.
    Caps(CapsArgs),
    /// Show the driver's page accounting (pages held by all VMs).
    Stats(StatsArgs),
}

/// The dirty-tracking mode requested.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// The best the CPU has: PML, else A/D scan, else write-protect.
    Auto,
    /// Scan the EPT dirty flags (needs EPT A/D).
    Ad,
    /// Page-modification logging (needs PML and EPT A/D).
    Pml,
    /// Write-protect the EPT leaves and log the faults.
    Wp,
}

impl ModeArg {
    /// The `mode` field of `abi::SetupReq`.
    pub fn abi(self) -> u32 {
        match self {
            ModeArg::Auto => 0,
            ModeArg::Ad => 1,
            ModeArg::Pml => 2,
            ModeArg::Wp => 3,
        }
    }
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ModeArg::Auto => "auto",
            ModeArg::Ad => "ad",
            ModeArg::Pml => "pml",
            ModeArg::Wp => "wp",
        }
    }
}

/// Guest RAM in MiB: a multiple of 2 between 4 and 4096 (abi::MIN_MEM..=abi::MAX_MEM).
fn parse_mem(s: &str) -> Result<u64, String> {
    let mib: u64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of MiB"))?;
    let range = (smudge_core::abi::MIN_MEM >> 20)..=(smudge_core::abi::MAX_MEM >> 20);
    if !range.contains(&mib) || !mib.is_multiple_of(2) {
        return Err(format!(
            "guest RAM must be an even number of MiB between 4 and 4096, not {mib}"
        ));
    }
    Ok(mib)
}

/// Seconds, possibly fractional, greater than 0.
fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(v > 0.0 && v.is_finite() && v < 1e9) {
        return Err(format!(
            "the timeout must be a positive number of seconds, not {s}"
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Options shared by `run` and `explain`.
#[derive(Args, Debug, Clone)]
pub struct GuestArgs {
    /// Guest RAM in MiB (even, 4..=4096); the top 1 MiB is reserved for smudge.
    #[arg(long, value_name = "MiB", default_value_t = 64, value_parser = parse_mem)]
    pub mem: u64,
    /// Dirty-tracking mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
    pub mode: ModeArg,
    /// Print JSON lines on stdout (the guest console goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Stop the guest after this many seconds (exit reason "timeout").
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub timeout: Option<Duration>,
    /// The guest: a static ELF64 executable (see guests/).
    #[arg(value_name = "GUEST.elf")]
    pub guest: PathBuf,
}

/// `smudge run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Guest options.
    #[command(flatten)]
    pub guest: GuestArgs,
    /// vCPUs (this build runs exactly 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub vcpus: u32,
    /// After checkpoint N's harvest, say "paused" and wait for a line on stdin before running
    /// on (one vCPU): the VM stays as it is meanwhile, for a look from outside or a host event.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub pause_at: Option<u64>,
}

/// `smudge explain`.
#[derive(Args, Debug, Clone)]
pub struct ExplainArgs {
    /// Guest options.
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Explain at most this many pages at each point (default: all).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

/// `smudge caps`.
#[derive(Args, Debug, Clone)]
pub struct CapsArgs {
    /// Decode this MSR dump (shared-tests/fixtures/vmx-msrs format) instead of asking the driver.
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `smudge stats`.
#[derive(Args, Debug, Clone)]
pub struct StatsArgs {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("smudge").chain(args.iter().copied()))
    }

    fn run_args(args: &[&str]) -> RunArgs {
        match parse(args).expect("parses").cmd {
            Cmd::Run(r) => r,
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn run_defaults_follow_the_spec() {
        let r = run_args(&["run", "g.elf"]);
        assert_eq!(r.guest.mem, 64);
        assert_eq!(r.guest.mode, ModeArg::Auto);
        assert_eq!(r.vcpus, 1);
        assert!(!r.guest.json);
        assert_eq!(r.guest.timeout, None);
        assert_eq!(r.guest.guest, PathBuf::from("g.elf"));
    }

    #[test]
    fn run_options() {
        let r = run_args(&[
            "run",
            "--mem",
            "128",
            "--mode",
            "pml",
            "--vcpus",
            "2",
            "--json",
            "--timeout",
            "2.5",
            "x",
        ]);
        assert_eq!(r.guest.mem, 128);
        assert_eq!(r.guest.mode.abi(), 2);
        assert_eq!(r.vcpus, 2);
        assert!(r.guest.json);
        assert_eq!(r.guest.timeout, Some(Duration::from_millis(2500)));
        // SetupReq.mode numbering (core/src/abi.rs): 0 auto, 1 ad, 2 pml, 3 wp.
        let modes: Vec<u32> = ["auto", "ad", "pml", "wp"]
            .iter()
            .map(|m| run_args(&["run", "--mode", m, "g"]).guest.mode.abi())
            .collect();
        assert_eq!(modes, vec![0, 1, 2, 3]);
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in [
            &["run", "--mem", "3", "g"][..],
            &["run", "--mem", "65", "g"],
            &["run", "--mem", "8192", "g"],
            &["run", "--mem", "lots", "g"],
            &["run", "--mode", "ept", "g"],
            &["run", "--vcpus", "0", "g"],
            &["run", "--vcpus", "9", "g"],
            &["run", "--timeout", "0", "g"],
            &["run", "--timeout", "-1", "g"],
            &["run"],
            &["frobnicate"],
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
        assert!(parse(&["run", "--mem", "4", "g"]).is_ok());
        assert!(parse(&["run", "--mem", "4096", "g"]).is_ok());
    }

    #[test]
    fn other_subcommands() {
        match parse(&["caps", "--from", "f.msr", "--json"]).unwrap().cmd {
            Cmd::Caps(c) => {
                assert_eq!(c.from, Some(PathBuf::from("f.msr")));
                assert!(c.json);
            }
            other => panic!("{other:?}"),
        }
        match parse(&["caps"]).unwrap().cmd {
            Cmd::Caps(c) => assert!(c.from.is_none() && !c.json),
            other => panic!("{other:?}"),
        }
        match parse(&["stats", "--json"]).unwrap().cmd {
            Cmd::Stats(s) => assert!(s.json),
            other => panic!("{other:?}"),
        }
        match parse(&["explain", "--mode", "ad", "--limit", "3", "g.elf"])
            .unwrap()
            .cmd
        {
            Cmd::Explain(e) => {
                assert_eq!(e.guest.mode, ModeArg::Ad);
                assert_eq!(e.limit, Some(3));
                assert_eq!(e.guest.mem, 64);
            }
            other => panic!("{other:?}"),
        }
        // explain runs one vCPU; --vcpus belongs to run only.
        assert!(parse(&["explain", "--vcpus", "1", "g"]).is_err());
    }
}
