//! Dirty logging against the model, for every mode: random slots (some unaligned, some mapped
//! with 2 MiB or 1 GiB leaves before logging starts, some sharing tables), random reads and
//! writes by 1-2 CPUs, interleaved with get / clear (64-page masks) / harvest. The handler loop
//! is the VM's: PML drained on every exit, write-protect violations resolved by the log, INVEPT
//! on every CPU after each clear. The reported set must be exactly the pages written through the
//! model since they were last harvested or cleared. The mock lends page tables to clearing scans
//! as plain memory (as a kernel shim may), and through the atomics in one variant.

use std::collections::BTreeSet;

use proptest::prelude::*;
use smudge_core::dirty::Mode;
use smudge_core::Error;
use smudge_tests::{Backing, MockPlatform, TrackedVm};

const PAGE: u64 = 4096;

#[derive(Clone, Debug)]
struct SlotGen {
    pages: u64,
    /// Offset in pages from the 1 GiB region start (or from the previous slot's end).
    offset: u64,
    backing: Backing,
    /// Place right after the previous slot (same tables) instead of in a region of its own.
    follow_prev: bool,
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        cpu: usize,
        slot: usize,
        page: u64,
    },
    /// Writes `count` consecutive pages (wrapping in the slot): fills PML buffers, dirties runs.
    WriteRun {
        cpu: usize,
        slot: usize,
        page: u64,
        count: u64,
    },
    Read {
        cpu: usize,
        slot: usize,
        page: u64,
    },
    /// A write to a mapped page outside every slot (in the large mapping around it).
    WriteOutside {
        cpu: usize,
        slot: usize,
        page: u64,
    },
    Get {
        slot: usize,
    },
    Harvest {
        slot: usize,
    },
    Clear {
        slot: usize,
        first_word: u64,
        num: ClearLen,
        masks: Vec<u64>,
    },
}

#[derive(Clone, Copy, Debug)]
enum ClearLen {
    Words(u64),
    ToEnd,
    Raw(u64),
}

fn slot_strategy() -> impl Strategy<Value = SlotGen> {
    (
        prop_oneof![3 => 1u64..=70, 3 => 1u64..=400, 1 => Just(512u64), 1 => 500u64..=1100],
        prop_oneof![
            2 => Just(0u64),
            2 => (0u64..8).prop_map(|k| k * 512),
            3 => 0u64..1536,
            1 => (1u64..1200).prop_map(|k| (1 << 18) - k), // may cross into the next GiB
        ],
        prop_oneof![3 => Just(Backing::Small), 2 => Just(Backing::Large2M), 1 => Just(Backing::Large1G)],
        prop::bool::weighted(0.3),
    )
        .prop_map(|(pages, offset, backing, follow_prev)| SlotGen { pages, offset, backing, follow_prev })
}

fn page_strategy() -> impl Strategy<Value = u64> {
    // Hot pages (TLB hits, repeated writes) and any page.
    prop_oneof![2 => 0u64..4, 1 => 60u64..70, 3 => any::<u16>().prop_map(u64::from)]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let cpu = 0usize..2;
    let slot = 0usize..3;
    prop_oneof![
        10 => (cpu.clone(), slot.clone(), page_strategy()).prop_map(|(cpu, slot, page)| Op::Write { cpu, slot, page }),
        4 => (cpu.clone(), slot.clone(), page_strategy()).prop_map(|(cpu, slot, page)| Op::Read { cpu, slot, page }),
        1 => (cpu.clone(), slot.clone(), page_strategy(), 1u64..700)
            .prop_map(|(cpu, slot, page, count)| Op::WriteRun { cpu, slot, page, count }),
        1 => (cpu, slot.clone(), any::<u16>()).prop_map(|(cpu, slot, page)| Op::WriteOutside { cpu, slot, page: u64::from(page) }),
        1 => slot.clone().prop_map(|slot| Op::Get { slot }),
        2 => slot.clone().prop_map(|slot| Op::Harvest { slot }),
        2 => (
            slot,
            0u64..20,
            prop_oneof![3 => (0u64..4).prop_map(ClearLen::Words), 2 => Just(ClearLen::ToEnd), 1 => (0u64..1200).prop_map(ClearLen::Raw)],
            prop::collection::vec(prop_oneof![Just(u64::MAX), any::<u64>(), Just(0u64)], 0..20),
        )
            .prop_map(|(slot, first_word, num, masks)| Op::Clear { slot, first_word, num, masks }),
    ]
}

/// The KVM_CLEAR_DIRTY_LOG rules, stated independently: `first` a multiple of 64, the range in
/// the slot, `num` a multiple of 64 unless the range ends at the slot end; the mask covers num.
fn clear_error(pages: u64, first: u64, num: u64, mask_words: usize) -> Option<Error> {
    let end = first + num;
    if first % 64 != 0 || end > pages || (num % 64 != 0 && end != pages) {
        return Some(Error::InvalidDirtyLogRange);
    }
    if (mask_words as u64) < num.div_ceil(64) {
        return Some(Error::BitmapTooSmall);
    }
    None
}

fn run(mode: Mode, ncpus: usize, ad_for_wp: bool, gens: Vec<SlotGen>, pre: Vec<Op>, ops: Vec<Op>) {
    run_on(MockPlatform::new(), mode, ncpus, ad_for_wp, gens, pre, ops)
}

fn run_on(
    p: MockPlatform,
    mode: Mode,
    ncpus: usize,
    ad_for_wp: bool,
    gens: Vec<SlotGen>,
    pre: Vec<Op>,
    ops: Vec<Op>,
) {
    let mut vm = TrackedVm::new(&p, mode, ncpus, ad_for_wp);
    // Lay out the slots: slot i in its own 1 GiB region (odd ones, so a slot may run into the
    // even GiB after it), or right after slot i-1.
    let mut next_region = 1u64;
    for (i, g) in gens.iter().enumerate() {
        let follow = g.follow_prev
            && i > 0
            && g.backing == Backing::Small
            && vm.slots[i - 1].mapped.1 == vm.slots[i - 1].end();
        let base = if follow {
            vm.slots[i - 1].end() + (g.offset % 3) * PAGE
        } else {
            let offset = if g.backing == Backing::Large1G {
                g.offset % 1536
            } else {
                g.offset
            };
            let b = (next_region << 30) + offset * PAGE;
            next_region += 2;
            b
        };
        vm.add_slot(base, g.pages, g.backing);
    }
    // Before logging starts: writes that set D in the large leaves and fill the TLBs.
    for op in &pre {
        if let Op::Write { cpu, slot, page } = *op {
            let s = &vm.slots[slot % gens.len()];
            let gpa = s.base + (page % s.pages) * PAGE;
            vm.write(cpu % ncpus, gpa);
        }
    }
    for s in 0..gens.len() {
        vm.enable_logging(s).expect("enable");
    }
    let n = gens.len();
    for op in ops {
        match op {
            Op::Write { cpu, slot, page } | Op::Read { cpu, slot, page } => {
                let s = &vm.slots[slot % n];
                let gpa = s.base + (page % s.pages) * PAGE + (page % 7) * 8;
                vm.access(cpu % ncpus, gpa, matches!(op, Op::Write { .. }))
                    .expect("guest access");
            }
            Op::WriteRun {
                cpu,
                slot,
                page,
                count,
            } => {
                let s = &vm.slots[slot % n];
                let (base, pages) = (s.base, s.pages);
                for k in 0..count.min(pages) {
                    vm.write(cpu % ncpus, base + ((page + k) % pages) * PAGE);
                }
            }
            Op::WriteOutside { cpu, slot, page } => {
                let s = &vm.slots[slot % n];
                let (ms, me) = s.mapped;
                let outside = (me - ms) / PAGE - s.pages;
                if outside == 0 {
                    continue;
                }
                let k = page % outside;
                let before = (s.base - ms) / PAGE;
                let gpa = if k < before {
                    ms + k * PAGE
                } else {
                    s.end() + (k - before) * PAGE
                };
                if vm.slots.iter().any(|o| gpa >= o.base && gpa < o.end()) {
                    continue;
                }
                vm.write(cpu % ncpus, gpa);
            }
            Op::Get { slot } => {
                let s = slot % n;
                let got = vm.get(s);
                assert_eq!(got, vm.slots[s].written, "get of slot {s}");
            }
            Op::Harvest { slot } => {
                let s = slot % n;
                let expected: BTreeSet<u64> = vm.slots[s].written.clone();
                let got = vm.harvest(s);
                assert_eq!(got, expected, "harvest of slot {s}");
            }
            Op::Clear {
                slot,
                first_word,
                num,
                masks,
            } => {
                let s = slot % n;
                let pages = vm.slots[s].pages;
                let first = match num {
                    ClearLen::Raw(_) => first_word * 32, // sometimes not a multiple of 64
                    _ => (first_word * 64) % pages.next_multiple_of(64),
                };
                let num = match num {
                    ClearLen::Words(w) => (w * 64).min(pages.saturating_sub(first)),
                    ClearLen::ToEnd => pages.saturating_sub(first),
                    ClearLen::Raw(r) => r,
                };
                let want = clear_error(pages, first, num, masks.len());
                let before = vm.slots[s].written.clone();
                let res = vm.clear(s, first, num, &masks);
                assert_eq!(
                    res.err(),
                    want,
                    "clear({first}, {num}) of a {pages}-page slot"
                );
                if want.is_some() {
                    assert_eq!(vm.slots[s].written, before);
                }
            }
        }
    }
    // Final harvest of every slot.
    for s in 0..n {
        let expected = vm.slots[s].written.clone();
        assert_eq!(vm.harvest(s), expected, "final harvest of slot {s}");
        assert!(vm.get(s).is_empty(), "get after harvest of slot {s}");
    }
    vm.destroy();
    p.assert_all_freed();
}

fn case_strategy() -> impl Strategy<Value = (usize, bool, Vec<SlotGen>, Vec<Op>, Vec<Op>)> {
    (
        1usize..=2,
        any::<bool>(),
        prop::collection::vec(slot_strategy(), 1..=3),
        prop::collection::vec(op_strategy(), 0..12),
        prop::collection::vec(op_strategy(), 1..160),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: if cfg!(debug_assertions) { 200 } else { 2500 }, ..ProptestConfig::default() })]

    #[test]
    fn ad_scan_reports_exactly_the_written_pages((ncpus, ad, gens, pre, ops) in case_strategy()) {
        run(Mode::AdScan, ncpus, ad, gens, pre, ops);
    }

    /// The same with the tables lent through the atomics (a platform without the override of
    /// `Platform::with_page_mut`); the other tests get them as plain memory.
    #[test]
    fn ad_scan_through_atomics_reports_exactly_the_written_pages((ncpus, ad, gens, pre, ops) in case_strategy()) {
        let p = MockPlatform::new();
        p.lend_through_atomics(true);
        run_on(p, Mode::AdScan, ncpus, ad, gens, pre, ops);
    }

    #[test]
    fn pml_reports_exactly_the_written_pages((ncpus, ad, gens, pre, ops) in case_strategy()) {
        run(Mode::Pml, ncpus, ad, gens, pre, ops);
    }

    #[test]
    fn write_protect_reports_exactly_the_written_pages((ncpus, ad, gens, pre, ops) in case_strategy()) {
        run(Mode::WriteProtect, ncpus, ad, gens, pre, ops);
    }
}
