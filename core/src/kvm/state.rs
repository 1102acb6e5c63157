//! KVM's register structs (`kvm_sregs`, `kvm_regs`) to and from smudge's [`GuestState`] and
//! guest GPRs: what KVM_GET/SET_SREGS and KVM_GET/SET_REGS mean. SET_SREGS refuses what KVM
//! refuses (EINVAL, Linux 6.12 `kvm_is_valid_sregs`: the paging-mode combinations, CR0, CR4 and
//! EFER reserved bits, an illegal CR3); a state KVM accepts but a VM entry cannot take (real
//! mode without "unrestricted guest") is accepted here and refused at KVM_RUN by the software
//! entry checker (KVM_EXIT_FAIL_ENTRY).

use crate::arch::GuestGprs;
use crate::kvm::abi::{Dtable, KvmRegs, Segment, Sregs};
use crate::regs::{
    CR0_CD, CR0_NW, CR0_PE, CR0_PG, CR4_CET, CR4_LA57, CR4_OSXSAVE, CR4_PAE, CR4_PKE, CR4_SMXE,
    CR4_VMXE, EFER_LMA, EFER_LME, EFER_NXE, EFER_SCE,
};
use crate::vmx::caps::VmxCaps;
use crate::vmx::guest_state::{Dtr, GuestState, Seg, AR_UNUSABLE};
use crate::vmx::setup::fix_cr;

/// CR4 bits a guest may not set: VMXE (no nested VMX), SMXE, OSXSAVE (XSAVE is hidden), PKE,
/// CET, LA57, and everything the processor's CR4_FIXED1 does not allow.
const CR4_DENIED: u64 = CR4_VMXE | CR4_SMXE | CR4_OSXSAVE | CR4_PKE | CR4_CET | CR4_LA57;
/// EFER bits a guest may set: SCE, LME, LMA, NXE.
const EFER_ALLOWED: u64 = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;

/// The VMCS access rights of a `kvm_segment` (KVM's `vmx_segment_access_rights`): an unusable
/// or non-present segment is only "unusable".
pub fn seg_from_kvm(s: &Segment) -> Seg {
    let ar = if s.unusable != 0 || s.present == 0 {
        AR_UNUSABLE
    } else {
        u32::from(s.type_ & 15)
            | u32::from(s.s & 1) << 4
            | u32::from(s.dpl & 3) << 5
            | u32::from(s.present & 1) << 7
            | u32::from(s.avl & 1) << 12
            | u32::from(s.l & 1) << 13
            | u32::from(s.db & 1) << 14
            | u32::from(s.g & 1) << 15
    };
    Seg {
        selector: s.selector,
        base: s.base,
        limit: s.limit,
        ar,
    }
}

/// The `kvm_segment` of a VMCS segment (KVM's `vmx_get_segment`: present is "not unusable").
pub fn seg_to_kvm(s: &Seg) -> Segment {
    let bit = |n: u32| ((s.ar >> n) & 1) as u8;
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: (s.ar & 15) as u8,
        present: 1 - bit(16),
        dpl: ((s.ar >> 5) & 3) as u8,
        db: bit(14),
        s: bit(4),
        l: bit(13),
        g: bit(15),
        avl: bit(12),
        unusable: bit(16),
        padding: 0,
    }
}

fn dtr_to_kvm(d: &Dtr) -> Dtable {
    Dtable {
        base: d.base,
        limit: d.limit as u16,
        padding: [0; 6],
    }
}

/// What KVM_GET_SREGS reports for `g`. `cr8` and `apic_base` are the vCPU's own (no local
/// APIC is emulated); no interrupt is ever pending.
pub fn sregs(g: &GuestState, cr2: u64, cr8: u64, apic_base: u64) -> Sregs {
    Sregs {
        cs: seg_to_kvm(&g.cs),
        ds: seg_to_kvm(&g.ds),
        es: seg_to_kvm(&g.es),
        fs: seg_to_kvm(&g.fs),
        gs: seg_to_kvm(&g.gs),
        ss: seg_to_kvm(&g.ss),
        tr: seg_to_kvm(&g.tr),
        ldt: seg_to_kvm(&g.ldtr),
        gdt: dtr_to_kvm(&g.gdtr),
        idt: dtr_to_kvm(&g.idtr),
        cr0: g.cr0_shadow,
        cr2,
        cr3: g.cr3,
        // The host-owned bits read as the shadow has them (VMXE clear).
        cr4: g.cr4_shadow,
        cr8,
        efer: g.efer,
        apic_base,
        interrupt_bitmap: [0; 4],
    }
}

/// KVM_SET_SREGS: `s` checked as KVM checks it, then put into `g` (the VMX fixed bits applied to
/// the CR0/CR4 the processor runs, except CR0.PE/PG, and the guest's values kept as the read
/// shadows). `maxphyaddr` is
/// the guest's physical-address width. Err: what KVM answers with EINVAL.
pub fn set_sregs(g: &mut GuestState, s: &Sregs, caps: &VmxCaps, maxphyaddr: u8) -> Result<(), ()> {
    let long = s.efer & EFER_LME != 0 && s.cr0 & CR0_PG != 0;
    if long {
        // 64-bit paging: CR4.PAE and EFER.LMA set, CR3 within the physical-address width.
        if s.cr4 & CR4_PAE == 0 || s.efer & EFER_LMA == 0 || s.cr3 >> maxphyaddr != 0 {
            return Err(());
        }
    } else if s.efer & EFER_LMA != 0 || s.cs.l != 0 {
        return Err(());
    }
    let cr4_reserved = !caps.cr4_fixed1 | CR4_DENIED;
    if s.cr0 >> 32 != 0
        || (s.cr0 & CR0_NW != 0 && s.cr0 & CR0_CD == 0)
        || (s.cr0 & CR0_PG != 0 && s.cr0 & CR0_PE == 0)
        || s.cr4 & cr4_reserved != 0
        || s.efer & !EFER_ALLOWED != 0
        || s.interrupt_bitmap != [0; 4]
    {
        return Err(());
    }
    // NE is forced as KVM forces it; PE and PG are not: a guest that asks for real mode or no
    // paging must not silently run in another mode, and the entry checker refuses it at
    // KVM_RUN unless the processor has "unrestricted guest" (SDM 27.3.1.1).
    g.cr0 = fix_cr(s.cr0, caps.cr0_fixed0 & !(CR0_PE | CR0_PG), caps.cr0_fixed1);
    g.cr0_shadow = s.cr0;
    g.cr3 = s.cr3;
    g.cr4 = fix_cr(s.cr4, caps.cr4_fixed0, caps.cr4_fixed1);
    g.cr4_shadow = s.cr4;
    g.efer = s.efer;
    g.cs = seg_from_kvm(&s.cs);
    g.ds = seg_from_kvm(&s.ds);
    g.es = seg_from_kvm(&s.es);
    g.fs = seg_from_kvm(&s.fs);
    g.gs = seg_from_kvm(&s.gs);
    g.ss = seg_from_kvm(&s.ss);
    g.tr = seg_from_kvm(&s.tr);
    g.ldtr = seg_from_kvm(&s.ldt);
    g.gdtr = Dtr {
        base: s.gdt.base,
        limit: s.gdt.limit.into(),
    };
    g.idtr = Dtr {
        base: s.idt.base,
        limit: s.idt.limit.into(),
    };
    Ok(())
}

/// KVM_GET_REGS: the GPRs, RSP and RIP/RFLAGS (`kvm_regs` order: RAX, RBX, RCX, RDX, RSI, RDI,
/// RSP, RBP, R8-R15).
pub fn regs(gprs: &GuestGprs, rsp: u64, rip: u64, rflags: u64) -> KvmRegs {
    let g = gprs;
    KvmRegs {
        gprs: [
            g.rax, g.rbx, g.rcx, g.rdx, g.rsi, g.rdi, rsp, g.rbp, g.r8, g.r9, g.r10, g.r11, g.r12,
            g.r13, g.r14, g.r15,
        ],
        rip,
        rflags,
    }
}

/// KVM_SET_REGS into the GPRs; returns (RSP, RIP, RFLAGS) for the VMCS. RFLAGS bit 1 always
/// reads as 1 (SDM 3.4.3; KVM forces it too).
pub fn set_regs(gprs: &mut GuestGprs, r: &KvmRegs) -> (u64, u64, u64) {
    let [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15] = r.gprs;
    *gprs = GuestGprs {
        rax,
        rbx,
        rcx,
        rdx,
        rsi,
        rdi,
        rbp,
        r8,
        r9,
        r10,
        r11,
        r12,
        r13,
        r14,
        r15,
        ..*gprs
    };
    (rsp, r.rip, r.rflags | 2)
}
