//! The INVEPT obligation after a harvest (SDM 29.4.3.4), shown on the model: without the
//! INVEPT, or with it on only one CPU of two, a page the guest writes after the harvest is not
//! reported (the classic lost-dirty-page bug); with it on every CPU, it is. Each test asserts both
//! halves, so it fails if the model stopped catching the bug as well as if the core lost pages.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering::Relaxed;

use smudge_core::dirty::{DirtyLog, Mode};
use smudge_core::ept::{Ept, EptFeatures, MemoryType, Perms};
use smudge_core::platform::{read_bytes, write_bytes, Platform};
use smudge_tests::model::{bit, eptp, Cpu};
use smudge_tests::{Backing, InveptPolicy, MockPlatform, TrackedVm};

const PAGE: u64 = 4096;
const BASE: u64 = 1 << 30;
const MODES: [Mode; 3] = [Mode::AdScan, Mode::Pml, Mode::WriteProtect];

fn set(pages: &[u64]) -> BTreeSet<u64> {
    pages.iter().copied().collect()
}

/// CPU `writer` writes page 5, harvest, writes page 5 again, harvest: what the second harvest
/// reports. INVEPT per `policy`.
fn rewrite_after_harvest(
    mode: Mode,
    ncpus: usize,
    writer: usize,
    policy: InveptPolicy,
) -> BTreeSet<u64> {
    let p = MockPlatform::new();
    let mut vm = TrackedVm::new(&p, mode, ncpus, false);
    vm.add_slot(BASE, 64, Backing::Small);
    vm.enable_logging(0).unwrap();
    vm.invept = policy;
    vm.write(writer, BASE + 5 * PAGE);
    assert_eq!(vm.harvest(0), set(&[5]));
    vm.write(writer, BASE + 5 * PAGE);
    assert_eq!(
        vm.slots[0].written,
        set(&[5]),
        "the oracle saw the second write"
    );
    let second = vm.harvest(0);
    vm.invept = InveptPolicy::AllCpus;
    vm.destroy();
    p.assert_all_freed();
    second
}

#[test]
fn omitting_invept_after_harvest_loses_the_page() {
    for mode in MODES {
        assert_eq!(
            rewrite_after_harvest(mode, 1, 0, InveptPolicy::Never),
            set(&[]),
            "{mode:?}: without INVEPT the cached translation absorbs the write"
        );
        assert_eq!(
            rewrite_after_harvest(mode, 1, 0, InveptPolicy::AllCpus),
            set(&[5]),
            "{mode:?} with INVEPT"
        );
    }
}

#[test]
fn invept_on_one_cpu_of_two_loses_the_page() {
    for mode in MODES {
        // CPU 1 wrote; only CPU 0 flushes: CPU 1's TLB keeps the stale translation.
        assert_eq!(
            rewrite_after_harvest(mode, 2, 1, InveptPolicy::OnlyCpu0),
            set(&[]),
            "{mode:?}"
        );
        assert_eq!(
            rewrite_after_harvest(mode, 2, 1, InveptPolicy::AllCpus),
            set(&[5]),
            "{mode:?}"
        );
        // CPU 0 flushed its own TLB, so its writes are caught either way.
        assert_eq!(
            rewrite_after_harvest(mode, 2, 0, InveptPolicy::OnlyCpu0),
            set(&[5]),
            "{mode:?}"
        );
    }
}

/// The A-flag-pruned scan depends on INVEPT too: the harvest clears A in the PDE; without
/// INVEPT the processor's paging-structure cache still holds that PDE, so a write to *another*
/// page under it sets the leaf's D but not the PDE's A, and the pruned scan skips the PT.
#[test]
fn omitting_invept_defeats_accessed_flag_pruning() {
    for policy in [InveptPolicy::Never, InveptPolicy::AllCpus] {
        let p = MockPlatform::new();
        let mut vm = TrackedVm::new(&p, Mode::AdScan, 1, false);
        // One whole PT: the PDE's span lies inside the slot, so the harvest clears its A.
        vm.add_slot(BASE, 512, Backing::Small);
        vm.enable_logging(0).unwrap();
        vm.invept = policy;
        vm.write(0, BASE + 3 * PAGE);
        assert_eq!(vm.harvest(0), set(&[3]));
        vm.write(0, BASE + 200 * PAGE);
        let leaf = vm.ept.leaf(&p, BASE + 200 * PAGE).unwrap().0.load(Relaxed);
        assert_ne!(leaf & bit::D, 0, "the write set D in the leaf either way");
        let got = vm.harvest(0);
        if policy == InveptPolicy::Never {
            assert_eq!(
                got,
                set(&[]),
                "the PDE's A stayed clear, the scan pruned the dirty leaf"
            );
        } else {
            assert_eq!(got, set(&[200]));
        }
        vm.invept = InveptPolicy::AllCpus;
        vm.destroy();
        p.assert_all_freed();
    }
}

/// Partial KVM_CLEAR_DIRTY_LOG has the same obligation.
#[test]
fn omitting_invept_after_clear_loses_the_page() {
    for mode in MODES {
        for policy in [InveptPolicy::Never, InveptPolicy::AllCpus] {
            let p = MockPlatform::new();
            let mut vm = TrackedVm::new(&p, mode, 1, true);
            vm.add_slot(BASE, 200, Backing::Large2M);
            vm.enable_logging(0).unwrap();
            vm.invept = policy;
            vm.write(0, BASE + 70 * PAGE);
            vm.write(0, BASE + 130 * PAGE);
            assert_eq!(vm.get(0), set(&[70, 130]));
            // Clear pages 64..127 only.
            vm.clear(0, 64, 64, &[u64::MAX]).unwrap();
            assert_eq!(vm.get(0), set(&[130]));
            vm.write(0, BASE + 70 * PAGE);
            let want = if policy == InveptPolicy::Never {
                set(&[130])
            } else {
                set(&[70, 130])
            };
            assert_eq!(vm.harvest(0), want, "{mode:?} {policy:?}");
            vm.invept = InveptPolicy::AllCpus;
            vm.destroy();
            p.assert_all_freed();
        }
    }
}

/// smudge's own writes into guest memory (platform::write_bytes on the backing page) do not go
/// through EPT, so they are never reported; the guest sees the data, and its own writes are.
#[test]
fn hypervisor_writes_are_not_dirty() {
    for mode in MODES {
        let p = MockPlatform::new();
        let mut ept = Ept::new(&p, EptFeatures::ALL).unwrap();
        let backing: Vec<u64> = (0..8).map(|_| p.alloc_page().unwrap()).collect();
        for (i, &hpa) in backing.iter().enumerate() {
            ept.map(
                &p,
                BASE + i as u64 * PAGE,
                hpa,
                PAGE,
                Perms::RW,
                MemoryType::WriteBack,
                false,
            )
            .unwrap();
        }
        let mut log = DirtyLog::new(&p, mode, BASE, 8).unwrap();
        let owed = log.enable(&p, &mut ept).unwrap();
        let e = eptp(ept.pml4(), mode != Mode::WriteProtect);
        let mut cpu = Cpu::new(EptFeatures::ALL);
        let pml = p.alloc_page().unwrap();
        if mode == Mode::Pml {
            cpu.enable_pml(pml);
        }
        // A fresh CPU caches nothing: the obligation is met.
        ept.invept_done(&p, owed);
        // The guest reads every page first (translations cached, A set).
        for i in 0..8 {
            assert_eq!(
                cpu.access(&p, e, BASE + i * PAGE, false),
                Ok(backing[i as usize])
            );
        }
        for &hpa in &backing {
            write_bytes(&p, hpa, 100, b"written by smudge");
        }
        let mut out = [0u64; 1];
        log.get(&p, &ept, &mut out).unwrap();
        assert_eq!(out[0], 0, "{mode:?}: hypervisor writes reported");
        let hpa = cpu.access(&p, e, BASE + 3 * PAGE + 100, false).unwrap();
        let mut buf = [0u8; 17];
        read_bytes(&p, hpa & !(PAGE - 1), 100, &mut buf);
        assert_eq!(&buf, b"written by smudge");
        // A guest write to page 6 is reported (WP: through the violation handler).
        let g = BASE + 6 * PAGE;
        if cpu.access(&p, e, g, true).is_err() {
            assert!(log.on_write_violation(&p, &ept, g));
            cpu.access(&p, e, g, true).unwrap();
        }
        if let Some(state) = cpu.pml {
            smudge_core::dirty::pml::drain(&p, state.buffer, state.index, |gpa| {
                assert!(log.mark(&p, gpa));
            });
        }
        let owed = log.harvest(&p, &mut ept, &mut out).unwrap();
        assert_eq!(out[0], 1 << 6, "{mode:?}");
        // The CPU model is dropped below, and its cached translations with it.
        ept.invept_done(&p, owed);
        log.disable(&p, &mut ept);
        log.free(&p);
        ept.destroy(&p);
        for hpa in backing.into_iter().chain([pml]) {
            p.free_page(hpa);
        }
        p.assert_all_freed();
    }
}
