//! smudge's KVM request numbers, struct layouts and constants against what the C compiler makes
//! of Linux 6.12's uapi headers (`fixtures/kvm-uapi/linux-6.12.txt`, printed by `gen.c` there).

use core::mem::{offset_of, size_of};
use std::collections::BTreeMap;

use smudge_core::kvm::abi::{self, cap, exit, mp_state, run, Ioctl};

fn fixture() -> BTreeMap<String, u64> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/kvm-uapi/linux-6.12.txt"
    );
    let text = std::fs::read_to_string(path).expect("the uapi fixture");
    text.lines()
        .map(|l| {
            let mut w = l.split_whitespace();
            let (kind, name, v) = (w.next(), w.next(), w.next());
            let v: u64 = v.and_then(|v| v.parse().ok()).expect(l);
            (format!("{} {}", kind.expect(l), name.expect(l)), v)
        })
        .collect()
}

#[test]
fn layouts_match_the_headers() {
    let f = fixture();
    let mut checked = 0;
    let mut check = |key: &str, ours: usize| {
        let c = f
            .get(key)
            .unwrap_or_else(|| panic!("{key} not in the fixture"));
        assert_eq!(ours as u64, *c, "{key}");
        checked += 1;
    };
    check(
        "size kvm_userspace_memory_region2",
        size_of::<abi::MemoryRegion2>(),
    );
    check(
        "offset kvm_userspace_memory_region2.memory_size",
        offset_of!(abi::MemoryRegion2, memory_size),
    );
    check(
        "offset kvm_userspace_memory_region2.userspace_addr",
        offset_of!(abi::MemoryRegion2, userspace_addr),
    );
    check(
        "offset kvm_userspace_memory_region2.guest_memfd",
        offset_of!(abi::MemoryRegion2, guest_memfd),
    );
    check("size kvm_dirty_log", size_of::<abi::DirtyLog>());
    check(
        "offset kvm_dirty_log.dirty_bitmap",
        offset_of!(abi::DirtyLog, dirty_bitmap),
    );
    check("size kvm_clear_dirty_log", size_of::<abi::ClearDirtyLog>());
    check(
        "offset kvm_clear_dirty_log.num_pages",
        offset_of!(abi::ClearDirtyLog, num_pages),
    );
    check(
        "offset kvm_clear_dirty_log.first_page",
        offset_of!(abi::ClearDirtyLog, first_page),
    );
    check(
        "offset kvm_clear_dirty_log.dirty_bitmap",
        offset_of!(abi::ClearDirtyLog, dirty_bitmap),
    );
    check("size kvm_regs", size_of::<abi::KvmRegs>());
    check(
        "offset kvm_regs.rdi",
        offset_of!(abi::KvmRegs, gprs) + 5 * 8,
    );
    check(
        "offset kvm_regs.r15",
        offset_of!(abi::KvmRegs, gprs) + 15 * 8,
    );
    check("offset kvm_regs.rip", offset_of!(abi::KvmRegs, rip));
    check("offset kvm_regs.rflags", offset_of!(abi::KvmRegs, rflags));
    check("size kvm_segment", size_of::<abi::Segment>());
    for (name, off) in [
        ("base", offset_of!(abi::Segment, base)),
        ("limit", offset_of!(abi::Segment, limit)),
        ("selector", offset_of!(abi::Segment, selector)),
        ("type", offset_of!(abi::Segment, type_)),
        ("present", offset_of!(abi::Segment, present)),
        ("dpl", offset_of!(abi::Segment, dpl)),
        ("db", offset_of!(abi::Segment, db)),
        ("s", offset_of!(abi::Segment, s)),
        ("l", offset_of!(abi::Segment, l)),
        ("g", offset_of!(abi::Segment, g)),
        ("avl", offset_of!(abi::Segment, avl)),
        ("unusable", offset_of!(abi::Segment, unusable)),
    ] {
        check(&format!("offset kvm_segment.{name}"), off);
    }
    check("size kvm_dtable", size_of::<abi::Dtable>());
    check("offset kvm_dtable.limit", offset_of!(abi::Dtable, limit));
    check("size kvm_sregs", size_of::<abi::Sregs>());
    for (name, off) in [
        ("cs", offset_of!(abi::Sregs, cs)),
        ("ss", offset_of!(abi::Sregs, ss)),
        ("tr", offset_of!(abi::Sregs, tr)),
        ("ldt", offset_of!(abi::Sregs, ldt)),
        ("gdt", offset_of!(abi::Sregs, gdt)),
        ("idt", offset_of!(abi::Sregs, idt)),
        ("cr0", offset_of!(abi::Sregs, cr0)),
        ("cr3", offset_of!(abi::Sregs, cr3)),
        ("cr8", offset_of!(abi::Sregs, cr8)),
        ("efer", offset_of!(abi::Sregs, efer)),
        ("apic_base", offset_of!(abi::Sregs, apic_base)),
        ("interrupt_bitmap", offset_of!(abi::Sregs, interrupt_bitmap)),
    ] {
        check(&format!("offset kvm_sregs.{name}"), off);
    }
    check("size kvm_cpuid_entry2", size_of::<abi::CpuidEntry2>());
    check(
        "offset kvm_cpuid_entry2.flags",
        offset_of!(abi::CpuidEntry2, flags),
    );
    check(
        "offset kvm_cpuid_entry2.edx",
        offset_of!(abi::CpuidEntry2, edx),
    );
    check("size kvm_cpuid2", size_of::<abi::Cpuid2>());
    check("offset kvm_cpuid2.entries", size_of::<abi::Cpuid2>());
    check("size kvm_enable_cap", size_of::<abi::EnableCap>());
    check(
        "offset kvm_enable_cap.args",
        offset_of!(abi::EnableCap, args),
    );
    check("size kvm_mp_state", size_of::<abi::MpState>());
    check("size kvm_dirty_gfn", size_of::<abi::DirtyGfn>());
    check("offset kvm_dirty_gfn.slot", offset_of!(abi::DirtyGfn, slot));
    check(
        "offset kvm_dirty_gfn.offset",
        offset_of!(abi::DirtyGfn, offset),
    );
    check("size kvm_run", run::SIZE);
    for (name, off) in [
        ("immediate_exit", run::IMMEDIATE_EXIT),
        ("exit_reason", run::EXIT_REASON),
        (
            "ready_for_interrupt_injection",
            run::READY_FOR_INTERRUPT_INJECTION,
        ),
        ("if_flag", run::IF_FLAG),
        ("flags", run::FLAGS),
        ("cr8", run::CR8),
        ("apic_base", run::APIC_BASE),
        ("io", run::EXIT),
        ("io.direction", run::IO_DIRECTION),
        ("io.size", run::IO_SIZE),
        ("io.port", run::IO_PORT),
        ("io.count", run::IO_COUNT),
        ("io.data_offset", run::IO_DATA_OFFSET),
        (
            "fail_entry.hardware_entry_failure_reason",
            run::FAIL_ENTRY_REASON,
        ),
        ("fail_entry.cpu", run::FAIL_ENTRY_CPU),
        ("mmio.phys_addr", run::MMIO_PHYS_ADDR),
        ("mmio.data", run::MMIO_DATA),
        ("mmio.len", run::MMIO_LEN),
        ("mmio.is_write", run::MMIO_IS_WRITE),
        ("kvm_valid_regs", run::VALID_REGS),
        ("kvm_dirty_regs", run::DIRTY_REGS),
        ("s", run::S),
    ] {
        check(&format!("offset kvm_run.{name}"), off);
    }
    assert!(checked > 70, "{checked} facts checked");
}

#[test]
fn request_numbers_and_constants_match_the_headers() {
    let f = fixture();
    let c = |name: &str| {
        *f.get(&format!("const {name}"))
            .unwrap_or_else(|| panic!("{name}"))
    };
    for (name, r) in [
        ("KVM_GET_API_VERSION", Ioctl::GetApiVersion),
        ("KVM_CREATE_VM", Ioctl::CreateVm),
        ("KVM_CHECK_EXTENSION", Ioctl::CheckExtension),
        ("KVM_GET_VCPU_MMAP_SIZE", Ioctl::GetVcpuMmapSize),
        ("KVM_GET_SUPPORTED_CPUID", Ioctl::GetSupportedCpuid),
        ("KVM_CREATE_VCPU", Ioctl::CreateVcpu),
        ("KVM_GET_DIRTY_LOG", Ioctl::GetDirtyLog),
        ("KVM_SET_USER_MEMORY_REGION2", Ioctl::SetUserMemoryRegion2),
        ("KVM_CREATE_IRQCHIP", Ioctl::CreateIrqchip),
        ("KVM_GET_TSC_KHZ", Ioctl::GetTscKhz),
        ("KVM_ENABLE_CAP", Ioctl::EnableCap),
        ("KVM_CLEAR_DIRTY_LOG", Ioctl::ClearDirtyLog),
        ("KVM_RESET_DIRTY_RINGS", Ioctl::ResetDirtyRings),
        ("KVM_RUN", Ioctl::Run),
        ("KVM_GET_REGS", Ioctl::GetRegs),
        ("KVM_SET_REGS", Ioctl::SetRegs),
        ("KVM_GET_SREGS", Ioctl::GetSregs),
        ("KVM_SET_SREGS", Ioctl::SetSregs),
        ("KVM_SET_SIGNAL_MASK", Ioctl::SetSignalMask),
        ("KVM_SET_CPUID2", Ioctl::SetCpuid2),
        ("KVM_GET_CPUID2", Ioctl::GetCpuid2),
        ("KVM_GET_MP_STATE", Ioctl::GetMpState),
        ("KVM_SET_MP_STATE", Ioctl::SetMpState),
    ] {
        assert_eq!(u64::from(r.number()), c(name), "{name}");
    }
    assert_eq!(Ioctl::ALL.len(), 23, "every request is checked above");
    for (name, v) in [
        ("KVMIO", u64::from(abi::KVMIO)),
        ("KVM_API_VERSION", u64::from(abi::API_VERSION)),
        ("KVM_CAP_MAX_VCPUS", cap::MAX_VCPUS.into()),
        ("KVM_CAP_NR_VCPUS", cap::NR_VCPUS.into()),
        ("KVM_CAP_NR_MEMSLOTS", cap::NR_MEMSLOTS.into()),
        ("KVM_CAP_IMMEDIATE_EXIT", cap::IMMEDIATE_EXIT.into()),
        ("KVM_CAP_USER_MEMORY", cap::USER_MEMORY.into()),
        ("KVM_CAP_USER_MEMORY2", cap::USER_MEMORY2.into()),
        ("KVM_CAP_GET_TSC_KHZ", cap::GET_TSC_KHZ.into()),
        (
            "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
            cap::MANUAL_DIRTY_LOG_PROTECT2.into(),
        ),
        ("KVM_CAP_DIRTY_LOG_RING", cap::DIRTY_LOG_RING.into()),
        (
            "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
            cap::DIRTY_LOG_RING_ACQ_REL.into(),
        ),
        (
            "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE",
            abi::MANUAL_PROTECT_ENABLE,
        ),
        ("KVM_DIRTY_LOG_INITIALLY_SET", abi::INITIALLY_SET),
        ("KVM_MEM_LOG_DIRTY_PAGES", abi::MEM_LOG_DIRTY_PAGES.into()),
        ("KVM_MEM_READONLY", abi::MEM_READONLY.into()),
        ("KVM_MEM_GUEST_MEMFD", abi::MEM_GUEST_MEMFD.into()),
        ("KVM_DIRTY_LOG_PAGE_OFFSET", abi::DIRTY_LOG_PAGE_OFFSET),
        ("KVM_DIRTY_GFN_F_DIRTY", abi::DIRTY_GFN_F_DIRTY.into()),
        ("KVM_DIRTY_GFN_F_RESET", abi::DIRTY_GFN_F_RESET.into()),
        ("KVM_MP_STATE_RUNNABLE", mp_state::RUNNABLE.into()),
        ("KVM_MP_STATE_UNINITIALIZED", mp_state::UNINITIALIZED.into()),
        ("KVM_MP_STATE_HALTED", mp_state::HALTED.into()),
        ("KVM_EXIT_UNKNOWN", exit::UNKNOWN.into()),
        ("KVM_EXIT_IO", exit::IO.into()),
        ("KVM_EXIT_HLT", exit::HLT.into()),
        ("KVM_EXIT_MMIO", exit::MMIO.into()),
        ("KVM_EXIT_SHUTDOWN", exit::SHUTDOWN.into()),
        ("KVM_EXIT_FAIL_ENTRY", exit::FAIL_ENTRY.into()),
        ("KVM_EXIT_INTR", exit::INTR.into()),
        ("KVM_EXIT_INTERNAL_ERROR", exit::INTERNAL_ERROR.into()),
        ("KVM_EXIT_DIRTY_RING_FULL", exit::DIRTY_RING_FULL.into()),
        ("KVM_EXIT_IO_IN", abi::EXIT_IO_IN.into()),
        ("KVM_EXIT_IO_OUT", abi::EXIT_IO_OUT.into()),
    ] {
        assert_eq!(v, c(name), "{name}");
    }
}
