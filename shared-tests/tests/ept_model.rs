//! Tests of the oracle itself: the model CPU on EPT tables written by hand, entry by entry, from
//! the SDM's layout (no core code builds them), with expectations taken from the SDM text.

use std::sync::atomic::Ordering::Relaxed;

use smudge_core::ept::EptFeatures;
use smudge_core::platform::Platform;
use smudge_tests::model::{bit, eptp, qual, AccessKind, Cpu, Exit};
use smudge_tests::MockPlatform;

const WB: u64 = 6 << 3;
const RWX: u64 = 7;

/// A hand-built hierarchy translating GPA 0..2 MiB through one PT, and GPA 1 GiB..1 GiB+2 MiB
/// through a 2 MiB leaf, and GPA 2 GiB.. through a 1 GiB leaf.
struct Tables {
    pml4: u64,
    pdpt: u64,
    pd: u64,
    pt: u64,
    pd1: u64,
}

const HPA0: u64 = 0x4000_0000; // leaves of the PT map GPA i*4K -> HPA0 + i*4K

fn build(p: &MockPlatform) -> Tables {
    let pml4 = p.alloc_page().unwrap();
    let pdpt = p.alloc_page().unwrap();
    let pd = p.alloc_page().unwrap();
    let pt = p.alloc_page().unwrap();
    let pd1 = p.alloc_page().unwrap();
    p.page(pml4)[0].store(pdpt | RWX, Relaxed);
    p.page(pdpt)[0].store(pd | RWX, Relaxed);
    p.page(pdpt)[1].store(pd1 | RWX, Relaxed);
    p.page(pdpt)[2].store(0x8000_0000 | RWX | WB | bit::PS, Relaxed); // 1 GiB leaf at 2 GiB
    p.page(pd)[0].store(pt | RWX, Relaxed);
    p.page(pd1)[0].store(0x20_0000 | RWX | WB | bit::PS, Relaxed); // 2 MiB leaf at 1 GiB
    for i in 0..16u64 {
        p.page(pt)[i as usize].store((HPA0 + i * 4096) | RWX | WB, Relaxed);
    }
    Tables {
        pml4,
        pdpt,
        pd,
        pt,
        pd1,
    }
}

fn word(p: &MockPlatform, table: u64, i: usize) -> u64 {
    p.page(table)[i].load(Relaxed)
}

fn set(p: &MockPlatform, table: u64, i: usize, v: u64) {
    p.page(table)[i].store(v, Relaxed)
}

#[test]
fn translation_of_4k_2m_1g_leaves() {
    let p = MockPlatform::new();
    let t = build(&p);
    let mut cpu = Cpu::new(EptFeatures::ALL);
    let e = eptp(t.pml4, false);
    assert_eq!(cpu.access(&p, e, 0x3123, false), Ok(HPA0 + 0x3123));
    assert_eq!(
        cpu.access(&p, e, (1 << 30) + 0x1_2345, false),
        Ok(0x20_0000 + 0x1_2345)
    );
    assert_eq!(
        cpu.access(&p, e, (2 << 30) + 0x1234_5678, true),
        Ok(0x8000_0000 + 0x1234_5678)
    );
    // Without A/D (EPTP bit 6 clear) the processor writes no flag (SDM 29.3.5).
    assert_eq!(word(&p, t.pml4, 0) & (bit::A | bit::D), 0);
    assert_eq!(word(&p, t.pdpt, 2) & (bit::A | bit::D), 0);
}

#[test]
fn accessed_and_dirty_flags() {
    let p = MockPlatform::new();
    let t = build(&p);
    let mut cpu = Cpu::new(EptFeatures::ALL);
    let e = eptp(t.pml4, true);
    cpu.access(&p, e, 0x2000, false).unwrap();
    // A in every entry used, no D on a read (SDM 29.3.5).
    for (table, i) in [(t.pml4, 0), (t.pdpt, 0), (t.pd, 0), (t.pt, 2)] {
        assert_ne!(word(&p, table, i) & bit::A, 0);
    }
    assert_eq!(word(&p, t.pt, 2) & bit::D, 0);
    assert_eq!(word(&p, t.pt, 3) & bit::A, 0, "an unused entry gets no A");
    cpu.access(&p, e, 0x3000, true).unwrap();
    assert_eq!(word(&p, t.pt, 3) & (bit::A | bit::D), bit::A | bit::D);
    // D only in the leaf.
    assert_eq!(word(&p, t.pd, 0) & bit::D, 0);
    // A 2 MiB leaf gets D too.
    cpu.access(&p, e, (1 << 30) + 0x5000, true).unwrap();
    assert_eq!(word(&p, t.pd1, 0) & (bit::A | bit::D), bit::A | bit::D);
    assert_ne!(word(&p, t.pdpt, 1) & bit::A, 0);
}

#[test]
fn violation_qualification() {
    let p = MockPlatform::new();
    let t = build(&p);
    let mut cpu = Cpu::new(EptFeatures::ALL);
    let e = eptp(t.pml4, true);
    // Not present at the PTE: bits 3-5 are 0 (the AND includes the not-present entry).
    assert_eq!(
        cpu.access(&p, e, 0x20_000, true),
        Err(Exit::EptViolation {
            gpa: 0x20_000,
            qualification: qual::WRITE
        })
    );
    // Not present at the PML4E.
    assert_eq!(
        cpu.access_kind(&p, e, 1 << 40, AccessKind::Fetch),
        Err(Exit::EptViolation {
            gpa: 1 << 40,
            qualification: qual::FETCH
        })
    );
    // Read-only leaf, write: bit 1, and bit 3 (readable).
    set(&p, t.pt, 5, (HPA0 + 5 * 4096) | bit::R | WB);
    assert_eq!(
        cpu.access(&p, e, 0x5008, true),
        Err(Exit::EptViolation {
            gpa: 0x5008,
            qualification: qual::WRITE | qual::READABLE
        })
    );
    // Rights are the AND across levels: a PDE with R|X above an RWX leaf.
    set(&p, t.pd, 0, t.pt | bit::R | bit::X);
    assert_eq!(
        cpu.access(&p, e, 0x6000, true),
        Err(Exit::EptViolation {
            gpa: 0x6000,
            qualification: qual::WRITE | qual::READABLE | qual::EXECUTABLE
        })
    );
    set(&p, t.pd, 0, t.pt | RWX);
    // Fetch of an RW leaf.
    set(&p, t.pt, 7, (HPA0 + 7 * 4096) | bit::R | bit::W | WB);
    assert_eq!(
        cpu.access_kind(&p, e, 0x7000, AccessKind::Fetch),
        Err(Exit::EptViolation {
            gpa: 0x7000,
            qualification: qual::FETCH | qual::READABLE | qual::WRITABLE
        })
    );
    // A walk that ends in a violation sets no D.
    assert_eq!(word(&p, t.pt, 5) & bit::D, 0);
    assert_eq!(cpu.stats.violations, 5);
}

/// A fresh walk (INVEPT first: the entries changed under the TLB) that reports a misconfiguration.
fn misconfig(cpu: &mut Cpu, p: &MockPlatform, e: u64, gpa: u64) -> Option<(u8, &'static str)> {
    cpu.invept();
    match cpu.access(p, e, gpa, false) {
        Err(Exit::EptMisconfig { level, reason, .. }) => Some((level, reason)),
        _ => None,
    }
}

#[test]
fn misconfigurations() {
    let p = MockPlatform::new();
    let t = build(&p);
    let e = eptp(t.pml4, true);
    let mut cpu = Cpu::new(EptFeatures {
        execute_only: false,
        ..EptFeatures::ALL
    });
    let leaf = HPA0 + 9 * 4096;
    // W without R, at a leaf and at a non-leaf (SDM 29.3.3.1).
    for rwx in [bit::W, bit::W | bit::X] {
        set(&p, t.pt, 9, leaf | rwx | WB);
        assert_eq!(
            misconfig(&mut cpu, &p, e, 0x9000).map(|m| m.0),
            Some(1),
            "rwx {rwx:#b}"
        );
    }
    set(&p, t.pdpt, 0, t.pd | bit::W);
    assert_eq!(misconfig(&mut cpu, &p, e, 0x9000).map(|m| m.0), Some(3));
    set(&p, t.pdpt, 0, t.pd | RWX);
    // Execute-only without the capability; with it, a fetch works and a read is a violation.
    set(&p, t.pt, 9, leaf | bit::X | WB);
    assert!(misconfig(&mut cpu, &p, e, 0x9000).is_some());
    let mut xo = Cpu::new(EptFeatures::ALL);
    assert_eq!(xo.access_kind(&p, e, 0x9000, AccessKind::Fetch), Ok(leaf));
    assert_eq!(
        xo.access(&p, e, 0x9000, false),
        Err(Exit::EptViolation {
            gpa: 0x9000,
            qualification: qual::READ | qual::EXECUTABLE
        })
    );
    // Leaf memory types 2, 3, 7 are misconfigurations; 0, 1, 4, 5, 6 are not.
    for mt in 0..8u64 {
        set(&p, t.pt, 9, leaf | RWX | (mt << 3));
        let bad = misconfig(&mut cpu, &p, e, 0x9000).is_some();
        assert_eq!(bad, matches!(mt, 2 | 3 | 7), "memory type {mt}");
    }
    // The memory-type field of a non-leaf is reserved (bits 6:3), bit 7 of a PML4E too.
    set(&p, t.pd, 0, t.pt | RWX | (1 << 3));
    assert_eq!(misconfig(&mut cpu, &p, e, 0x9000).map(|m| m.0), Some(2));
    set(&p, t.pd, 0, t.pt | RWX);
    set(&p, t.pml4, 0, t.pdpt | RWX | bit::PS);
    assert_eq!(misconfig(&mut cpu, &p, e, 0x9000).map(|m| m.0), Some(4));
    set(&p, t.pml4, 0, t.pdpt | RWX);
    // Address bits at or above MAXPHYADDR (46 here).
    set(&p, t.pt, 9, leaf | (1 << 46) | RWX | WB);
    assert_eq!(misconfig(&mut cpu, &p, e, 0x9000).map(|m| m.0), Some(1));
    set(&p, t.pt, 9, leaf | (1 << 45) | RWX | WB);
    assert_eq!(misconfig(&mut cpu, &p, e, 0x9000), None);
    // Reserved bits 20:12 of a 2 MiB leaf; bit 7 of a PDE without 2 MiB support.
    set(&p, t.pd1, 0, 0x20_0000 | (1 << 12) | RWX | WB | bit::PS);
    assert_eq!(misconfig(&mut cpu, &p, e, 1 << 30).map(|m| m.0), Some(2));
    set(&p, t.pd1, 0, 0x20_0000 | RWX | WB | bit::PS);
    let mut no2m = Cpu::new(EptFeatures {
        large_2m: false,
        ..EptFeatures::ALL
    });
    assert_eq!(misconfig(&mut no2m, &p, e, 1 << 30).map(|m| m.0), Some(2));
    let mut no1g = Cpu::new(EptFeatures {
        large_1g: false,
        ..EptFeatures::ALL
    });
    assert_eq!(misconfig(&mut no1g, &p, e, 2 << 30).map(|m| m.0), Some(3));
    // Bits 62:52 of a leaf are ignored (smudge keeps a software flag at 52).
    set(&p, t.pt, 9, leaf | (1 << 52) | RWX | WB);
    cpu.invept();
    assert_eq!(cpu.access(&p, e, 0x9000, true), Ok(leaf));
    // A misconfiguration sets no flag.
    set(&p, t.pt, 10, (HPA0 + 10 * 4096) | bit::W | WB);
    assert!(misconfig(&mut cpu, &p, e, 0xa000).is_some());
    assert_eq!(word(&p, t.pt, 10) & (bit::A | bit::D), 0);
}

#[test]
fn eptp_checks() {
    let p = MockPlatform::new();
    let t = build(&p);
    let mut cpu = Cpu::new(EptFeatures {
        ad: false,
        ..EptFeatures::ALL
    });
    let good = eptp(t.pml4, false);
    assert!(cpu.access(&p, good, 0, false).is_ok());
    assert!(matches!(
        cpu.access(&p, eptp(t.pml4, true), 0, false),
        Err(Exit::InvalidEptp { .. })
    ));
    assert!(matches!(
        cpu.access(&p, (good & !7) | 1, 0, false),
        Err(Exit::InvalidEptp { .. })
    ));
    assert!(matches!(
        cpu.access(&p, good & !(7 << 3), 0, false),
        Err(Exit::InvalidEptp { .. })
    ));
    assert!(matches!(
        cpu.access(&p, good | (1 << 9), 0, false),
        Err(Exit::InvalidEptp { .. })
    ));
}

#[test]
fn tlb_keeps_translations_until_invept() {
    let p = MockPlatform::new();
    let t = build(&p);
    let mut cpu = Cpu::new(EptFeatures::ALL);
    let e = eptp(t.pml4, true);
    assert_eq!(cpu.access(&p, e, 0x1000, false), Ok(HPA0 + 0x1000));
    // Software unmaps the page; the cached translation is still used.
    set(&p, t.pt, 1, 0);
    assert_eq!(cpu.access(&p, e, 0x1000, false), Ok(HPA0 + 0x1000));
    assert_eq!(cpu.stats.tlb_hits, 1);
    // Another CPU never cached it.
    let mut other = Cpu::new(EptFeatures::ALL);
    assert!(matches!(
        other.access(&p, e, 0x1000, false),
        Err(Exit::EptViolation { .. })
    ));
    cpu.invept();
    assert!(matches!(
        cpu.access(&p, e, 0x1000, false),
        Err(Exit::EptViolation { .. })
    ));
    // Single-context INVEPT of another EPTP leaves this one's translations alone.
    cpu.access(&p, e, 0x2000, false).unwrap();
    cpu.invept_single(eptp(0x1234_5000, true));
    assert_eq!(cpu.cached_translations(), 1);
    cpu.invept_single(e);
    assert_eq!(cpu.cached_translations(), 0);
}

#[test]
fn cached_dirty_flag_absorbs_writes() {
    let p = MockPlatform::new();
    let t = build(&p);
    let mut cpu = Cpu::new(EptFeatures::ALL);
    let e = eptp(t.pml4, true);
    cpu.access(&p, e, 0x4000, true).unwrap();
    assert_ne!(word(&p, t.pt, 4) & bit::D, 0);
    // Software clears D without INVEPT: the next write hits the TLB entry cached with D=1 and
    // does not set D again (SDM 29.4.3.4: software must INVEPT after clearing D).
    set(&p, t.pt, 4, word(&p, t.pt, 4) & !bit::D);
    cpu.access(&p, e, 0x4000, true).unwrap();
    assert_eq!(
        word(&p, t.pt, 4) & bit::D,
        0,
        "write through a dirty cached translation"
    );
    cpu.invept();
    cpu.access(&p, e, 0x4000, true).unwrap();
    assert_ne!(word(&p, t.pt, 4) & bit::D, 0);
}

#[test]
fn write_through_clean_cached_translation_sets_dirty() {
    let p = MockPlatform::new();
    let t = build(&p);
    let mut cpu = Cpu::new(EptFeatures::ALL);
    let e = eptp(t.pml4, true);
    cpu.access(&p, e, 0x8000, false).unwrap();
    assert_eq!(word(&p, t.pt, 8) & bit::D, 0);
    cpu.access(&p, e, 0x8000, true).unwrap();
    assert_ne!(word(&p, t.pt, 8) & bit::D, 0);
    assert_eq!(cpu.stats.tlb_hits, 0, "the write had to walk");
}

#[test]
fn paging_structure_cache_skips_upper_accessed_flags() {
    let p = MockPlatform::new();
    let t = build(&p);
    let e = eptp(t.pml4, true);
    for psc in [true, false] {
        let mut cpu = Cpu::new(EptFeatures::ALL);
        cpu.paging_structure_cache = psc;
        cpu.access(&p, e, 0x1000, false).unwrap();
        // Software clears A in the upper entries (as a harvest does) without INVEPT.
        for (table, i) in [(t.pml4, 0), (t.pdpt, 0), (t.pd, 0)] {
            set(&p, table, i, word(&p, table, i) & !bit::A);
        }
        // A write to another page under the same PDE: a TLB miss.
        cpu.access(&p, e, 0xc000, true).unwrap();
        assert_ne!(word(&p, t.pt, 12) & bit::D, 0);
        let upper_a = word(&p, t.pd, 0) & bit::A != 0;
        assert_eq!(upper_a, !psc, "PDE A with paging-structure caches {psc}");
        cpu.invept();
        cpu.access(&p, e, 0xd000, true).unwrap();
        assert_ne!(
            word(&p, t.pd, 0) & bit::A,
            0,
            "after INVEPT the walk starts at the PML4"
        );
    }
}

#[test]
fn violation_invalidates_cached_mapping() {
    let p = MockPlatform::new();
    let t = build(&p);
    let mut cpu = Cpu::new(EptFeatures::ALL);
    let e = eptp(t.pml4, true);
    set(&p, t.pt, 6, (HPA0 + 6 * 4096) | bit::R | WB);
    cpu.access(&p, e, 0x6000, false).unwrap();
    // Software grants W without INVEPT: the cached R-only translation faults once...
    set(&p, t.pt, 6, (HPA0 + 6 * 4096) | bit::R | bit::W | WB);
    assert_eq!(
        cpu.access(&p, e, 0x6000, true),
        Err(Exit::EptViolation {
            gpa: 0x6000,
            qualification: qual::WRITE | qual::READABLE
        })
    );
    // ... and the violation dropped it (SDM 29.4.3.1), so the retry walks and succeeds.
    assert_eq!(cpu.access(&p, e, 0x6000, true), Ok(HPA0 + 0x6000));
}

#[test]
fn page_modification_log() {
    let p = MockPlatform::new();
    let t = build(&p);
    // Map the whole PT.
    for i in 16..512u64 {
        set(&p, t.pt, i as usize, (HPA0 + i * 4096) | RWX | WB);
    }
    let buf = p.alloc_page().unwrap();
    let mut cpu = Cpu::new(EptFeatures::ALL);
    cpu.enable_pml(buf);
    let e = eptp(t.pml4, true);
    cpu.access(&p, e, 0x3456, true).unwrap();
    assert_eq!(word(&p, buf, 511), 0x3000, "4 KiB-aligned GPA at index 511");
    assert_eq!(cpu.pml.unwrap().index, 510);
    cpu.access(&p, e, 0x3000, true).unwrap();
    cpu.access(&p, e, 0x3000, false).unwrap();
    assert_eq!(cpu.pml.unwrap().index, 510, "no log when D was already set");
    // Reading a page logs nothing; writing it later logs it once.
    cpu.access(&p, e, 0x5000, false).unwrap();
    assert_eq!(cpu.pml.unwrap().index, 510);
    // Pages 4..511 (508), the 2 MiB leaf twice (one log), the 1 GiB leaf: 511 entries in all.
    for i in 4..512u64 {
        cpu.access(&p, e, i * 4096, true).unwrap();
    }
    cpu.access(&p, e, 1 << 30, true).unwrap();
    cpu.access(&p, e, (1 << 30) + 0x1000, true).unwrap();
    cpu.access(&p, e, 2 << 30, true).unwrap();
    assert_eq!(cpu.stats.pml_logged, 511);
    assert_eq!(cpu.pml.unwrap().index, 0);
    // The 512th is logged at index 0, and the index wraps to 0xFFFF (SDM 29.3.6).
    cpu.access(&p, e, 0x2008, true).unwrap();
    assert_eq!(word(&p, buf, 0), 0x2000);
    assert_eq!(cpu.pml.unwrap().index, 0xffff);
    // Full: a write that needs to set D exits without the access and without setting a flag.
    assert_eq!(
        cpu.access(&p, e, 0x1000, true),
        Err(Exit::PmlFull { gpa: 0x1000 })
    );
    assert_eq!(
        word(&p, t.pt, 1) & (bit::A | bit::D),
        0,
        "no flag set by a PML-full exit"
    );
    // Even a read that must set an A flag exits (SDM 29.3.6: "an accessed or dirty flag").
    assert_eq!(
        cpu.access(&p, e, 0x1000, false),
        Err(Exit::PmlFull { gpa: 0x1000 })
    );
    // A walk that sets nothing (A and D already set) proceeds.
    cpu.invept();
    assert_eq!(cpu.access(&p, e, 0x3000, true), Ok(HPA0 + 0x3000));
    // The handler drains and resets the index; the write then proceeds and is logged at 511.
    cpu.set_pml_index(511);
    assert_eq!(cpu.access(&p, e, 0x1000, true), Ok(HPA0 + 0x1000));
    assert_eq!(word(&p, buf, 511), 0x1000);
    assert_eq!(cpu.pml.unwrap().index, 510);
}
