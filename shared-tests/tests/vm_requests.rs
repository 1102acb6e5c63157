//! The VM-level requests beyond SETUP: ADD_SLOT, SET_MODE, CREATE_VCPU's entry state, and
//! GET_REGS/SET_REGS, driven through the core and checked with the SDM model of the
//! processor's EPT walk (which sets A/D and raises violations as hardware does).

use std::collections::BTreeSet;

use smudge_core::abi::{self, Regs, Wire};
use smudge_core::answer;
use smudge_core::dirty::Mode;
use smudge_core::ept::EptFeatures;
use smudge_core::platform::Platform;
use smudge_core::vcpu::VcpuPages;
use smudge_core::vm::{Fault, Vm};
use smudge_core::vmx::caps::VmxCaps;
use smudge_core::vmx::hw::HwVcpu;
use smudge_core::Error;
use smudge_tests::model::{Cpu, Exit};
use smudge_tests::platform::MockPlatform;

const MEM: u64 = 8 << 20;

fn vm(p: &MockPlatform, mode: Mode) -> Vm {
    let mut vm = Vm::new(p, EptFeatures::ALL, mode, 1 << 20).expect("vm");
    vm.add_ram(p, MEM).expect("ram");
    vm
}

fn eptp(vm: &Vm) -> u64 {
    vm.ept()
        .eptp(matches!(vm.mode(), Mode::AdScan | Mode::Pml))
        .0
}

/// A guest write of `gpa` on the model processor, with the VM's exit handling in between (as
/// the run loop does): lazy backing and the write-protect log. Returns the last fault the VM
/// decided, `Resolved` when the write went through.
fn guest_write(cpu: &mut Cpu, p: &MockPlatform, vm: &mut Vm, gpa: u64) -> Fault {
    for _ in 0..4 {
        match cpu.access(p, eptp(vm), gpa, true) {
            Ok(_) => return Fault::Resolved,
            Err(Exit::EptViolation { gpa, qualification }) => {
                match vm.on_ept_violation(p, gpa, qualification) {
                    Fault::Resolved => {}
                    other => return other,
                }
            }
            Err(e) => panic!("unexpected exit {e:?}"),
        }
    }
    panic!("the write of {gpa:#x} never completed");
}

/// Harvests slot `s` and INVEPTs (the obligation the harvest raised); the dirty GPAs.
fn harvest(cpu: &mut Cpu, p: &MockPlatform, vm: &mut Vm, s: usize) -> BTreeSet<u64> {
    let (base, pages) = vm
        .slots()
        .find(|(i, _)| *i == s)
        .map(|(_, sl)| (sl.base, sl.pages))
        .expect("slot");
    let mut bits = vec![0u64; pages.div_ceil(64) as usize];
    let owed = vm.harvest(p, s, &mut bits).expect("harvest");
    cpu.invept();
    vm.ept_mut().invept_done(p, owed);
    let mut out = BTreeSet::new();
    for (w, word) in bits.iter().enumerate() {
        for b in 0..64 {
            if word & (1 << b) != 0 {
                out.insert(base + (w as u64 * 64 + b) * 4096);
            }
        }
    }
    out
}

#[test]
fn an_added_slot_is_backed_lazily_logged_and_no_longer_mmio() {
    for mode in [Mode::AdScan, Mode::Pml, Mode::WriteProtect] {
        let p = MockPlatform::new();
        let mut vm = vm(&p, mode);
        let mut cpu = Cpu::new(EptFeatures::ALL);
        let base = 0x1_0000_0000;
        // Before the slot: the processor's violation is an MMIO exit for user space.
        assert_eq!(
            guest_write(&mut cpu, &p, &mut vm, base + 0x2000),
            Fault::Mmio {
                gpa: base + 0x2000,
                write: true
            }
        );
        let s = vm.add_slot(&p, base, 1 << 20).expect("slot");
        assert_eq!(s, 1, "RAM is slot 0");
        // PML: the model logs writes to a buffer, and the run loop drains it into the log.
        let pml_buffer = p.alloc_page().expect("pml buffer");
        if mode == Mode::Pml {
            cpu.enable_pml(pml_buffer);
        }
        let written = [base, base + 0x2000, base + 0xf_f000];
        for &g in &written {
            assert_eq!(guest_write(&mut cpu, &p, &mut vm, g), Fault::Resolved);
        }
        if let Some(pml) = cpu.pml.take() {
            assert_eq!(vm.pml_drain(&p, pml_buffer, pml.index), written.len());
        }
        p.free_page(pml_buffer);
        assert_eq!(
            harvest(&mut cpu, &p, &mut vm, 1),
            written.iter().copied().collect::<BTreeSet<_>>(),
            "{mode:?}: slot 1 reports exactly the pages written"
        );
        assert!(
            harvest(&mut cpu, &p, &mut vm, 0).is_empty(),
            "{mode:?}: RAM saw no write"
        );
        // Overlap with RAM or the new slot is refused; so is a ninth slot.
        assert_eq!(vm.add_slot(&p, base + 0x1000, 0x1000), Err(Error::Overlap));
        assert_eq!(vm.add_slot(&p, MEM - 0x1000, 0x2000), Err(Error::Overlap));
        for i in 0..6u64 {
            vm.add_slot(&p, 0x2_0000_0000 + i * 0x10_0000, 0x1000)
                .expect("slots 2..=7");
        }
        assert_eq!(
            vm.add_slot(&p, 0x3_0000_0000, 0x1000),
            Err(Error::NoFreeSlot)
        );
        cpu.invept();
        vm.destroy(&p);
        p.assert_all_freed();
    }
}

#[test]
fn set_mode_before_the_first_run_switches_every_slot_cleanly() {
    let p = MockPlatform::new();
    let mut vm = vm(&p, Mode::AdScan);
    let mut cpu = Cpu::new(EptFeatures::ALL);
    // smudge's own writes (an image) back pages; the guest then writes one of them.
    vm.write_guest(&p, 0x10_0000, &[1; 0x3000]).expect("write");
    assert_eq!(
        guest_write(&mut cpu, &p, &mut vm, 0x10_1000),
        Fault::Resolved
    );

    // A/D -> write-protect: every backed page loses W; the A/D write before the switch is
    // forgotten (the log starts empty in the new mode).
    let owed = vm.set_mode(&p, Mode::WriteProtect).expect("to wp");
    assert_eq!(vm.mode(), Mode::WriteProtect);
    assert!(owed.is_owed(), "W removed: INVEPT owed");
    cpu.invept();
    vm.ept_mut().invept_done(&p, owed);
    for g in [0x10_0000u64, 0x10_1000, 0x10_2000] {
        let t = vm.ept().translate(&p, g).expect("backed");
        assert_eq!(t.perms.0 & 2, 0, "{g:#x} write-protected");
    }
    assert_eq!(
        guest_write(&mut cpu, &p, &mut vm, 0x10_2000),
        Fault::Resolved
    );
    assert_eq!(
        harvest(&mut cpu, &p, &mut vm, 0),
        BTreeSet::from([0x10_2000])
    );

    // Write-protect -> A/D: W comes back everywhere, and a write sets D (EPTP bit 6).
    let owed = vm.set_mode(&p, Mode::AdScan).expect("to ad");
    cpu.invept();
    vm.ept_mut().invept_done(&p, owed);
    for g in [0x10_0000u64, 0x10_1000, 0x10_2000] {
        let t = vm.ept().translate(&p, g).expect("backed");
        assert_ne!(t.perms.0 & 2, 0, "{g:#x} writable again");
    }
    assert!(harvest(&mut cpu, &p, &mut vm, 0).is_empty());
    assert_eq!(
        guest_write(&mut cpu, &p, &mut vm, 0x10_0000),
        Fault::Resolved
    );
    assert_eq!(
        harvest(&mut cpu, &p, &mut vm, 0),
        BTreeSet::from([0x10_0000])
    );

    // A failed allocation leaves the VM exactly as it was.
    let held = vm.pages_held();
    p.fail_allocs_after(0);
    assert_eq!(vm.set_mode(&p, Mode::Pml), Err(Error::OutOfMemory));
    p.clear_faults();
    assert_eq!(vm.mode(), Mode::AdScan);
    assert_eq!(vm.pages_held(), held);

    // After a vCPU ran, the mode is part of its VMCS: refused.
    vm.mark_started();
    assert_eq!(
        vm.set_mode(&p, Mode::WriteProtect),
        Err(Error::AlreadyRunning)
    );
    assert_eq!(vm.mode(), Mode::AdScan);
    cpu.invept();
    vm.destroy(&p);
    p.assert_all_freed();
}

#[test]
fn set_mode_refuses_ad_modes_without_ept_ad() {
    let p = MockPlatform::new();
    let features = EptFeatures {
        ad: false,
        ..EptFeatures::ALL
    };
    let mut vm = Vm::new(&p, features, Mode::WriteProtect, 1 << 20).expect("vm");
    vm.add_ram(&p, MEM).expect("ram");
    assert_eq!(vm.set_mode(&p, Mode::AdScan), Err(Error::Unsupported));
    assert_eq!(vm.set_mode(&p, Mode::Pml), Err(Error::Unsupported));
    assert_eq!(vm.mode(), Mode::WriteProtect);
    vm.destroy(&p);
    p.assert_all_freed();
}

#[test]
fn mode_controls_follow_the_capabilities_of_every_fixture() {
    for (name, caps) in smudge_tests::fixtures::all_caps() {
        let best = caps.choose_mode(false).ok();
        for asked in [
            None,
            Some(Mode::AdScan),
            Some(Mode::Pml),
            Some(Mode::WriteProtect),
        ] {
            let r = answer::mode_controls(&caps, best.unwrap_or(Mode::WriteProtect), asked);
            let want = asked.or(best).unwrap_or(Mode::WriteProtect);
            match r {
                Ok((m, ctls)) => {
                    assert_eq!(m, want, "{name}");
                    assert!(caps.mode_available(m).is_ok(), "{name}: {m:?}");
                    // PML on exactly in PML mode (SDM 25.6.2 secondary bit 17).
                    let pml = ctls.secondary & (1 << 17) != 0;
                    assert_eq!(pml, m == Mode::Pml, "{name}: {m:?}");
                }
                Err(e) => {
                    assert_eq!(e, Error::Unsupported);
                    assert!(caps.mode_available(want).is_err(), "{name}: {want:?}");
                }
            }
        }
    }
}

#[test]
fn a_new_vcpu_starts_in_the_guest_abi_entry_state_and_set_regs_round_trips() {
    let p = MockPlatform::new();
    let mut vm = vm(&p, Mode::AdScan);
    let image = smudge_tests::elf::minimal(0x20_0000, &[0xf4], 0x1000);
    let entry = vm.load_elf(&p, &image).expect("load");
    let (rip, rsp) = answer::vcpu_entry(&vm, 2).expect("entry");
    assert_eq!(rip, entry);
    let layout = vm.layout().expect("layout");
    assert_eq!(rsp, layout.stack_top(2));
    assert!(
        layout.is_reserved(rsp - 8),
        "the stack lies in the reserved top 1 MiB"
    );
    let pages = VcpuPages::alloc(&p, &VmxCaps::default()).expect("pages");
    let mut v = HwVcpu::new(2, pages, rip, rsp);
    let r = v.regs();
    assert_eq!(
        r,
        Regs {
            rdi: 2,
            rsp,
            rip: entry,
            rflags: 0x2,
            ..Regs::default()
        },
        "guest ABI: RDI = index, RSP = stack top, RFLAGS = 0x2, other GPRs 0"
    );

    v.state.halted = true;
    let new = Regs {
        rax: 1,
        rbx: 2,
        rcx: 3,
        rdx: 4,
        rsi: 5,
        rdi: 6,
        rsp: 7,
        rbp: 8,
        r8: 9,
        r9: 10,
        r10: 11,
        r11: 12,
        r12: 13,
        r13: 14,
        r14: 15,
        r15: 16,
        rip: 0x20_0000,
        rflags: 0x202,
    };
    v.set_regs(&new);
    assert_eq!(v.regs(), new);
    assert!(
        v.regs_dirty,
        "the VMCS copy must be rewritten before the next entry"
    );
    assert!(
        !v.state.halted,
        "a stopped vCPU runs again from the new RIP"
    );
    assert_eq!(v.gprs.r15, 16);

    // LOAD_ELF moves only a vCPU that has not run: once its VMCS is programmed, the registers
    // are the guest's (a memory load never moves a running vCPU, as in KVM).
    v.load_entry(0x30_0000);
    assert_eq!(v.rip, 0x30_0000, "not run yet: starts at the new entry");
    v.programmed = true;
    v.load_entry(0x40_0000);
    assert_eq!(v.rip, 0x30_0000, "has run: keeps its RIP");

    // Without RAM there is no stack to point at.
    let bare = Vm::new(&p, EptFeatures::ALL, Mode::AdScan, 16).expect("vm");
    assert_eq!(answer::vcpu_entry(&bare, 0), Err(Error::NotMapped));
    bare.destroy(&p);
    v.free_pages(&p);
    vm.destroy(&p);
    p.assert_all_freed();
}

#[test]
fn regs_requests_decode_and_check_rflags_and_rip() {
    let encode = |regs: Regs| {
        let mut b = vec![0u8; abi::Op::SetRegs.buffer_size()];
        abi::SetRegsReq {
            version: abi::VERSION,
            vcpu: 1,
            regs,
        }
        .to_bytes(&mut b)
        .expect("encode");
        abi::decode(abi::Op::SetRegs, &b)
    };
    let ok = Regs {
        rip: 0xffff_8000_0000_0000,
        rflags: 0x2 | (1 << 9) | (1 << 21),
        rax: 7,
        ..Regs::default()
    };
    assert_eq!(encode(ok), Ok(abi::Request::SetRegs { vcpu: 1, regs: ok }));
    // SDM 27.3.1.4: bit 1 must be 1; 63:22, 15, 5, 3 must be 0; VM must be 0 in IA-32e mode.
    for bad in [
        0u64,
        0x2 | 1 << 22,
        0x2 | 1 << 15,
        0x2 | 1 << 5,
        0x2 | 1 << 3,
        0x2 | 1 << 17,
    ] {
        assert_eq!(
            encode(Regs { rflags: bad, ..ok }),
            Err(abi::AbiError::BadRflags),
            "{bad:#x}"
        );
    }
    for bad in [0x8000_0000_0000u64, 0xffff_7fff_ffff_ffff, 1 << 63] {
        assert_eq!(
            encode(Regs { rip: bad, ..ok }),
            Err(abi::AbiError::BadRip),
            "{bad:#x}"
        );
    }
    // GET_REGS answers with the same layout, KVM's `struct kvm_regs` order.
    assert_eq!(abi::Op::GetRegs.response_size(), 18 * 8);
    let mut b = vec![0u8; 18 * 8];
    ok.to_bytes(&mut b).expect("encode");
    assert_eq!(
        u64::from_le_bytes(b[0..8].try_into().unwrap()),
        7,
        "rax first"
    );
    assert_eq!(
        u64::from_le_bytes(b[128..136].try_into().unwrap()),
        ok.rip,
        "rip 17th"
    );
    assert_eq!(Regs::from_bytes(&b), Ok(ok));
}

#[test]
fn add_slot_requests_decode_within_the_limits() {
    let decode = |gpa: u64, size: u64| {
        let mut b = vec![0u8; abi::Op::AddSlot.buffer_size()];
        abi::AddSlotReq {
            version: abi::VERSION,
            reserved: 0,
            gpa,
            size,
        }
        .to_bytes(&mut b)
        .expect("encode");
        abi::decode(abi::Op::AddSlot, &b)
    };
    assert_eq!(
        decode(0x1_0000_0000, 1 << 20),
        Ok(abi::Request::AddSlot {
            gpa: 0x1_0000_0000,
            size: 1 << 20
        })
    );
    assert_eq!(
        decode(abi::GPA_LIMIT - abi::MAX_SLOT, abi::MAX_SLOT),
        Ok(abi::Request::AddSlot {
            gpa: abi::GPA_LIMIT - abi::MAX_SLOT,
            size: abi::MAX_SLOT
        })
    );
    for (gpa, size) in [
        (0x1000_0800, 0x1000),
        (0x1000_0000, 0x800),
        (0x1000_0000, 0),
        (0, abi::MAX_SLOT + 0x1000),
        (abi::GPA_LIMIT - 0x1000, 0x2000),
        (u64::MAX & !0xfff, 0x2000),
    ] {
        assert_eq!(
            decode(gpa, size),
            Err(abi::AbiError::BadSlot),
            "{gpa:#x}+{size:#x}"
        );
    }
}
