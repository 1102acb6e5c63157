//! Programming a VMCS for the smudge guest ABI: controls derived from the capability MSRs
//! (through [`VmxCaps::adjust_controls`]), the host-state area from a snapshot of this CPU, the
//! guest-state area of a 64-bit guest. Everything is written through [`VmcsAccess`], so the same
//! code programs the hardware VMCS (`hw::HwVmcs`) and an in-memory [`VmcsImage`] in tests.
//!
//! [`VmcsImage`]: crate::vmx::vmcs::VmcsImage

use crate::arch::HostState;
use crate::dirty::Mode;
use crate::vmx::caps::{
    entry, exit, pin, primary, secondary, ControlError, ControlRequest, Controls, VmxCaps, Want,
};
use crate::vmx::fields::Field;
use crate::vmx::guest_state::GuestState;
use crate::vmx::vmcs::{VmcsAccess, VmcsError};

/// The controls smudge asks for a guest tracked in `mode` (SDM 25.6-25.8):
/// - pin-based: external interrupts and NMIs exit to the host (required), the preemption timer
///   bounds a stay in the guest (wanted);
/// - primary: HLT, unconditional I/O (the console is port I/O), MSR bitmaps, secondary controls,
///   CR8 load/store exiting so the guest's TPR stays private, and MOV-DR exiting so the guest's
///   debug registers stay private too (the exit handler keeps them; the host's DR0-DR3 and DR6
///   are never the guest's) (all required). CR3 load/store
///   exiting is not asked for: with EPT the guest owns CR3, and the adjustment leaves those
///   default1 bits set only where the MSR forces them (no TRUE controls, SDM A.2);
/// - secondary: EPT (required), PML in PML mode (required), RDTSCP and INVPCID (wanted), VPID
///   when `vpid` (wanted), WBINVD exiting (wanted: a guest must not write back and invalidate
///   the caches of a host CPU, a noisy-neighbour attack on everything else on it);
/// - VM-exit: 64-bit host and save/load EFER (required), save/load PAT (wanted);
/// - VM-entry: IA-32e mode guest and load EFER (required), load PAT (wanted).
pub const fn guest_request(mode: Mode, vpid: bool) -> ControlRequest {
    let mut sec_required = secondary::ENABLE_EPT;
    if let Mode::Pml = mode {
        sec_required |= secondary::ENABLE_PML;
    }
    let mut sec_wanted =
        secondary::ENABLE_RDTSCP | secondary::ENABLE_INVPCID | secondary::WBINVD_EXITING;
    if vpid {
        sec_wanted |= secondary::ENABLE_VPID;
    }
    ControlRequest {
        pin: Want {
            required: pin::EXTERNAL_INTERRUPT_EXITING | pin::NMI_EXITING,
            wanted: pin::ACTIVATE_PREEMPTION_TIMER,
        },
        primary: Want {
            required: primary::HLT_EXITING
                | primary::UNCONDITIONAL_IO_EXITING
                | primary::USE_MSR_BITMAPS
                | primary::ACTIVATE_SECONDARY_CONTROLS
                | primary::CR8_LOAD_EXITING
                | primary::CR8_STORE_EXITING
                | primary::MOV_DR_EXITING,
            wanted: 0,
        },
        secondary: Want {
            required: sec_required,
            wanted: sec_wanted,
        },
        exit: Want {
            required: exit::HOST_ADDRESS_SPACE_SIZE | exit::SAVE_IA32_EFER | exit::LOAD_IA32_EFER,
            wanted: exit::SAVE_IA32_PAT | exit::LOAD_IA32_PAT,
        },
        entry: Want {
            required: entry::IA32E_MODE_GUEST | entry::LOAD_IA32_EFER,
            wanted: entry::LOAD_IA32_PAT,
        },
    }
}

/// [`guest_request`] adjusted to the capabilities (SDM 31.5.1), or the required control the
/// processor does not allow.
pub const fn guest_controls(
    caps: &VmxCaps,
    mode: Mode,
    vpid: bool,
) -> Result<Controls, ControlError> {
    caps.adjust_controls(&guest_request(mode, vpid))
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
}

/// Fits `value` to the CR0/CR4 fixed bits (SDM A.7, A.8).
pub fn fix_cr(value: u64, fixed0: u64, fixed1: u64) -> u64 {
    (value | fixed0) & fixed1
}

use crate::regs::CR4_OSXSAVE;

/// The guest's IA32_PAT: the power-up value (SDM Vol. 3A 13.12.4, Table 13-12).
pub const GUEST_PAT: u64 = 0x0007_0406_0007_0406;

/// Programs the control, host-state and guest-state areas of `v` for a guest that starts in
/// `guest`.
pub fn program(
    v: &mut dyn VmcsAccess,
    caps: &VmxCaps,
    ctls: &Controls,
    host_state: &HostState,
    guest: &GuestState,
    cfg: &VcpuConfig,
) -> Result<(), VmcsError> {
    use Field as F;
    // Controls (SDM 25.6-25.8). "IA-32e mode guest" follows the guest's EFER.LMA (SDM
    // 27.3.1.1).
    let entry_ctls = if guest.long_mode() {
        ctls.entry | entry::IA32E_MODE_GUEST
    } else {
        ctls.entry & !entry::IA32E_MODE_GUEST
    };
    v.write(F::PinBasedControls, ctls.pin.into())?;
    v.write(F::PrimaryProcessorBasedControls, ctls.primary.into())?;
    v.write(F::SecondaryProcessorBasedControls, ctls.secondary.into())?;
    v.write(F::VmExitControls, ctls.exit.into())?;
    v.write(F::VmEntryControls, entry_ctls.into())?;
    v.write(F::ExceptionBitmap, 0)?;
    v.write(F::Cr3TargetCount, 0)?;
    v.write(F::VmExitMsrStoreCount, 0)?;
    v.write(F::VmExitMsrLoadCount, 0)?;
    v.write(F::VmEntryMsrLoadCount, 0)?;
    v.write(F::VmEntryInterruptionInformation, 0)?;
    v.write(F::MsrBitmapAddress, cfg.msr_bitmap)?;
    v.write(F::EptPointer, cfg.eptp)?;
    if ctls.secondary & secondary::ENABLE_VPID != 0 {
        v.write(F::VirtualProcessorId, cfg.vpid.into())?;
    }
    if ctls.secondary & secondary::ENABLE_PML != 0 {
        v.write(F::PmlAddress, cfg.pml_buffer)?;
        v.write(F::GuestPmlIndex, crate::dirty::pml::INDEX_RESET.into())?;
    }
    // The guest owns CR0 (the fixed bits are forced in GUEST_CR0). Host-owned CR4 bits (SDM
    // 25.6.6): those VMX fixes (VMXE, read as the shadow has it), and OSXSAVE: the guest cannot
    // set it (the MOV to CR4 exits), so it never runs with the host's XCR0 and extended state
    // (CPUID hides XSAVE, `vm::filter_cpuid`).
    v.write(F::Cr0GuestHostMask, 0)?;
    v.write(F::Cr4GuestHostMask, caps.cr4_fixed0 | CR4_OSXSAVE)?;

    program_host(v, ctls, host_state)?;

    // Guest-state area (SDM 25.4, checks in SDM 27.3.1).
    guest.write(v, ctls.entry & entry::LOAD_IA32_PAT != 0)?;
    v.write(F::GuestIa32Debugctl, 0)?;
    v.write(F::GuestInterruptibilityState, 0)?;
    v.write(F::GuestActivityState, 0)?;
    v.write(F::GuestPendingDebugExceptions, 0)?;
    v.write(F::VmcsLinkPointer, u64::MAX)?;
    Ok(())
}

/// Writes the host-state area from a snapshot of this CPU (SDM 25.5; checks in SDM 27.2.3).
/// HOST_RSP and HOST_RIP are written by the entry trampoline.
pub fn program_host(
    v: &mut dyn VmcsAccess,
    ctls: &Controls,
    host_state: &HostState,
) -> Result<(), VmcsError> {
    use Field as F;
    // Selectors with RPL=0 and TI=0 (SDM 27.2.3); DS/ES null (restored after the exit).
    let h = host_state;
    let sel = |s: u16| u64::from(if s & 7 == 0 { s } else { 0 });
    v.write(F::HostCr0, h.cr0)?;
    v.write(F::HostCr3, h.cr3)?;
    v.write(F::HostCr4, h.cr4)?;
    v.write(F::HostEsSelector, 0)?;
    v.write(F::HostCsSelector, sel(h.cs))?;
    v.write(F::HostSsSelector, sel(h.ss))?;
    v.write(F::HostDsSelector, 0)?;
    v.write(F::HostFsSelector, sel(h.fs))?;
    v.write(F::HostGsSelector, sel(h.gs))?;
    v.write(F::HostTrSelector, sel(h.tr))?;
    v.write(F::HostFsBase, h.fs_base)?;
    v.write(F::HostGsBase, h.gs_base)?;
    v.write(F::HostTrBase, h.tr_base)?;
    v.write(F::HostGdtrBase, h.gdtr.base)?;
    v.write(F::HostIdtrBase, h.idtr.base)?;
    v.write(F::HostIa32SysenterCs, h.sysenter_cs)?;
    v.write(F::HostIa32SysenterEsp, h.sysenter_esp)?;
    v.write(F::HostIa32SysenterEip, h.sysenter_eip)?;
    v.write(F::HostIa32Efer, h.efer)?;
    if ctls.exit & exit::LOAD_IA32_PAT != 0 {
        v.write(F::HostIa32Pat, h.pat)?;
    }
    Ok(())
}
