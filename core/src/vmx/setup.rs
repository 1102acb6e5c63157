//! Programming a VMCS for the smudge guest ABI: controls derived from the capability MSRs,
//! the host-state area from a snapshot of this CPU, the guest-state area of a 64-bit guest.

use x86::vmx::vmcs::{control, guest, host};

use crate::arch::HostState;
use crate::dirty::Mode;
use crate::guest::{self as abi, Layout};
use crate::vmx::caps::{Ctls, VmxCaps};

/// Pin-based controls (SDM 25.6.1).
pub mod pin {
    /// External-interrupt exiting.
    pub const EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
    /// NMI exiting.
    pub const NMI_EXITING: u32 = 1 << 3;
    /// Activate VMX-preemption timer.
    pub const PREEMPTION_TIMER: u32 = 1 << 6;
}
/// Primary processor-based controls (SDM 25.6.2).
pub mod proc1 {
    /// HLT exiting.
    pub const HLT_EXITING: u32 = 1 << 7;
    /// CR3-load exiting.
    pub const CR3_LOAD_EXITING: u32 = 1 << 15;
    /// CR8-load exiting.
    pub const CR8_LOAD_EXITING: u32 = 1 << 19;
    /// CR8-store exiting.
    pub const CR8_STORE_EXITING: u32 = 1 << 20;
    /// CR3-store exiting.
    pub const CR3_STORE_EXITING: u32 = 1 << 16;
    /// Unconditional I/O exiting.
    pub const UNCOND_IO_EXITING: u32 = 1 << 24;
    /// Use MSR bitmaps.
    pub const USE_MSR_BITMAPS: u32 = 1 << 28;
    /// Activate secondary controls.
    pub const SECONDARY_CONTROLS: u32 = 1 << 31;
}
/// Secondary processor-based controls (SDM 25.6.2).
pub mod proc2 {
    /// Enable EPT.
    pub const EPT: u32 = 1 << 1;
    /// Enable RDTSCP.
    pub const RDTSCP: u32 = 1 << 3;
    /// Enable VPID.
    pub const VPID: u32 = 1 << 5;
    /// Unrestricted guest.
    pub const UNRESTRICTED_GUEST: u32 = 1 << 7;
    /// Enable INVPCID.
    pub const INVPCID: u32 = 1 << 12;
    /// Enable PML.
    pub const PML: u32 = 1 << 17;
}
/// VM-exit controls (SDM 25.7.1).
pub mod exit {
    /// Host address-space size (64-bit host).
    pub const HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
    /// Save IA32_PAT.
    pub const SAVE_PAT: u32 = 1 << 18;
    /// Load IA32_PAT.
    pub const LOAD_PAT: u32 = 1 << 19;
    /// Save IA32_EFER.
    pub const SAVE_EFER: u32 = 1 << 20;
    /// Load IA32_EFER.
    pub const LOAD_EFER: u32 = 1 << 21;
}
/// VM-entry controls (SDM 25.8.1).
pub mod entry {
    /// IA-32e mode guest.
    pub const IA32E_MODE_GUEST: u32 = 1 << 9;
    /// Load IA32_PAT.
    pub const LOAD_PAT: u32 = 1 << 14;
    /// Load IA32_EFER.
    pub const LOAD_EFER: u32 = 1 << 15;
}

/// A control smudge needs that the processor does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MissingControl {
    /// The control field's capability MSR.
    pub msr: &'static str,
    /// Bit number.
    pub bit: u32,
}

/// The five control fields, adjusted to the capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Controls {
    /// Pin-based.
    pub pin: u32,
    /// Primary processor-based.
    pub proc1: u32,
    /// Secondary processor-based.
    pub proc2: u32,
    /// VM-exit.
    pub exit: u32,
    /// VM-entry.
    pub entry: u32,
}

/// SDM A.3-A.5: bits the capability says must be 1 are set; `wanted` bits only where allowed;
/// `required` bits that are not allowed are an error.
fn adjust(ctls: &Ctls, required: u32, wanted: u32, msr: &'static str) -> Result<u32, MissingControl> {
    let missing = required & !ctls.may_be_1;
    if missing != 0 {
        return Err(MissingControl { msr, bit: missing.trailing_zeros() });
    }
    Ok(ctls.must_be_1 | ((required | wanted) & ctls.may_be_1))
}

impl Controls {
    /// Controls for the guest ABI in dirty-tracking `mode`.
    pub fn for_guest(caps: &VmxCaps, mode: Mode, vpid: bool) -> Result<Controls, MissingControl> {
        let pin = adjust(
            &caps.pinbased,
            pin::EXTERNAL_INTERRUPT_EXITING | pin::NMI_EXITING,
            pin::PREEMPTION_TIMER,
            "IA32_VMX_(TRUE_)PINBASED_CTLS",
        )?;
        let mut proc1 = adjust(
            &caps.procbased,
            proc1::HLT_EXITING
                | proc1::UNCOND_IO_EXITING
                | proc1::USE_MSR_BITMAPS
                | proc1::SECONDARY_CONTROLS
                | proc1::CR8_LOAD_EXITING
                | proc1::CR8_STORE_EXITING,
            0,
            "IA32_VMX_(TRUE_)PROCBASED_CTLS",
        )?;
        // With EPT the guest owns CR3 (SDM 25.6.2): clear CR3 exiting where the TRUE MSR allows.
        proc1 &= !((proc1::CR3_LOAD_EXITING | proc1::CR3_STORE_EXITING) & !caps.procbased.must_be_1);
        let mut req2 = proc2::EPT;
        if mode == Mode::Pml {
            req2 |= proc2::PML;
        }
        let want2 = proc2::RDTSCP | proc2::INVPCID | if vpid { proc2::VPID } else { 0 };
        let proc2 = adjust(&caps.procbased2, req2, want2, "IA32_VMX_PROCBASED_CTLS2")?;
        let exit = adjust(
            &caps.exit,
            exit::HOST_ADDRESS_SPACE_SIZE | exit::SAVE_EFER | exit::LOAD_EFER,
            exit::SAVE_PAT | exit::LOAD_PAT,
            "IA32_VMX_(TRUE_)EXIT_CTLS",
        )?;
        let entry = adjust(
            &caps.entry,
            entry::IA32E_MODE_GUEST | entry::LOAD_EFER,
            entry::LOAD_PAT,
            "IA32_VMX_(TRUE_)ENTRY_CTLS",
        )?;
        Ok(Controls { pin, proc1, proc2, exit, entry })
    }
}

/// Per-vCPU inputs of [`program`].
#[derive(Clone, Copy, Debug)]
pub struct VcpuConfig {
    /// EPTP value.
    pub eptp: u64,
    /// VPID (non-zero) when the VPID control is on.
    pub vpid: u16,
    /// Host-physical address of the PML buffer (PML mode).
    pub pml_buffer: u64,
    /// Host-physical address of the 4 KiB MSR bitmap.
    pub msr_bitmap: u64,
    /// Guest RIP.
    pub rip: u64,
    /// Guest RSP.
    pub rsp: u64,
}

/// Writes one VMCS field; the hardware VMCS and the in-memory image both provide it.
pub type WriteField<'a, E> = &'a mut dyn FnMut(u32, u64) -> Result<(), E>;

/// Fits `value` to the CR0/CR4 fixed bits (SDM A.7, A.8).
pub fn fix_cr(value: u64, fixed0: u64, fixed1: u64) -> u64 {
    (value | fixed0) & fixed1
}

/// Programs the control, host-state and guest-state areas of the current VMCS.
pub fn program<E>(
    w: WriteField<'_, E>,
    caps: &VmxCaps,
    ctls: &Controls,
    host_state: &HostState,
    layout: &Layout,
    cfg: &VcpuConfig,
) -> Result<(), E> {
    // Controls.
    w(control::PINBASED_EXEC_CONTROLS, ctls.pin.into())?;
    w(control::PRIMARY_PROCBASED_EXEC_CONTROLS, ctls.proc1.into())?;
    w(control::SECONDARY_PROCBASED_EXEC_CONTROLS, ctls.proc2.into())?;
    w(control::VMEXIT_CONTROLS, ctls.exit.into())?;
    w(control::VMENTRY_CONTROLS, ctls.entry.into())?;
    w(control::EXCEPTION_BITMAP, 0)?;
    w(control::CR3_TARGET_COUNT, 0)?;
    w(control::VMEXIT_MSR_STORE_COUNT, 0)?;
    w(control::VMEXIT_MSR_LOAD_COUNT, 0)?;
    w(control::VMENTRY_MSR_LOAD_COUNT, 0)?;
    w(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0)?;
    w(control::MSR_BITMAPS_ADDR_FULL, cfg.msr_bitmap)?;
    w(control::EPTP_FULL, cfg.eptp)?;
    if ctls.proc2 & proc2::VPID != 0 {
        w(control::VPID, cfg.vpid.into())?;
    }
    if ctls.proc2 & proc2::PML != 0 {
        w(control::PML_ADDR_FULL, cfg.pml_buffer)?;
        w(guest::PML_INDEX, crate::dirty::pml::INDEX_RESET.into())?;
    }
    // The guest must keep CR4.VMXE=1 (CR4_FIXED0) but sees it clear: own the bit, shadow 0.
    w(control::CR0_GUEST_HOST_MASK, 0)?;
    w(control::CR0_READ_SHADOW, abi::CR0)?;
    w(control::CR4_GUEST_HOST_MASK, caps.cr4_fixed0)?;
    w(control::CR4_READ_SHADOW, abi::CR4)?;

    program_host(w, ctls, host_state)?;

    // Guest-state area (SDM 25.4, checks in SDM 27.3.1).
    w(guest::CR0, fix_cr(abi::CR0, caps.cr0_fixed0, caps.cr0_fixed1))?;
    w(guest::CR3, layout.cr3())?;
    w(guest::CR4, fix_cr(abi::CR4, caps.cr4_fixed0, caps.cr4_fixed1))?;
    w(guest::DR7, 0x400)?;
    w(guest::RSP, cfg.rsp)?;
    w(guest::RIP, cfg.rip)?;
    w(guest::RFLAGS, 0x2)?;
    // CS: 64-bit code, type 11, S, P, L, G (access-rights format SDM 25.4.1 Table 25-2).
    w(guest::CS_SELECTOR, abi::CS_SELECTOR.into())?;
    w(guest::CS_BASE, 0)?;
    w(guest::CS_LIMIT, 0xffff_ffff)?;
    w(guest::CS_ACCESS_RIGHTS, 0xa09b)?;
    for (s, b, l, a) in [
        (guest::SS_SELECTOR, guest::SS_BASE, guest::SS_LIMIT, guest::SS_ACCESS_RIGHTS),
        (guest::DS_SELECTOR, guest::DS_BASE, guest::DS_LIMIT, guest::DS_ACCESS_RIGHTS),
        (guest::ES_SELECTOR, guest::ES_BASE, guest::ES_LIMIT, guest::ES_ACCESS_RIGHTS),
        (guest::FS_SELECTOR, guest::FS_BASE, guest::FS_LIMIT, guest::FS_ACCESS_RIGHTS),
        (guest::GS_SELECTOR, guest::GS_BASE, guest::GS_LIMIT, guest::GS_ACCESS_RIGHTS),
    ] {
        w(s, abi::DS_SELECTOR.into())?;
        w(b, 0)?;
        w(l, 0xffff_ffff)?;
        // Read/write data, accessed, S, P, D/B, G.
        w(a, 0xc093)?;
    }
    w(guest::LDTR_SELECTOR, 0)?;
    w(guest::LDTR_BASE, 0)?;
    w(guest::LDTR_LIMIT, 0)?;
    w(guest::LDTR_ACCESS_RIGHTS, 1 << 16)?; // unusable
    w(guest::TR_SELECTOR, abi::TR_SELECTOR.into())?;
    w(guest::TR_BASE, layout.tss())?;
    w(guest::TR_LIMIT, 0x67)?;
    w(guest::TR_ACCESS_RIGHTS, 0x8b)?; // busy 64-bit TSS, P (SDM 27.3.1.2)
    w(guest::GDTR_BASE, layout.gdt())?;
    w(guest::GDTR_LIMIT, abi::GDT_LIMIT.into())?;
    // An empty IDT: any exception escalates to a triple fault, which ends the run.
    w(guest::IDTR_BASE, 0)?;
    w(guest::IDTR_LIMIT, 0)?;
    w(guest::IA32_DEBUGCTL_FULL, 0)?;
    w(guest::IA32_SYSENTER_CS, 0)?;
    w(guest::IA32_SYSENTER_ESP, 0)?;
    w(guest::IA32_SYSENTER_EIP, 0)?;
    w(guest::IA32_EFER_FULL, abi::EFER)?;
    if ctls.entry & entry::LOAD_PAT != 0 {
        w(guest::IA32_PAT_FULL, 0x0007_0406_0007_0406)?;
    }
    w(guest::INTERRUPTIBILITY_STATE, 0)?;
    w(guest::ACTIVITY_STATE, 0)?;
    w(guest::PENDING_DBG_EXCEPTIONS, 0)?;
    w(guest::LINK_PTR_FULL, u64::MAX)?;
    Ok(())
}

/// Writes the host-state area from a snapshot of this CPU (SDM 25.5; checks in SDM 27.2.3).
/// HOST_RSP and HOST_RIP are written by the entry trampoline.
pub fn program_host<E>(w: WriteField<'_, E>, ctls: &Controls, host_state: &HostState) -> Result<(), E> {
    // Selectors with RPL=0 and TI=0; DS/ES null (restored after the exit).
    let h = host_state;
    let sel = |s: u16| u64::from(if s & 7 == 0 { s } else { 0 });
    w(host::CR0, h.cr0)?;
    w(host::CR3, h.cr3)?;
    w(host::CR4, h.cr4)?;
    w(host::ES_SELECTOR, 0)?;
    w(host::CS_SELECTOR, sel(h.cs))?;
    w(host::SS_SELECTOR, sel(h.ss))?;
    w(host::DS_SELECTOR, 0)?;
    w(host::FS_SELECTOR, sel(h.fs))?;
    w(host::GS_SELECTOR, sel(h.gs))?;
    w(host::TR_SELECTOR, sel(h.tr))?;
    w(host::FS_BASE, h.fs_base)?;
    w(host::GS_BASE, h.gs_base)?;
    w(host::TR_BASE, h.tr_base)?;
    w(host::GDTR_BASE, h.gdtr.base)?;
    w(host::IDTR_BASE, h.idtr.base)?;
    w(host::IA32_SYSENTER_CS, h.sysenter_cs)?;
    w(host::IA32_SYSENTER_ESP, h.sysenter_esp)?;
    w(host::IA32_SYSENTER_EIP, h.sysenter_eip)?;
    w(host::IA32_EFER_FULL, h.efer)?;
    if ctls.exit & exit::LOAD_PAT != 0 {
        w(host::IA32_PAT_FULL, h.pat)?;
    }

    Ok(())
}
