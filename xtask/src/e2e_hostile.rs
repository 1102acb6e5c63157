//! Hostile input and faults, end to end on the emulated VT-x machine (one boot, 2 CPUs):
//! `smudge-hostile` (malformed requests, races, allocator fault injection), guests that attack
//! from inside (an exception storm, VMX instructions, a page hog under a failing allocator), the
//! lost-page hunt with 2 vCPUs in each dirty mode, and then a clean kernel log, zero pages held
//! and a clean unload. The figures printed here are the README's reliability numbers.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

use crate::bochs::Artifacts;
use crate::e2e::{case, exit_event, gfns, run_cases, union_check, Case};
use crate::step;

/// The module parameters inside the machine.
const PARAMS: &str = "/sys/module/smudge/parameters";
/// Pages `fail_alloc_after` lets the hog case allocate before the host allocator "fails":
/// enough for SETUP and LOAD_ELF (a few dozen), far fewer than the guest's 64 MiB (16384).
const HOG_ALLOCS: u32 = 2000;
/// The lost-page guest's regions (guests/src/bin/lostpage.rs): vCPU v writes pages
/// [FIRST + v * PAGES, FIRST + (v + 1) * PAGES).
const LOSTPAGE_FIRST: u64 = 0x400;
const LOSTPAGE_PAGES: u64 = 0x1c00;

/// `cmd`, then the driver's page count (`pages_held=N`), keeping `cmd`'s status.
fn with_pages(cmd: &str) -> String {
    format!("{cmd}; rc=$?; echo \"pages_held=$(cat {PARAMS}/pages_held)\"; exit $rc")
}

fn pages_after(c: &Case) -> Result<()> {
    let held = c.out.lines().rev().find_map(|l| l.strip_prefix("pages_held=")).context("no pages_held line")?;
    if held.trim() != "0" {
        bail!("{}: pages_held = {} after the VM closed", c.name, held.trim());
    }
    Ok(())
}

/// The whole hostile suite; prints one line per check and the figures.
pub fn suite(a: &Artifacts) -> Result<()> {
    let mut cases: Vec<(&str, String)> = vec![
        ("hostile-tool", "smudge-hostile /guests".into()),
        ("ud-storm", with_pages("smudge run --json /guests/hostile_ud_storm")),
        ("vmread", with_pages("smudge run --json /guests/hostile_vmread")),
        ("invept", with_pages("smudge run --json /guests/hostile_invept")),
        (
            "hog-oom",
            format!(
                "echo {HOG_ALLOCS} > {PARAMS}/fail_alloc_after; smudge run --json --mem 64 /guests/hostile_hog; rc=$?; \
                 echo -1 > {PARAMS}/fail_alloc_after; echo \"pages_held=$(cat {PARAMS}/pages_held)\"; exit $rc"
            ),
        ),
        ("hog-after", with_pages("smudge run --json --mem 64 /guests/hostile_hog")),
    ];
    for m in ["ad", "pml", "wp"] {
        let name: &'static str = Box::leak(format!("lostpage-{m}").into_boxed_str());
        cases.push((name, with_pages(&format!("smudge run --json --vcpus 2 --mode {m} /guests/lostpage"))));
    }
    cases.extend([
        ("dmesg", "dmesg | grep -E 'Oops|BUG|WARNING|general protection' || true".to_string()),
        ("unload", "rmmod smudge && ! test -e /dev/smudge".into()),
    ]);
    step("hostile input and faults on Bochs corei7_skylake_x with 2 CPUs");
    let (res, secs) = run_cases(a, "corei7_skylake_x", 2, &cases)?;
    let mut failures = Vec::new();
    let mut check = |name: &str, r: Result<String>| match r {
        Ok(msg) => println!("  ok    {name}: {msg}"),
        Err(e) => {
            println!("  FAIL  {name}: {e:#}");
            failures.push(name.to_string());
        }
    };
    let mut figures = Vec::new();

    check("smudge-hostile: every malformed request, race and injected fault handled", (|| {
        let c = case(&res, "hostile-tool")?;
        let total = c.out.lines().find_map(parse_totals).context("no totals line")?;
        let fails: Vec<&str> = c.out.lines().filter(|l| l.starts_with("FAIL ")).collect();
        let (ioctls, faults) = c.out.lines().find_map(parse_figures).unwrap_or((0, 0));
        figures.push(format!("smudge-hostile: {} cases ({ioctls} ioctls), {faults} injected faults survived", total.0 + total.1));
        if c.rc != 0 || total.1 != 0 || !fails.is_empty() {
            bail!("rc {}, {} passed, {} failed:\n{}", c.rc, total.0, total.1, fails.join("\n"));
        }
        Ok(format!("{} cases passed, {ioctls} ioctls, {faults} injected faults survived", total.0))
    })());

    check("exception storm stays inside the guest", (|| {
        let c = case(&res, "ud-storm")?;
        let e = exit_event(c)?;
        let line = c.out.lines().find(|l| l.contains("hostile_ud_storm: handled")).context("no handler count")?;
        let total = field(line, "total=").context("no total")?;
        let expected = field(line, "expected=").context("no expected")?;
        // SDM 26.2: with the exception bitmap empty, guest exceptions never cause a VM exit
        // (basic reason 0 counts only the NMIs the host takes).
        let exc_exits = e["exits"]["exception_nmi"].as_u64().unwrap_or(0);
        if e["reason"] != "exit" || e["code"] != 0 || total != expected || exc_exits * 100 > total {
            bail!("{line}; exit {} code {}; {exc_exits} exception exits:\n{}", e["reason"], e["code"], c.out);
        }
        pages_after(c)?;
        figures.push(format!("exception storm: {total} guest exceptions handled by the guest's own IDT"));
        Ok(format!("{total} #UD/#BP/#DE/#GP handled by the guest, exit code 0, pages back to 0"))
    })());

    // SDM Appendix C: basic exit reasons 23 (VMREAD) and 50 (INVEPT).
    for (name, reason) in [("vmread", 23u64), ("invept", 50)] {
        check(&format!("guest {name} stops the VM"), (|| {
            let c = case(&res, name)?;
            let e = exit_event(c)?;
            let msg = e["message"].as_str().unwrap_or_default();
            if e["reason"] != "error" || !msg.contains("VMX instruction") || e["exit_reason_number"] != reason || c.out.contains("returned") {
                bail!("{}", c.out);
            }
            pages_after(c)?;
            Ok(format!("reason error, exit reason {reason} ({}), \"{msg}\"", e["exit_reason"].as_str().unwrap_or_default()))
        })());
    }

    check("page hog under a failing host allocator", (|| {
        let c = case(&res, "hog-oom")?;
        let e = exit_event(c)?;
        let msg = e["message"].as_str().unwrap_or_default();
        if e["reason"] != "error" || !(msg.contains("out of memory") || msg.contains("page limit")) {
            bail!("{}", c.out);
        }
        pages_after(c)?;
        let progress = c.out.lines().rev().find(|l| l.starts_with("hostile_hog: ") && l.ends_with(" pages")).unwrap_or("no progress line");
        figures.push(format!("page hog: stopped cleanly after {HOG_ALLOCS} allocations ({progress})"));
        Ok(format!("\"{msg}\" after {HOG_ALLOCS} allocations ({progress}), pages back to 0"))
    })());

    check("the same hog runs to the end once the allocator works", (|| {
        let c = case(&res, "hog-after")?;
        let e = exit_event(c)?;
        if c.rc != 0 || e["reason"] != "exit" || e["code"] != 0 {
            bail!("rc {}:\n{}", c.rc, c.out);
        }
        pages_after(c)?;
        let touched = c.out.lines().find(|l| l.contains("hostile_hog: touched")).unwrap_or_default();
        Ok(format!("{}, pages back to 0", touched.trim()))
    })());

    for m in ["ad", "pml", "wp"] {
        check(&format!("lost-page hunt, 2 vCPUs ({m})"), (|| {
            let c = case(&res, &format!("lostpage-{m}"))?;
            if c.rc != 0 {
                bail!("rc {}:\n{}", c.rc, tail(&c.out, 30));
            }
            let h = hunt(c)?;
            let (written, harvested, n) = union_check(c)?;
            pages_after(c)?;
            figures.push(format!(
                "lost-page hunt ({m}): {} writes to {written} pages by 2 vCPUs, {n} harvests, {harvested} pages harvested, \
                 {} writes re-dirtied a harvested page, 0 lost, 0 spurious",
                h.writes, h.redirtied
            ));
            Ok(format!(
                "{} writes, {written} pages written, {harvested} harvested over {n} harvests, {} re-dirtied after a harvest; \
                 every write in its window: 0 lost, 0 spurious",
                h.writes, h.redirtied
            ))
        })());
    }

    check("kernel log clean", (|| {
        let c = case(&res, "dmesg")?;
        if !c.out.trim().is_empty() {
            bail!("{}", c.out);
        }
        Ok("no Oops, BUG, WARNING or general protection fault".into())
    })());
    check("unload after everything", (|| {
        let c = case(&res, "unload")?;
        if c.rc != 0 {
            bail!("{}", c.out);
        }
        Ok("rmmod succeeded, /dev/smudge gone".into())
    })());
    println!("  (hostile 2-CPU boot with {} cases: {secs:.1} s)", cases.len());
    println!("  reliability figures:");
    for f in &figures {
        println!("    {f}");
    }
    if !failures.is_empty() {
        bail!("{} hostile check(s) failed: {}", failures.len(), failures.join(", "));
    }
    Ok(())
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `N passed, M failed`.
fn parse_totals(line: &str) -> Option<(u64, u64)> {
    let (p, rest) = line.split_once(" passed, ")?;
    let f = rest.strip_suffix(" failed")?;
    Some((p.trim().parse().ok()?, f.trim().parse().ok()?))
}

/// `smudge-hostile: N ioctls sent, M faults injected or provoked and survived`.
fn parse_figures(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("smudge-hostile: ")?;
    let (i, rest) = rest.split_once(" ioctls sent, ")?;
    let (f, _) = rest.split_once(' ')?;
    Some((i.parse().ok()?, f.parse().ok()?))
}

/// The number after `key` in a line of `key=value` words.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse().ok())
}

/// What the lost-page hunt found.
struct Hunt {
    /// W lines.
    writes: usize,
    /// Writes to a page that an earlier harvest had already reported (so its D bit, W
    /// permission or PML state had been reset before this write).
    redirtied: usize,
}

/// One write the guest reported.
struct Write {
    gfn: u64,
    /// The write happened after harvest number `lower` (0: no constraint).
    lower: usize,
    /// ... and before harvest number `upper` completed (the first harvest printed after its W
    /// line: the W line was printed once the RUN that carried it returned, so the write was done).
    upper: usize,
}

/// The per-write check of the lost-page hunt, stronger than the union: every write must appear
/// in a harvest inside the window the output order allows, and every harvested page must be
/// explained by a write whose window contains that harvest.
///
/// Harvests are numbered 1.. in output order (checkpoint events, then the exit event), which is
/// the order the tool ran them; each one ran with every vCPU kicked out. A write of vCPU v in its
/// round r > 1 happened after v's checkpoint r-1 was harvested, and that harvest is printed after
/// the `C v r-1` line; so the write is after harvest (harvests printed before that line) + 1.
fn hunt(c: &Case) -> Result<Hunt> {
    let mut harvests: Vec<BTreeSet<u64>> = Vec::new();
    let mut writes: Vec<Write> = Vec::new();
    let mut open: Vec<usize> = Vec::new(); // writes without an upper bound yet
    let mut lower_of: BTreeMap<u64, usize> = BTreeMap::new(); // vCPU -> lower bound of its next writes
    for line in c.out.lines() {
        let line = line.trim();
        if line.starts_with('{') {
            let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
            if v["event"] == "checkpoint" || v["event"] == "exit" {
                harvests.push(gfns(&v));
                let k = harvests.len();
                for i in open.drain(..) {
                    writes[i].upper = k;
                }
            }
        } else if let Some(h) = line.strip_prefix("W ") {
            let gfn = u64::from_str_radix(h.trim().trim_start_matches("0x"), 16).with_context(|| format!("bad W line {line}"))?;
            let vcpu = gfn.checked_sub(LOSTPAGE_FIRST).map(|o| o / LOSTPAGE_PAGES).filter(|&v| v < 2);
            let Some(vcpu) = vcpu else { bail!("write outside both regions: {line}") };
            open.push(writes.len());
            writes.push(Write { gfn, lower: lower_of.get(&vcpu).copied().unwrap_or(0), upper: usize::MAX });
        } else if let Some(rest) = line.strip_prefix("C ") {
            let vcpu: u64 = rest.split_whitespace().next().and_then(|s| s.parse().ok()).with_context(|| format!("bad C line {line}"))?;
            lower_of.insert(vcpu, harvests.len() + 1);
        }
    }
    if writes.is_empty() || harvests.is_empty() {
        bail!("no writes or no harvests:\n{}", tail(&c.out, 20));
    }
    let mut lost = Vec::new();
    let mut redirtied = 0;
    for w in &writes {
        if w.upper == usize::MAX {
            lost.push(format!("{:#x} (no harvest after its W line)", w.gfn));
            continue;
        }
        let seen = (w.lower + 1..=w.upper).any(|k| harvests[k - 1].contains(&w.gfn));
        if !seen {
            lost.push(format!("{:#x} (harvests {}..={})", w.gfn, w.lower + 1, w.upper));
        }
        if harvests[..w.lower.min(harvests.len())].iter().any(|h| h.contains(&w.gfn)) {
            redirtied += 1;
        }
    }
    let mut spurious = Vec::new();
    for (i, h) in harvests.iter().enumerate() {
        let k = i + 1;
        for &g in h {
            if !writes.iter().any(|w| w.gfn == g && w.lower < k && k <= w.upper) {
                spurious.push(format!("{g:#x} in harvest {k}"));
            }
        }
    }
    if !lost.is_empty() || !spurious.is_empty() {
        lost.truncate(20);
        spurious.truncate(20);
        bail!("{} writes, {} harvests: lost {:?}, spurious {:?}", writes.len(), harvests.len(), lost, spurious);
    }
    Ok(Hunt { writes: writes.len(), redirtied })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case_of(out: &str) -> Case {
        Case { name: "t".into(), rc: 0, out: out.into() }
    }

    #[test]
    fn a_rewrite_after_the_harvest_must_appear_again() {
        // vCPU 0 writes page 0x400, checkpoints (harvest 1 has it), writes it again, halts: the
        // exit harvest must have it too.
        let good = "W 0x400\nC 0 1\n{\"event\":\"checkpoint\",\"dirty_gfns\":[1024]}\nW 0x400\n{\"event\":\"exit\",\"dirty_gfns\":[1024]}\n";
        let h = hunt(&case_of(good)).unwrap();
        assert_eq!((h.writes, h.redirtied), (2, 1));
        // The union check cannot see this loss; the window check must.
        let lost = good.replace("{\"event\":\"exit\",\"dirty_gfns\":[1024]}", "{\"event\":\"exit\",\"dirty_gfns\":[]}");
        assert!(hunt(&case_of(&lost)).is_err());
        assert!(union_check(&case_of(&lost)).is_ok());
    }

    #[test]
    fn spurious_pages_and_strays_are_refused() {
        let spurious = "W 0x400\nC 0 1\n{\"event\":\"checkpoint\",\"dirty_gfns\":[1024, 1025]}\n{\"event\":\"exit\",\"dirty_gfns\":[]}\n";
        assert!(hunt(&case_of(spurious)).is_err());
        // A page reported by a harvest before its write could have happened.
        let early = "C 0 1\n{\"event\":\"checkpoint\",\"dirty_gfns\":[1024]}\nW 0x400\n{\"event\":\"exit\",\"dirty_gfns\":[]}\n";
        assert!(hunt(&case_of(early)).is_err());
        assert!(hunt(&case_of("W 0x10\n{\"event\":\"exit\",\"dirty_gfns\":[16]}\n")).is_err());
    }

    #[test]
    fn the_other_vcpus_writes_may_land_in_any_later_harvest() {
        // vCPU 1's write (0x2000) is printed before harvest 1 but may have happened after it
        // only if it was printed after; here it is printed before, so harvest 1 must have it.
        let ok = "W 0x2000\nW 0x400\nC 0 1\n{\"event\":\"checkpoint\",\"dirty_gfns\":[1024, 8192]}\n{\"event\":\"exit\",\"dirty_gfns\":[]}\n";
        assert!(hunt(&case_of(ok)).is_ok());
        // A vCPU-1 write printed after harvest 1 (its console came back later) may show up in
        // harvest 1 or 2.
        let late = "W 0x400\nC 0 1\n{\"event\":\"checkpoint\",\"dirty_gfns\":[1024, 8192]}\nW 0x2000\n{\"event\":\"exit\",\"dirty_gfns\":[]}\n";
        assert!(hunt(&case_of(late)).is_ok());
    }

    #[test]
    fn totals_parse() {
        assert_eq!(parse_totals("512 passed, 0 failed"), Some((512, 0)));
        assert_eq!(parse_figures("smudge-hostile: 9000 ioctls sent, 120 faults injected or provoked and survived"), Some((9000, 120)));
        assert_eq!(field("x: handled #UD=5 total=20000 expected=20000", "total="), Some(20000));
    }
}
