//! User-memory slots (KVM's KVM_SET_USER_MEMORY_REGION): the caller's pages pinned and mapped
//! when the slot is made, shared between host and guest, tracked like any slot in every dirty
//! mode (checked with the SDM model of the processor's EPT walk), and unpinned on removal or on
//! any failure while making the slot.

use std::collections::BTreeSet;

use smudge_core::dirty::Mode;
use smudge_core::ept::EptFeatures;
use smudge_core::vm::{Fault, Vm};
use smudge_core::Error;
use smudge_tests::model::{Cpu, Exit};
use smudge_tests::platform::MockPlatform;

/// Where KVM's dirty-log test puts its slot with MAXPHYADDR 40: just below 1 TiB.
const BASE: u64 = (1 << 40) - (1 << 30);
/// The process's address of the slot's memory.
const UADDR: u64 = 0x7f12_3450_0000;
const PAGES: u64 = 300;

fn eptp(vm: &Vm) -> u64 {
    vm.ept()
        .eptp(matches!(vm.mode(), Mode::AdScan | Mode::Pml))
        .0
}

fn guest_write(cpu: &mut Cpu, p: &MockPlatform, vm: &mut Vm, gpa: u64) {
    for _ in 0..4 {
        match cpu.access(p, eptp(vm), gpa, true) {
            Ok(_) => return,
            Err(Exit::EptViolation { gpa, qualification }) => {
                assert_eq!(vm.on_ept_violation(p, gpa, qualification), Fault::Resolved);
            }
            Err(e) => panic!("unexpected exit {e:?}"),
        }
    }
    panic!("the write of {gpa:#x} never completed");
}

/// Drains the model's PML buffer into the VM's log (the run loop does so at every exit), then
/// harvests slot `s` and INVEPTs.
fn harvest(cpu: &mut Cpu, p: &MockPlatform, vm: &mut Vm, s: usize) -> BTreeSet<u64> {
    if let Some(pml) = cpu.pml {
        vm.pml_drain(p, pml.buffer, pml.index);
        cpu.set_pml_index(511);
    }
    let mut bits = vec![0u64; PAGES.div_ceil(64) as usize];
    let owed = vm.harvest(p, s, &mut bits).expect("harvest");
    cpu.invept();
    vm.ept_mut().invept_done(p, owed);
    (0..PAGES)
        .filter(|i| bits[(i / 64) as usize] >> (i % 64) & 1 != 0)
        .map(|i| BASE + i * 4096)
        .collect()
}

#[test]
fn host_and_guest_share_the_pinned_pages_and_writes_are_logged() {
    for mode in [Mode::AdScan, Mode::Pml, Mode::WriteProtect] {
        let p = MockPlatform::new();
        let mut vm = Vm::new(&p, EptFeatures::ALL, mode, 1 << 20).expect("vm");
        let (s, owed) = vm
            .add_user_slot(&p, BASE, PAGES * 4096, UADDR, true)
            .expect("user slot");
        assert!(
            owed.is_owed(),
            "cleaning the mapped slot for its log owes INVEPT"
        );
        // No processor has used the EPT yet: nothing to invalidate.
        vm.ept_mut().invept_done(&p, owed);
        assert_eq!(vm.pinned_pages(), PAGES);
        assert_eq!(p.user_pins(), PAGES);
        // The EPT tables are the driver's pages; the pinned ones are not counted as backing.
        assert_eq!(vm.backing_pages(), 0);
        // What the process writes the guest reads, and the other way round.
        p.user_write(UADDR + 5 * 4096 + 8, b"host");
        let mut back = [0u8; 4];
        vm.read_guest(&p, BASE + 5 * 4096 + 8, &mut back)
            .expect("read");
        assert_eq!(&back, b"host");
        vm.write_guest(&p, BASE + 7 * 4096, b"guest")
            .expect("write");
        assert_eq!(p.user_read(UADDR + 7 * 4096, 5), b"guest");
        // Every page is mapped: no guest access faults for backing; writes are logged.
        let mut cpu = Cpu::new(EptFeatures::ALL);
        let pml_buffer = smudge_core::platform::Platform::alloc_page(&p).expect("pml");
        if mode == Mode::Pml {
            cpu.enable_pml(pml_buffer);
        }
        let mut first = harvest(&mut cpu, &p, &mut vm, s);
        first.retain(|_| false);
        let wrote: BTreeSet<u64> = [0, 1, 63, 64, 200, 299].map(|i| BASE + i * 4096).into();
        for &g in &wrote {
            guest_write(&mut cpu, &p, &mut vm, g + 16);
        }
        assert_eq!(harvest(&mut cpu, &p, &mut vm, s), wrote, "{mode:?}");
        assert!(harvest(&mut cpu, &p, &mut vm, s).is_empty(), "{mode:?}");
        guest_write(&mut cpu, &p, &mut vm, BASE + 64 * 4096);
        assert_eq!(
            harvest(&mut cpu, &p, &mut vm, s),
            [BASE + 64 * 4096].into(),
            "{mode:?}: a page written again after its harvest"
        );
        // Outside the slot: MMIO, as before.
        assert!(matches!(
            vm.on_ept_violation(&p, BASE - 4096, 2),
            Fault::Mmio { .. }
        ));
        let owed = vm.remove_slot(&p, s);
        assert!(owed.is_owed(), "unmapping owes INVEPT");
        assert_eq!((vm.pinned_pages(), p.user_pins()), (0, 0));
        smudge_core::platform::Platform::free_page(&p, pml_buffer);
        cpu.invept();
        vm.ept_mut().invept_done(&p, owed);
        vm.destroy(&p);
        p.assert_all_freed();
    }
}

#[test]
fn a_hole_in_the_user_range_fails_cleanly() {
    let p = MockPlatform::new();
    let mut vm = Vm::new(&p, EptFeatures::ALL, Mode::Pml, 1 << 20).expect("vm");
    p.unmap_user(UADDR + 100 * 4096, UADDR + 101 * 4096);
    assert_eq!(
        vm.add_user_slot(&p, BASE, PAGES * 4096, UADDR, true),
        Err(Error::UserMemory)
    );
    assert_eq!((vm.pinned_pages(), p.user_pins()), (0, 0));
    assert!(
        vm.ept().translate(&p, BASE).is_none(),
        "nothing stays mapped"
    );
    // The slot can be made where the memory is whole.
    let (s, owed) = vm
        .add_user_slot(&p, BASE, 100 * 4096, UADDR, true)
        .expect("the part before the hole");
    // What the failed attempt owes (it returned only its error), and what these two return.
    let owed = owed.and(vm.remove_slot(&p, s)).and(vm.ept().owed());
    vm.ept_mut().invept_done(&p, owed);
    vm.destroy(&p);
    p.assert_all_freed();
}

#[test]
fn an_allocation_failure_while_mapping_unpins_everything() {
    for after in [0, 1, 2, 3, 4] {
        let p = MockPlatform::new();
        let mut vm = Vm::new(&p, EptFeatures::ALL, Mode::WriteProtect, 1 << 20).expect("vm");
        // The EPT tables of the slot need a PDPT, a PD and a page table each 512 pages.
        p.fail_allocs_after(after);
        let r = vm.add_user_slot(&p, BASE, PAGES * 4096, UADDR, true);
        p.clear_faults();
        match r {
            Err(Error::OutOfMemory) => {}
            other => panic!("{after} allocations allowed: {other:?}"),
        }
        assert_eq!((vm.pinned_pages(), p.user_pins()), (0, 0), "{after}");
        let owed = vm.ept().owed();
        vm.ept_mut().invept_done(&p, owed);
        vm.destroy(&p);
        p.assert_all_freed();
    }
}

#[test]
fn overlapping_or_misaligned_slots_are_refused_without_pinning() {
    let p = MockPlatform::new();
    let mut vm = Vm::new(&p, EptFeatures::ALL, Mode::AdScan, 1 << 20).expect("vm");
    let (s, owed) = vm
        .add_user_slot(&p, BASE, 64 * 4096, UADDR, true)
        .expect("slot");
    assert_eq!(
        vm.add_user_slot(&p, BASE + 63 * 4096, 4096, UADDR + (1 << 30), true),
        Err(Error::Overlap)
    );
    assert_eq!(
        vm.add_user_slot(&p, BASE + (1 << 30), 4096, UADDR + 1, true),
        Err(Error::Misaligned)
    );
    assert_eq!(p.user_pins(), 64);
    let owed = owed.and(vm.remove_slot(&p, s));
    vm.ept_mut().invept_done(&p, owed);
    vm.destroy(&p);
    p.assert_all_freed();
}
