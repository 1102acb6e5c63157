//! The VM layer on the host: guest memory and lazy backing, the ELF loader, the exit handler's
//! decisions, and page accounting, against the mock platform (which catches leaks and
//! double frees) and the SDM's exit-qualification layouts.

use smudge_core::arch::GuestGprs;
use smudge_core::dirty::Mode;
use smudge_core::ept::EptFeatures;
use smudge_core::guest::{ElfError, Layout, RESERVED};
use smudge_core::vm::{
    reason, Action, ExitInfo, Fault, LoadError, RunExit, StopCause, VcpuState, Vm,
};
use smudge_tests::platform::MockPlatform;

const MEM: u64 = 8 << 20;

fn vm(p: &MockPlatform, mode: Mode) -> Vm {
    let mut vm = Vm::new(p, EptFeatures::ALL, mode, 1 << 20).expect("vm");
    vm.add_ram(p, MEM).expect("ram");
    vm
}

fn host_cpuid(leaf: u32, _sub: u32) -> [u32; 4] {
    // A fixed "host": VMX (ECX bit 5) present, hypervisor bit clear.
    if leaf == 1 {
        [0x50654, 0, 0x7ffa_f3bf & !(1 << 31), 0xbfeb_fbff]
    } else {
        [leaf, 1, 2, 3]
    }
}

fn exit(
    vm: &mut Vm,
    p: &MockPlatform,
    v: &mut VcpuState,
    g: &mut GuestGprs,
    reason: u32,
    q: u64,
    gpa: u64,
) -> Action {
    vm.handle_exit(
        p,
        v,
        &ExitInfo {
            reason,
            qualification: q,
            gpa,
            instr_len: 3,
        },
        g,
        &host_cpuid,
    )
}

/// A minimal ELF64 executable: one PT_LOAD of `code` at `paddr`, entry at its start.
fn elf(paddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
    smudge_tests::elf::minimal(paddr, code, memsz)
}

#[test]
fn guest_page_tables_identity_map_4_gib_with_2_mib_pages() {
    let p = MockPlatform::new();
    let vm = vm(&p, Mode::AdScan);
    let l = vm.layout().expect("layout");
    let mut q = [0u8; 8];
    // PML4[0] -> PDPT, PDPT[i] -> PD i, PD entries map 2 MiB pages (SDM Vol. 3A 4.5).
    vm.read_guest(&p, l.cr3(), &mut q).expect("read");
    assert_eq!(u64::from_le_bytes(q), (l.reserved_base() + 0x1000) | 0x3);
    for (gib, mib) in [(0u64, 0u64), (1, 6), (3, 1022)] {
        let pde = l.reserved_base() + 0x2000 + gib * 0x1000 + (mib / 2) * 8;
        vm.read_guest(&p, pde, &mut q).expect("read");
        assert_eq!(
            u64::from_le_bytes(q),
            ((gib << 30) + (mib << 20)) | 0x83,
            "PDE for {gib} GiB + {mib} MiB"
        );
    }
    assert!(l.is_reserved(MEM - RESERVED) && !l.is_reserved(MEM - RESERVED - 1));
}

#[test]
fn smudge_writes_never_dirty_the_log() {
    for mode in [Mode::AdScan, Mode::Pml, Mode::WriteProtect] {
        let p = MockPlatform::new();
        let mut vm = vm(&p, mode);
        let img = elf(0x10_0000, &[0xf4; 5000], 9000);
        assert_eq!(vm.load_elf(&p, &img), Ok(0x10_0000));
        let mut out = vec![0u64; (MEM / 4096 / 64) as usize];
        let owed = vm.harvest(&p, 0, &mut out).expect("harvest");
        vm.ept_mut().invept_done(&p, owed);
        assert!(
            out.iter().all(|w| *w == 0),
            "{mode:?}: image load and page tables showed up as guest writes"
        );
    }
}

#[test]
fn elf_loader_rejects_bad_images_precisely() {
    let p = MockPlatform::new();
    let mut vm = vm(&p, Mode::AdScan);
    let good = elf(0x10_0000, &[0x90; 16], 16);
    let mut not_elf = good.clone();
    not_elf[0] = 0;
    let mut truncated = good.clone();
    truncated.truncate(130);
    let mut bad_seg = good.clone();
    bad_seg[64 + 40..64 + 48].copy_from_slice(&1u64.to_le_bytes()); // memsz < filesz
    let into_reserved = elf(MEM - RESERVED - 8, &[0x90; 16], 16);
    let mut entry_out = good.clone();
    entry_out[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes());
    for (img, want) in [
        (not_elf, ElfError::NotElf64X86),
        (truncated, ElfError::Truncated),
        (bad_seg, ElfError::BadSegment),
        (into_reserved, ElfError::SegmentOutOfRange),
        (entry_out, ElfError::EntryOutsideImage),
    ] {
        assert_eq!(vm.load_elf(&p, &img), Err(LoadError::Elf(want)));
    }
}

#[test]
fn lazy_backing_then_mmio_outside_every_slot() {
    let p = MockPlatform::new();
    let mut vm = vm(&p, Mode::AdScan);
    let before = vm.backing_pages();
    // SDM 28.2.1 Table 28-7: bit 1 = data write.
    assert_eq!(vm.on_ept_violation(&p, 0x40_0123, 0x2), Fault::Resolved);
    assert_eq!(vm.backing_pages(), before + 1);
    assert!(vm.ept().translate(&p, 0x40_0000).is_some());
    assert_eq!(
        vm.on_ept_violation(&p, 0x8000_0000, 0x2),
        Fault::Mmio {
            gpa: 0x8000_0000,
            write: true
        }
    );
    // A fault on a page another CPU already backed is resolved, not fatal.
    assert_eq!(vm.on_ept_violation(&p, 0x40_0000, 0x1), Fault::Resolved);
}

#[test]
fn page_limit_and_allocation_failure_stop_cleanly() {
    let p = MockPlatform::new();
    let mut vm = Vm::new(&p, EptFeatures::ALL, Mode::AdScan, 0).expect("vm");
    vm.add_slot(&p, 0, MEM).expect("slot");
    assert_eq!(vm.on_ept_violation(&p, 0x1000, 0x2), Fault::LimitReached);
    let mut vm2 = Vm::new(&p, EptFeatures::ALL, Mode::AdScan, 100).expect("vm");
    vm2.add_slot(&p, 0, MEM).expect("slot");
    p.fail_allocs_after(0);
    assert_eq!(vm2.on_ept_violation(&p, 0x1000, 0x2), Fault::OutOfMemory);
    p.clear_faults();
    vm.destroy(&p);
    vm2.destroy(&p);
    p.assert_all_freed();
}

#[test]
fn host_page_cap_stops_the_vm_cleanly_and_names_the_cap() {
    let p = MockPlatform::new();
    // Write-protect mode logs the write of a fault that backs a page (A/D would need the CPU).
    let mut vm = vm(&p, Mode::WriteProtect);
    let held = p.live_pages();
    // Room for the cap's worth of faults: each backs one page (the tables exist after the first).
    p.set_host_cap(held + 3);
    let mut resolved = 0u64;
    let mut stop = None;
    for gfn in 0x400..0x410u64 {
        match vm.on_ept_violation(&p, gfn << 12, 0x2) {
            Fault::Resolved => resolved += 1,
            f => {
                stop = Some(f);
                break;
            }
        }
    }
    assert_eq!(stop, Some(Fault::HostPageCap));
    assert!(p.live_pages() <= held + 3, "never past the cap");
    assert!(
        resolved >= 1 && resolved <= 3,
        "{resolved} faults served under the cap"
    );
    // Requests that need a page say so too, and the VM stays usable: its log reads.
    assert_eq!(
        vm.write_guest(&p, 0x60_0000, &[1]),
        Err(smudge_core::Error::HostPageCap)
    );
    assert!(smudge_core::Error::HostPageCap
        .message()
        .contains("max_pages"));
    let mut bits = vec![0u64; (MEM / 4096 / 64) as usize];
    let owed = vm.harvest(&p, 0, &mut bits).expect("harvest under the cap");
    vm.ept_mut().invept_done(&p, owed);
    assert_eq!(
        bits.iter().map(|w| w.count_ones() as u64).sum::<u64>(),
        resolved,
        "every page backed for a write is in the log"
    );
    // With the cap lifted the same VM goes on.
    p.set_host_cap(u64::MAX);
    assert_eq!(vm.on_ept_violation(&p, 0x41_0000, 0x2), Fault::Resolved);
    vm.destroy(&p);
    p.assert_all_freed();
}

#[test]
fn hypercalls_console_cpuid_and_cr8() {
    let p = MockPlatform::new();
    let mut vm = vm(&p, Mode::AdScan);
    let mut v = VcpuState::new(0);
    let mut g = GuestGprs::default();
    // OUT DX, AL to 0x3F8: size 1 (0), OUT (bit 3 = 0), port in 31:16 (SDM Table 28-5).
    g.rax = u64::from(b'x');
    assert_eq!(
        exit(&mut vm, &p, &mut v, &mut g, reason::IO, 0x3f8 << 16, 0),
        Action::Resume { advance: 3 }
    );
    assert_eq!(&v.console[..v.console_len], b"x");
    // IN from an absent port reads all ones in the accessed size.
    g.rax = 0x1234_5678;
    exit(
        &mut vm,
        &p,
        &mut v,
        &mut g,
        reason::IO,
        (0x60 << 16) | (1 << 3),
        0,
    );
    assert_eq!(g.rax, 0x1234_56ff);
    // CPUID: VMX hidden, hypervisor bit set.
    g.rax = 1;
    exit(&mut vm, &p, &mut v, &mut g, reason::CPUID, 0, 0);
    assert_eq!(g.rcx & (1 << 5), 0);
    assert_ne!(g.rcx & (1 << 31), 0);
    // MOV CR8, RBX then MOV RAX, CR8 (SDM Table 28-3: CR in 3:0, type in 5:4, GPR in 11:8).
    g.rbx = 0xfe;
    exit(
        &mut vm,
        &p,
        &mut v,
        &mut g,
        reason::CR_ACCESS,
        8 | (3 << 8),
        0,
    );
    g.rax = 0;
    exit(
        &mut vm,
        &p,
        &mut v,
        &mut g,
        reason::CR_ACCESS,
        8 | (1 << 4),
        0,
    );
    assert_eq!(g.rax, 0xe, "the guest's CR8 is private and 4 bits wide");
    // Hypercalls: unknown -> RAX = !0; checkpoint -> user, RAX = 0; exit -> code from RDI.
    g.rax = 7;
    assert_eq!(
        exit(&mut vm, &p, &mut v, &mut g, reason::VMCALL, 0, 0),
        Action::Resume { advance: 3 }
    );
    assert_eq!(g.rax, u64::MAX);
    g.rax = 1;
    assert_eq!(
        exit(&mut vm, &p, &mut v, &mut g, reason::VMCALL, 0, 0),
        Action::ToUser(RunExit::Checkpoint)
    );
    assert_eq!(g.rax, 0);
    g.rax = 0;
    g.rdi = 42;
    assert_eq!(
        exit(&mut vm, &p, &mut v, &mut g, reason::VMCALL, 0, 0),
        Action::ToUser(RunExit::ExitCode(42))
    );
    assert!(v.halted);
    assert_eq!(v.exits[reason::VMCALL as usize], 3);
}

#[test]
fn fatal_exits_stop_with_a_precise_cause() {
    let p = MockPlatform::new();
    let mut vm = vm(&p, Mode::AdScan);
    let mut g = GuestGprs::default();
    for (r, want) in [
        (reason::TRIPLE_FAULT, RunExit::TripleFault),
        (
            27,
            RunExit::Stopped {
                reason: 27,
                what: StopCause::VmxInstruction,
            },
        ),
        (
            50,
            RunExit::Stopped {
                reason: 50,
                what: StopCause::VmxInstruction,
            },
        ),
        (
            reason::EPT_MISCONFIG,
            RunExit::Stopped {
                reason: 49,
                what: StopCause::EptMisconfig,
            },
        ),
        (
            0x8000_0021,
            RunExit::Stopped {
                reason: 33,
                what: StopCause::EntryFailed,
            },
        ),
        (
            13,
            RunExit::Stopped {
                reason: 13,
                what: StopCause::UnhandledExit,
            },
        ),
    ] {
        let mut v = VcpuState::new(0);
        assert_eq!(
            exit(&mut vm, &p, &mut v, &mut g, r, 0, 0),
            Action::ToUser(want),
            "reason {r:#x}"
        );
        assert!(v.halted);
    }
}

#[test]
fn destroy_returns_every_page() {
    for mode in [Mode::AdScan, Mode::Pml, Mode::WriteProtect] {
        let p = MockPlatform::new();
        let mut vm = vm(&p, mode);
        for i in 0..300u64 {
            let _ = vm.on_ept_violation(&p, 0x20_0000 + i * 0x1000, 0x2);
        }
        vm.add_slot(&p, 1 << 32, 1 << 30).expect("second slot");
        assert!(vm.pages_held() > 300);
        vm.destroy(&p);
        p.assert_all_freed();
    }
}

#[test]
fn layout_bounds() {
    assert!(Layout::new(3 << 20).is_err());
    assert!(Layout::new(5 << 20).is_err());
    assert!(Layout::new(8 << 30).is_err());
    assert_eq!(
        Layout::new(64 << 20).map(|l| l.stack_top(0)),
        Ok((63 << 20) + 0x10000 + 0x4000)
    );
}

#[test]
fn bss_reads_zero_even_over_earlier_writes() {
    let p = MockPlatform::new();
    let mut vm = vm(&p, Mode::AdScan);
    vm.write_guest(&p, 0x10_0000, &[0xaa; 0x3000])
        .expect("write");
    // filesz 16, memsz 0x2800: bytes 16..0x2800 are .bss and must read as zero.
    let img = elf(0x10_0000, &[0x90; 16], 0x2800);
    assert_eq!(vm.load_elf(&p, &img), Ok(0x10_0000));
    let mut b = vec![0u8; 0x3000];
    vm.read_guest(&p, 0x10_0000, &mut b).expect("read");
    assert!(b[..16].iter().all(|&x| x == 0x90));
    assert!(b[16..0x2800].iter().all(|&x| x == 0), "stale bytes in .bss");
    assert!(
        b[0x2800..].iter().all(|&x| x == 0xaa),
        "bytes past p_memsz are not the image's"
    );
}

#[test]
fn explain_reports_the_guest_pde_and_the_ept_leaf_of_the_backing_page() {
    let p = MockPlatform::new();
    let mut vm = vm(&p, Mode::AdScan);
    let unbacked = smudge_core::answer::explain_guest(&vm, &p, 0x40_0000).expect("explain");
    assert_eq!((unbacked.ept_leaf, unbacked.hpa), (0, 0));
    assert_eq!(vm.on_ept_violation(&p, 0x40_0123, 0x2), Fault::Resolved);
    let r = smudge_core::answer::explain_guest(&vm, &p, 0x40_0123).expect("explain");
    // The guest's 2 MiB PDE for 4 MiB: P|RW|PS (SDM Vol. 3A 4.5).
    assert_eq!((r.guest_pte, r.guest_level), (0x40_0000 | 0x83, 2));
    // A 4 KiB EPT leaf, RWX and WB (SDM 29.3.2), pointing at a page the platform handed out.
    assert_eq!((r.ept_level, r.ept_leaf & 0x3f), (1, 0x7 | (6 << 3)));
    assert!(p.is_live(r.hpa) && r.ept_leaf & !0xfff & 0x000f_ffff_ffff_f000 == r.hpa);
}

#[test]
fn wbinvd_is_skipped_and_counted() {
    // SDM Table 25-7 bit 6 makes WBINVD/WBNOINVD exit with basic reason 54 (Appendix C): the
    // host skips the instruction (no cache of the host CPU is written back or invalidated for
    // the guest) and counts the exit.
    let p = MockPlatform::new();
    let mut vm = vm(&p, Mode::AdScan);
    let mut v = VcpuState::new(0);
    let mut g = GuestGprs::default();
    for _ in 0..5 {
        assert_eq!(
            exit(&mut vm, &p, &mut v, &mut g, 54, 0, 0),
            Action::Resume { advance: 3 }
        );
    }
    assert_eq!(v.exits[54], 5);
    assert_eq!(smudge_core::vm::reason::name(54), "wbinvd");
    vm.destroy(&p);
    p.assert_all_freed();
}

#[test]
fn debug_registers_are_the_guests_own() {
    // SDM 28.2.1 Table 28-4: DR number in 2:0, direction in bit 4 (1 = MOV from DR), register
    // in 11:8.
    let q = |dr: u64, from: bool, reg: u64| dr | (u64::from(from) << 4) | (reg << 8);
    let p = MockPlatform::new();
    let mut vm = vm(&p, Mode::AdScan);
    let mut v = VcpuState::new(0);
    let mut g = GuestGprs::default();
    // Power-up values first (SDM 18.2.4, 18.2.6).
    exit(&mut vm, &p, &mut v, &mut g, 29, q(7, true, 3), 0);
    assert_eq!(g.rbx, 0x400);
    // MOV DR0, RAX; MOV RCX, DR0.
    g.rax = 0xffff_8000_1234_5000;
    assert_eq!(
        exit(&mut vm, &p, &mut v, &mut g, 29, q(0, false, 0), 0),
        Action::Resume { advance: 3 }
    );
    exit(&mut vm, &p, &mut v, &mut g, 29, q(0, true, 1), 0);
    assert_eq!(g.rcx, 0xffff_8000_1234_5000);
    // DR7 keeps bit 10 set and bits 11, 12, 14, 15 clear; DR5 aliases DR7.
    g.rdx = 0xffff_ffff_ffff_f80b;
    exit(&mut vm, &p, &mut v, &mut g, 29, q(7, false, 2), 0);
    exit(&mut vm, &p, &mut v, &mut g, 29, q(5, true, 8), 0);
    assert_eq!(g.r8, 0xffff_27ff & 0xffff_f80b | 0x400);
    // DR6 bits 4-11 and 16-31 read as 1; DR4 aliases DR6.
    g.rsi = 1;
    exit(&mut vm, &p, &mut v, &mut g, 29, q(4, false, 6), 0);
    exit(&mut vm, &p, &mut v, &mut g, 29, q(6, true, 7), 0);
    assert_eq!(g.rdi, 0xffff_0ff1);
    assert_eq!(v.exits[29], 7);
    vm.destroy(&p);
    p.assert_all_freed();
}

#[test]
fn cpuid_hides_extended_state_beyond_sse() {
    use smudge_core::vm::filter_cpuid;
    // All ones in: the bits the SDM names for VMX, XSAVE/AVX and AVX-512 come out clear, stated
    // here by their SDM bit numbers (Vol. 2A CPUID, Tables 3-10, 3-11 and leaf 07H).
    let ones = [u32::MAX; 4];
    let l1 = filter_cpuid(1, 0, ones);
    for b in [5, 12, 26, 27, 28, 29] {
        assert_eq!(l1[2] & (1 << b), 0, "CPUID.1:ECX bit {b}");
    }
    assert_ne!(l1[2] & (1 << 31), 0, "hypervisor bit");
    assert_eq!(l1[3], u32::MAX, "EDX (x87, SSE, SSE2...) untouched");
    let l7 = filter_cpuid(7, 0, ones);
    for b in [5, 16, 17, 21, 26, 27, 28, 30, 31] {
        assert_eq!(l7[1] & (1 << b), 0, "CPUID.7:EBX bit {b}");
    }
    assert_ne!(l7[1] & (1 << 0), 0, "FSGSBASE stays");
    for b in [1, 6, 9, 10, 11, 12, 14] {
        assert_eq!(l7[2] & (1 << b), 0, "CPUID.7:ECX bit {b}");
    }
    for b in [2, 3, 8, 22, 23, 24, 25] {
        assert_eq!(l7[3] & (1 << b), 0, "CPUID.7:EDX bit {b}");
    }
    assert_eq!(
        filter_cpuid(7, 1, ones)[0] & 0x30,
        0,
        "AVX-VNNI, AVX512_BF16"
    );
    assert_eq!(filter_cpuid(0xD, 0, ones), [0; 4], "no XSAVE leaf");
    assert_eq!(filter_cpuid(0xD, 1, ones), [0; 4]);
    // On this machine's own processor: no XSAVE or AVX feature reaches a guest.
    let real = smudge_core::arch::cpuid(1, 0);
    assert_eq!(filter_cpuid(1, 0, real)[2] & (0xf << 26), 0);
}
