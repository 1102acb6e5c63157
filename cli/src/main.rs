//! smudge: the user-space tool. Runs guests under the smudge driver, prints their dirty pages,
//! explains the EPT/host page-table state of a written page, and decodes VMX capabilities.

mod args;
mod caps;
mod device;
mod explain;
mod gfns;
mod json;
mod multi;
mod os;
mod run;

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;

use args::{Cli, Cmd, GuestArgs};
use device::Vmm;
use json::Json;
use run::{status, RunConfig, Streams};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => guest_cmd(&a.guest, a.vcpus, None, a.pause_at),
        Cmd::Explain(a) => guest_cmd(&a.guest, 1, Some(a.limit), None),
        Cmd::Caps(a) => caps_cmd(&a),
        Cmd::Stats(a) => stats_cmd(&a),
    };
    match r {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("smudge: {e:#}");
            ExitCode::from(status::TOOL_ERROR as u8)
        }
    }
}

fn guest_cmd(
    g: &GuestArgs,
    vcpus: u32,
    explain: Option<Option<usize>>,
    pause_at: Option<u64>,
) -> anyhow::Result<i32> {
    let image =
        std::fs::read(&g.guest).with_context(|| format!("cannot read {}", g.guest.display()))?;
    let cfg = RunConfig {
        mem_bytes: g.mem << 20,
        mode: g.mode,
        vcpus,
        json: g.json,
        explain,
        pause_at,
    };
    if vcpus != 1 && explain.is_some() {
        anyhow::bail!("explain runs one vCPU (drop --vcpus)");
    }
    if vcpus != 1 && pause_at.is_some() {
        anyhow::bail!("--pause-at runs one vCPU (drop --vcpus)");
    }
    run::check_image(&image, cfg.mem_bytes).with_context(|| g.guest.display().to_string())?;
    let mut dev = os::Device::open()?;
    let start = Instant::now();
    // A spinning guest returns to user space only when a signal is pending: the alarm sends
    // SIGALRM to this thread from the deadline on.
    let _alarm = match g.timeout {
        Some(t) => Some(os::Alarm::at(start + t).context("cannot arm the timeout")?),
        None => None,
    };
    let timed_out = || g.timeout.is_some_and(|t| start.elapsed() >= t);
    let (mut stdout, mut stderr) = (std::io::stdout().lock(), std::io::stderr().lock());
    let mut stdin = std::io::stdin().lock();
    let mut streams = Streams::new(&mut stdout, &mut stderr);
    streams.stdin = Some(&mut stdin);
    if vcpus == 1 {
        return run::run_guest(&mut dev, &image, &cfg, &mut streams, &timed_out);
    }
    let mode = run::prepare(&mut dev, &image, &cfg)?;
    multi::run_vcpus(&mut dev, &cfg, mode, &mut streams, &timed_out)
}

fn caps_cmd(a: &args::CapsArgs) -> anyhow::Result<i32> {
    let report = match &a.from {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            caps::Report::from_dump(&text, &path.display().to_string())?
        }
        None => {
            let mut dev = os::Device::open()?;
            let resp = dev
                .caps()
                .map_err(|e| anyhow::anyhow!("cannot read the capabilities: {}", e.err))?;
            caps::Report::from_driver(&resp, &caps::host_cpuid)
        }
    };
    if a.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.human());
    }
    Ok(status::OK)
}

fn stats_cmd(a: &args::StatsArgs) -> anyhow::Result<i32> {
    let mut dev = os::Device::open()?;
    let s = dev
        .stats()
        .map_err(|e| anyhow::anyhow!("cannot read the statistics: {}", e.err))?;
    if a.json {
        let j = Json::object()
            .with("driver_pages", s.driver_pages)
            .with("vm_pages", s.vm_pages);
        println!("{j}");
    } else {
        println!(
            "driver pages: {} (pages held by every VM of the driver)",
            s.driver_pages
        );
        println!("this VM: {} pages (a fresh open holds none)", s.vm_pages);
    }
    Ok(status::OK)
}
