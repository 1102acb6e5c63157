//! `Ept` map/unmap/protect/split/translate under random operations, against a reference map
//! (BTreeMap of GPA page -> (HPA page, rights)), with allocation faults injected. The tables are
//! read back by an independent walker and by the model CPU; every error is checked against the
//! set of errors the arguments allow; page accounting is exact.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use smudge_core::ept::{Ept, EptFeatures, Invept, MemoryType, Perms, GPA_LIMIT};
use smudge_core::platform::Platform;
use smudge_core::Error;
use smudge_tests::model::{bit, eptp, qual, span, AccessKind, Cpu, Exit};
use smudge_tests::MockPlatform;

const PAGE: u64 = 4096;
const M2: u64 = 1 << 21;
const G1: u64 = 1 << 30;

type RefMap = BTreeMap<u64, (u64, u8)>;

#[derive(Clone, Debug)]
enum Op {
    Map {
        gpa: u64,
        hpa: u64,
        len: u64,
        perms: u8,
        large: bool,
    },
    Unmap {
        gpa: u64,
        len: u64,
    },
    Protect {
        gpa: u64,
        len: u64,
        perms: u8,
    },
    Split {
        gpa: u64,
    },
    SplitRange {
        gpa: u64,
        len: u64,
    },
    InveptDone,
}

/// GPAs concentrated around a few anchors (so operations meet earlier mappings and share
/// tables), plus misaligned, top-of-space and arbitrary values.
fn gpa_strategy() -> impl Strategy<Value = u64> {
    let anchor = prop_oneof![
        Just(0u64),
        Just(G1),
        Just(2 * G1 - 4 * M2),
        Just(512 * G1 - 4 * M2)
    ];
    prop_oneof![
        5 => (anchor.clone(), 0u64..2048).prop_map(|(a, k)| a + k * PAGE),
        3 => (anchor, 0u64..6).prop_map(|(a, k)| a + k * M2),
        1 => (0u64..(1 << 21)).prop_map(|p| p * PAGE),    // any page below 8 GiB
        1 => (1u64..4).prop_map(|k| GPA_LIMIT - k * M2),  // at the top of the GPA space
        1 => (0u64..(1 << 33), 1u64..4096).prop_map(|(a, o)| (a & !(PAGE - 1)) | o), // misaligned
        1 => any::<u64>(),
    ]
}

fn perms_strategy() -> impl Strategy<Value = u8> {
    prop_oneof![3 => Just(7u8), 3 => Just(3u8), 2 => Just(1u8), 1 => Just(5u8), 1 => Just(4u8), 2 => 0u8..8]
}

fn len_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        5 => (1u64..=16).prop_map(|n| n * PAGE),
        4 => (1u64..=1100).prop_map(|n| n * PAGE),
        3 => (1u64..=4).prop_map(|n| n * M2),
        1 => Just(G1),
        1 => Just(0u64),
        1 => 1u64..4096,
        1 => Just(!(PAGE - 1)),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let hpa = prop_oneof![
        4 => Just(None),                                         // identity
        2 => (0u64..(1 << 21)).prop_map(|p| Some(p * PAGE)),
        1 => (0u64..64).prop_map(|k| Some((1u64 << 46) - k * M2)), // near or beyond MAXPHYADDR
        1 => (1u64..4096).prop_map(Some),                          // misaligned
    ];
    prop_oneof![
        6 => (gpa_strategy(), hpa, len_strategy(), perms_strategy(), any::<bool>()).prop_map(|(gpa, hpa, len, perms, large)| {
            Op::Map { gpa, hpa: hpa.unwrap_or(gpa), len, perms, large }
        }),
        3 => (gpa_strategy(), len_strategy()).prop_map(|(gpa, len)| Op::Unmap { gpa, len }),
        3 => (gpa_strategy(), len_strategy(), perms_strategy()).prop_map(|(gpa, len, perms)| Op::Protect { gpa, len, perms }),
        2 => gpa_strategy().prop_map(|gpa| Op::Split { gpa }),
        1 => (gpa_strategy(), len_strategy()).prop_map(|(gpa, len)| Op::SplitRange { gpa, len }),
        1 => Just(Op::InveptDone),
    ]
}

fn features_strategy() -> impl Strategy<Value = EptFeatures> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(39u8), Just(46u8), Just(52u8)],
    )
        .prop_map(
            |(large_2m, large_1g, execute_only, max_phys_bits)| EptFeatures {
                large_2m,
                large_1g: large_1g && large_2m,
                ad: true,
                execute_only,
                max_phys_bits,
            },
        )
}

/// Errors the SDM and the documented contract allow for a range argument.
fn range_errors(gpa: u64, len: u64, errs: &mut Vec<Error>) -> Option<u64> {
    if gpa % PAGE != 0 || len % PAGE != 0 {
        errs.push(Error::Misaligned);
    }
    let end = gpa.checked_add(len);
    if len == 0 || end.is_none() {
        errs.push(Error::EmptyOrWrappingRange);
    }
    if end.is_some_and(|e| e > GPA_LIMIT) {
        errs.push(Error::GpaOutOfRange);
    }
    end.filter(|_| errs.is_empty())
}

/// SDM 29.3.3.1: W needs R; execute-only needs the capability; no access at all is no mapping.
fn perms_valid(perms: u8, f: &EptFeatures) -> bool {
    let (r, w, x) = (perms & 1 != 0, perms & 2 != 0, perms & 4 != 0);
    // perms < 8, and not (W without R), and (R, or X with the execute-only capability).
    perms != 0 && perms < 8 && (r || !w) && (r || (x && f.execute_only))
}

/// What the tables really hold, read with an independent walker: leaves (gpa, level, entry),
/// table pages reachable, and structural checks (no empty table below the PML4, no entry the
/// processor would call a misconfiguration).
struct Walk {
    leaves: Vec<(u64, u8, u64)>,
    tables: BTreeSet<u64>,
}

fn walk_tables(p: &MockPlatform, pml4: u64, cpu: &Cpu) -> Walk {
    let mut w = Walk {
        leaves: Vec::new(),
        tables: BTreeSet::new(),
    };
    fn rec(p: &MockPlatform, table: u64, level: u8, base: u64, cpu: &Cpu, w: &mut Walk) {
        assert!(w.tables.insert(table), "table {table:#x} linked twice");
        let mut present = 0;
        for i in 0..512u64 {
            let v = p.page(table)[i as usize].load(std::sync::atomic::Ordering::Relaxed);
            if v & 7 == 0 {
                assert_eq!(
                    v & bit::ADDR,
                    0,
                    "not-present entry with an address (stale?)"
                );
                continue;
            }
            present += 1;
            if let Some(r) = cpu.misconfiguration(v, level) {
                panic!(
                    "level {level} entry {v:#x} at gpa {:#x} is a misconfiguration: {r}",
                    base + i * span(level)
                );
            }
            let g = base + i * span(level);
            if level == 1 || v & bit::PS != 0 {
                w.leaves.push((g, level, v));
            } else {
                assert_eq!(
                    v & 7,
                    7,
                    "non-leaf entries carry every right (the leaves decide)"
                );
                rec(p, v & bit::ADDR, level - 1, g, cpu, w);
            }
        }
        assert!(
            level == 4 || present > 0,
            "empty table {table:#x} at level {level} left linked"
        );
    }
    rec(p, pml4, 4, 0, cpu, &mut w);
    w
}

/// The tables hold exactly the reference: same pages, HPAs and rights.
fn check_all(p: &MockPlatform, ept: &Ept, r: &RefMap, cpu: &Cpu) -> Walk {
    let w = walk_tables(p, ept.pml4(), cpu);
    let mut pages = 0u64;
    for &(g, level, v) in &w.leaves {
        let n = span(level) / PAGE;
        pages += n;
        let hpa = v & bit::ADDR & !(span(level) - 1);
        // Every page of a large leaf (sampled for 1 GiB leaves) matches the reference.
        let step = if n > 4096 { 61 } else { 1 };
        let mut k = 0;
        while k < n {
            let got = r.get(&(g + k * PAGE));
            assert_eq!(
                got,
                Some(&(hpa + k * PAGE, (v & 7) as u8)),
                "leaf at {g:#x} level {level}, page {k}"
            );
            k += step;
        }
        assert_eq!(
            r.get(&(g + (n - 1) * PAGE)),
            Some(&(hpa + (n - 1) * PAGE, (v & 7) as u8))
        );
        assert_eq!((v >> 3) & 7, MemoryType::WriteBack as u64, "memory type");
    }
    assert_eq!(
        pages,
        r.len() as u64,
        "leaves cover exactly the reference's pages"
    );
    assert_eq!(w.tables.len(), ept.tables_in_use(), "tables_in_use");
    w
}

/// Model CPU accesses at `gpa` agree with the reference (rights and exit qualification).
fn check_page(p: &MockPlatform, ept: &Ept, r: &RefMap, cpu: &mut Cpu, gpa: u64) {
    if gpa >= GPA_LIMIT {
        return;
    }
    let e = eptp(ept.pml4(), false);
    cpu.invept();
    let page = gpa & !(PAGE - 1);
    for (kind, right, q) in [
        (AccessKind::Read, 1u8, qual::READ),
        (AccessKind::Write, 2, qual::WRITE),
        (AccessKind::Fetch, 4, qual::FETCH),
    ] {
        let got = cpu.access_kind(p, e, gpa, kind);
        let want = match r.get(&page) {
            Some(&(hpa, perms)) if perms & right != 0 => Ok(hpa + (gpa - page)),
            Some(&(_, perms)) => Err(Exit::EptViolation {
                gpa,
                qualification: q | (u64::from(perms) << 3),
            }),
            None => Err(Exit::EptViolation {
                gpa,
                qualification: q,
            }),
        };
        assert_eq!(got, want, "{kind:?} at {gpa:#x}");
        let t = ept.translate(p, gpa);
        match r.get(&page) {
            Some(&(hpa, perms)) => {
                let t = t.expect("translate of a mapped page");
                assert_eq!((t.hpa, t.perms.0), (hpa + (gpa - page), perms));
            }
            None => assert_eq!(t, None, "translate of an unmapped page"),
        }
    }
}

/// Replaces the GPA of an operation by a mapped page: the `n`-th (modulo) page of the
/// reference, rounded down to 2 MiB when `align`, plus `offset` pages.
#[derive(Clone, Copy, Debug)]
struct Target {
    n: u32,
    align: bool,
    offset: u16,
}

fn target_strategy() -> impl Strategy<Value = Option<Target>> {
    prop::option::weighted(
        0.5,
        (
            any::<u32>(),
            any::<bool>(),
            prop_oneof![Just(0u16), 0u16..16, 0u16..600],
        )
            .prop_map(|(n, align, offset)| Target { n, align, offset }),
    )
}

fn run(features: EptFeatures, ops: Vec<(Op, Option<u8>, Option<Target>)>, probes: Vec<u64>) {
    let p = MockPlatform::new();
    let mut ept = Ept::new(&p, features).unwrap();
    let mut r: RefMap = BTreeMap::new();
    let mut cpu = Cpu::new(features);
    let mut zombies: BTreeSet<u64> = BTreeSet::new();
    let mut tables = check_all(&p, &ept, &r, &cpu).tables;
    // What the successful operations returned since the last INVEPT, and whether one failed
    // (a failure returns only its error; what it owes is `Ept::owed`).
    let (mut owed, mut failed) = (Invept::NONE, false);
    for (mut op, fault, target) in ops {
        let target = target.and_then(|Target { n, align, offset }| {
            r.keys()
                .nth(n as usize % r.len().max(1))
                .map(|&g| (if align { g & !(M2 - 1) } else { g }) + u64::from(offset) * PAGE)
        });
        if let Some(t) = target {
            match &mut op {
                Op::Map { gpa, .. }
                | Op::Unmap { gpa, .. }
                | Op::Protect { gpa, .. }
                | Op::Split { gpa }
                | Op::SplitRange { gpa, .. } => *gpa = t,
                _ => {}
            }
        }
        if let Some(n) = fault {
            p.fail_nth_alloc(u64::from(n) + 1);
        }
        let failed_before = p.stats().failed_allocs;
        let tables_before = ept.tables_in_use();
        let before = r.clone();
        let mut errs = Vec::new();
        let mut touched = Vec::new();
        let owed_before = ept.needs_invept();
        let mut got = Invept::NONE;
        let result: Result<(), Error> = match op {
            Op::Map {
                gpa,
                hpa,
                len,
                perms,
                large,
            } => {
                let end = range_errors(gpa, len, &mut errs);
                if hpa % PAGE != 0 {
                    errs.push(Error::Misaligned);
                }
                match hpa.checked_add(len) {
                    None => errs.push(Error::EmptyOrWrappingRange),
                    Some(he) if he > 1u64 << features.max_phys_bits => {
                        errs.push(Error::HpaOutOfRange)
                    }
                    _ => {}
                }
                if !perms_valid(perms, &features) {
                    errs.push(Error::InvalidPermissions);
                }
                if let Some(end) = end {
                    if r.range(gpa..end).next().is_some() {
                        errs.push(Error::Overlap);
                    }
                    touched.extend([gpa, end - PAGE]);
                }
                let res = ept.map(
                    &p,
                    gpa,
                    hpa,
                    len,
                    Perms(perms),
                    MemoryType::WriteBack,
                    large,
                );
                if res.is_ok() {
                    let mut g = gpa;
                    while g < gpa + len {
                        r.insert(g, (hpa + (g - gpa), perms));
                        g += PAGE;
                    }
                }
                if res == Err(Error::OutOfMemory) {
                    // A failed map leaves the tables exactly as they were.
                    assert_eq!(
                        ept.tables_in_use(),
                        tables_before,
                        "map failure changed tables_in_use"
                    );
                }
                res
            }
            Op::Unmap { gpa, len } => {
                let end = range_errors(gpa, len, &mut errs);
                let res = ept.unmap(&p, gpa, len).map(|o| got = o);
                if let (Ok(()), Some(end)) = (res, end) {
                    let gone: Vec<u64> = r.range(gpa..end).map(|(&g, _)| g).collect();
                    for g in gone {
                        r.remove(&g);
                    }
                    touched.extend([gpa, end - PAGE, gpa.wrapping_sub(PAGE), end]);
                }
                res
            }
            Op::Protect { gpa, len, perms } => {
                let end = range_errors(gpa, len, &mut errs);
                if !perms_valid(perms, &features) {
                    errs.push(Error::InvalidPermissions);
                }
                if let Some(end) = end {
                    if r.range(gpa..end).count() as u64 != len / PAGE {
                        errs.push(Error::NotMapped);
                    }
                    touched.extend([gpa, end - PAGE, gpa.wrapping_sub(PAGE), end]);
                }
                let res = ept.protect(&p, gpa, len, Perms(perms)).map(|o| got = o);
                if let (Ok(()), Some(end)) = (res, end) {
                    for (_, v) in r.range_mut(gpa..end) {
                        v.1 = perms;
                    }
                }
                res
            }
            Op::Split { gpa } => {
                let page = gpa & !(PAGE - 1);
                if !r.contains_key(&page) || gpa >= GPA_LIMIT {
                    errs.push(Error::NotMapped);
                }
                let level_before = ept.translate(&p, gpa).map(|t| t.level);
                let res = ept.split(&p, gpa).map(|o| got = o);
                if res.is_ok() {
                    let split = got.is_owed();
                    let level_after = ept.translate(&p, gpa).map(|t| t.level);
                    let lb = level_before.expect("split of a mapped page");
                    assert_eq!(
                        split,
                        lb > 1,
                        "a split owes INVEPT exactly when there was a large leaf (SDM 29.4.3.4)"
                    );
                    assert_eq!(level_after, Some(if split { lb - 1 } else { lb }));
                }
                touched.push(gpa);
                res
            }
            Op::SplitRange { gpa, len } => {
                let end = range_errors(gpa, len, &mut errs);
                let res = ept.split_range(&p, gpa, len).map(|o| got = o);
                if let (Ok(()), Some(end)) = (res, end) {
                    for &g in r.range(gpa..end).map(|(g, _)| g).step_by(97) {
                        assert_eq!(
                            ept.translate(&p, g).map(|t| t.level),
                            Some(1),
                            "split_range left a large leaf"
                        );
                    }
                    touched.extend([gpa, end - PAGE]);
                }
                res
            }
            Op::InveptDone => {
                let paid = core::mem::replace(&mut owed, Invept::NONE);
                if !failed {
                    assert_eq!(
                        paid.is_owed(),
                        ept.needs_invept(),
                        "the returned obligations are exactly what the EPT owes"
                    );
                }
                failed = false;
                ept.invept_done(&p, paid.and(ept.owed()));
                assert_eq!(ept.tables_pending_free(), 0);
                for &z in &zombies {
                    assert!(
                        !p.is_live(z),
                        "retired table {z:#x} not freed by invept_done"
                    );
                }
                zombies.clear();
                assert!(!ept.needs_invept());
                Ok(())
            }
        };
        p.clear_faults();
        if result.is_ok() && !owed_before && ept.needs_invept() {
            assert!(
                got.is_owed(),
                "{op:?} made INVEPT owed without returning it"
            );
        }
        failed |= result.is_err();
        owed.add(got);
        match result {
            Ok(()) => assert!(
                errs.is_empty(),
                "{op:?} succeeded, expected one of {errs:?}"
            ),
            Err(Error::OutOfMemory) => {
                assert!(
                    errs.is_empty(),
                    "{op:?}: OutOfMemory, expected one of {errs:?}"
                );
                assert!(
                    p.stats().failed_allocs > failed_before,
                    "OutOfMemory without a failed allocation"
                );
                assert_eq!(r, before);
            }
            Err(e) => {
                assert!(
                    errs.contains(&e),
                    "{op:?} returned {e:?}, expected one of {errs:?}"
                );
                assert_eq!(r, before);
            }
        }
        if result.is_err() {
            // Every translation is unchanged: the reference was not touched, so check it all.
            let w = check_all(&p, &ept, &r, &cpu);
            assert_eq!(w.tables.len(), ept.tables_in_use());
        }
        // Accounting: every live page is a linked table or one waiting for INVEPT.
        assert_eq!(
            p.live_pages(),
            (ept.tables_in_use() + ept.tables_pending_free()) as u64,
            "after {op:?}"
        );
        let now = walk_tables(&p, ept.pml4(), &cpu).tables;
        assert_eq!(now.len(), ept.tables_in_use());
        // Tables unlinked by this operation stay allocated until invept_done (a processor may
        // still walk them through its paging-structure caches).
        for &t in tables.difference(&now) {
            if !zombies.contains(&t) {
                assert!(p.is_live(t), "table {t:#x} freed before INVEPT");
                assert!(
                    ept.needs_invept() && (owed.is_owed() || failed),
                    "a table was unlinked without returning an INVEPT obligation"
                );
                zombies.insert(t);
            }
        }
        tables = now;
        for g in touched.into_iter().chain(probes.iter().copied()) {
            check_page(&p, &ept, &r, &mut cpu, g);
        }
    }
    check_all(&p, &ept, &r, &cpu);
    ept.destroy(&p);
    p.assert_all_freed();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: if cfg!(debug_assertions) { 40 } else { 400 }, ..ProptestConfig::default() })]

    #[test]
    fn ept_operations_match_reference(
        features in features_strategy(),
        ops in prop::collection::vec((op_strategy(), prop::option::weighted(0.3, 0u8..6), target_strategy()), 1..30),
        probes in prop::collection::vec(gpa_strategy(), 4),
    ) {
        run(features, ops, probes);
    }
}

/// Map failing at every possible allocation: tables, translations and pages unchanged.
#[test]
fn map_failure_at_each_allocation_rolls_back() {
    // Tables the map needs, counted by hand from the layout below: with 2 MiB leaves, a PD for
    // GiB 511, a PT for the unaligned head, a PDPT and a PD past 512 GiB, a PT for the tail (5);
    // with 4 KiB leaves only, a PD, 2 PTs, a PDPT, a PD and 2 PTs (7).
    for (features, needed) in [
        (EptFeatures::ALL, 5),
        (
            EptFeatures {
                large_1g: false,
                large_2m: false,
                ..EptFeatures::ALL
            },
            7,
        ),
    ] {
        for n in 1..12 {
            let p = MockPlatform::new();
            let mut ept = Ept::new(&p, features).unwrap();
            // Something already there, sharing upper tables with the next map.
            ept.map(
                &p,
                0x7fe0_0000,
                0x7fe0_0000,
                0x1000,
                Perms::RW,
                MemoryType::WriteBack,
                false,
            )
            .unwrap();
            let tables = ept.tables_in_use();
            let live = p.live_pages();
            p.fail_nth_alloc(n);
            // Crosses a 1 GiB and a 512 GiB boundary: needs several tables.
            let gpa = (512 * G1) - M2 - M2 / 2 - 5 * PAGE;
            let res = ept.map(
                &p,
                gpa,
                gpa,
                3 * M2 + 10 * PAGE,
                Perms::RWX,
                MemoryType::WriteBack,
                true,
            );
            p.clear_faults();
            let cpu = Cpu::new(features);
            assert_eq!(
                res.is_ok(),
                n > needed,
                "allocation {n} of {needed} failing: {res:?}"
            );
            if res.is_err() {
                assert_eq!(res, Err(Error::OutOfMemory));
                assert_eq!(ept.tables_in_use(), tables);
                let mut r = RefMap::new();
                r.insert(0x7fe0_0000, (0x7fe0_0000, 3));
                check_all(&p, &ept, &r, &cpu);
                // The rollback unmapped what the map had made: a failure's obligation is the
                // EPT's own record.
                let owed = ept.owed();
                ept.invept_done(&p, owed);
                assert_eq!(p.live_pages(), live, "failed map leaked pages (n = {n})");
            }
            ept.destroy(&p);
            p.assert_all_freed();
        }
    }
}

/// A processor may keep walking unlinked tables through its paging-structure caches until
/// INVEPT (SDM 29.4.3.4), so the core frees them only in `invept_done`.
#[test]
fn unlinked_tables_stay_allocated_until_invept() {
    let p = MockPlatform::new();
    let mut ept = Ept::new(&p, EptFeatures::ALL).unwrap();
    ept.map(
        &p,
        G1,
        G1,
        16 * PAGE,
        Perms::RW,
        MemoryType::WriteBack,
        false,
    )
    .unwrap();
    let e = eptp(ept.pml4(), true);
    let mut cpu = Cpu::new(EptFeatures::ALL);
    assert_eq!(cpu.access(&p, e, G1, true), Ok(G1));
    let owed = ept.unmap(&p, G1, 16 * PAGE).unwrap();
    assert_eq!(ept.tables_in_use(), 1);
    assert_eq!(ept.tables_pending_free(), 3);
    assert!(owed.is_owed() && ept.needs_invept());
    // The stale translation still works, and a miss walks the unlinked PT from the cache.
    assert_eq!(cpu.access(&p, e, G1, true), Ok(G1));
    assert!(matches!(
        cpu.access(&p, e, G1 + PAGE, false),
        Err(Exit::EptViolation { .. })
    ));
    assert_eq!(p.live_pages(), 4);
    cpu.invept();
    ept.invept_done(&p, owed);
    assert_eq!(p.live_pages(), 1);
    assert_eq!(
        cpu.access(&p, e, G1, true),
        Err(Exit::EptViolation {
            gpa: G1,
            qualification: qual::WRITE
        })
    );
    ept.destroy(&p);
    p.assert_all_freed();
}

/// The model catches a VM that calls `invept_done` without executing INVEPT: its
/// paging-structure cache leads into a freed page.
#[test]
#[should_panic(expected = "use after free")]
fn invept_done_without_invept_is_a_use_after_free() {
    let p = MockPlatform::new();
    let mut ept = Ept::new(&p, EptFeatures::ALL).unwrap();
    ept.map(
        &p,
        G1,
        G1,
        16 * PAGE,
        Perms::RW,
        MemoryType::WriteBack,
        false,
    )
    .unwrap();
    let e = eptp(ept.pml4(), true);
    let mut cpu = Cpu::new(EptFeatures::ALL);
    cpu.access(&p, e, G1, false).unwrap();
    let owed = ept.unmap(&p, G1, 16 * PAGE).unwrap();
    ept.invept_done(&p, owed);
    let _ = cpu.access(&p, e, G1 + PAGE, false);
}

/// Destroying an EPT returns every page, including those waiting for INVEPT.
#[test]
fn destroy_returns_every_page() {
    let p = MockPlatform::new();
    let mut ept = Ept::new(&p, EptFeatures::ALL).unwrap();
    ept.map(
        &p,
        0,
        0,
        3 * G1 + 5 * M2 + 7 * PAGE,
        Perms::RWX,
        MemoryType::WriteBack,
        true,
    )
    .unwrap();
    ept.map(
        &p,
        600 * G1,
        0x1000,
        70 * PAGE,
        Perms::R,
        MemoryType::WriteBack,
        true,
    )
    .unwrap();
    let owed = ept.unmap(&p, G1 + M2, M2 + PAGE).unwrap();
    let owed = owed.and(ept.split_range(&p, 0, 4 * M2).unwrap());
    assert!(owed.is_owed() && ept.tables_pending_free() + ept.tables_in_use() > 1);
    ept.destroy(&p);
    p.assert_all_freed();
}
