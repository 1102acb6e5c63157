//! End-to-end tests on the emulated VT-x machine. Bochs is an independent VMX implementation:
//! its VM-entry checks judge our VMCS, its EPT walk sets the A/D bits we harvest, and the
//! guests report through the console which pages they wrote, so each dirty log is compared
//! with what the guest itself says.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeSet;

use crate::bochs::{boot, Artifacts, Machine};
use crate::step;

/// One case's output inside a boot.
pub(crate) struct Case {
    pub(crate) name: String,
    pub(crate) rc: i32,
    pub(crate) out: String,
}

/// The shell functions of [`run_cases`]: `sent` prints how many bytes ttyS1 has sent, once it
/// has sent all it was given (its count stops moving), as init does before the power-off.
const SENT: &str = "set +e
tx() { sed -n 's/^1:.* tx:\\([0-9]*\\).*/\\1/p' /proc/tty/driver/serial; }
sent() { p=; c=$(tx); while [ \"$c\" != \"$p\" ]; do p=$c; i=0; while [ $i -lt 500 ]; do i=$((i+1)); done; c=$(tx); done; echo $c; }
";

/// The emulated serial line (ttyS1) has been seen to drop one transmit FIFO load (16 bytes) in
/// a 2-CPU boot; the boot is then run again, once. The checks never see incomplete output.
#[derive(Debug)]
pub(crate) struct ConsoleLoss(String);

impl std::fmt::Display for ConsoleLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the serial console lost output: {}", self.0)
    }
}

impl std::error::Error for ConsoleLoss {}

/// Runs `cases` (name, shell command) in one boot; returns each case's output and status.
/// Each case's status line also says how many bytes the serial line sent for it (ttyS1's
/// transmit count, read once all is sent), so that output lost on the way out is told apart
/// from output never written ([`ConsoleLoss`]). The cases write to the terminal itself, as a
/// user's would; a case leaves no background process writing to it.
pub(crate) fn run_cases(
    a: &Artifacts,
    m: &Machine,
    files: &[std::path::PathBuf],
    timeout: u64,
    cases: &[(&str, String)],
) -> Result<(Vec<Case>, f64)> {
    let mut script = String::from(SENT);
    for (name, cmd) in cases {
        script.push_str(&format!(
            "echo '@@CASE {name}'\na=$(sent)\n( {cmd} ) 2>&1\nrc=$?\necho\nb=$(sent)\n\
             echo \"@@RC {name} $rc ${{a:+${{b:+$((b - a))}}}}\"\n"
        ));
    }
    let b = boot(a, m, files, &script, timeout, false)?;
    let raw = b.output;
    // `boot` drops lines starting with @@SMUDGE; our markers survive.
    let mut out = Vec::new();
    let mut cur: Option<Case> = None;
    let mut arrived = 0usize;
    for seg in raw.split_inclusive('\n') {
        // The terminal sent each newline as CR LF (ONLCR): the line is what came before them.
        let line = seg
            .strip_suffix('\n')
            .map_or(seg, |l| l.strip_suffix('\r').unwrap_or(l));
        if let Some(n) = line.strip_prefix("@@CASE ") {
            cur = Some(Case {
                name: n.to_string(),
                rc: -1,
                out: String::new(),
            });
            arrived = 0;
        } else if let Some(rest) = line.strip_prefix("@@RC ") {
            let mut it = rest.split_whitespace();
            let (n, rc, sent) = (
                it.next().unwrap_or_default(),
                it.next().and_then(|s| s.parse().ok()).unwrap_or(-1),
                it.next().and_then(|s| s.parse::<usize>().ok()),
            );
            if let Some(mut c) = cur.take() {
                if let Some(sent) = sent.filter(|&s| s != arrived) {
                    let what = format!("case {n}: ttyS1 sent {sent} bytes, {arrived} arrived");
                    return Err(ConsoleLoss(what).into());
                }
                if c.name == n {
                    c.rc = rc;
                    out.push(c);
                }
            }
        } else if let Some(c) = cur.as_mut() {
            c.out.push_str(line);
            c.out.push('\n');
            arrived += seg.len();
        }
    }
    for (name, _) in cases {
        if !out.iter().any(|c| c.name == *name) {
            return Err(ConsoleLoss(format!(
                "case {name} has no status line; machine output:\n{raw}"
            ))
            .into());
        }
    }
    Ok((out, b.seconds))
}

/// A check of one boot's output: it reads the outputs of the boot's cases and may add lines to
/// the figures printed at the end (the README's numbers); it returns its one-line result.
type Verify = Box<dyn Fn(&[Case], &mut Vec<String>) -> Result<String>>;

/// One boot of the emulated machine: the cases it runs (name, shell command), and the checks of
/// their output, each printed as one `ok` or `FAIL` line.
pub(crate) struct Boot {
    title: String,
    machine: Machine<'static>,
    /// Files put at /files (the working directory of the cases).
    pub(crate) files: Vec<std::path::PathBuf>,
    /// Seconds before the boot counts as hung.
    pub(crate) timeout: u64,
    cases: Vec<(String, String)>,
    checks: Vec<(String, Verify)>,
}

impl Boot {
    pub(crate) fn new(title: &str, cpu: &'static str, smp: u32) -> Boot {
        Boot::on(title, Machine::new(cpu, smp))
    }

    /// A boot of machine `m`.
    pub(crate) fn on(title: &str, m: Machine<'static>) -> Boot {
        Boot {
            title: title.into(),
            machine: m,
            files: Vec::new(),
            timeout: 600,
            cases: Vec::new(),
            checks: Vec::new(),
        }
    }

    /// A case: `cmd` runs in the machine, its output and status are kept under `name`.
    pub(crate) fn case(&mut self, name: impl Into<String>, cmd: impl Into<String>) {
        self.cases.push((name.into(), cmd.into()));
    }

    /// A check of the cases' output.
    pub(crate) fn check(
        &mut self,
        title: impl Into<String>,
        verify: impl Fn(&[Case], &mut Vec<String>) -> Result<String> + 'static,
    ) {
        self.checks.push((title.into(), Box::new(verify)));
    }
}

/// Boots each of `boots` once, runs its checks, prints one line per check, the boot times and
/// the figures, and fails naming every check that failed.
pub(crate) fn run_boots(a: &Artifacts, boots: Vec<Boot>) -> Result<()> {
    let mut failures = Vec::new();
    let mut figures = Vec::new();
    for b in boots {
        step(&b.title);
        let cases: Vec<(&str, String)> = b
            .cases
            .iter()
            .map(|(n, c)| (n.as_str(), c.clone()))
            .collect();
        let run = || run_cases(a, &b.machine, &b.files, b.timeout, &cases);
        let (res, secs) = match run() {
            Err(e) if e.downcast_ref::<ConsoleLoss>().is_some() => {
                println!("  {e:#}; booting once more");
                run()?
            }
            r => r?,
        };
        for (title, verify) in &b.checks {
            match verify(&res, &mut figures) {
                Ok(msg) => println!("  ok    {title}: {msg}"),
                Err(e) => {
                    println!("  FAIL  {title}: {e:#}");
                    failures.push(title.clone());
                }
            }
        }
        println!("  (boot with {} cases: {secs:.1} s)", cases.len());
    }
    if !figures.is_empty() {
        println!("  figures:");
        for f in &figures {
            println!("    {f}");
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} end-to-end check(s) failed: {}",
            failures.len(),
            failures.join(", ")
        );
    }
    Ok(())
}

pub(crate) fn case<'a>(cases: &'a [Case], name: &str) -> Result<&'a Case> {
    cases
        .iter()
        .find(|c| c.name == name)
        .with_context(|| format!("no case {name}"))
}

/// The kernel log's lines that mean trouble (empty output: a clean log).
pub(crate) const KERNEL_LOG_TROUBLE: &str =
    "dmesg | grep -E 'Oops|BUG|WARNING|general protection|Out of memory|oom-killer|page allocation failure' || true";

fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn gfns(v: &Value) -> BTreeSet<u64> {
    v["dirty_gfns"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
        .unwrap_or_default()
}

/// The pagewriter's own account: the pages it wrote before each checkpoint.
fn reported_rounds(out: &str) -> Vec<BTreeSet<u64>> {
    let mut rounds = Vec::new();
    let mut cur = BTreeSet::new();
    for line in out.lines() {
        if let Some(h) = line.trim().strip_prefix("W ") {
            if let Ok(g) = u64::from_str_radix(h.trim().trim_start_matches("0x"), 16) {
                cur.insert(g);
            }
        } else if line.starts_with("{\"event\":\"checkpoint\"") {
            rounds.push(std::mem::take(&mut cur));
        }
    }
    rounds
}

/// Checks one pagewriter run: every checkpoint's dirty log equals the pages the guest reports.
fn check_pagewriter(c: &Case, mode: &str) -> Result<(usize, usize)> {
    if c.rc != 0 {
        bail!("{}: exit status {}:\n{}", c.name, c.rc, c.out);
    }
    let events = json_lines(&c.out);
    let cps: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "checkpoint")
        .collect();
    let reported = reported_rounds(&c.out);
    if cps.is_empty() || cps.len() != reported.len() {
        bail!(
            "{}: {} checkpoints but {} reported rounds:\n{}",
            c.name,
            cps.len(),
            reported.len(),
            c.out
        );
    }
    let mut pages = 0;
    for (i, (cp, want)) in cps.iter().zip(&reported).enumerate() {
        if cp["mode"] != mode {
            bail!("{}: checkpoint mode {} != {mode}", c.name, cp["mode"]);
        }
        let got = gfns(cp);
        if &got != want {
            let lost: Vec<String> = want.difference(&got).map(|g| format!("{g:#x}")).collect();
            let extra: Vec<String> = got.difference(want).map(|g| format!("{g:#x}")).collect();
            bail!("{} checkpoint {}: dirty log differs from the guest's report: lost {:?}, spurious {:?}", c.name, i + 1, lost, extra);
        }
        pages += want.len();
    }
    Ok((cps.len(), pages))
}

pub(crate) fn exit_event(c: &Case) -> Result<Value> {
    json_lines(&c.out)
        .into_iter()
        .rev()
        .find(|e| e["event"] == "exit")
        .with_context(|| format!("{}: no exit event in:\n{}", c.name, c.out))
}

fn expect_reason(c: &Case, reason: &str) -> Result<()> {
    let e = exit_event(c)?;
    if e["reason"] != reason {
        bail!(
            "{}: expected reason {reason}, got {}:\n{}",
            c.name,
            e["reason"],
            c.out
        );
    }
    Ok(())
}

/// Exits per re-dirtied page from a seqwriter run: pass 2 re-writes every page of pass 1
/// (already backed), so its exits are the final counts minus those at checkpoint 1.
fn exits_per_redirty(c: &Case) -> Result<(f64, u64)> {
    let events = json_lines(&c.out);
    let cp1 = events
        .iter()
        .find(|e| e["event"] == "checkpoint" && e["seq"] == 1)
        .context("seqwriter: no checkpoint 1")?;
    let cp2 = events
        .iter()
        .find(|e| e["event"] == "checkpoint" && e["seq"] == 2)
        .context("seqwriter: no checkpoint 2")?;
    let pages = gfns(cp2).len() as u64;
    let count = |e: &Value| -> u64 {
        ["ept_violation", "pml_full"]
            .iter()
            .map(|k| e["exits"][k].as_u64().unwrap_or(0))
            .sum()
    };
    let d = count(cp2).saturating_sub(count(cp1));
    if pages == 0 {
        bail!("seqwriter: checkpoint 2 reported no pages");
    }
    Ok((d as f64 / pages as f64, pages))
}

/// Several vCPUs: the union of every harvest must equal the union of every page the vCPUs
/// report writing. Returns (pages written, pages harvested, harvests).
fn union_check(c: &Case) -> Result<(usize, usize, usize)> {
    let mut written = BTreeSet::new();
    for line in c.out.lines() {
        if let Some(h) = line.trim().strip_prefix("W ") {
            if let Ok(g) = u64::from_str_radix(h.trim().trim_start_matches("0x"), 16) {
                written.insert(g);
            }
        }
    }
    let events = json_lines(&c.out);
    let mut harvested = BTreeSet::new();
    let mut n = 0;
    for e in &events {
        if e["event"] == "checkpoint" || e["event"] == "exit" {
            harvested.extend(gfns(e));
            n += 1;
        }
    }
    let lost: Vec<String> = written
        .difference(&harvested)
        .map(|g| format!("{g:#x}"))
        .collect();
    let spurious: Vec<String> = harvested
        .difference(&written)
        .map(|g| format!("{g:#x}"))
        .collect();
    if written.is_empty() || !lost.is_empty() || !spurious.is_empty() {
        bail!(
            "{}: written {}, lost {:?}, spurious {:?}",
            c.name,
            written.len(),
            lost,
            spurious
        );
    }
    Ok((written.len(), harvested.len(), n))
}

/// The whole suite: three boots here, and the hostile suite's.
pub fn suite() -> Result<()> {
    let a = Artifacts::build()?;
    run_boots(
        &a,
        vec![
            main_boot(),
            tigerlake_boot(),
            smp_boot(),
            crash_boot(),
            crate::e2e_hostile::boot(),
            crate::selftests::boot()?,
        ],
    )
}

/// Dirty logs, the seed's observation, hostile guests and a bad VMCS on skylake_x with 1 CPU.
fn main_boot() -> Boot {
    let mut b = Boot::new(
        "end-to-end suite on Bochs corei7_skylake_x (1 CPU)",
        "corei7_skylake_x",
        1,
    );
    b.case("hello", "smudge run /guests/hello");
    for m in ["ad", "pml", "wp"] {
        b.case(
            format!("pagewriter-{m}"),
            format!("smudge run --json --mode {m} /guests/pagewriter"),
        );
    }
    for m in ["ad", "pml", "wp"] {
        b.case(
            format!("seqwriter-{m}"),
            format!("smudge run --json --mode {m} /guests/seqwriter"),
        );
    }
    for (name, cmd) in [
        ("explain", "smudge explain /guests/pagewriter".to_string()),
        ("triple", "smudge run --json /guests/hostile_triple".into()),
        ("spin", "smudge run --json --timeout 3 /guests/hostile_spin".into()),
        ("beyond", "smudge run --json /guests/hostile_beyond".into()),
        ("ptwrite", "smudge run --json /guests/hostile_ptwrite".into()),
        ("vmx", "smudge run --json /guests/hostile_vmx".into()),
        ("bad-vmcs-precheck", "echo 1 > /sys/module/smudge/parameters/test_bad_vmcs; smudge run --json /guests/hello; echo 0 > /sys/module/smudge/parameters/test_bad_vmcs".into()),
        ("bad-vmcs-cpu", "echo 2 > /sys/module/smudge/parameters/test_bad_vmcs; smudge run --json /guests/hello; echo 0 > /sys/module/smudge/parameters/test_bad_vmcs".into()),
        ("after-hostile", "smudge run /guests/hello".into()),
        ("unload-refused-while-open", "smudge run --timeout 4 /guests/hostile_spin > /dev/null 2>&1 & sleep 1; if rmmod smudge 2>/dev/null; then echo UNLOADED; else echo REFUSED; fi; wait".into()),
        ("pages-held", "cat /sys/module/smudge/parameters/pages_held".into()),
        ("unload", "rmmod smudge && ! test -e /dev/smudge".into()),
    ] {
        b.case(name, cmd);
    }
    b.check("hello console", move |res, _| {
        let c = case(res, "hello")?;
        if c.rc != 0 || !c.out.contains("hello from the smudge guest") {
            bail!("rc {}:\n{}", c.rc, c.out);
        }
        Ok("guest console reached the tool".into())
    });
    for m in ["ad", "pml", "wp"] {
        b.check(
            &format!("dirty log = guest's report ({m})"),
            move |res, _| {
                let (n, pages) = check_pagewriter(case(res, &format!("pagewriter-{m}"))?, m)?;
                Ok(format!(
                    "{n} checkpoints, {pages} pages, 0 lost, 0 spurious"
                ))
            },
        );
    }
    for m in ["ad", "pml", "wp"] {
        b.check(
            &format!("exits per re-dirtied page ({m})"),
            move |res, figures| {
                let c = case(res, &format!("seqwriter-{m}"))?;
                if c.rc != 0 {
                    bail!("rc {}:\n{}", c.rc, c.out);
                }
                let (x, pages) = exits_per_redirty(c)?;
                let ok = match m {
                    "ad" => x < 0.01,
                    "pml" => x > 0.0 && x < 0.01,
                    _ => (x - 1.0).abs() < 0.01,
                };
                figures.push(format!("exits per re-dirtied page ({m}): {x:.4}"));
                if !ok {
                    bail!("{x:.4} exits per page over {pages} pages is not what {m} should cost");
                }
                Ok(format!("{x:.4} exits/page over {pages} re-dirtied pages"))
            },
        );
    }
    b.check("explain: EPT D=1, host (user) PTE D=0", move |res, _| {
        let c = case(res, "explain")?;
        // Every explained page: EPT leaf D=1, and the tool's own read-only user PTE of the same
        // backing page D=0 (the seed's observation).
        let lines: Vec<&str> = c.out.lines().filter(|l| l.contains(" EPT 0x")).collect();
        let seed = lines
            .iter()
            .filter(|l| {
                let ept = l.split(" EPT ").nth(1).unwrap_or_default();
                let user = l.split(" user PTE ").nth(1).unwrap_or_default();
                ept.contains("A=1 D=1") && user.contains("D=0")
            })
            .count();
        if c.rc != 0 || lines.is_empty() || seed != lines.len() {
            bail!(
                "rc {}, {} of {} pages show EPT D=1 with user PTE D=0:\n{}",
                c.rc,
                seed,
                lines.len(),
                c.out
            );
        }
        Ok(format!(
            "{seed} pages: EPT leaf D=1, user PTE of the same backing page D=0"
        ))
    });
    b.check("triple fault", move |res, _| {
        expect_reason(case(res, "triple")?, "triple_fault").map(|_| "ends the run".into())
    });
    b.check("endless loop", move |res, _| {
        expect_reason(case(res, "spin")?, "timeout").map(|_| "stopped by the timeout".into())
    });
    b.check("access beyond memory", move |res, _| {
        expect_reason(case(res, "beyond")?, "mmio").map(|_| "MMIO exit".into())
    });
    b.check("write to own page tables", move |res, _| {
        let c = case(res, "ptwrite")?;
        let e = exit_event(c)?;
        if e["code"] != 0 {
            bail!("{}", c.out);
        }
        Ok("guest survives".into())
    });
    b.check("guest VMX instruction", move |res, _| {
        let c = case(res, "vmx")?;
        expect_reason(c, "error")?;
        if !c.out.contains("VMX instruction") {
            bail!("{}", c.out);
        }
        Ok("stopped with a precise reason".into())
    });
    b.check(
        "bad VMCS refused by the software checker before VMLAUNCH",
        move |res, _| {
            let c = case(res, "bad-vmcs-precheck")?;
            let e = exit_event(c)?;
            let msg = e["message"].as_str().unwrap_or_default();
            if e["reason"] != "error"
                || !msg.contains("before VMLAUNCH")
                || !msg.contains("[guest.cr0.fixed]")
                || !msg.contains("SDM 27.3.1.1")
            {
                bail!("{}", c.out);
            }
            Ok("named rule [guest.cr0.fixed], SDM 27.3.1.1".into())
        },
    );
    b.check(
        "bad VMCS: Bochs refuses the entry, the checker names the rule",
        move |res, _| {
            let c = case(res, "bad-vmcs-cpu")?;
            let e = exit_event(c)?;
            let msg = e["message"].as_str().unwrap_or_default();
            if e["reason"] != "error"
                || !msg.contains("VM entry failed")
                || !msg.contains("[guest.cr0.fixed]")
                || e["exit_reason_number"] != 33
            {
                bail!("{}", c.out);
            }
            Ok("exit reason 33 (invalid guest state) explained as [guest.cr0.fixed]".into())
        },
    );
    b.check("host healthy after hostile guests", move |res, _| {
        let c = case(res, "after-hostile")?;
        if c.rc != 0 || !c.out.contains("hello from the smudge guest") {
            bail!("{}", c.out);
        }
        Ok("next run works".into())
    });
    b.check("unload refused while a VM is open", move |res, _| {
        let c = case(res, "unload-refused-while-open")?;
        if !c.out.contains("REFUSED") {
            bail!("{}", c.out);
        }
        Ok("rmmod fails while a guest runs; the module stays usable".into())
    });
    b.check("page accounting back to zero", move |res, _| {
        let c = case(res, "pages-held")?;
        if c.out.trim() != "0" {
            bail!("pages_held = {}", c.out.trim());
        }
        Ok("0 pages held after every VM closed".into())
    });
    b.check("unload", move |res, _| {
        let c = case(res, "unload")?;
        if c.rc != 0 {
            bail!("{}", c.out);
        }
        Ok("rmmod succeeded".into())
    });
    b
}

/// The dirty logs again on another CPU model, and the isolation guest on the model that
/// enumerates every speculation barrier (L1D_FLUSH, MD_CLEAR, IBPB).
fn tigerlake_boot() -> Boot {
    let mut b = Boot::new(
        "end-to-end suite on Bochs tigerlake (1 CPU)",
        "tigerlake",
        1,
    );
    b.case(
        "tl-barriers-default",
        "dmesg | grep 'speculation barriers'; grep -H . /sys/devices/system/cpu/vulnerabilities/mds \
         /sys/devices/system/cpu/vulnerabilities/mmio_stale_data /sys/devices/system/cpu/vulnerabilities/spectre_v2; \
         grep -o -w -E 'flush_l1d|md_clear|ibpb' /proc/cpuinfo | sort -u | sed 's/^/cpuinfo: /'",
    );
    b.check(
        "tigerlake: speculation barriers follow the kernel's choices",
        |res, _| {
            let c = case(res, "tl-barriers-default")?;
            let line = c
                .out
                .lines()
                .find(|l| l.contains("speculation barriers before each VM entry"))
                .ok_or_else(|| anyhow::anyhow!("no barrier line in the kernel log:\n{}", c.out))?;
            let said = line.rsplit("VM entry: ").next().unwrap_or_default();
            let sysfs = |f: &str| {
                c.out
                    .lines()
                    .find(|l| l.contains(&format!("vulnerabilities/{f}:")))
                    .unwrap_or_default()
            };
            // The kernel clears CPU buffers ("Mitigation: Clear CPU buffers") exactly when it
            // set X86_FEATURE_CLEAR_CPU_BUF; it issues IBPB when spectre_v2 says so.
            let verw = ["mds", "mmio_stale_data"]
                .iter()
                .any(|f| sysfs(f).contains("Clear CPU buffers"));
            let ibpb = sysfs("spectre_v2").contains("IBPB: conditional")
                || sysfs("spectre_v2").contains("IBPB: always-on");
            let flush_possible = c.out.contains("cpuinfo: flush_l1d");
            if said.contains("VERW") != verw
                || said.contains("IBPB") != ibpb
                || (said.contains("L1D flush") && !flush_possible)
            {
                bail!("smudge said \"{said}\", the kernel:\n{}", c.out);
            }
            Ok(format!(
                "smudge: \"{said}\", as the kernel's mitigation state implies"
            ))
        },
    );
    for m in ["ad", "pml", "wp"] {
        b.case(
            format!("tl-pagewriter-{m}"),
            format!("smudge run --json --mode {m} /guests/pagewriter"),
        );
    }
    for m in ["ad", "pml", "wp"] {
        b.check(
            &format!("tigerlake: dirty log = guest's report ({m})"),
            move |res, _| {
                let (n, pages) = check_pagewriter(case(res, &format!("tl-pagewriter-{m}"))?, m)?;
                Ok(format!(
                    "{n} checkpoints, {pages} pages, 0 lost, 0 spurious"
                ))
            },
        );
    }
    // Last: it reloads the module with the test-only probe and every barrier forced.
    b.case(
        "tl-isolation",
        "rmmod smudge && insmod /smudge.ko force_barriers=1 probe_host=1 && smudge-hostile isolation /guests/isolation; \
         rc=$?; rmmod smudge; insmod /smudge.ko; exit $rc",
    );
    b.check("tigerlake: the isolation guest changes nothing of the host", |res, figures| {
        let c = case(res, "tl-isolation")?;
        let barriers: Vec<u64> = c
            .out
            .lines()
            .find_map(|l| l.strip_prefix("barriers: "))
            .map(|l| {
                l.split(", ")
                    .filter_map(|w| w.split(' ').next()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let ok = c.rc == 0 && c.out.contains(" passed, 0 failed") && !c.out.contains("FAIL");
        let [entries, l1d, verw, ibpb] = barriers[..] else {
            bail!("no barrier counts:\n{}", c.out);
        };
        if !ok || entries == 0 || l1d != entries || verw != entries || ibpb == 0 {
            bail!("{}", c.out);
        }
        figures.push(format!(
            "isolation guest (100 checkpoints, 2,000 WBINVDs, 1,000 MOV-DRs): the tool's XMM0-XMM15 and hardware breakpoint kept across 101 RUNs, host DR0-DR3/DR7/XCR0/DEBUGCTL unchanged after all {entries} exits; forced barriers: {l1d} L1D flushes, {verw} VERWs, {ibpb} IBPB"
        ));
        Ok(format!(
            "guest and tool kept their registers, host debug state unchanged after {entries} exits, {l1d} L1D flushes, {verw} VERWs, {ibpb} IBPB"
        ))
    });
    b
}

/// A kernel crash with smudge loaded on 2 CPUs, one of them running a guest: every CPU leaves
/// VMX operation on the way down, the crashing one through the panic notifier, the other
/// through the kernel's emergency virtualization callback (INIT is blocked in VMX operation, so
/// a CPU left in it would keep kdump's kernel or a reboot from starting it).
fn crash_boot() -> Boot {
    let mut b = Boot::on(
        "a kernel crash with smudge loaded on Bochs corei7_skylake_x with 2 CPUs",
        Machine {
            crash: true,
            ..Machine::new("corei7_skylake_x", 2)
        },
    );
    b.timeout = 300;
    b.case("hook", "dmesg | grep 'smudge:.*virtualization callback'");
    // A guest that spins until the crash, on whichever CPU the scheduler gives it.
    b.case(
        "guest",
        "smudge run /guests/hostile_spin >/dev/null 2>&1 & sleep 2; kill -0 $! && echo running",
    );
    b.check(
        "a crash leaves VMX operation on every CPU",
        move |res, _| {
            let hook = case(res, "hook")?;
            if !hook.out.contains("registered the kernel's virtualization callback") {
                bail!("the kernel's virtualization callback is not in use: {}", hook.out);
            }
            let guest = case(res, "guest")?;
            if !guest.out.contains("running") {
                bail!("the guest was not running at the crash: {}", guest.out);
            }
            let log = &case(res, "kernel-log")?.out;
            let left: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("left VMX operation"))
                .collect();
            for cpu in 0..2 {
                let want = format!("smudge: CPU {cpu} left VMX operation (VMXOFF, CR4.VMXE 0)");
                if !left.iter().any(|l| l.contains(&want)) {
                    bail!("no '{want}' before the end of the panic:\n{}", left.join("\n"));
                }
            }
            Ok("a guest running, both CPUs left VMX operation (VMXOFF succeeded, CR4.VMXE 0) before the panic ended: the panicking one in the panic notifier, the other in the kernel's emergency callback".into())
        },
    );
    b
}

/// Two vCPUs on two CPUs: harvests with the other vCPU kicked out, and CR2 kept across exits.
fn smp_boot() -> Boot {
    let mut b = Boot::new(
        "end-to-end suite on Bochs corei7_skylake_x with 2 CPUs (2 vCPUs)",
        "corei7_skylake_x",
        2,
    );
    // The sleep case takes minutes of emulation (391.6 s measured in a boot of its own).
    b.timeout = 1200;
    for m in ["ad", "pml", "wp"] {
        b.case(
            format!("smp-{m}"),
            format!("smudge run --json --vcpus 2 --mode {m} /guests/smpwriter"),
        );
    }
    // Two shell loops that fork and page-fault all the time share the CPUs with the guest, so
    // the host takes page faults (which write CR2) between the guest's exits and entries.
    b.case(
        "smp-cr2",
        "sh -c 'while :; do ls / >/dev/null; done' & A=$!; sh -c 'while :; do ls / >/dev/null; done' & B=$!; \
         smudge run --json /guests/cr2keeper; kill $A $B",
    );
    // CPU 1 offline and back (INIT, which brings it back, is blocked in VMX root operation:
    // smudge leaves it first and enters it again after), then both CPUs run the guests again.
    b.case(
        "smp-hotplug",
        "echo 0 > /sys/devices/system/cpu/cpu1/online && echo 1 > /sys/devices/system/cpu/cpu1/online \
         && cat /sys/devices/system/cpu/online && smudge run --json --vcpus 2 --mode ad /guests/smpwriter",
    );
    // A system sleep in the middle of a guest: hibernation as far as the syscore callbacks
    // (pm_test "core": CPU 1 offline, then CPU 0 with interrupts off; 5 s; back), without
    // writing an image, while the pagewriter waits after its 4th checkpoint (`--pause-at`) with
    // its VMCS active on the CPU it ran on. smudge VMCLEARs the VMCSs active on each CPU, leaves
    // VMX operation as the CPU goes and enters it again as it comes back; the guest then runs
    // its last 4 rounds, each checkpoint's dirty log against its own report. Then new guests
    // run on both CPUs.
    b.case(
        "smp-sleep",
        "mkfifo /files/go; smudge run --json --mode pml --pause-at 4 /guests/pagewriter \
         </files/go >/files/pw.out 2>&1 & S=$!; exec 3>/files/go; \
         i=0; until grep -q '\"paused\"' /files/pw.out || [ $i -gt 20000 ]; do i=$((i+1)); done; \
         echo core > /sys/power/pm_test && echo disk > /sys/power/state; echo sleep-rc=$?; \
         echo go >&3; exec 3>&-; R=0; wait $S || R=$?; echo pw-rc=$R; cat /files/pw.out; \
         dmesg | grep 'smudge: CPU .* system sleep'; cat /sys/devices/system/cpu/online",
    );
    b.case(
        "smp-after-sleep",
        "smudge run --json --vcpus 2 --mode pml /guests/smpwriter",
    );
    b.case("smp-dmesg", KERNEL_LOG_TROUBLE);
    b.case(
        "smp-pages-held",
        "cat /sys/module/smudge/parameters/pages_held",
    );
    b.case("smp-unload", "rmmod smudge");
    for m in ["ad", "pml", "wp"] {
        b.check(&format!("2 vCPUs: no page lost or spurious ({m})"), move |res, _| {
                let c = case(res, &format!("smp-{m}"))?;
                if c.rc != 0 {
                    bail!("rc {}:\n{}", c.rc, c.out);
                }
                let (written, harvested, n) = union_check(c)?;
                Ok(format!("{n} harvests (other vCPU kicked out each time), {written} pages written, {harvested} harvested, 0 lost, 0 spurious"))
        });
    }
    b.check(
        "guest CR2 survives exits while the host page-faults",
        move |res, _| {
            let c = case(res, "smp-cr2")?;
            let e = exit_event(c)?;
            if e["code"] != 0 || !c.out.contains("40 of 40 rounds kept CR2") {
                bail!("{}", c.out);
            }
            Ok("40 of 40 checkpoints: the guest read back the CR2 it wrote".into())
        },
    );
    b.check("a CPU taken offline and back online", move |res, _| {
        let c = case(res, "smp-hotplug")?;
        if c.rc != 0 || !c.out.lines().any(|l| l.trim() == "0-1") {
            bail!("rc {}:\n{}", c.rc, c.out);
        }
        let (written, harvested, n) = union_check(c)?;
        Ok(format!("CPU 1 offline and back (it left VMX operation and entered it again), then 2 vCPUs: {n} harvests, {written} pages written, {harvested} harvested, 0 lost"))
    });
    b.check("a system sleep in the middle of a guest", move |res, _| {
        let c = case(res, "smp-sleep")?;
        let out = &c.out;
        let online = out.lines().any(|l| l.trim() == "0-1");
        if c.rc != 0 || !out.contains("sleep-rc=0") || !out.contains("pw-rc=0") || !online {
            bail!("rc {}:\n{out}", c.rc);
        }
        for want in [
            "smudge: CPU 0 left VMX operation for a system sleep",
            "smudge: CPU 0 in VMX operation again after a system sleep",
        ] {
            if !out.contains(want) {
                bail!("no '{want}':\n{out}");
            }
        }
        // The guest paused across the sleep, then ran its last rounds on (from the VMCS data its
        // CPU wrote back before leaving VMX operation), each dirty log equal to its report.
        let paused = json_lines(out).iter().any(|e| e["event"] == "paused" && e["seq"] == 4);
        let (checkpoints, pages) = check_pagewriter(c, "pml")?;
        if !paused || checkpoints != 8 || exit_event(c)?["code"] != 0 {
            bail!("the guest did not pause after checkpoint 4 and run to its end:\n{out}");
        }
        let dmesg = case(res, "smp-dmesg")?;
        if !dmesg.out.trim().is_empty() {
            bail!("kernel log: {}", dmesg.out);
        }
        let after = case(res, "smp-after-sleep")?;
        if after.rc != 0 {
            bail!("rc {} after the sleep:\n{}", after.rc, after.out);
        }
        let (written, harvested, n) = union_check(after)?;
        Ok(format!("hibernation to its syscore callbacks and back, the pagewriter paused after checkpoint 4: CPU 1 left VMX operation going offline, CPU 0 in syscore suspend, both entered it again; the guest ran on to its end ({checkpoints} checkpoints, {pages} pages, each dirty log = its report); kernel log clean; then 2 vCPUs: {n} harvests, {written} pages written, {harvested} harvested, 0 lost"))
    });
    b.check("2 vCPUs: pages back to zero, unload", move |res, _| {
        let held = case(res, "smp-pages-held")?.out.trim().to_string();
        if held != "0" || case(res, "smp-unload")?.rc != 0 {
            bail!("pages_held = {held}");
        }
        Ok("0 pages held, rmmod succeeded".into())
    });
    b
}
