//! Hostile input and faults, end to end on the emulated VT-x machine (one boot, 2 CPUs):
//! `smudge-hostile` (malformed requests, races, allocator fault injection), guests that attack
//! from inside (an exception storm, VMX instructions, a page hog under a failing allocator), the
//! lost-page hunt with 2 vCPUs in each dirty mode, and then a clean kernel log, zero pages held
//! and a clean unload. The figures printed here are the README's reliability numbers.
//!
//! The machine's serial line carries only a few hundred bytes per second (measured: 3000 short
//! lines took 230 s), so bulky output stays in files inside the machine: smudge-hostile's
//! per-case lines (only FAIL lines and the totals travel), and the lost-page runs, which
//! `smudge-hostile lostpage-check` checks there (hostile/src/lostpage.rs) and summarises.

use anyhow::{bail, Context, Result};

use crate::bochs::Artifacts;
use crate::e2e::{case, exit_event, run_boots, Boot, Case};

/// The module parameters inside the machine.
const PARAMS: &str = "/sys/module/smudge/parameters";
/// Pages `fail_alloc_after` lets the hog case allocate before the host allocator "fails":
/// enough for SETUP and LOAD_ELF (a few dozen), far fewer than the guest's 64 MiB (16384).
const HOG_ALLOCS: u32 = 2000;

/// `cmd` with its output kept in a file, which is then printed with the `dirty_gfns` lists cut
/// out of the JSON events (a page hog's list alone is 90 KB); then the driver's page count
/// (`pages_held=N`). Keeps `cmd`'s status.
fn with_pages(cmd: &str) -> String {
    format!(
        "{{ {cmd}; }} > /files/out.txt 2>&1; rc=$?; sed 's/,\"dirty_gfns\":\\[[^]]*\\]//' /files/out.txt | tail -20; \
         echo \"pages_held=$(cat {PARAMS}/pages_held)\"; exit $rc"
    )
}

fn pages_after(c: &Case) -> Result<()> {
    let held = c
        .out
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("pages_held="))
        .context("no pages_held line")?;
    if held.trim() != "0" {
        bail!(
            "{}: pages_held = {} after the VM closed",
            c.name,
            held.trim()
        );
    }
    Ok(())
}

/// Guest RAM of each VM of the host-memory cases: four at once need more than the machine's
/// 512 MiB.
const HOG_MIB: u32 = 200;

/// Four VMs of [`HOG_MIB`] touching all their RAM at once, with the driver-wide cap `max_pages`
/// (0 = the default, half of RAM); prints each VM's exit event (without its page list), then
/// `pages_held=N`.
fn four_hogs(tag: &str, max_pages: u64) -> String {
    format!(
        "echo {max_pages} > {PARAMS}/max_pages; \
         for i in 1 2 3 4; do smudge run --json --mem {HOG_MIB} /guests/hostile_hog > /files/{tag}-$i.txt 2>&1 & done; wait; \
         for i in 1 2 3 4; do grep '\"event\":\"exit\"' /files/{tag}-$i.txt | sed 's/,\"dirty_gfns\":\\[[^]]*\\]//; s/,\"exits\":{{[^}}]*}}//'; done; \
         echo 0 > {PARAMS}/max_pages; echo \"pages_held=$(cat {PARAMS}/pages_held)\""
    )
}

/// Checks a [`four_hogs`] case: every VM ran to its end or stopped with a message containing
/// `expected`, at least one did stop so, and every page came back. Returns how many stopped.
fn hogs_stopped(c: &Case, expected: &str) -> Result<usize> {
    let events: Vec<serde_json::Value> = c
        .out
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if events.len() != 4 {
        bail!("{} exit events of 4:\n{}", events.len(), c.out);
    }
    let mut stopped = 0;
    for e in &events {
        let msg = e["message"].as_str().unwrap_or_default();
        if e["reason"] == "error" && msg.contains(expected) {
            stopped += 1;
        } else if !(e["reason"] == "exit" && e["code"] == 0) {
            bail!("a VM ended otherwise: {e}\n{}", c.out);
        }
    }
    if stopped == 0 {
        bail!(
            "no VM stopped with \"{expected}\": the limit was never reached\n{}",
            c.out
        );
    }
    pages_after(c)?;
    Ok(stopped)
}

/// The hostile suite alone (`cargo xtask e2e-hostile`).
pub fn suite(a: &Artifacts) -> Result<()> {
    run_boots(a, vec![boot()])
}

/// The hostile suite's boot: one line per check, and the reliability figures.
pub fn boot() -> Boot {
    let mut b = Boot::new(
        "hostile input and faults on Bochs corei7_skylake_x with 2 CPUs",
        "corei7_skylake_x",
        2,
    );
    let cases: Vec<(&str, String)> = vec![
        (
            "hostile-tool",
            "smudge-hostile /guests > /files/hostile.log 2>&1; rc=$?; grep -v '^ok ' /files/hostile.log; exit $rc".into(),
        ),
        ("ud-storm", with_pages("smudge run --json /guests/hostile_ud_storm")),
        ("vmread", with_pages("smudge run --json /guests/hostile_vmread")),
        ("invept", with_pages("smudge run --json /guests/hostile_invept")),
        ("wbinvd", with_pages("smudge run --json /guests/hostile_wbinvd")),
        ("debugregs", with_pages("smudge run --json /guests/debugregs")),
        ("xsave", with_pages("smudge run --json /guests/hostile_xsave")),
        (
            "hog-oom",
            with_pages(&format!(
                "echo {HOG_ALLOCS} > {PARAMS}/fail_alloc_after; smudge run --json --mem 64 /guests/hostile_hog; rc=$?; \
                 echo -1 > {PARAMS}/fail_alloc_after; (exit $rc)"
            )),
        ),
        ("hog-after", with_pages("smudge run --json --mem 64 /guests/hostile_hog")),
        // Above the machine's 131,072 pages: the allocator (with smudge's host reserve) runs out.
        ("oom-4x200", four_hogs("oom", 1 << 20)),
        ("cap-4x200", four_hogs("cap", 0)),
        (
            "hog-200-after",
            with_pages(&format!("smudge run --json --mem {HOG_MIB} /guests/hostile_hog")),
        ),
        (
            "device-access",
            "ls -l /dev/smudge | cut -c1-10; su -s /bin/sh user -c 'id -u; smudge caps'; echo \"user_rc=$?\"; \
             smudge caps > /dev/null; echo \"root_rc=$?\""
                .into(),
        ),
    ];
    for (name, cmd) in cases {
        b.case(name, cmd);
    }
    for m in ["ad", "pml", "wp"] {
        let out = format!("/files/lostpage-{m}.txt");
        b.case(
            format!("lostpage-{m}"),
            format!(
                "smudge run --json --vcpus 2 --mode {m} /guests/lostpage > {out} 2>&1; rc=$?; \
                 smudge-hostile lostpage-check {out}; rc2=$?; echo \"run_status=$rc\"; grep -v '^[WC] ' {out} | grep -v '^{{' | head -5; \
                 echo \"pages_held=$(cat {PARAMS}/pages_held)\"; exit $rc2"
            ),
        );
    }
    b.case("dmesg", crate::e2e::KERNEL_LOG_TROUBLE);
    b.case("unload", "rmmod smudge && ! test -e /dev/smudge");

    b.check(
        "smudge-hostile: every malformed request, race and injected fault handled",
        move |res, figures| {
            let c = case(res, "hostile-tool")?;
            let total = c
                .out
                .lines()
                .find_map(parse_totals)
                .context("no totals line")?;
            let fails: Vec<&str> = c.out.lines().filter(|l| l.starts_with("FAIL ")).collect();
            let (ioctls, faults) = c.out.lines().find_map(parse_figures).unwrap_or((0, 0));
            figures.push(format!(
                "smudge-hostile: {} cases ({ioctls} ioctls), {faults} injected faults survived",
                total.0 + total.1
            ));
            if c.rc != 0 || total.1 != 0 || !fails.is_empty() {
                bail!(
                    "rc {}, {} passed, {} failed:\n{}",
                    c.rc,
                    total.0,
                    total.1,
                    fails.join("\n")
                );
            }
            Ok(format!(
                "{} cases passed, {ioctls} ioctls, {faults} injected faults survived",
                total.0
            ))
        },
    );

    b.check(
        "exception storm stays inside the guest",
        move |res, figures| {
            let c = case(res, "ud-storm")?;
            let e = exit_event(c)?;
            let line = c
                .out
                .lines()
                .find(|l| l.contains("hostile_ud_storm: handled"))
                .context("no handler count")?;
            let total = field(line, "total=").context("no total")?;
            let expected = field(line, "expected=").context("no expected")?;
            // SDM 26.2: with the exception bitmap empty, guest exceptions never cause a VM exit
            // (basic reason 0 counts only the NMIs the host takes).
            let exc_exits = e["exits"]["exception_nmi"].as_u64().unwrap_or(0);
            if e["reason"] != "exit"
                || e["code"] != 0
                || total != expected
                || exc_exits * 100 > total
            {
                bail!(
                    "{line}; exit {} code {}; {exc_exits} exception exits:\n{}",
                    e["reason"],
                    e["code"],
                    c.out
                );
            }
            pages_after(c)?;
            figures.push(format!(
                "exception storm: {total} guest exceptions handled by the guest's own IDT"
            ));
            Ok(format!(
                "{total} #UD/#BP/#DE/#GP handled by the guest, exit code 0, pages back to 0"
            ))
        },
    );

    // SDM Appendix C: basic exit reasons 23 (VMREAD) and 50 (INVEPT).
    for (name, reason) in [("vmread", 23u64), ("invept", 50)] {
        b.check(&format!("guest {name} stops the VM"), move |res, _| {
            let c = case(res, name)?;
            let e = exit_event(c)?;
            let msg = e["message"].as_str().unwrap_or_default();
            if e["reason"] != "error"
                || !msg.contains("VMX instruction")
                || e["exit_reason_number"] != reason
                || c.out.contains("returned")
            {
                bail!("{}", c.out);
            }
            pages_after(c)?;
            Ok(format!(
                "reason error, exit reason {reason} ({}), \"{msg}\"",
                e["exit_reason"].as_str().unwrap_or_default()
            ))
        });
    }

    b.check("guest WBINVD exits and is skipped", move |res, figures| {
        let c = case(res, "wbinvd")?;
        let e = exit_event(c)?;
        let n = e["exits"]["wbinvd"].as_u64().unwrap_or(0);
        if c.rc != 0 || e["code"] != 0 || n != 2000 {
            bail!("{n} WBINVD exits:\n{}", c.out);
        }
        pages_after(c)?;
        figures.push("a guest running WBINVD 2,000 times: 2,000 WBINVD exits, each skipped; the host CPU's caches are not flushed".into());
        Ok("2000 of 2000 WBINVDs exited (reason 54) and were skipped, exit code 0".into())
    });
    b.check("guest debug registers are the guest's own", move |res, figures| {
        let c = case(res, "debugregs")?;
        let e = exit_event(c)?;
        let n = e["exits"]["dr_access"].as_u64().unwrap_or(0);
        if c.rc != 0 || e["code"] != 0 || n != 600 || !c.out.contains(", 0 wrong") {
            bail!("{n} MOV-DR exits:\n{}", c.out);
        }
        pages_after(c)?;
        figures.push("a guest writing and reading DR0-DR3, DR6, DR7 300 times each way: 600 MOV-DR exits, every value read back as written, none reaching the processor".into());
        Ok("600 of 600 MOV DR exited (reason 29), 300 values read back as written".into())
    });
    b.check("guest cannot enable extended state", move |res, figures| {
        let c = case(res, "xsave")?;
        let e = exit_event(c)?;
        // SDM Appendix C: basic exit reason 28, control-register access.
        if !c.out.contains("XSAVE/AVX hidden in CPUID")
            || c.out.contains("CR4.OSXSAVE set")
            || e["reason"] != "error"
            || e["exit_reason_number"] != 28
            || !e["message"].as_str().unwrap_or_default().contains("host-owned CR4 bit")
        {
            bail!("{}", c.out);
        }
        pages_after(c)?;
        figures.push("a guest looking for XSAVE/AVX and setting CR4.OSXSAVE: CPUID shows none, the MOV to CR4 exits (reason 28) and the VM stops".into());
        Ok("XSAVE/AVX hidden in CPUID; MOV to CR4 setting OSXSAVE exits (reason 28), VM stopped".into())
    });
    b.check("page hog under a failing host allocator", move |res, figures| {
            let c = case(res, "hog-oom")?;
            let e = exit_event(c)?;
            let msg = e["message"].as_str().unwrap_or_default();
            if e["reason"] != "error"
                || !(msg.contains("out of memory") || msg.contains("page limit"))
            {
                bail!("{}", c.out);
            }
            pages_after(c)?;
            let faults = e["exits"]["ept_violation"].as_u64().unwrap_or(0);
            figures.push(format!("page hog: stopped cleanly when the host allocator failed ({HOG_ALLOCS} allocations allowed, {faults} EPT violations served)"));
            Ok(format!("\"{msg}\" after {faults} EPT violations ({HOG_ALLOCS} allocations allowed), pages back to 0"))

    });

    b.check(
        "the same hog runs to the end once the allocator works",
        move |res, _| {
            let c = case(res, "hog-after")?;
            let e = exit_event(c)?;
            if c.rc != 0 || e["reason"] != "exit" || e["code"] != 0 {
                bail!("rc {}:\n{}", c.rc, c.out);
            }
            pages_after(c)?;
            let touched = c
                .out
                .lines()
                .find(|l| l.contains("hostile_hog: touched"))
                .unwrap_or_default();
            Ok(format!("{}, pages back to 0", touched.trim()))
        },
    );

    for (title, name, says, what) in [
        (
            "four 200 MiB VMs at once on 512 MiB, cap above RAM: clean out-of-memory stops",
            "oom-4x200",
            "host out of memory",
            "four 200 MiB VMs at once on the 512 MiB machine, cap above RAM",
        ),
        (
            "the same under the default cap (half of RAM): stops name the cap",
            "cap-4x200",
            "max_pages",
            "the same with the default cap (half of RAM)",
        ),
    ] {
        b.check(title, move |res, figures| {
            let n = hogs_stopped(case(res, name)?, says)?;
            figures.push(format!("{what}: {n} of 4 stopped with \"{says}\" in the message, the others completed; no OOM kill, pages back to 0"));
            Ok(format!("{n} of 4 stopped with \"{says}\", the rest completed, pages back to 0"))
        });
    }
    b.check("a 200 MiB VM afterwards runs to its end", move |res, _| {
        let c = case(res, "hog-200-after")?;
        let e = exit_event(c)?;
        if c.rc != 0 || e["reason"] != "exit" || e["code"] != 0 {
            bail!("rc {}:\n{}", c.rc, c.out);
        }
        pages_after(c)?;
        Ok("exit 0, pages back to 0".into())
    });
    b.check("only root opens /dev/smudge", move |res, figures| {
            let c = case(res, "device-access")?;
            let o = &c.out;
            if !o.starts_with("crw-------")
                || !o.lines().any(|l| l.trim() == "1000")
                || !o.contains("Permission denied (only root may open it")
                || o.contains("user_rc=0")
                || !o.contains("root_rc=0")
            {
                bail!("{o}");
            }
            figures.push("uid 1000 opening /dev/smudge (crw-------): refused with \"Permission denied (only root may open it by default ...)\"; root: works".into());
            Ok("crw-------; uid 1000 refused with the tool's hint; root works".into())
    });

    for m in ["ad", "pml", "wp"] {
        b.check(&format!("lost-page hunt, 2 vCPUs ({m})"), move |res, figures| {
                let c = case(res, &format!("lostpage-{m}"))?;
                let line = c
                    .out
                    .lines()
                    .find(|l| l.starts_with("lostpage-check: writes="))
                    .context("no lostpage-check summary")?;
                let f = |k: &str| field(line, &format!("{k}=")).unwrap_or(u64::MAX);
                let clean = ["union_lost", "union_spurious", "lost", "spurious"]
                    .iter()
                    .all(|k| f(k) == 0);
                if c.rc != 0
                    || !clean
                    || !line.contains("end=hlt")
                    || !c.out.contains("run_status=0")
                {
                    bail!("rc {}:\n{}", c.rc, c.out);
                }
                pages_after(c)?;
                figures.push(format!(
                "lost-page hunt ({m}): {} writes to {} pages by 2 vCPUs, {} harvests reported {} pages; \
                 {} writes re-dirtied a harvested page; 0 lost, 0 spurious",
                f("writes"), f("pages"), f("harvests"), f("harvested"), f("redirtied")
            ));
                Ok(format!(
                "{} writes, {} pages written, {} harvested over {} harvests, {} re-dirtied after a harvest; \
                 union and per-write window: 0 lost, 0 spurious",
                f("writes"), f("pages"), f("harvested"), f("harvests"), f("redirtied")
            ))
        });
    }

    b.check("kernel log clean", move |res, _| {
        let c = case(res, "dmesg")?;
        if !c.out.trim().is_empty() {
            bail!("{}", c.out);
        }
        Ok(
            "no Oops, BUG, WARNING, general protection fault, OOM kill or page-allocation failure"
                .into(),
        )
    });
    b.check("unload after everything", move |res, _| {
        let c = case(res, "unload")?;
        if c.rc != 0 {
            bail!("{}", c.out);
        }
        Ok("rmmod succeeded, /dev/smudge gone".into())
    });
    b
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
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_parse() {
        assert_eq!(parse_totals("512 passed, 0 failed"), Some((512, 0)));
        assert_eq!(
            parse_figures(
                "smudge-hostile: 9000 ioctls sent, 120 faults injected or provoked and survived"
            ),
            Some((9000, 120))
        );
        assert_eq!(
            field("x: handled #UD=5 total=20000 expected=20000", "total="),
            Some(20000)
        );
    }
}
