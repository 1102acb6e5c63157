//! The A/D scan's leaf loop on raw page tables: every leaf state the chunk fast paths sort
//! (clean, present and dirty, present and dirty with no R/W bit, not present with D set, not
//! present), in runs that make dense, mixed and clean 64-leaf chunks, mispredicted dense chunks
//! and partial chunks at both ends of a slot that starts and ends anywhere in three page tables.
//! `get` and `harvest` must report exactly the present leaves with D set, `harvest` must clear D
//! in those leaves and change no other bit of any entry, whether the platform lends the tables
//! as plain memory (as a kernel shim may) or through the atomics (the trait's default).

use std::sync::atomic::Ordering::Relaxed;

use proptest::prelude::*;
use smudge_core::dirty::{DirtyLog, Mode};
use smudge_core::ept::{Ept, EptFeatures, MemoryType, Perms};
use smudge_core::platform::Platform;
use smudge_tests::model::bit;
use smudge_tests::MockPlatform;

const PAGE: u64 = 4096;
const TABLES: usize = 3;
const LEAVES: usize = TABLES * 512;

#[derive(Clone, Copy, Debug)]
enum Leaf {
    Clean,
    Dirty,
    /// Present through X only: no R/W/X bit in common with the other dirty leaves.
    DirtyExecOnly,
    /// Not present, with the D bit (ignored by the processor) set.
    AbsentWithD,
    Absent,
}

/// The entry of `leaf` for the page at `hpa`.
fn entry(leaf: Leaf, hpa: u64) -> u64 {
    let wb = 6 << bit::MEMTYPE_SHIFT;
    match leaf {
        Leaf::Clean => hpa | wb | bit::R | bit::W | bit::A,
        Leaf::Dirty => hpa | wb | bit::R | bit::W | bit::A | bit::D,
        Leaf::DirtyExecOnly => hpa | wb | bit::X | bit::A | bit::D,
        Leaf::AbsentWithD => hpa | bit::A | bit::D,
        Leaf::Absent => 0,
    }
}

fn is_dirty(v: u64) -> bool {
    v & (bit::R | bit::W | bit::X) != 0 && v & bit::D != 0
}

/// Runs of leaf states, long ones included, cut to `LEAVES` leaves.
fn leaves_strategy() -> impl Strategy<Value = Vec<Leaf>> {
    let leaf = prop_oneof![
        4 => Just(Leaf::Clean),
        6 => Just(Leaf::Dirty),
        1 => Just(Leaf::DirtyExecOnly),
        1 => Just(Leaf::AbsentWithD),
        1 => Just(Leaf::Absent),
    ];
    let len = prop_oneof![3 => 1usize..8, 2 => 8usize..200, 1 => Just(64usize), 1 => 400usize..900];
    prop::collection::vec((leaf, len), 1..40).prop_map(|runs| {
        let mut v: Vec<Leaf> = runs
            .into_iter()
            .flat_map(|(l, n)| std::iter::repeat_n(l, n))
            .collect();
        v.resize(LEAVES, Leaf::Clean);
        v
    })
}

/// Three page tables mapping GPA 0..6 MiB with 4 KiB leaves.
struct Tables {
    p: MockPlatform,
    ept: Ept,
    /// The leaf words, through which the test writes and reads entries.
    pts: Vec<u64>,
}

impl Tables {
    fn new(lend_through_atomics: bool) -> Tables {
        let p = MockPlatform::new();
        p.lend_through_atomics(lend_through_atomics);
        let mut ept = Ept::new(&p, EptFeatures::ALL).expect("EPT");
        let bytes = (LEAVES as u64) * PAGE;
        ept.map(&p, 0, 0, bytes, Perms::RW, MemoryType::WriteBack, false)
            .expect("map");
        // The tables, from the entries (SDM layout): PML4E 0, PDPTE 0, PDEs 0..3.
        let addr = |table: u64, i: usize| p.page(table)[i].load(Relaxed) & bit::ADDR;
        let pdpt = addr(ept.pml4(), 0);
        let pd = addr(pdpt, 0);
        let pts = (0..TABLES).map(|t| addr(pd, t)).collect();
        // A set above every leaf, as the processor's walks leave it (SDM 29.3.5).
        p.page(ept.pml4())[0].fetch_or(bit::A, Relaxed);
        p.page(pdpt)[0].fetch_or(bit::A, Relaxed);
        for t in 0..TABLES {
            p.page(pd)[t].fetch_or(bit::A, Relaxed);
        }
        Tables { p, ept, pts }
    }

    fn word(&self, i: usize) -> &std::sync::atomic::AtomicU64 {
        &self.p.page(self.pts[i / 512])[i % 512]
    }

    fn words(&self) -> Vec<u64> {
        (0..LEAVES).map(|i| self.word(i).load(Relaxed)).collect()
    }
}

/// The bitmap of the dirty leaves in `[lo, lo + pages)`, bit k = leaf lo + k.
fn expected_bitmap(words: &[u64], lo: usize, pages: usize) -> Vec<u64> {
    let mut out = vec![0u64; pages.div_ceil(64)];
    for k in 0..pages {
        if is_dirty(words[lo + k]) {
            out[k / 64] |= 1 << (k % 64);
        }
    }
    out
}

fn check(leaves: &[Leaf], lo: usize, pages: usize, lend_through_atomics: bool) {
    let mut t = Tables::new(lend_through_atomics);
    for (i, &l) in leaves.iter().enumerate() {
        t.word(i).store(entry(l, i as u64 * PAGE), Relaxed);
    }
    let before = t.words();
    let want = expected_bitmap(&before, lo, pages);
    let log = DirtyLog::new(&t.p, Mode::AdScan, lo as u64 * PAGE, pages as u64).expect("log");
    let mut out = vec![u64::MAX; pages.div_ceil(64)];

    log.get(&t.p, &t.ept, &mut out).expect("get");
    assert_eq!(out, want, "get");
    assert_eq!(t.words(), before, "get changed an entry");

    let owed = log.harvest(&t.p, &mut t.ept, &mut out).expect("harvest");
    t.ept.invept_done(&t.p, owed);
    assert_eq!(out, want, "harvest");
    let after = t.words();
    for i in 0..LEAVES {
        let mut v = before[i];
        if (lo..lo + pages).contains(&i) && is_dirty(v) {
            v &= !bit::D;
        }
        assert_eq!(
            after[i], v,
            "leaf {i} after harvest: was {:#x} ({:?})",
            before[i], leaves[i]
        );
    }

    let owed = log
        .harvest(&t.p, &mut t.ept, &mut out)
        .expect("second harvest");
    t.ept.invept_done(&t.p, owed);
    assert!(out.iter().all(|&w| w == 0), "second harvest reported pages");
    assert_eq!(t.words(), after, "second harvest changed an entry");

    log.free(&t.p);
    t.ept.destroy(&t.p);
    t.p.assert_all_freed();
}

#[test]
fn all_dirty_tables_and_partial_chunks() {
    let all = vec![Leaf::Dirty; LEAVES];
    for lend in [false, true] {
        check(&all, 0, LEAVES, lend);
        check(&all, 3, 64 * 5 + 1, lend);
        check(&all, 511, 2, lend);
        check(&all, 100, LEAVES - 100, lend);
    }
}

#[test]
fn dense_chunks_followed_by_a_mispredicted_one() {
    // A dense chunk makes the next one predicted dense; each of these leaves breaks it.
    for odd in [
        Leaf::Clean,
        Leaf::DirtyExecOnly,
        Leaf::AbsentWithD,
        Leaf::Absent,
    ] {
        for at in [64, 65, 100, 127, 128 + 63, 511, 512] {
            let mut leaves = vec![Leaf::Dirty; LEAVES];
            leaves[at] = odd;
            for lend in [false, true] {
                check(&leaves, 0, LEAVES, lend);
                check(&leaves, 1, 700, lend);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: if cfg!(debug_assertions) { 300 } else { 3000 }, ..ProptestConfig::default() })]

    #[test]
    fn get_and_harvest_match_the_raw_entries(
        leaves in leaves_strategy(),
        lo in prop_oneof![Just(0usize), 0usize..LEAVES],
        len in prop_oneof![Just(LEAVES), 1usize..=LEAVES],
        lend_through_atomics in any::<bool>(),
    ) {
        let lo = lo.min(LEAVES - 1);
        let pages = len.min(LEAVES - lo);
        check(&leaves, lo, pages, lend_through_atomics);
    }
}
