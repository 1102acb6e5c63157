//! The vCPU state KVM's selftest library sets through KVM_SET_SREGS (`vcpu_init_sregs` in
//! `tools/testing/selftests/kvm/lib/x86_64/processor.c`): 64-bit mode with its own GDT, IDT,
//! TSS and page tables, on top of what KVM_GET_SREGS returned.

use smudge_core::kvm::abi::{MemoryRegion2, Segment, Sregs};
use smudge_core::regs::{
    CR0_NE, CR0_PE, CR0_PG, CR4_OSFXSR, CR4_PAE, EFER_LMA, EFER_LME, EFER_NXE,
};

/// The library's GDT, IDT, TSS and top-level page table (guest-physical addresses).
pub const GDT: u64 = 0x2000;
/// See [`GDT`].
pub const IDT: u64 = 0x3000;
/// See [`GDT`].
pub const TSS: u64 = 0x4000;
/// See [`GDT`].
pub const CR3: u64 = 0x5000;
/// The TSS selector (`KERNEL_TSS`).
pub const TSS_SELECTOR: u16 = 0x18;

/// KVM_SET_USER_MEMORY_REGION2's argument for slot `slot`: `size` bytes of the caller's memory
/// at `uaddr`, at guest-physical `gpa`, with `flags` (`KVM_MEM_*`).
pub fn region(slot: u32, flags: u32, gpa: u64, size: u64, uaddr: u64) -> MemoryRegion2 {
    MemoryRegion2 {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: uaddr,
        ..Default::default()
    }
}

/// The 64-bit code segment (`KERNEL_CS`).
pub fn code64() -> Segment {
    Segment {
        selector: 0x8,
        limit: 0xffff_ffff,
        s: 1,
        type_: 11,
        g: 1,
        l: 1,
        present: 1,
        ..Default::default()
    }
}

/// The data segment (`KERNEL_DS`).
pub fn data64() -> Segment {
    Segment {
        selector: 0x10,
        limit: 0xffff_ffff,
        s: 1,
        type_: 3,
        g: 1,
        present: 1,
        ..Default::default()
    }
}

/// What `vcpu_init_sregs` makes of `reset`: CR0 PE|NE|PG, CR4 PAE|OSFXSR, EFER LME|LMA|NX, an
/// unusable LDT, the flat segments, a busy 64-bit TSS.
pub fn long_mode(reset: &Sregs) -> Sregs {
    let mut s = *reset;
    s.idt.base = IDT;
    s.idt.limit = 4095;
    s.gdt.base = GDT;
    s.gdt.limit = 4095;
    s.cr0 = CR0_PE | CR0_NE | CR0_PG;
    s.cr4 |= CR4_PAE | CR4_OSFXSR;
    s.efer |= EFER_LME | EFER_LMA | EFER_NXE;
    s.ldt = Segment {
        unusable: 1,
        ..Default::default()
    };
    s.cs = code64();
    s.ds = data64();
    s.es = data64();
    s.gs = data64();
    s.tr = Segment {
        base: TSS,
        limit: 0x67,
        selector: TSS_SELECTOR,
        type_: 11,
        present: 1,
        ..Default::default()
    };
    s.cr3 = CR3;
    s
}
