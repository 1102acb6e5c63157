//! `smudge run` and `smudge explain`: set up a VM, load the guest, run vCPU 0, and report the
//! dirty pages at each checkpoint and at the end.

use std::io::Write;

use anyhow::{anyhow, bail, Context};
use smudge_core::abi::{self, exit_kind, RunResp};
use smudge_core::guest::{Elf, Layout};
use smudge_core::vm::reason;

use crate::args::ModeArg;
use crate::device::{ReqError, Vmm};
use crate::explain;
use crate::gfns::{bitmap_words, format_gfns, guest_dirty_gfns};
use crate::json::Json;

/// Process exit statuses (also in `smudge run --help`).
pub mod status {
    /// The guest exited with code 0 or executed HLT.
    pub const OK: i32 = 0;
    /// smudge failed (device, request, file).
    pub const TOOL_ERROR: i32 = 1;
    /// The guest exited with a non-zero code.
    pub const GUEST_FAILED: i32 = 3;
    /// The guest accessed memory outside every slot.
    pub const MMIO: i32 = 4;
    /// The guest triple-faulted.
    pub const TRIPLE_FAULT: i32 = 5;
    /// The VM stopped with an error (VM-entry failure, VMX instruction, page limit...).
    pub const ERROR: i32 = 6;
    /// --timeout elapsed.
    pub const TIMEOUT: i32 = 124;
}

/// What `run`/`explain` do.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// Requested dirty-tracking mode.
    pub mode: ModeArg,
    /// vCPUs.
    pub vcpus: u32,
    /// JSON lines on stdout, console on stderr.
    pub json: bool,
    /// `Some(limit)`: explain the dirty pages at the first checkpoint and at the end.
    pub explain: Option<Option<usize>>,
    /// Wait for a line of input after this checkpoint (`--pause-at`).
    pub pause_at: Option<u64>,
}

/// Where output goes. Every write is followed by a flush of that stream, so the order of console
/// bytes and events is kept when both streams go to one pipe.
pub struct Streams<'a> {
    /// Standard output.
    pub stdout: &'a mut dyn Write,
    /// Standard error.
    pub stderr: &'a mut dyn Write,
    /// Standard input, for `--pause-at` (None: a pause does not wait).
    pub stdin: Option<&'a mut dyn std::io::BufRead>,
    /// The console output so far does not end with a newline.
    console_mid_line: bool,
}

impl<'a> Streams<'a> {
    /// Console and events go to these two streams (which is which depends on `--json`).
    pub fn new(stdout: &'a mut dyn Write, stderr: &'a mut dyn Write) -> Streams<'a> {
        Streams {
            stdout,
            stderr,
            stdin: None,
            console_mid_line: false,
        }
    }

    /// The pause of `--pause-at` after checkpoint `seq`: an event, then one line of input (or
    /// its end).
    pub fn pause(&mut self, json: bool, seq: u64) -> std::io::Result<()> {
        let event = Json::object().with("event", "paused").with("seq", seq);
        let human = format!("paused after checkpoint {seq}: a line on stdin runs the guest on");
        self.event(json, &event, &human)?;
        if let Some(input) = self.stdin.as_mut() {
            input.read_line(&mut String::new())?;
        }
        Ok(())
    }

    fn console_stream(&mut self, json: bool) -> &mut dyn Write {
        if json {
            &mut *self.stderr
        } else {
            &mut *self.stdout
        }
    }

    pub fn console(&mut self, json: bool, bytes: &[u8]) -> std::io::Result<()> {
        let Some(&last) = bytes.last() else {
            return Ok(());
        };
        let w = self.console_stream(json);
        w.write_all(bytes)?;
        w.flush()?;
        self.console_mid_line = last != b'\n';
        Ok(())
    }

    /// Ends an unfinished console line, so that an event line never starts in the middle of one
    /// when both streams go to one pipe.
    fn end_console_line(&mut self, json: bool) -> std::io::Result<()> {
        if self.console_mid_line {
            self.console_mid_line = false;
            let w = self.console_stream(json);
            w.write_all(b"\n")?;
            w.flush()?;
        }
        Ok(())
    }

    /// An event: a JSON line on stdout, or a human line on stderr.
    pub fn event(&mut self, json: bool, value: &Json, human: &str) -> std::io::Result<()> {
        self.end_console_line(json)?;
        if json {
            writeln!(self.stdout, "{value}")?;
            self.stdout.flush()
        } else {
            for line in human.lines() {
                writeln!(self.stderr, "smudge: {line}")?;
            }
            self.stderr.flush()
        }
    }

    /// Text for humans only (stderr; nothing in JSON mode).
    pub fn note(&mut self, json: bool, text: &str) -> std::io::Result<()> {
        if !json {
            self.end_console_line(json)?;
            self.stderr.write_all(text.as_bytes())?;
            self.stderr.flush()?;
        }
        Ok(())
    }
}

/// How the run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// Hypercall 0 with this code.
    Exit(u64),
    /// HLT.
    Hlt,
    /// Triple fault.
    TripleFault,
    /// Access outside every slot.
    Mmio {
        /// Address.
        gpa: u64,
        /// A write.
        write: bool,
    },
    /// The driver stopped the VM.
    Error {
        /// Basic exit reason.
        reason: u32,
        /// VM-instruction error or 0.
        code: u64,
        /// The driver's message.
        message: String,
    },
    /// --timeout elapsed.
    Timeout,
}

impl End {
    /// The `reason` field of the exit event.
    pub fn name(&self) -> &'static str {
        match self {
            End::Exit(_) => "exit",
            End::Hlt => "hlt",
            End::TripleFault => "triple_fault",
            End::Mmio { .. } => "mmio",
            End::Error { .. } => "error",
            End::Timeout => "timeout",
        }
    }

    /// The process exit status.
    pub fn status(&self) -> i32 {
        match self {
            End::Exit(0) | End::Hlt => status::OK,
            End::Exit(_) => status::GUEST_FAILED,
            End::Mmio { .. } => status::MMIO,
            End::TripleFault => status::TRIPLE_FAULT,
            End::Error { .. } => status::ERROR,
            End::Timeout => status::TIMEOUT,
        }
    }

    /// The guest's exit code: RDI of hypercall 0, 0 for HLT; none otherwise.
    pub fn code(&self) -> Option<u64> {
        match self {
            End::Exit(c) => Some(*c),
            End::Hlt => Some(0),
            _ => None,
        }
    }
}

/// The name of a dirty mode number of `StatsResp::mode` / `CapsResp::mode`.
pub fn mode_name(n: u32) -> &'static str {
    match n {
        1 => "ad",
        2 => "pml",
        3 => "wp",
        _ => "unknown",
    }
}

/// Exit counters by name (`vm::reason::name`), only non-zero, in order of the first reason
/// number of each name; reasons that share a name are summed.
pub fn exit_counts(exits: &[u64]) -> Vec<(&'static str, u64)> {
    let mut out: Vec<(&'static str, u64)> = Vec::new();
    for (r, &n) in exits.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let name = reason::name(r as u32);
        match out.iter_mut().find(|(k, _)| *k == name) {
            Some((_, v)) => *v += n,
            None => out.push((name, n)),
        }
    }
    out
}

pub fn message_text(resp: &RunResp) -> String {
    let end = resp
        .message
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(resp.message.len());
    String::from_utf8_lossy(&resp.message[..end]).into_owned()
}

fn exits_json(exits: &[(&'static str, u64)]) -> Json {
    let mut ex = Json::object();
    for (name, n) in exits {
        ex = ex.with(name, *n);
    }
    ex
}

/// The checkpoint event. `exits` are the VM's exit counts so far (cumulative).
pub fn checkpoint_event(
    seq: u64,
    mode: &str,
    exits: &[(&'static str, u64)],
    gfns: &[u64],
) -> (Json, String) {
    let json = Json::object()
        .with("event", "checkpoint")
        .with("seq", seq)
        .with("mode", mode)
        .with("exits", exits_json(exits))
        .with("dirty_gfns", Json::numbers(gfns));
    let human = format!(
        "checkpoint {seq}: {} dirty pages: {}",
        gfns.len(),
        format_gfns(gfns)
    );
    (json, human)
}

/// What the run loop did for the host around the VM entries (STATS `isolation`).
fn isolation_json(i: &smudge_core::abi::Isolation) -> Json {
    Json::object()
        .with("entries", i.entries)
        .with("l1d_flushes", i.l1d_flushes)
        .with("verws", i.verws)
        .with("ibpbs", i.ibpbs)
        .with("host_probes", i.probes)
        .with("host_changed", i.host_changed)
}

/// The exit event.
pub fn exit_event(
    end: &End,
    mode: &str,
    checkpoints: u64,
    stats: &smudge_core::abi::StatsResp,
    gfns: &[u64],
) -> (Json, String) {
    let exits = &exit_counts(&stats.exits);
    let mut json = Json::object()
        .with("event", "exit")
        .with("code", end.code())
        .with("reason", end.name())
        .with("status", end.status() as u64)
        .with("mode", mode)
        .with("checkpoints", checkpoints)
        .with("isolation", isolation_json(&stats.isolation));
    let mut human = match end {
        End::Exit(c) => format!("exit: the guest exited with code {c}"),
        End::Hlt => "exit: the guest executed HLT".to_string(),
        End::TripleFault => "exit: triple fault".to_string(),
        End::Mmio { gpa, write } => {
            format!(
                "exit: MMIO {} at GPA {gpa:#x}, outside guest RAM",
                if *write { "write" } else { "read" }
            )
        }
        End::Error {
            reason: r,
            code,
            message,
        } => {
            let mut s = match *r {
                abi::NO_VM_EXIT => format!("exit: error: {message} (no VM exit"),
                r => format!(
                    "exit: error: {message} (exit reason {r}, {}",
                    reason::name(r)
                ),
            };
            match *code {
                0 => {}
                abi::VMFAIL_INVALID => s.push_str(", VMfailInvalid (no VM-instruction error)"),
                code => s.push_str(&format!(", VM-instruction error {code}")),
            }
            s + ")"
        }
        End::Timeout => "exit: timeout".to_string(),
    };
    match end {
        End::Mmio { gpa, write } => json = json.with("gpa", *gpa).with("write", *write),
        End::Error {
            reason: r,
            code,
            message,
        } => {
            json = json
                .with("message", message.as_str())
                .with(
                    "exit_reason",
                    match *r {
                        abi::NO_VM_EXIT => "none",
                        r => reason::name(r),
                    },
                )
                .with("exit_reason_number", *r)
                .with("error_code", *code)
        }
        _ => {}
    }
    json = json
        .with("exits", exits_json(exits))
        .with("dirty_gfns", Json::numbers(gfns));
    let total: u64 = exits.iter().map(|e| e.1).sum();
    let list: Vec<String> = exits.iter().map(|(k, v)| format!("{k} {v}")).collect();
    human.push_str(&format!("\n{total} VM exits: {}", list.join(", ")));
    human.push_str(&format!(
        "\nsince the last checkpoint: {} dirty pages: {}",
        gfns.len(),
        format_gfns(gfns)
    ));
    (json, human)
}

fn setup_error(e: ReqError, mode: ModeArg) -> anyhow::Error {
    if crate::os::is_unsupported(&e.err) {
        return match mode {
            ModeArg::Auto => anyhow!("the driver cannot run a guest on this CPU (see `smudge caps`)"),
            ModeArg::Ad => anyhow!("dirty-tracking mode 'ad' is not supported by this CPU: it needs EPT accessed/dirty flags (see `smudge caps`)"),
            ModeArg::Pml => anyhow!("dirty-tracking mode 'pml' is not supported by this CPU: it needs PML and EPT accessed/dirty flags (see `smudge caps`)"),
            ModeArg::Wp => anyhow!("dirty-tracking mode 'wp' is not supported by this CPU (see `smudge caps`)"),
        };
    }
    anyhow!("cannot set up the VM: {}", e.err)
}

pub fn harvest_gfns(vmm: &mut dyn Vmm, mem_bytes: u64, clear: bool) -> anyhow::Result<Vec<u64>> {
    let mut bm = vec![0u64; bitmap_words(mem_bytes)];
    vmm.dirty_log(0, clear, &mut bm)
        .context("cannot read the dirty log")?;
    Ok(guest_dirty_gfns(&bm, mem_bytes))
}

/// Checks the guest image as the driver's loader will (core::guest::Elf), so that a bad image
/// gets the loader's precise message here; the driver would only put it in the kernel log.
pub fn check_image(image: &[u8], mem_bytes: u64) -> anyhow::Result<()> {
    let layout =
        Layout::new(mem_bytes).map_err(|_| anyhow!("bad guest RAM size {mem_bytes:#x}"))?;
    Elf::parse(image, &layout)
        .map(|_| ())
        .map_err(|e| anyhow!("{}", e.message()))
}

/// Runs `image`; returns the process exit status. `timed_out` says whether --timeout elapsed.
pub fn run_guest(
    vmm: &mut dyn Vmm,
    image: &[u8],
    cfg: &RunConfig,
    out: &mut Streams<'_>,
    timed_out: &dyn Fn() -> bool,
) -> anyhow::Result<i32> {
    if cfg.vcpus != 1 {
        bail!("run_guest drives one vCPU; several go through multi::run_vcpus");
    }
    let mode = prepare(vmm, image, cfg)?;
    run_prepared(vmm, cfg, mode, out, timed_out)
}

/// SETUP and LOAD_ELF; returns the dirty mode the driver chose.
pub fn prepare(vmm: &mut dyn Vmm, image: &[u8], cfg: &RunConfig) -> anyhow::Result<&'static str> {
    check_image(image, cfg.mem_bytes)?;
    let req = abi::SetupReq {
        version: abi::VERSION,
        mode: cfg.mode.abi(),
        mem_bytes: cfg.mem_bytes,
        vcpus: cfg.vcpus,
        page_limit: 0,
    };
    vmm.setup(&req).map_err(|e| setup_error(e, cfg.mode))?;
    vmm.load_elf(image)
        .map_err(|e| anyhow!("the driver refused the guest image: {}", e.err))?;
    Ok(match vmm.stats() {
        Ok(s) => mode_name(s.mode),
        Err(_) => cfg.mode.name(),
    })
}

/// Runs vCPU 0 of a prepared VM to its end; returns the process exit status.
pub fn run_prepared(
    vmm: &mut dyn Vmm,
    cfg: &RunConfig,
    mode: &'static str,
    out: &mut Streams<'_>,
    timed_out: &dyn Fn() -> bool,
) -> anyhow::Result<i32> {
    let mut seq = 0u64;
    let end = loop {
        if timed_out() {
            break End::Timeout;
        }
        let resp = vmm
            .run(0)
            .map_err(|e| anyhow!("cannot run the guest: {}", e.err))?;
        let n = (resp.console_len as usize).min(resp.console.len());
        out.console(cfg.json, &resp.console[..n])?;
        match resp.kind {
            exit_kind::CONSOLE | exit_kind::INTERRUPTED => continue,
            exit_kind::CHECKPOINT => {
                seq += 1;
                if seq == 1 {
                    if let Some(limit) = cfg.explain {
                        explain::explain_now(
                            vmm,
                            cfg,
                            out,
                            &format!("checkpoint {seq}"),
                            mode,
                            limit,
                        )?;
                    }
                }
                let gfns = harvest_gfns(vmm, cfg.mem_bytes, true)?;
                let stats = vmm
                    .stats()
                    .map_err(|e| anyhow!("cannot read the VM statistics: {}", e.err))?;
                let (json, human) = checkpoint_event(seq, mode, &exit_counts(&stats.exits), &gfns);
                out.event(cfg.json, &json, &human)?;
                if cfg.pause_at == Some(seq) {
                    out.pause(cfg.json, seq)?;
                }
            }
            exit_kind::HLT => break End::Hlt,
            exit_kind::EXIT => break End::Exit(resp.code),
            exit_kind::MMIO => {
                break End::Mmio {
                    gpa: resp.gpa,
                    write: resp.write != 0,
                }
            }
            exit_kind::TRIPLE_FAULT => break End::TripleFault,
            exit_kind::ERROR => {
                break End::Error {
                    reason: resp.reason,
                    code: resp.code,
                    message: message_text(&resp),
                }
            }
            k => {
                break End::Error {
                    reason: resp.reason,
                    code: 0,
                    message: format!("unknown exit kind {k} from the driver"),
                }
            }
        }
    };
    if let Some(limit) = cfg.explain {
        explain::explain_now(vmm, cfg, out, "exit", mode, limit)?;
    }
    let gfns = harvest_gfns(vmm, cfg.mem_bytes, true)?;
    let stats = vmm
        .stats()
        .map_err(|e| anyhow!("cannot read the VM statistics: {}", e.err))?;
    let (json, human) = exit_event(&end, mode, seq, &stats, &gfns);
    out.event(cfg.json, &json, &human)?;
    if cfg.explain.is_some() {
        out.note(cfg.json, &explain::note(mode))?;
    }
    Ok(end.status())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::device::ReqResult;
    use std::collections::VecDeque;

    /// A scripted driver: RUN answers from a queue; each dirty-log request returns the next
    /// bitmap given as page lists (get and harvest are recorded).
    #[derive(Default)]
    pub struct FakeVmm {
        pub setups: Vec<abi::SetupReq>,
        pub loaded: usize,
        pub runs: VecDeque<RunResp>,
        pub logs: VecDeque<Vec<u64>>,
        pub log_calls: Vec<bool>,
        pub stats: abi::StatsResp,
        pub setup_err: Option<i32>,
        pub explained: Vec<u64>,
    }

    pub fn resp(kind: u32, console: &str) -> RunResp {
        let mut r = RunResp {
            kind,
            ..RunResp::default()
        };
        r.console[..console.len()].copy_from_slice(console.as_bytes());
        r.console_len = console.len() as u32;
        r
    }

    impl Vmm for FakeVmm {
        fn setup(&mut self, req: &abi::SetupReq) -> ReqResult<()> {
            self.setups.push(*req);
            match self.setup_err {
                Some(errno) => Err(ReqError {
                    op: abi::Op::Setup,
                    err: std::io::Error::from_raw_os_error(errno),
                }),
                None => Ok(()),
            }
        }
        fn load_elf(&mut self, image: &[u8]) -> ReqResult<u64> {
            self.loaded = image.len();
            Ok(0x100000)
        }
        fn run(&mut self, _vcpu: u32) -> ReqResult<RunResp> {
            Ok(self
                .runs
                .pop_front()
                .expect("the test scripted enough RUN answers"))
        }
        fn dirty_log(&mut self, _slot: u32, harvest: bool, bitmap: &mut [u64]) -> ReqResult<()> {
            self.log_calls.push(harvest);
            bitmap.fill(0);
            for gfn in self.logs.pop_front().unwrap_or_default() {
                bitmap[(gfn / 64) as usize] |= 1 << (gfn % 64);
            }
            Ok(())
        }
        fn stats(&mut self) -> ReqResult<abi::StatsResp> {
            Ok(self.stats)
        }
        fn explain(&mut self, gpa: u64, _user_va: u64) -> ReqResult<abi::ExplainResp> {
            self.explained.push(gpa);
            Ok(abi::ExplainResp {
                guest_pte: (gpa & !0x1f_ffff) | 0xe3,
                guest_level: 2,
                ept_level: 1,
                ept_leaf: 0x1234_5000 | 0x307,
                hpa: 0x1234_5000,
                host_va: 0xffff_8880_1234_5000,
                host_pte: 0x8000_0000_1220_01e3,
                host_level: 2,
                ..abi::ExplainResp::default()
            })
        }
        fn caps(&mut self) -> ReqResult<abi::CapsResp> {
            Ok(abi::CapsResp::default())
        }
    }

    /// A minimal valid guest image: ELF64 x86-64 ET_EXEC, one PT_LOAD at 1 MiB.
    pub fn tiny_elf() -> Vec<u8> {
        let mut e = vec![0u8; 0x78 + 16];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // ELFCLASS64
        e[5] = 1; // little-endian
        e[6] = 1;
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        e[24..32].copy_from_slice(&0x100000u64.to_le_bytes()); // e_entry
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        e[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        e[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 64;
        e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        e[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes()); // p_offset
        e[ph + 16..ph + 24].copy_from_slice(&0x100000u64.to_le_bytes()); // p_vaddr
        e[ph + 24..ph + 32].copy_from_slice(&0x100000u64.to_le_bytes()); // p_paddr
        e[ph + 32..ph + 40].copy_from_slice(&16u64.to_le_bytes()); // p_filesz
        e[ph + 40..ph + 48].copy_from_slice(&16u64.to_le_bytes()); // p_memsz
        e
    }

    pub fn cfg(json: bool) -> RunConfig {
        RunConfig {
            mem_bytes: 64 << 20,
            mode: ModeArg::Auto,
            vcpus: 1,
            json,
            explain: None,
            pause_at: None,
        }
    }

    /// Runs with captured streams; returns (status, stdout, stderr).
    pub fn run_captured(
        vmm: &mut FakeVmm,
        cfg: &RunConfig,
        timed_out: &dyn Fn() -> bool,
    ) -> (anyhow::Result<i32>, String, String) {
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let r = run_guest(
            vmm,
            &tiny_elf(),
            cfg,
            &mut Streams::new(&mut o, &mut e),
            timed_out,
        );
        (
            r,
            String::from_utf8(o).unwrap(),
            String::from_utf8(e).unwrap(),
        )
    }

    fn json_lines(s: &str) -> Vec<serde_json::Value> {
        s.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    #[test]
    fn checkpoints_harvest_and_report_written_pages() {
        let mut exits = [0u64; 70];
        exits[reason::EPT_VIOLATION as usize] = 7;
        exits[reason::VMCALL as usize] = 3;
        exits[reason::IO as usize] = 20;
        let mut vmm = FakeVmm {
            runs: [
                resp(exit_kind::CONSOLE, "W 0x400\n"),
                resp(exit_kind::CHECKPOINT, "W 0x7ff\n"),
                resp(exit_kind::INTERRUPTED, ""),
                resp(exit_kind::CHECKPOINT, ""),
                {
                    let mut r = resp(exit_kind::EXIT, "bye\n");
                    r.code = 0;
                    r
                },
            ]
            .into(),
            // Each harvest: guest pages plus the reserved region (0x3f00.. for 64 MiB: page tables,
            // stack), which must not be reported.
            logs: [
                vec![0x400, 0x7ff, 0x3f02, 0x3f10],
                vec![0x3f10],
                vec![0x1000, 0x3fff],
            ]
            .into(),
            stats: abi::StatsResp {
                mode: 2,
                exits,
                ..abi::StatsResp::default()
            },
            ..FakeVmm::default()
        };
        let (r, out, err) = run_captured(&mut vmm, &cfg(true), &|| false);
        assert_eq!(r.unwrap(), 0);
        assert_eq!(
            vmm.setups,
            vec![abi::SetupReq {
                version: 1,
                mode: 0,
                mem_bytes: 64 << 20,
                vcpus: 1,
                page_limit: 0
            }]
        );
        assert_eq!(
            vmm.log_calls,
            vec![true, true, true],
            "checkpoints and the end harvest"
        );
        // Console on stderr in JSON mode, in order; stdout only JSON.
        assert_eq!(err, "W 0x400\nW 0x7ff\nbye\n");
        let ev = json_lines(&out);
        assert_eq!(ev.len(), 3);
        let counts = serde_json::json!({"ept_violation":7,"vmcall":3,"io":20});
        assert_eq!(
            ev[0],
            serde_json::json!({"event":"checkpoint","seq":1,"mode":"pml","exits":counts,"dirty_gfns":[0x400, 0x7ff]})
        );
        assert_eq!(
            ev[1],
            serde_json::json!({"event":"checkpoint","seq":2,"mode":"pml","exits":counts,"dirty_gfns":[]})
        );
        assert_eq!(ev[2]["event"], "exit");
        assert_eq!(ev[2]["code"], 0);
        assert_eq!(ev[2]["reason"], "exit");
        assert_eq!(ev[2]["checkpoints"], 2);
        assert_eq!(
            ev[2]["exits"],
            serde_json::json!({"ept_violation":7,"vmcall":3,"io":20})
        );
        assert_eq!(ev[2]["dirty_gfns"], serde_json::json!([0x1000]));
    }

    #[test]
    fn a_pause_after_a_checkpoint_waits_for_one_line() {
        let mut vmm = FakeVmm {
            runs: [
                resp(exit_kind::CHECKPOINT, ""),
                resp(exit_kind::CHECKPOINT, ""),
                resp(exit_kind::EXIT, ""),
            ]
            .into(),
            logs: [vec![], vec![], vec![]].into(),
            ..FakeVmm::default()
        };
        let cfg = RunConfig {
            pause_at: Some(1),
            ..cfg(true)
        };
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let mut input = std::io::Cursor::new(b"go\nrest\n".to_vec());
        let mut streams = Streams::new(&mut o, &mut e);
        streams.stdin = Some(&mut input);
        let r = run_guest(&mut vmm, &tiny_elf(), &cfg, &mut streams, &|| false);
        assert_eq!(r.unwrap(), 0);
        let events: Vec<String> = json_lines(&String::from_utf8(o).unwrap())
            .iter()
            .map(|e| format!("{} {}", e["event"], e["seq"]))
            .collect();
        assert_eq!(
            events,
            [
                "\"checkpoint\" 1",
                "\"paused\" 1",
                "\"checkpoint\" 2",
                "\"exit\" null"
            ]
        );
        assert_eq!(input.position(), 3, "one line read, the rest left");
    }

    /// Both streams into one buffer, as with `2>&1`.
    #[derive(Clone, Default)]
    struct Shared(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.borrow_mut().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_vmfail_invalid_is_named_not_numbered() {
        let human = |code| {
            let end = End::Error {
                reason: abi::NO_VM_EXIT,
                code,
                message: "vmptrld failed: Invalid".into(),
            };
            exit_event(&end, "ad", 0, &abi::StatsResp::default(), &[]).1
        };
        let invalid = human(abi::VMFAIL_INVALID);
        assert!(invalid.contains("VMfailInvalid"), "{invalid}");
        assert!(invalid.contains("(no VM exit, "), "{invalid}");
        assert!(!invalid.contains(&u64::MAX.to_string()), "{invalid}");
        assert!(human(7).contains("VM-instruction error 7"));
    }

    #[test]
    fn merged_streams_keep_order_and_whole_lines() {
        let mut vmm = FakeVmm {
            // The console buffer filled in the middle of a line, then the guest checkpointed.
            runs: [
                resp(exit_kind::CONSOLE, "W 0x400\nW 0x4"),
                resp(exit_kind::CHECKPOINT, "01\npart"),
                resp(exit_kind::EXIT, ""),
            ]
            .into(),
            logs: [vec![0x400, 0x401]].into(),
            ..FakeVmm::default()
        };
        let buf = Shared::default();
        let (mut o, mut e) = (buf.clone(), buf.clone());
        let r = run_guest(
            &mut vmm,
            &tiny_elf(),
            &cfg(true),
            &mut Streams::new(&mut o, &mut e),
            &|| false,
        );
        assert_eq!(r.unwrap(), 0);
        let text = String::from_utf8(buf.0.borrow().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..3], ["W 0x400", "W 0x401", "part"], "{text}");
        assert!(lines[3].starts_with("{\"event\":\"checkpoint\""), "{text}");
        assert!(lines[4].starts_with("{\"event\":\"exit\""), "{text}");
        assert_eq!(lines.len(), 5);
    }

    #[test]
    fn human_mode_keeps_console_on_stdout() {
        let mut vmm = FakeVmm {
            runs: [
                resp(exit_kind::CHECKPOINT, "hi\n"),
                resp(exit_kind::HLT, ""),
            ]
            .into(),
            logs: [vec![0x400, 0x401, 0x402, 0x900]].into(),
            stats: abi::StatsResp {
                mode: 1,
                ..abi::StatsResp::default()
            },
            ..FakeVmm::default()
        };
        let (r, out, err) = run_captured(&mut vmm, &cfg(false), &|| false);
        assert_eq!(r.unwrap(), 0, "HLT is success");
        assert_eq!(out, "hi\n");
        assert!(
            err.contains("smudge: checkpoint 1: 4 dirty pages: 0x400-0x402 0x900\n"),
            "{err}"
        );
        assert!(
            err.contains("smudge: exit: the guest executed HLT"),
            "{err}"
        );
    }

    #[test]
    fn each_ending_has_its_reason_and_status() {
        let mut err_resp = resp(exit_kind::ERROR, "");
        err_resp.reason = 19 + 8; // VMXON
        err_resp.set_message("the guest executed a VMX instruction");
        let mut mmio = resp(exit_kind::MMIO, "");
        mmio.gpa = 0x8000_0000;
        mmio.write = 1;
        let mut exit7 = resp(exit_kind::EXIT, "");
        exit7.code = 7;
        let cases = [
            (exit7, "exit", status::GUEST_FAILED),
            (
                resp(exit_kind::TRIPLE_FAULT, ""),
                "triple_fault",
                status::TRIPLE_FAULT,
            ),
            (mmio, "mmio", status::MMIO),
            (err_resp, "error", status::ERROR),
        ];
        for (last, name, st) in cases {
            let mut vmm = FakeVmm {
                runs: [last].into(),
                stats: abi::StatsResp {
                    mode: 3,
                    ..Default::default()
                },
                ..FakeVmm::default()
            };
            let (r, out, _) = run_captured(&mut vmm, &cfg(true), &|| false);
            assert_eq!(r.unwrap(), st, "{name}");
            let ev = &json_lines(&out)[0];
            assert_eq!(ev["reason"], name);
            assert_eq!(ev["mode"], "wp");
            match name {
                "exit" => assert_eq!(ev["code"], 7),
                "mmio" => {
                    assert_eq!(ev["gpa"], 0x8000_0000u64);
                    assert_eq!(ev["write"], true);
                }
                "error" => {
                    assert_eq!(ev["message"], "the guest executed a VMX instruction");
                    assert_eq!(ev["exit_reason"], "vmx_instruction");
                }
                _ => {}
            }
        }
    }

    #[test]
    fn timeout_stops_an_interrupted_guest() {
        let runs: VecDeque<RunResp> = (0..5).map(|_| resp(exit_kind::INTERRUPTED, "")).collect();
        let mut vmm = FakeVmm {
            runs,
            ..FakeVmm::default()
        };
        let calls = std::cell::Cell::new(0);
        // The clock says "elapsed" on the fourth check.
        let timed_out = || {
            calls.set(calls.get() + 1);
            calls.get() > 3
        };
        let (r, out, _) = run_captured(&mut vmm, &cfg(true), &timed_out);
        assert_eq!(r.unwrap(), status::TIMEOUT);
        assert_eq!(vmm.runs.len(), 2, "three runs, then the timeout");
        assert_eq!(json_lines(&out)[0]["reason"], "timeout");
    }

    #[test]
    fn unsupported_mode_is_one_clear_line() {
        let mut vmm = FakeVmm {
            setup_err: Some(95),
            ..FakeVmm::default()
        }; // EOPNOTSUPP
        let c = RunConfig {
            mode: ModeArg::Pml,
            ..cfg(false)
        };
        let (r, _, _) = run_captured(&mut vmm, &c, &|| false);
        let msg = format!("{:#}", r.unwrap_err());
        assert!(msg.contains("'pml' is not supported by this CPU"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn several_vcpus_are_refused_before_anything_runs() {
        let mut vmm = FakeVmm::default();
        let c = RunConfig {
            vcpus: 2,
            ..cfg(false)
        };
        let (r, _, _) = run_captured(&mut vmm, &c, &|| false);
        assert_eq!(
            r.unwrap_err().to_string(),
            "run_guest drives one vCPU; several go through multi::run_vcpus"
        );
        assert!(vmm.setups.is_empty());
    }

    #[test]
    fn a_bad_image_is_refused_with_the_loader_message() {
        let mut vmm = FakeVmm::default();
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let r = run_guest(
            &mut vmm,
            b"#!/bin/sh\n",
            &cfg(false),
            &mut Streams::new(&mut o, &mut e),
            &|| false,
        );
        assert!(r.unwrap_err().to_string().contains("not an ELF64"));
        assert!(vmm.setups.is_empty());
    }

    #[test]
    fn exit_counts_merge_names_and_skip_zero() {
        let mut exits = [0u64; 70];
        exits[19] = 1; // VMCLEAR
        exits[24] = 2; // VMREAD: both "vmx_instruction"
        exits[48] = 5;
        assert_eq!(
            exit_counts(&exits),
            vec![("vmx_instruction", 3), ("ept_violation", 5)]
        );
    }
}
