//! VMCS field encodings (SDM Vol. 3D Appendix B), one typed enum named after the SDM.
//!
//! Encodings come from the `x86` crate (`x86::vmx::vmcs`) where it has them; the rest are
//! written out with their Appendix B table. 64-bit fields are listed with their "full" encoding
//! (bit 0 = 0); the "high" encodings (bit 0 = 1, upper 32 bits) are reachable through
//! [`width_of_encoding`] only, since smudge runs on 64-bit hosts and never needs them.
//!
//! An encoding is a 32-bit value (SDM B, Table B-1 / 25-21 in older editions):
//! bit 0 access type (0 = full, 1 = high), bits 9:1 index, bits 11:10 type
//! (0 control, 1 VM-exit information, 2 guest state, 3 host state), bit 12 reserved,
//! bits 14:13 width (0 16-bit, 1 64-bit, 2 32-bit, 3 natural width).

use x86::vmx::vmcs::{control as c, guest as g, host as h, ro};

/// Width of a VMCS field, from bits 14:13 of its encoding (SDM B).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// 16-bit field.
    W16,
    /// 64-bit field (or the 32-bit "high" half when accessed with bit 0 = 1).
    W64,
    /// 32-bit field.
    W32,
    /// Natural width: 64 bits on processors that support Intel 64 (all smudge hosts).
    Natural,
}

impl Width {
    /// Number of value bits the field holds on a 64-bit processor.
    pub const fn bits(self) -> u32 {
        match self {
            Width::W16 => 16,
            Width::W32 => 32,
            Width::W64 | Width::Natural => 64,
        }
    }
    /// Mask of the bits the field keeps; a VMWRITE drops the others (SDM 31.3 VMWRITE).
    pub const fn mask(self) -> u64 {
        match self {
            Width::W16 => 0xFFFF,
            Width::W32 => 0xFFFF_FFFF,
            Width::W64 | Width::Natural => u64::MAX,
        }
    }
}

/// Kind of a VMCS field, from bits 11:10 of its encoding (SDM B).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// VM-execution, VM-exit and VM-entry control fields.
    Control,
    /// VM-exit information fields (read-only data).
    ExitInformation,
    /// Guest-state area.
    GuestState,
    /// Host-state area.
    HostState,
}

/// Width of any encoding, including a "high" access (bit 0 = 1 on a 64-bit field, which reads
/// bits 63:32 as a 32-bit value; SDM B.2).
pub const fn width_of_encoding(encoding: u32) -> Width {
    match (encoding >> 13) & 3 {
        0 => Width::W16,
        1 if encoding & 1 == 1 => Width::W32,
        1 => Width::W64,
        2 => Width::W32,
        _ => Width::Natural,
    }
}

/// Kind (bits 11:10) of any encoding.
pub const fn kind_of_encoding(encoding: u32) -> Kind {
    match (encoding >> 10) & 3 {
        0 => Kind::Control,
        1 => Kind::ExitInformation,
        2 => Kind::GuestState,
        _ => Kind::HostState,
    }
}

macro_rules! vmcs_fields {
    ($( $(#[$meta:meta])* $name:ident = $enc:expr, )*) => {
        /// A VMCS field (SDM Vol. 3D Appendix B). The discriminant is the field's encoding.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum Field {
            $( $(#[$meta])* $name = $enc, )*
        }

        /// Dense position of each field, for fixed-size storage (`VmcsImage`).
        #[allow(non_camel_case_types, dead_code)]
        #[derive(Clone, Copy)]
        enum Slot { $( $name, )* Count }

        impl Field {
            /// Every field smudge knows, in Appendix B order.
            pub const ALL: &'static [Field] = &[ $( Field::$name, )* ];
            /// Number of fields in [`Field::ALL`].
            pub const COUNT: usize = Slot::Count as usize;

            /// Dense index in `0..COUNT`.
            pub const fn slot(self) -> usize {
                match self { $( Field::$name => Slot::$name as usize, )* }
            }
            /// The SDM-style name of the field (the variant name).
            pub const fn name(self) -> &'static str {
                match self { $( Field::$name => stringify!($name), )* }
            }
        }
    };
}

vmcs_fields! {
    // ---- B.1.1 16-bit control fields ----
    /// Virtual-processor identifier (VPID).
    VirtualProcessorId = c::VPID,
    /// Posted-interrupt notification vector.
    PostedInterruptNotificationVector = c::POSTED_INTERRUPT_NOTIFICATION_VECTOR,
    /// EPTP index.
    EptpIndex = c::EPTP_INDEX,
    // ---- B.1.2 16-bit guest-state fields ----
    /// Guest ES selector.
    GuestEsSelector = g::ES_SELECTOR,
    /// Guest CS selector.
    GuestCsSelector = g::CS_SELECTOR,
    /// Guest SS selector.
    GuestSsSelector = g::SS_SELECTOR,
    /// Guest DS selector.
    GuestDsSelector = g::DS_SELECTOR,
    /// Guest FS selector.
    GuestFsSelector = g::FS_SELECTOR,
    /// Guest GS selector.
    GuestGsSelector = g::GS_SELECTOR,
    /// Guest LDTR selector.
    GuestLdtrSelector = g::LDTR_SELECTOR,
    /// Guest TR selector.
    GuestTrSelector = g::TR_SELECTOR,
    /// Guest interrupt status (virtual-interrupt delivery).
    GuestInterruptStatus = g::INTERRUPT_STATUS,
    /// PML index.
    GuestPmlIndex = g::PML_INDEX,
    // ---- B.1.3 16-bit host-state fields ----
    /// Host ES selector.
    HostEsSelector = h::ES_SELECTOR,
    /// Host CS selector.
    HostCsSelector = h::CS_SELECTOR,
    /// Host SS selector.
    HostSsSelector = h::SS_SELECTOR,
    /// Host DS selector.
    HostDsSelector = h::DS_SELECTOR,
    /// Host FS selector.
    HostFsSelector = h::FS_SELECTOR,
    /// Host GS selector.
    HostGsSelector = h::GS_SELECTOR,
    /// Host TR selector.
    HostTrSelector = h::TR_SELECTOR,
    // ---- B.2.1 64-bit control fields ----
    /// Address of I/O bitmap A.
    IoBitmapAAddress = c::IO_BITMAP_A_ADDR_FULL,
    /// Address of I/O bitmap B.
    IoBitmapBAddress = c::IO_BITMAP_B_ADDR_FULL,
    /// Address of MSR bitmaps.
    MsrBitmapAddress = c::MSR_BITMAPS_ADDR_FULL,
    /// VM-exit MSR-store address.
    VmExitMsrStoreAddress = c::VMEXIT_MSR_STORE_ADDR_FULL,
    /// VM-exit MSR-load address.
    VmExitMsrLoadAddress = c::VMEXIT_MSR_LOAD_ADDR_FULL,
    /// VM-entry MSR-load address.
    VmEntryMsrLoadAddress = c::VMENTRY_MSR_LOAD_ADDR_FULL,
    /// Executive-VMCS pointer.
    ExecutiveVmcsPointer = c::EXECUTIVE_VMCS_PTR_FULL,
    /// PML address.
    PmlAddress = c::PML_ADDR_FULL,
    /// TSC offset.
    TscOffset = c::TSC_OFFSET_FULL,
    /// Virtual-APIC address.
    VirtualApicAddress = c::VIRT_APIC_ADDR_FULL,
    /// APIC-access address.
    ApicAccessAddress = c::APIC_ACCESS_ADDR_FULL,
    /// Posted-interrupt descriptor address.
    PostedInterruptDescriptorAddress = c::POSTED_INTERRUPT_DESC_ADDR_FULL,
    /// VM-function controls.
    VmFunctionControls = c::VM_FUNCTION_CONTROLS_FULL,
    /// EPT pointer (EPTP).
    EptPointer = c::EPTP_FULL,
    /// EOI-exit bitmap 0.
    EoiExitBitmap0 = c::EOI_EXIT0_FULL,
    /// EOI-exit bitmap 1.
    EoiExitBitmap1 = c::EOI_EXIT1_FULL,
    /// EOI-exit bitmap 2.
    EoiExitBitmap2 = c::EOI_EXIT2_FULL,
    /// EOI-exit bitmap 3.
    EoiExitBitmap3 = c::EOI_EXIT3_FULL,
    /// EPTP-list address.
    EptpListAddress = c::EPTP_LIST_ADDR_FULL,
    /// VMREAD-bitmap address.
    VmreadBitmapAddress = c::VMREAD_BITMAP_ADDR_FULL,
    /// VMWRITE-bitmap address.
    VmwriteBitmapAddress = c::VMWRITE_BITMAP_ADDR_FULL,
    /// Virtualization-exception information address.
    VirtualizationExceptionInformationAddress = c::VIRT_EXCEPTION_INFO_ADDR_FULL,
    /// XSS-exiting bitmap.
    XssExitingBitmap = c::XSS_EXITING_BITMAP_FULL,
    /// ENCLS-exiting bitmap.
    EnclsExitingBitmap = c::ENCLS_EXITING_BITMAP_FULL,
    /// Sub-page-permission-table pointer (SPPTP).
    SubPagePermissionTablePointer = c::SUBPAGE_PERM_TABLE_PTR_FULL,
    /// TSC multiplier.
    TscMultiplier = c::TSC_MULTIPLIER_FULL,
    /// Tertiary processor-based VM-execution controls (not in x86 0.52; SDM B.2.1).
    TertiaryProcessorBasedControls = 0x2034,
    /// ENCLV-exiting bitmap (not in x86 0.52; SDM B.2.1).
    EnclvExitingBitmap = 0x2036,
    // ---- B.2.2 64-bit read-only data fields ----
    /// Guest-physical address (EPT violations and misconfigurations).
    GuestPhysicalAddress = ro::GUEST_PHYSICAL_ADDR_FULL,
    // ---- B.2.3 64-bit guest-state fields ----
    /// VMCS link pointer.
    VmcsLinkPointer = g::LINK_PTR_FULL,
    /// Guest IA32_DEBUGCTL.
    GuestIa32Debugctl = g::IA32_DEBUGCTL_FULL,
    /// Guest IA32_PAT.
    GuestIa32Pat = g::IA32_PAT_FULL,
    /// Guest IA32_EFER.
    GuestIa32Efer = g::IA32_EFER_FULL,
    /// Guest IA32_PERF_GLOBAL_CTRL.
    GuestIa32PerfGlobalCtrl = g::IA32_PERF_GLOBAL_CTRL_FULL,
    /// Guest PDPTE0.
    GuestPdpte0 = g::PDPTE0_FULL,
    /// Guest PDPTE1.
    GuestPdpte1 = g::PDPTE1_FULL,
    /// Guest PDPTE2.
    GuestPdpte2 = g::PDPTE2_FULL,
    /// Guest PDPTE3.
    GuestPdpte3 = g::PDPTE3_FULL,
    /// Guest IA32_BNDCFGS.
    GuestIa32Bndcfgs = g::IA32_BNDCFGS_FULL,
    /// Guest IA32_RTIT_CTL.
    GuestIa32RtitCtl = g::IA32_RTIT_CTL_FULL,
    /// Guest IA32_LBR_CTL (not in x86 0.52; SDM B.2.3).
    GuestIa32LbrCtl = 0x2816,
    /// Guest IA32_PKRS (not in x86 0.52; SDM B.2.3).
    GuestIa32Pkrs = 0x2818,
    // ---- B.2.4 64-bit host-state fields ----
    /// Host IA32_PAT.
    HostIa32Pat = h::IA32_PAT_FULL,
    /// Host IA32_EFER.
    HostIa32Efer = h::IA32_EFER_FULL,
    /// Host IA32_PERF_GLOBAL_CTRL.
    HostIa32PerfGlobalCtrl = h::IA32_PERF_GLOBAL_CTRL_FULL,
    /// Host IA32_PKRS (not in x86 0.52; SDM B.2.4).
    HostIa32Pkrs = 0x2C06,
    // ---- B.3.1 32-bit control fields ----
    /// Pin-based VM-execution controls.
    PinBasedControls = c::PINBASED_EXEC_CONTROLS,
    /// Primary processor-based VM-execution controls.
    PrimaryProcessorBasedControls = c::PRIMARY_PROCBASED_EXEC_CONTROLS,
    /// Exception bitmap.
    ExceptionBitmap = c::EXCEPTION_BITMAP,
    /// Page-fault error-code mask.
    PageFaultErrorCodeMask = c::PAGE_FAULT_ERR_CODE_MASK,
    /// Page-fault error-code match.
    PageFaultErrorCodeMatch = c::PAGE_FAULT_ERR_CODE_MATCH,
    /// CR3-target count.
    Cr3TargetCount = c::CR3_TARGET_COUNT,
    /// Primary VM-exit controls.
    VmExitControls = c::VMEXIT_CONTROLS,
    /// VM-exit MSR-store count.
    VmExitMsrStoreCount = c::VMEXIT_MSR_STORE_COUNT,
    /// VM-exit MSR-load count.
    VmExitMsrLoadCount = c::VMEXIT_MSR_LOAD_COUNT,
    /// VM-entry controls.
    VmEntryControls = c::VMENTRY_CONTROLS,
    /// VM-entry MSR-load count.
    VmEntryMsrLoadCount = c::VMENTRY_MSR_LOAD_COUNT,
    /// VM-entry interruption-information field.
    VmEntryInterruptionInformation = c::VMENTRY_INTERRUPTION_INFO_FIELD,
    /// VM-entry exception error code.
    VmEntryExceptionErrorCode = c::VMENTRY_EXCEPTION_ERR_CODE,
    /// VM-entry instruction length.
    VmEntryInstructionLength = c::VMENTRY_INSTRUCTION_LEN,
    /// TPR threshold.
    TprThreshold = c::TPR_THRESHOLD,
    /// Secondary processor-based VM-execution controls.
    SecondaryProcessorBasedControls = c::SECONDARY_PROCBASED_EXEC_CONTROLS,
    /// PLE_Gap.
    PleGap = c::PLE_GAP,
    /// PLE_Window.
    PleWindow = c::PLE_WINDOW,
    // ---- B.3.2 32-bit read-only data fields ----
    /// VM-instruction error.
    VmInstructionError = ro::VM_INSTRUCTION_ERROR,
    /// Exit reason.
    ExitReason = ro::EXIT_REASON,
    /// VM-exit interruption information.
    VmExitInterruptionInformation = ro::VMEXIT_INTERRUPTION_INFO,
    /// VM-exit interruption error code.
    VmExitInterruptionErrorCode = ro::VMEXIT_INTERRUPTION_ERR_CODE,
    /// IDT-vectoring information field.
    IdtVectoringInformation = ro::IDT_VECTORING_INFO,
    /// IDT-vectoring error code.
    IdtVectoringErrorCode = ro::IDT_VECTORING_ERR_CODE,
    /// VM-exit instruction length.
    VmExitInstructionLength = ro::VMEXIT_INSTRUCTION_LEN,
    /// VM-exit instruction information.
    VmExitInstructionInformation = ro::VMEXIT_INSTRUCTION_INFO,
    // ---- B.3.3 32-bit guest-state fields ----
    /// Guest ES limit.
    GuestEsLimit = g::ES_LIMIT,
    /// Guest CS limit.
    GuestCsLimit = g::CS_LIMIT,
    /// Guest SS limit.
    GuestSsLimit = g::SS_LIMIT,
    /// Guest DS limit.
    GuestDsLimit = g::DS_LIMIT,
    /// Guest FS limit.
    GuestFsLimit = g::FS_LIMIT,
    /// Guest GS limit.
    GuestGsLimit = g::GS_LIMIT,
    /// Guest LDTR limit.
    GuestLdtrLimit = g::LDTR_LIMIT,
    /// Guest TR limit.
    GuestTrLimit = g::TR_LIMIT,
    /// Guest GDTR limit.
    GuestGdtrLimit = g::GDTR_LIMIT,
    /// Guest IDTR limit.
    GuestIdtrLimit = g::IDTR_LIMIT,
    /// Guest ES access rights.
    GuestEsAccessRights = g::ES_ACCESS_RIGHTS,
    /// Guest CS access rights.
    GuestCsAccessRights = g::CS_ACCESS_RIGHTS,
    /// Guest SS access rights.
    GuestSsAccessRights = g::SS_ACCESS_RIGHTS,
    /// Guest DS access rights.
    GuestDsAccessRights = g::DS_ACCESS_RIGHTS,
    /// Guest FS access rights.
    GuestFsAccessRights = g::FS_ACCESS_RIGHTS,
    /// Guest GS access rights.
    GuestGsAccessRights = g::GS_ACCESS_RIGHTS,
    /// Guest LDTR access rights.
    GuestLdtrAccessRights = g::LDTR_ACCESS_RIGHTS,
    /// Guest TR access rights.
    GuestTrAccessRights = g::TR_ACCESS_RIGHTS,
    /// Guest interruptibility state.
    GuestInterruptibilityState = g::INTERRUPTIBILITY_STATE,
    /// Guest activity state.
    GuestActivityState = g::ACTIVITY_STATE,
    /// Guest SMBASE.
    GuestSmbase = g::SMBASE,
    /// Guest IA32_SYSENTER_CS.
    GuestIa32SysenterCs = g::IA32_SYSENTER_CS,
    /// VMX-preemption timer value.
    VmxPreemptionTimerValue = g::VMX_PREEMPTION_TIMER_VALUE,
    // ---- B.3.4 32-bit host-state field ----
    /// Host IA32_SYSENTER_CS.
    HostIa32SysenterCs = h::IA32_SYSENTER_CS,
    // ---- B.4.1 natural-width control fields ----
    /// CR0 guest/host mask.
    Cr0GuestHostMask = c::CR0_GUEST_HOST_MASK,
    /// CR4 guest/host mask.
    Cr4GuestHostMask = c::CR4_GUEST_HOST_MASK,
    /// CR0 read shadow.
    Cr0ReadShadow = c::CR0_READ_SHADOW,
    /// CR4 read shadow.
    Cr4ReadShadow = c::CR4_READ_SHADOW,
    /// CR3-target value 0.
    Cr3TargetValue0 = c::CR3_TARGET_VALUE0,
    /// CR3-target value 1.
    Cr3TargetValue1 = c::CR3_TARGET_VALUE1,
    /// CR3-target value 2.
    Cr3TargetValue2 = c::CR3_TARGET_VALUE2,
    /// CR3-target value 3.
    Cr3TargetValue3 = c::CR3_TARGET_VALUE3,
    // ---- B.4.2 natural-width read-only data fields ----
    /// Exit qualification.
    ExitQualification = ro::EXIT_QUALIFICATION,
    /// I/O RCX.
    IoRcx = ro::IO_RCX,
    /// I/O RSI.
    IoRsi = ro::IO_RSI,
    /// I/O RDI.
    IoRdi = ro::IO_RDI,
    /// I/O RIP.
    IoRip = ro::IO_RIP,
    /// Guest-linear address.
    GuestLinearAddress = ro::GUEST_LINEAR_ADDR,
    // ---- B.4.3 natural-width guest-state fields ----
    /// Guest CR0.
    GuestCr0 = g::CR0,
    /// Guest CR3.
    GuestCr3 = g::CR3,
    /// Guest CR4.
    GuestCr4 = g::CR4,
    /// Guest ES base.
    GuestEsBase = g::ES_BASE,
    /// Guest CS base.
    GuestCsBase = g::CS_BASE,
    /// Guest SS base.
    GuestSsBase = g::SS_BASE,
    /// Guest DS base.
    GuestDsBase = g::DS_BASE,
    /// Guest FS base.
    GuestFsBase = g::FS_BASE,
    /// Guest GS base.
    GuestGsBase = g::GS_BASE,
    /// Guest LDTR base.
    GuestLdtrBase = g::LDTR_BASE,
    /// Guest TR base.
    GuestTrBase = g::TR_BASE,
    /// Guest GDTR base.
    GuestGdtrBase = g::GDTR_BASE,
    /// Guest IDTR base.
    GuestIdtrBase = g::IDTR_BASE,
    /// Guest DR7.
    GuestDr7 = g::DR7,
    /// Guest RSP.
    GuestRsp = g::RSP,
    /// Guest RIP.
    GuestRip = g::RIP,
    /// Guest RFLAGS.
    GuestRflags = g::RFLAGS,
    /// Guest pending debug exceptions.
    GuestPendingDebugExceptions = g::PENDING_DBG_EXCEPTIONS,
    /// Guest IA32_SYSENTER_ESP.
    GuestIa32SysenterEsp = g::IA32_SYSENTER_ESP,
    /// Guest IA32_SYSENTER_EIP.
    GuestIa32SysenterEip = g::IA32_SYSENTER_EIP,
    /// Guest IA32_S_CET (not in x86 0.52; SDM B.4.3).
    GuestIa32SCet = 0x6828,
    /// Guest SSP (not in x86 0.52; SDM B.4.3).
    GuestSsp = 0x682A,
    /// Guest IA32_INTERRUPT_SSP_TABLE_ADDR (not in x86 0.52; SDM B.4.3).
    GuestIa32InterruptSspTableAddr = 0x682C,
    // ---- B.4.4 natural-width host-state fields ----
    /// Host CR0.
    HostCr0 = h::CR0,
    /// Host CR3.
    HostCr3 = h::CR3,
    /// Host CR4.
    HostCr4 = h::CR4,
    /// Host FS base.
    HostFsBase = h::FS_BASE,
    /// Host GS base.
    HostGsBase = h::GS_BASE,
    /// Host TR base.
    HostTrBase = h::TR_BASE,
    /// Host GDTR base.
    HostGdtrBase = h::GDTR_BASE,
    /// Host IDTR base.
    HostIdtrBase = h::IDTR_BASE,
    /// Host IA32_SYSENTER_ESP.
    HostIa32SysenterEsp = h::IA32_SYSENTER_ESP,
    /// Host IA32_SYSENTER_EIP.
    HostIa32SysenterEip = h::IA32_SYSENTER_EIP,
    /// Host RSP.
    HostRsp = h::RSP,
    /// Host RIP.
    HostRip = h::RIP,
    /// Host IA32_S_CET (not in x86 0.52; SDM B.4.4).
    HostIa32SCet = 0x6C18,
    /// Host SSP (not in x86 0.52; SDM B.4.4).
    HostSsp = 0x6C1A,
    /// Host IA32_INTERRUPT_SSP_TABLE_ADDR (not in x86 0.52; SDM B.4.4).
    HostIa32InterruptSspTableAddr = 0x6C1C,
}

impl Field {
    /// The field's 32-bit encoding (full access).
    pub const fn encoding(self) -> u32 {
        self as u32
    }
    /// Width from encoding bits 14:13.
    pub const fn width(self) -> Width {
        width_of_encoding(self.encoding())
    }
    /// Kind from encoding bits 11:10.
    pub const fn kind(self) -> Kind {
        kind_of_encoding(self.encoding())
    }
    /// The field with this (full-access) encoding, if smudge knows it.
    pub fn from_encoding(encoding: u32) -> Option<Field> {
        Field::ALL
            .iter()
            .copied()
            .find(|f| f.encoding() == encoding)
    }
}

impl core::fmt::Display for Field {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} ({:#06x})", self.name(), self.encoding())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Widths and kinds checked against the SDM Appendix B tables the fields are listed in,
    // not against the decoding function.
    #[test]
    fn widths_match_appendix_b_tables() {
        assert_eq!(Field::GuestPmlIndex.width(), Width::W16); // B.1.2
        assert_eq!(Field::VirtualProcessorId.width(), Width::W16); // B.1.1
        assert_eq!(Field::PmlAddress.width(), Width::W64); // B.2.1
        assert_eq!(Field::GuestPhysicalAddress.width(), Width::W64); // B.2.2
        assert_eq!(Field::VmcsLinkPointer.width(), Width::W64); // B.2.3
        assert_eq!(Field::VmInstructionError.width(), Width::W32); // B.3.2
        assert_eq!(Field::VmxPreemptionTimerValue.width(), Width::W32); // B.3.3
        assert_eq!(Field::ExitQualification.width(), Width::Natural); // B.4.2
        assert_eq!(Field::GuestRip.width(), Width::Natural); // B.4.3
        assert_eq!(Field::HostCr3.width(), Width::Natural); // B.4.4
        assert_eq!(Field::ExitReason.kind(), Kind::ExitInformation);
        assert_eq!(Field::GuestCr0.kind(), Kind::GuestState);
        assert_eq!(Field::HostRip.kind(), Kind::HostState);
        assert_eq!(Field::EptPointer.kind(), Kind::Control);
        // A high access of a 64-bit field is a 32-bit access (SDM B.2).
        assert_eq!(width_of_encoding(0x200F), Width::W32);
    }

    #[test]
    fn encodings_named_in_the_brief() {
        assert_eq!(Field::PmlAddress.encoding(), 0x200E);
        assert_eq!(Field::GuestPmlIndex.encoding(), 0x0812);
        assert_eq!(Field::VmInstructionError.encoding(), 0x4400);
        assert_eq!(Field::ExitReason.encoding(), 0x4402);
        assert_eq!(Field::ExitQualification.encoding(), 0x6400);
        assert_eq!(Field::GuestPhysicalAddress.encoding(), 0x2400);
        assert_eq!(Field::VmxPreemptionTimerValue.encoding(), 0x482E);
    }

    #[test]
    fn encodings_are_unique_full_access_and_have_no_reserved_bits() {
        for (i, a) in Field::ALL.iter().enumerate() {
            assert_eq!(a.slot(), i);
            assert_eq!(a.encoding() & 1, 0, "{a} is a high access");
            // Bit 12 and bits 31:15 are reserved in an encoding (SDM B).
            assert_eq!(a.encoding() & !0x6FFF, 0, "{a} sets reserved encoding bits");
            assert_eq!(Field::from_encoding(a.encoding()), Some(*a));
            for b in Field::ALL.iter().skip(i + 1) {
                assert_ne!(a.encoding(), b.encoding(), "{a} and {b}");
            }
        }
        assert_eq!(Field::from_encoding(0x0001), None);
    }
}
