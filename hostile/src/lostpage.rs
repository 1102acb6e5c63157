//! The lost-page hunt's checker: reads the output of `smudge run --json --vcpus 2
//! /guests/lostpage` (console lines and JSON events in the order the tool printed them) and
//! checks every write the guest reported against the harvests.
//!
//! It runs inside the emulated machine because the machine's serial line carries only a few
//! hundred bytes per second: the run's output (tens of KiB per mode) stays in a file there, and
//! only this summary travels.
//!
//! Two checks. The union (as for smpwriter): the pages written equal the pages harvested. And a
//! stronger one per write, which also catches a page lost after it was re-dirtied (the union
//! cannot: an earlier harvest already holds the page). Harvests are numbered 1.. in output
//! order (checkpoint events, then the exit event), the order the tool ran them, each with every
//! vCPU kicked out. A write is done before the first harvest printed after its W line (the line
//! came back with the RUN that returned after the write). A write of vCPU v in its round r > 1
//! happened after v's checkpoint r-1 was harvested, and that harvest is printed after the
//! `C v r-1` line, so after harvest (harvests printed before that line) + 1. Every write must
//! appear in a harvest inside its window, and every harvested page must have a write whose window
//! holds that harvest.

use std::collections::{BTreeMap, BTreeSet};

/// The guest's regions (guests/src/bin/lostpage.rs): vCPU v writes pages
/// [FIRST + v * PAGES, FIRST + (v + 1) * PAGES).
const FIRST: u64 = 0x400;
const PAGES: u64 = 0x1c00;

/// One write the guest reported.
struct Write {
    gfn: u64,
    /// The write happened after harvest number `lower` (0: no constraint).
    lower: usize,
    /// ... and before harvest number `upper`.
    upper: usize,
}

/// What the hunt found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// W lines.
    pub writes: usize,
    /// Distinct pages written.
    pub pages: usize,
    /// Harvests (checkpoint and exit events).
    pub harvests: usize,
    /// Distinct pages harvested.
    pub harvested: usize,
    /// Writes to a page an earlier harvest had reported (its tracking state was reset before).
    pub redirtied: usize,
    /// Written pages no harvest reported.
    pub union_lost: Vec<u64>,
    /// Harvested pages no W line names.
    pub union_spurious: Vec<u64>,
    /// Writes missing from every harvest of their window.
    pub lost: Vec<String>,
    /// Harvested pages no write explains at that harvest.
    pub spurious: Vec<String>,
    /// The exit event's reason.
    pub end: String,
    /// Lines that are neither W, C nor an event, or malformed ones (tool errors, cut lines).
    pub other: Vec<String>,
}

impl Report {
    /// Nothing lost, nothing spurious, no stray line (a W line cut in two by another vCPU's
    /// output would be one), and the run ended with every vCPU halted.
    pub fn clean(&self) -> bool {
        self.writes > 0
            && self.other.is_empty()
            && self.union_lost.is_empty()
            && self.union_spurious.is_empty()
            && self.lost.is_empty()
            && self.spurious.is_empty()
            && self.end == "hlt"
    }
}

/// The numbers of `"dirty_gfns":[...]` in a JSON event line.
fn dirty_gfns(line: &str) -> Option<BTreeSet<u64>> {
    let start = line.find("\"dirty_gfns\":[")? + "\"dirty_gfns\":[".len();
    let end = start + line[start..].find(']')?;
    let list = line[start..end].trim();
    if list.is_empty() {
        return Some(BTreeSet::new());
    }
    list.split(',').map(|s| s.trim().parse().ok()).collect()
}

/// The string value of `"key":"..."` in a JSON event line.
fn string_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":\"");
    let start = line.find(&pat)? + pat.len();
    Some(&line[start..start + line[start..].find('"')?])
}

/// Checks the output of one lost-page run.
pub fn check(out: &str) -> Report {
    let mut r = Report::default();
    let mut harvests: Vec<BTreeSet<u64>> = Vec::new();
    let mut writes: Vec<Write> = Vec::new();
    let mut open: Vec<usize> = Vec::new();
    let mut lower_of: BTreeMap<u64, usize> = BTreeMap::new();
    for line in out.lines().map(str::trim) {
        if line.starts_with('{') {
            let event = string_field(line, "event").unwrap_or_default();
            if event != "checkpoint" && event != "exit" {
                continue;
            }
            let Some(g) = dirty_gfns(line) else {
                r.other.push(line.chars().take(120).collect());
                continue;
            };
            harvests.push(g);
            let k = harvests.len();
            for i in open.drain(..) {
                writes[i].upper = k;
            }
            if event == "exit" {
                r.end = string_field(line, "reason").unwrap_or_default().to_string();
            }
        } else if let Some(h) = line.strip_prefix("W ") {
            match u64::from_str_radix(h.trim().trim_start_matches("0x"), 16) {
                Ok(gfn) if (FIRST..FIRST + 2 * PAGES).contains(&gfn) => {
                    let vcpu = (gfn - FIRST) / PAGES;
                    open.push(writes.len());
                    writes.push(Write {
                        gfn,
                        lower: lower_of.get(&vcpu).copied().unwrap_or(0),
                        upper: usize::MAX,
                    });
                }
                _ => r.other.push(line.to_string()),
            }
        } else if let Some(rest) = line.strip_prefix("C ") {
            match rest
                .split_whitespace()
                .next()
                .and_then(|s| s.parse::<u64>().ok())
            {
                Some(vcpu) => {
                    lower_of.insert(vcpu, harvests.len() + 1);
                }
                None => r.other.push(line.to_string()),
            }
        } else if !line.is_empty() {
            r.other.push(line.chars().take(120).collect());
        }
    }
    let written: BTreeSet<u64> = writes.iter().map(|w| w.gfn).collect();
    let harvested: BTreeSet<u64> = harvests.iter().flatten().copied().collect();
    r.writes = writes.len();
    r.pages = written.len();
    r.harvests = harvests.len();
    r.harvested = harvested.len();
    r.union_lost = written.difference(&harvested).copied().collect();
    r.union_spurious = harvested.difference(&written).copied().collect();
    for w in &writes {
        if w.upper == usize::MAX {
            r.lost
                .push(format!("{:#x} (no harvest after its W line)", w.gfn));
            continue;
        }
        if !(w.lower + 1..=w.upper).any(|k| harvests[k - 1].contains(&w.gfn)) {
            r.lost.push(format!(
                "{:#x} (not in harvests {}..={})",
                w.gfn,
                w.lower + 1,
                w.upper
            ));
        }
        if harvests[..w.lower.min(harvests.len())]
            .iter()
            .any(|h| h.contains(&w.gfn))
        {
            r.redirtied += 1;
        }
    }
    for (i, h) in harvests.iter().enumerate() {
        let k = i + 1;
        for &g in h {
            if !writes
                .iter()
                .any(|w| w.gfn == g && w.lower < k && k <= w.upper)
            {
                r.spurious.push(format!("{g:#x} in harvest {k}"));
            }
        }
    }
    r
}

/// `smudge-hostile lostpage-check FILE`: prints the figures; true when clean.
pub fn main(path: &str) -> bool {
    let out = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) => {
            println!("lostpage-check: cannot read {path}: {e}");
            return false;
        }
    };
    let r = check(&out);
    println!(
        "lostpage-check: writes={} pages={} harvests={} harvested={} redirtied={} union_lost={} union_spurious={} lost={} spurious={} end={}",
        r.writes,
        r.pages,
        r.harvests,
        r.harvested,
        r.redirtied,
        r.union_lost.len(),
        r.union_spurious.len(),
        r.lost.len(),
        r.spurious.len(),
        r.end
    );
    let show = |what: &str, v: &[String]| {
        if !v.is_empty() {
            println!(
                "lostpage-check: {what} (first 20 of {}): {:?}",
                v.len(),
                &v[..v.len().min(20)]
            );
        }
    };
    show("lost", &r.lost);
    show("spurious", &r.spurious);
    show("other lines", &r.other);
    if !r.union_lost.is_empty() || !r.union_spurious.is_empty() {
        println!(
            "lostpage-check: union lost {:x?}, union spurious {:x?}",
            &r.union_lost[..r.union_lost.len().min(20)],
            &r.union_spurious[..r.union_spurious.len().min(20)]
        );
    }
    r.clean()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CP: &str = "{\"event\":\"checkpoint\",\"seq\":1,\"dirty_gfns\":[";
    const EXIT: &str = "{\"event\":\"exit\",\"reason\":\"hlt\",\"dirty_gfns\":[";

    #[test]
    fn a_rewrite_after_the_harvest_must_appear_again() {
        // vCPU 0 writes page 0x400, checkpoints (harvest 1 has it), writes it again, halts: the
        // exit harvest must have it too.
        let good = format!("W 400\nC 0 1\n{CP}1024]}}\nW 400\n{EXIT}1024]}}\n");
        let r = check(&good);
        assert!(r.clean(), "{r:?}");
        assert_eq!(
            (r.writes, r.redirtied, r.harvests, r.end.as_str()),
            (2, 1, 2, "hlt")
        );
        // The union cannot see this loss; the window check must.
        let lost = format!("W 400\nC 0 1\n{CP}1024]}}\nW 400\n{EXIT}]}}\n");
        let r = check(&lost);
        assert!(r.union_lost.is_empty() && r.union_spurious.is_empty());
        assert_eq!(r.lost.len(), 1);
        assert!(!r.clean());
    }

    #[test]
    fn spurious_pages_and_strays_are_refused() {
        let spurious = check(&format!("W 400\nC 0 1\n{CP}1024, 1025]}}\n{EXIT}]}}\n"));
        assert_eq!(spurious.union_spurious, vec![1025]);
        assert!(!spurious.clean());
        // A page reported by a harvest before its write could have happened.
        let early = check(&format!("C 0 1\n{CP}1024]}}\nW 400\n{EXIT}]}}\n"));
        assert_eq!((early.lost.len(), early.spurious.len()), (1, 1));
        // A write outside both regions.
        let stray = check(&format!("W 10\n{EXIT}16]}}\n"));
        assert!(!stray.clean() && stray.other == vec!["W 10".to_string()]);
        // A run that did not end with every vCPU halted.
        assert!(!check(&format!("W 400\n{}1024]}}\n", EXIT.replace("hlt", "error"))).clean());
    }

    #[test]
    fn the_other_vcpus_writes_may_land_in_any_later_harvest() {
        // vCPU 1's write (0x2000) printed before harvest 1 must be in harvest 1.
        assert!(check(&format!(
            "W 2000\nW 400\nC 0 1\n{CP}1024, 8192]}}\n{EXIT}]}}\n"
        ))
        .clean());
        assert!(!check(&format!(
            "W 2000\nW 400\nC 0 1\n{CP}1024]}}\n{EXIT}8192]}}\n"
        ))
        .clean());
        // Printed after harvest 1 (its console came back later): harvest 1 or 2 may hold it.
        assert!(check(&format!(
            "W 400\nC 0 1\n{CP}1024, 8192]}}\nW 2000\n{EXIT}]}}\n"
        ))
        .clean());
        assert!(check(&format!(
            "W 400\nC 0 1\n{CP}1024]}}\nW 2000\n{EXIT}8192]}}\n"
        ))
        .clean());
    }

    #[test]
    fn event_fields_parse() {
        assert_eq!(
            dirty_gfns("{\"dirty_gfns\":[1, 2,3]}"),
            Some([1, 2, 3].into())
        );
        assert_eq!(dirty_gfns("{\"dirty_gfns\":[]}"), Some(BTreeSet::new()));
        assert_eq!(dirty_gfns("{\"dirty_gfns\":[1,x]}"), None);
        assert_eq!(
            string_field("{\"event\":\"exit\",\"reason\":\"hlt\"}", "reason"),
            Some("hlt")
        );
    }
}
