//! VMX capability MSRs (SDM Vol. 3D Appendix A) decoded into one typed struct, the control
//! adjustment of SDM 31.5.1, and the choice of the dirty-tracking mode.

use core::fmt;

use crate::dirty::Mode;
use crate::ept::EptFeatures;

/// The allowed settings of one VM-execution/exit/entry control field (SDM A.3-A.5):
/// bits 31:0 of the MSR are the allowed 0-settings (a 1 there means the control must be 1),
/// bits 63:32 the allowed 1-settings (a 0 there means the control must be 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ctls {
    /// Controls that must be 1 (MSR bits 31:0).
    pub must_be_1: u32,
    /// Controls that may be 1 (MSR bits 63:32).
    pub may_be_1: u32,
}

impl Ctls {
    /// Decodes a capability MSR value.
    pub const fn from_msr(v: u64) -> Ctls {
        Ctls {
            must_be_1: v as u32,
            may_be_1: (v >> 32) as u32,
        }
    }
    /// True if `value` respects both the allowed-0 and allowed-1 settings.
    pub const fn valid(&self, value: u32) -> bool {
        value & self.must_be_1 == self.must_be_1 && value & !self.may_be_1 == 0
    }
    /// True if control bit `bit` may be set.
    pub const fn allows(&self, bit: u32) -> bool {
        self.may_be_1 & (1 << bit) != 0
    }
}

/// Everything the processor reports about VMX, as the hypervisor needs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxCaps {
    /// IA32_VMX_BASIC (0x480).
    pub basic: u64,
    /// Pin-based controls (IA32_VMX_TRUE_PINBASED_CTLS 0x48D when BASIC bit 55, else 0x481).
    pub pinbased: Ctls,
    /// Primary processor-based controls (0x48E or 0x482).
    pub procbased: Ctls,
    /// Secondary processor-based controls (0x48B; all-zero when the primary control bit 31 is not allowed).
    pub procbased2: Ctls,
    /// VM-exit controls (0x48F or 0x483).
    pub exit: Ctls,
    /// VM-entry controls (0x490 or 0x484).
    pub entry: Ctls,
    /// IA32_VMX_MISC (0x485).
    pub misc: u64,
    /// IA32_VMX_CR0_FIXED0 (0x486): CR0 bits that must be 1.
    pub cr0_fixed0: u64,
    /// IA32_VMX_CR0_FIXED1 (0x487): CR0 bits that may be 1.
    pub cr0_fixed1: u64,
    /// IA32_VMX_CR4_FIXED0 (0x488).
    pub cr4_fixed0: u64,
    /// IA32_VMX_CR4_FIXED1 (0x489).
    pub cr4_fixed1: u64,
    /// IA32_VMX_EPT_VPID_CAP (0x48C), 0 when absent.
    pub ept_vpid_cap: u64,
    /// IA32_VMX_VMFUNC (0x491), 0 when absent.
    pub vmfunc: u64,
    /// MAXPHYADDR (CPUID.80000008H:EAX[7:0]), 36 when unknown.
    pub max_phys_bits: u8,
    /// CPUID.1:ECX.VMX[bit 5]; `None` when unknown (a dump without CPUID).
    pub cpuid_vmx: Option<bool>,
    /// IA32_FEATURE_CONTROL (0x3A) as read.
    pub feature_control: MsrValue,
    /// The first capability MSR that had to be read but was absent or unknown (its field is 0).
    pub unreadable: Option<UnreadableMsr>,
}

// ---------------------------------------------------------------------------------------------
// Reading the capabilities
// ---------------------------------------------------------------------------------------------

/// MSR numbers (SDM Vol. 4 "Model-Specific Registers"; Vol. 3D Appendix A).
pub mod msr {
    /// IA32_FEATURE_CONTROL: bit 0 lock, bit 2 enable VMX outside SMX (SDM 24.7).
    pub const IA32_FEATURE_CONTROL: u32 = 0x3A;
    /// IA32_VMX_BASIC (A.1).
    pub const IA32_VMX_BASIC: u32 = 0x480;
    /// IA32_VMX_PINBASED_CTLS (A.3.1).
    pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
    /// IA32_VMX_PROCBASED_CTLS (A.3.2).
    pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
    /// IA32_VMX_EXIT_CTLS (A.4.1).
    pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
    /// IA32_VMX_ENTRY_CTLS (A.5).
    pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
    /// IA32_VMX_MISC (A.6).
    pub const IA32_VMX_MISC: u32 = 0x485;
    /// IA32_VMX_CR0_FIXED0 (A.7).
    pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
    /// IA32_VMX_CR0_FIXED1 (A.7).
    pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
    /// IA32_VMX_CR4_FIXED0 (A.8).
    pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
    /// IA32_VMX_CR4_FIXED1 (A.8).
    pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
    /// IA32_VMX_VMCS_ENUM (A.9).
    pub const IA32_VMX_VMCS_ENUM: u32 = 0x48A;
    /// IA32_VMX_PROCBASED_CTLS2 (A.3.3), only if primary allowed-1 bit 31 (MSR bit 63).
    pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
    /// IA32_VMX_EPT_VPID_CAP (A.10), only if secondary allowed-1 bit 1 (EPT) or bit 5 (VPID).
    pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48C;
    /// IA32_VMX_TRUE_PINBASED_CTLS (A.3.1), only if IA32_VMX_BASIC bit 55.
    pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48D;
    /// IA32_VMX_TRUE_PROCBASED_CTLS (A.3.2), only if IA32_VMX_BASIC bit 55.
    pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48E;
    /// IA32_VMX_TRUE_EXIT_CTLS (A.4.1), only if IA32_VMX_BASIC bit 55.
    pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48F;
    /// IA32_VMX_TRUE_ENTRY_CTLS (A.5), only if IA32_VMX_BASIC bit 55.
    pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
    /// IA32_VMX_VMFUNC (A.11), only if secondary allowed-1 bit 13 (enable VM functions).
    pub const IA32_VMX_VMFUNC: u32 = 0x491;
    /// IA32_VMX_PROCBASED_CTLS3 (A.3.4), tertiary controls.
    pub const IA32_VMX_PROCBASED_CTLS3: u32 = 0x492;
    /// IA32_VMX_EXIT_CTLS2 (A.4.2), secondary exit controls.
    pub const IA32_VMX_EXIT_CTLS2: u32 = 0x493;

    /// The SDM name of an MSR smudge reads, or "MSR" for others.
    pub const fn name(msr: u32) -> &'static str {
        match msr {
            IA32_FEATURE_CONTROL => "IA32_FEATURE_CONTROL",
            IA32_VMX_BASIC => "IA32_VMX_BASIC",
            IA32_VMX_PINBASED_CTLS => "IA32_VMX_PINBASED_CTLS",
            IA32_VMX_PROCBASED_CTLS => "IA32_VMX_PROCBASED_CTLS",
            IA32_VMX_EXIT_CTLS => "IA32_VMX_EXIT_CTLS",
            IA32_VMX_ENTRY_CTLS => "IA32_VMX_ENTRY_CTLS",
            IA32_VMX_MISC => "IA32_VMX_MISC",
            IA32_VMX_CR0_FIXED0 => "IA32_VMX_CR0_FIXED0",
            IA32_VMX_CR0_FIXED1 => "IA32_VMX_CR0_FIXED1",
            IA32_VMX_CR4_FIXED0 => "IA32_VMX_CR4_FIXED0",
            IA32_VMX_CR4_FIXED1 => "IA32_VMX_CR4_FIXED1",
            IA32_VMX_VMCS_ENUM => "IA32_VMX_VMCS_ENUM",
            IA32_VMX_PROCBASED_CTLS2 => "IA32_VMX_PROCBASED_CTLS2",
            IA32_VMX_EPT_VPID_CAP => "IA32_VMX_EPT_VPID_CAP",
            IA32_VMX_TRUE_PINBASED_CTLS => "IA32_VMX_TRUE_PINBASED_CTLS",
            IA32_VMX_TRUE_PROCBASED_CTLS => "IA32_VMX_TRUE_PROCBASED_CTLS",
            IA32_VMX_TRUE_EXIT_CTLS => "IA32_VMX_TRUE_EXIT_CTLS",
            IA32_VMX_TRUE_ENTRY_CTLS => "IA32_VMX_TRUE_ENTRY_CTLS",
            IA32_VMX_VMFUNC => "IA32_VMX_VMFUNC",
            IA32_VMX_PROCBASED_CTLS3 => "IA32_VMX_PROCBASED_CTLS3",
            IA32_VMX_EXIT_CTLS2 => "IA32_VMX_EXIT_CTLS2",
            _ => "MSR",
        }
    }
}

/// The result of reading one MSR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MsrValue {
    /// The read succeeded.
    Value(u64),
    /// The read raised #GP: the processor does not implement the MSR.
    Absent,
    /// Nobody knows: a dump that does not list the MSR. Never produced by a live read.
    #[default]
    Unknown,
}

impl MsrValue {
    /// The value, if the read succeeded.
    pub const fn value(self) -> Option<u64> {
        match self {
            MsrValue::Value(v) => Some(v),
            MsrValue::Absent | MsrValue::Unknown => None,
        }
    }
}

/// The four output registers of one CPUID leaf/subleaf.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidRegs {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

impl CpuidRegs {
    /// CPUID(leaf, subleaf) on the processor the caller runs on.
    pub fn of_this_cpu(leaf: u32, subleaf: u32) -> CpuidRegs {
        let [eax, ebx, ecx, edx] = crate::arch::cpuid(leaf, subleaf);
        CpuidRegs { eax, ebx, ecx, edx }
    }
}

/// A VMX MSR that the capabilities need but could not be read. The first one met is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnreadableMsr {
    /// MSR number.
    pub msr: u32,
    /// `Absent` (#GP) or `Unknown` (not in the dump).
    pub state: MsrValue,
}

/// Bits of IA32_VMX_BASIC (SDM A.1 "Basic VMX Information").
pub mod basic {
    /// Bits 30:0: VMCS revision identifier.
    pub const REVISION_MASK: u64 = 0x7fff_ffff;
    /// Bits 44:32: bytes to allocate for the VMXON region and any VMCS region.
    pub const REGION_SIZE_SHIFT: u32 = 32;
    /// Width of the region size field (bits 44:32).
    pub const REGION_SIZE_MASK: u64 = 0x1fff;
    /// Bit 48: VMXON, VMCS and other structure addresses are limited to 32 bits.
    pub const PHYS_ADDR_32: u64 = 1 << 48;
    /// Bits 53:50: memory type of the VMCS and the structures it points to (6 = WB).
    pub const MEMORY_TYPE_SHIFT: u32 = 50;
    /// Bit 54: VM exits due to INS/OUTS report instruction information.
    pub const INS_OUTS_INFO: u64 = 1 << 54;
    /// Bit 55: the default1 controls may be 0; the TRUE_* MSRs exist (A.2).
    pub const TRUE_CTLS: u64 = 1 << 55;
    /// Bit 56: VM entry may deliver a hardware exception with or without an error code,
    /// whatever the vector (SDM 27.2.1.3).
    pub const ENTRY_EXCEPTION_ANY_ERROR_CODE: u64 = 1 << 56;
}

/// Bits of IA32_VMX_MISC (SDM A.6 "Miscellaneous Data").
pub mod misc {
    /// Bits 4:0: the VMX-preemption timer counts down by 1 every 2^X TSC ticks.
    pub const PREEMPTION_TIMER_RATE_MASK: u64 = 0x1f;
    /// Bit 5: VM exits store EFER.LMA into the "IA-32e mode guest" entry control.
    pub const STORES_EFER_LMA: u64 = 1 << 5;
    /// Bit 6: activity state HLT supported.
    pub const ACTIVITY_HLT: u64 = 1 << 6;
    /// Bit 7: activity state shutdown supported.
    pub const ACTIVITY_SHUTDOWN: u64 = 1 << 7;
    /// Bit 8: activity state wait-for-SIPI supported.
    pub const ACTIVITY_WAIT_SIPI: u64 = 1 << 8;
    /// Bits 24:16: number of CR3-target values.
    pub const CR3_TARGETS_SHIFT: u32 = 16;
    /// Bits 27:25: N, where 512 * (N + 1) is the recommended maximum MSR-list length.
    pub const MAX_MSR_LIST_SHIFT: u32 = 25;
    /// Bit 29: VMWRITE may write every VMCS field, exit-information fields included.
    pub const VMWRITE_ANY_FIELD: u64 = 1 << 29;
}

/// Bits of IA32_VMX_EPT_VPID_CAP (SDM A.10 "VPID and EPT Capabilities").
pub mod ept_cap {
    /// Bit 0: execute-only translations.
    pub const EXECUTE_ONLY: u64 = 1 << 0;
    /// Bit 6: page-walk length of 4.
    pub const WALK_4: u64 = 1 << 6;
    /// Bit 7: page-walk length of 5.
    pub const WALK_5: u64 = 1 << 7;
    /// Bit 8: the EPT paging structures may be UC.
    pub const MEMORY_TYPE_UC: u64 = 1 << 8;
    /// Bit 14: the EPT paging structures may be WB.
    pub const MEMORY_TYPE_WB: u64 = 1 << 14;
    /// Bit 16: 2 MiB pages (EPT PDE bit 7).
    pub const LARGE_2M: u64 = 1 << 16;
    /// Bit 17: 1 GiB pages (EPT PDPTE bit 7).
    pub const LARGE_1G: u64 = 1 << 17;
    /// Bit 20: INVEPT supported.
    pub const INVEPT: u64 = 1 << 20;
    /// Bit 21: accessed and dirty flags for EPT (SDM 29.3.5).
    pub const AD: u64 = 1 << 21;
    /// Bit 22: advanced VM-exit information for EPT violations.
    pub const ADVANCED_EXIT_INFO: u64 = 1 << 22;
    /// Bit 23: supervisor shadow-stack control.
    pub const SUPERVISOR_SHADOW_STACK: u64 = 1 << 23;
    /// Bit 25: single-context INVEPT.
    pub const INVEPT_SINGLE: u64 = 1 << 25;
    /// Bit 26: all-context INVEPT.
    pub const INVEPT_ALL: u64 = 1 << 26;
    /// Bit 32: INVVPID supported.
    pub const INVVPID: u64 = 1 << 32;
    /// Bit 40: individual-address INVVPID.
    pub const INVVPID_ADDRESS: u64 = 1 << 40;
    /// Bit 41: single-context INVVPID.
    pub const INVVPID_SINGLE: u64 = 1 << 41;
    /// Bit 42: all-context INVVPID.
    pub const INVVPID_ALL: u64 = 1 << 42;
    /// Bit 43: single-context-retaining-globals INVVPID.
    pub const INVVPID_SINGLE_RETAIN_GLOBALS: u64 = 1 << 43;
}

/// IA32_FEATURE_CONTROL bits (SDM 24.7 "Enabling and Entering VMX Operation").
pub mod feature_control {
    /// Bit 0: lock; once set, writes #GP until reset, and VMXON #GPs while it is clear.
    pub const LOCK: u64 = 1 << 0;
    /// Bit 1: enable VMX inside SMX operation.
    pub const VMX_INSIDE_SMX: u64 = 1 << 1;
    /// Bit 2: enable VMX outside SMX operation.
    pub const VMX_OUTSIDE_SMX: u64 = 1 << 2;
}

impl VmxCaps {
    /// Reads the capabilities through `rdmsr` and `cpuid`, following SDM Appendix A on which
    /// MSRs exist:
    /// - CPUID.1:ECX bit 5 (VMX) known to be 0: nothing else is read (the VMX MSRs would #GP).
    /// - TRUE_* controls (0x48D-0x490) when IA32_VMX_BASIC bit 55 is set, else 0x481-0x484 (A.2).
    /// - IA32_VMX_PROCBASED_CTLS2 (0x48B) only when primary allowed-1 bit 31 (A.3.3).
    /// - IA32_VMX_EPT_VPID_CAP (0x48C) only when secondary allowed-1 bit 1 or 5 (A.10).
    /// - IA32_VMX_VMFUNC (0x491) only when secondary allowed-1 bit 13 (A.11); smudge does not use
    ///   VM functions, so an unreadable one is left 0 and is not an error.
    ///
    /// `rdmsr` is a #GP-safe read on a live CPU, or a dump lookup (which may say `Unknown`).
    /// `cpuid(leaf, subleaf)` gives `None` when unknown. A VMX MSR that is needed but unreadable
    /// is left 0 and remembered in [`VmxCaps::unreadable`]; [`VmxCaps::choose_mode`] reports it.
    pub fn from_reader(
        rdmsr: impl Fn(u32) -> MsrValue,
        cpuid: impl Fn(u32, u32) -> Option<CpuidRegs>,
    ) -> VmxCaps {
        let mut caps = VmxCaps {
            max_phys_bits: 36,
            ..VmxCaps::default()
        };

        caps.cpuid_vmx = cpuid(1, 0).map(|r| r.ecx & (1 << 5) != 0);
        // MAXPHYADDR: CPUID.80000008H:EAX[7:0] when that leaf exists (CPUID.80000000H:EAX >=
        // 80000008H); otherwise 36 (SDM Vol. 3A 4.1.4). A dump that lists 0x80000008 but not
        // 0x80000000 is trusted.
        let ext_max = cpuid(0x8000_0000, 0).map(|r| r.eax);
        if let Some(r) = cpuid(0x8000_0008, 0) {
            let bits = (r.eax & 0xff) as u8;
            if ext_max.is_none_or(|m| m >= 0x8000_0008) && bits != 0 {
                caps.max_phys_bits = bits;
            }
        }
        if caps.cpuid_vmx == Some(false) {
            return caps;
        }
        caps.feature_control = rdmsr(msr::IA32_FEATURE_CONTROL);

        let mut unreadable: Option<UnreadableMsr> = None;
        let mut need = |m: u32| -> u64 {
            match rdmsr(m) {
                MsrValue::Value(v) => v,
                state => {
                    if unreadable.is_none() {
                        unreadable = Some(UnreadableMsr { msr: m, state });
                    }
                    0
                }
            }
        };

        caps.basic = need(msr::IA32_VMX_BASIC);
        if caps.basic != 0 {
            // SDM A.2: bit 55 says the TRUE_* MSRs exist and report the default1 controls
            // that may be 0.
            let t = caps.basic & basic::TRUE_CTLS != 0;
            let pick = |plain: u32, true_: u32| if t { true_ } else { plain };
            caps.pinbased = Ctls::from_msr(need(pick(
                msr::IA32_VMX_PINBASED_CTLS,
                msr::IA32_VMX_TRUE_PINBASED_CTLS,
            )));
            caps.procbased = Ctls::from_msr(need(pick(
                msr::IA32_VMX_PROCBASED_CTLS,
                msr::IA32_VMX_TRUE_PROCBASED_CTLS,
            )));
            caps.exit = Ctls::from_msr(need(pick(
                msr::IA32_VMX_EXIT_CTLS,
                msr::IA32_VMX_TRUE_EXIT_CTLS,
            )));
            caps.entry = Ctls::from_msr(need(pick(
                msr::IA32_VMX_ENTRY_CTLS,
                msr::IA32_VMX_TRUE_ENTRY_CTLS,
            )));
            caps.misc = need(msr::IA32_VMX_MISC);
            caps.cr0_fixed0 = need(msr::IA32_VMX_CR0_FIXED0);
            caps.cr0_fixed1 = need(msr::IA32_VMX_CR0_FIXED1);
            caps.cr4_fixed0 = need(msr::IA32_VMX_CR4_FIXED0);
            caps.cr4_fixed1 = need(msr::IA32_VMX_CR4_FIXED1);
            // SDM A.3.3: 0x48B exists only if the primary controls allow bit 31.
            if caps
                .procbased
                .allows(primary::ACTIVATE_SECONDARY_CONTROLS_BIT)
            {
                caps.procbased2 = Ctls::from_msr(need(msr::IA32_VMX_PROCBASED_CTLS2));
            }
            // SDM A.10: 0x48C exists only if EPT or VPID may be enabled.
            if caps.procbased2.allows(secondary::ENABLE_EPT_BIT)
                || caps.procbased2.allows(secondary::ENABLE_VPID_BIT)
            {
                caps.ept_vpid_cap = need(msr::IA32_VMX_EPT_VPID_CAP);
            }
        }
        caps.unreadable = unreadable;
        // SDM A.11: 0x491 exists only if "enable VM functions" may be 1. Optional for smudge.
        if caps.procbased2.allows(secondary::ENABLE_VM_FUNCTIONS_BIT) {
            caps.vmfunc = rdmsr(msr::IA32_VMX_VMFUNC).value().unwrap_or(0);
        }
        caps
    }

    // --- IA32_VMX_BASIC (SDM A.1) ---

    /// VMCS revision identifier (bits 30:0); the first dword of the VMXON region and every VMCS.
    pub const fn revision_id(&self) -> u32 {
        (self.basic & basic::REVISION_MASK) as u32
    }
    /// Bytes of the VMXON and VMCS regions (bits 44:32; at most 4096).
    pub const fn vmcs_region_size(&self) -> u32 {
        ((self.basic >> basic::REGION_SIZE_SHIFT) & basic::REGION_SIZE_MASK) as u32
    }
    /// Memory type the processor uses for the VMCS and its structures (bits 53:50; 6 = WB).
    pub const fn vmcs_memory_type(&self) -> u8 {
        ((self.basic >> basic::MEMORY_TYPE_SHIFT) & 0xf) as u8
    }
    /// Bit 48: VMXON/VMCS region addresses are limited to 32 bits.
    pub const fn vmcs_phys_addr_32bit(&self) -> bool {
        self.basic & basic::PHYS_ADDR_32 != 0
    }
    /// Bit 54: INS/OUTS VM exits report instruction information (SDM 28.2.5).
    pub const fn ins_outs_info(&self) -> bool {
        self.basic & basic::INS_OUTS_INFO != 0
    }
    /// Bit 55: the control fields were read from the TRUE_* MSRs (SDM A.2).
    pub const fn true_ctls(&self) -> bool {
        self.basic & basic::TRUE_CTLS != 0
    }
    /// Bit 56: VM entry may inject a hardware exception with or without an error code.
    pub const fn entry_exception_any_error_code(&self) -> bool {
        self.basic & basic::ENTRY_EXCEPTION_ANY_ERROR_CODE != 0
    }

    // --- IA32_VMX_MISC (SDM A.6) ---

    /// The preemption timer counts down by 1 every 2^rate TSC ticks (bits 4:0).
    pub const fn preemption_timer_rate(&self) -> u8 {
        (self.misc & misc::PREEMPTION_TIMER_RATE_MASK) as u8
    }
    /// Bit 6: the guest may be entered in (and exit from) the HLT activity state.
    pub const fn activity_hlt(&self) -> bool {
        self.misc & misc::ACTIVITY_HLT != 0
    }
    /// Bit 7: activity state shutdown.
    pub const fn activity_shutdown(&self) -> bool {
        self.misc & misc::ACTIVITY_SHUTDOWN != 0
    }
    /// Bit 8: activity state wait-for-SIPI.
    pub const fn activity_wait_for_sipi(&self) -> bool {
        self.misc & misc::ACTIVITY_WAIT_SIPI != 0
    }
    /// Number of CR3-target values (bits 24:16).
    pub const fn cr3_target_count(&self) -> u32 {
        ((self.misc >> misc::CR3_TARGETS_SHIFT) & 0x1ff) as u32
    }
    /// Recommended maximum entries in each MSR load/store list: 512 * (N + 1), N = bits 27:25.
    pub const fn max_msr_list_entries(&self) -> u32 {
        512 * ((((self.misc >> misc::MAX_MSR_LIST_SHIFT) & 0x7) as u32) + 1)
    }
    /// Bit 29: VMWRITE can write the VM-exit information fields.
    pub const fn vmwrite_any_field(&self) -> bool {
        self.misc & misc::VMWRITE_ANY_FIELD != 0
    }

    // --- CPUID and IA32_FEATURE_CONTROL (SDM 24.6, 24.7) ---

    /// CPUID.1:ECX.VMX[bit 5]; `None` when unknown (a dump without CPUID).
    pub const fn vmx_supported(&self) -> Option<bool> {
        self.cpuid_vmx
    }
    /// IA32_FEATURE_CONTROL bit 0, if readable.
    pub const fn feature_control_locked(&self) -> Option<bool> {
        match self.feature_control {
            MsrValue::Value(v) => Some(v & feature_control::LOCK != 0),
            _ => None,
        }
    }
    /// IA32_FEATURE_CONTROL bit 2 (VMXON outside SMX allowed), if readable.
    pub const fn vmx_outside_smx_enabled(&self) -> Option<bool> {
        match self.feature_control {
            MsrValue::Value(v) => Some(v & feature_control::VMX_OUTSIDE_SMX != 0),
            _ => None,
        }
    }
    /// SDM 24.7: VMXON #GPs when the lock bit is clear; firmware usually locks the MSR. When it is
    /// readable and unlocked, the driver must set bits 2 and 0 itself before VMXON.
    pub const fn feature_control_needs_setup(&self) -> bool {
        matches!(self.feature_control_locked(), Some(false))
    }

    // --- Controls (SDM 25.6.1, 25.6.2, 25.7.1, 25.8.1) ---

    /// Primary control bit 31: the secondary controls exist.
    pub const fn secondary_controls(&self) -> bool {
        self.procbased
            .allows(primary::ACTIVATE_SECONDARY_CONTROLS_BIT)
    }
    /// Secondary control bit 1: EPT (SDM 29.3).
    pub const fn ept(&self) -> bool {
        self.secondary_controls() && self.procbased2.allows(secondary::ENABLE_EPT_BIT)
    }
    /// Secondary control bit 5: VPID (SDM 29.1).
    pub const fn vpid(&self) -> bool {
        self.secondary_controls() && self.procbased2.allows(secondary::ENABLE_VPID_BIT)
    }
    /// Secondary control bit 7: unrestricted guest (real mode and unpaged protected mode; SDM 26.6).
    pub const fn unrestricted_guest(&self) -> bool {
        self.secondary_controls() && self.procbased2.allows(secondary::UNRESTRICTED_GUEST_BIT)
    }
    /// Secondary control bit 17: page-modification logging (SDM 29.3.6). Useful only with
    /// [`VmxCaps::ept_ad`]; see [`VmxCaps::mode_available`].
    pub const fn pml(&self) -> bool {
        self.secondary_controls() && self.procbased2.allows(secondary::ENABLE_PML_BIT)
    }
    /// Secondary control bit 3: RDTSCP does not #UD in the guest.
    pub const fn rdtscp(&self) -> bool {
        self.secondary_controls() && self.procbased2.allows(secondary::ENABLE_RDTSCP_BIT)
    }
    /// Secondary control bit 12: INVPCID does not #UD in the guest.
    pub const fn invpcid(&self) -> bool {
        self.secondary_controls() && self.procbased2.allows(secondary::ENABLE_INVPCID_BIT)
    }
    /// Secondary control bit 20: XSAVES/XRSTORS do not #UD in the guest.
    pub const fn xsaves(&self) -> bool {
        self.secondary_controls() && self.procbased2.allows(secondary::ENABLE_XSAVES_BIT)
    }
    /// Pin-based control bit 6: the VMX-preemption timer (SDM 26.5.1).
    pub const fn preemption_timer(&self) -> bool {
        self.pinbased.allows(pin::ACTIVATE_PREEMPTION_TIMER_BIT)
    }
    /// Primary control bit 28: MSR bitmaps.
    pub const fn msr_bitmaps(&self) -> bool {
        self.procbased.allows(primary::USE_MSR_BITMAPS_BIT)
    }
    /// Primary control bit 27: monitor trap flag.
    pub const fn monitor_trap_flag(&self) -> bool {
        self.procbased.allows(primary::MONITOR_TRAP_FLAG_BIT)
    }

    // --- IA32_VMX_EPT_VPID_CAP (SDM A.10) ---

    const fn ept_cap(&self, bit: u64) -> bool {
        self.ept() && self.ept_vpid_cap & bit != 0
    }
    /// Bit 0: execute-only EPT translations.
    pub const fn ept_execute_only(&self) -> bool {
        self.ept_cap(ept_cap::EXECUTE_ONLY)
    }
    /// Bit 6: 4-level EPT page walk (what [`crate::ept::Eptp::new`] uses).
    pub const fn ept_walk_4(&self) -> bool {
        self.ept_cap(ept_cap::WALK_4)
    }
    /// Bit 8: EPT paging structures may be uncacheable.
    pub const fn ept_uc(&self) -> bool {
        self.ept_cap(ept_cap::MEMORY_TYPE_UC)
    }
    /// Bit 14: EPT paging structures may be write-back (what smudge uses).
    pub const fn ept_wb(&self) -> bool {
        self.ept_cap(ept_cap::MEMORY_TYPE_WB)
    }
    /// Bit 16: 2 MiB EPT pages.
    pub const fn large_2m(&self) -> bool {
        self.ept_cap(ept_cap::LARGE_2M)
    }
    /// Bit 17: 1 GiB EPT pages.
    pub const fn large_1g(&self) -> bool {
        self.ept_cap(ept_cap::LARGE_1G)
    }
    /// Bit 20: INVEPT.
    pub const fn invept(&self) -> bool {
        self.ept_cap(ept_cap::INVEPT)
    }
    /// Bit 21: EPT accessed and dirty flags (EPTP bit 6 may be set; SDM 29.3.5).
    pub const fn ept_ad(&self) -> bool {
        self.ept_cap(ept_cap::AD)
    }
    /// Bit 25: single-context INVEPT (SDM 29.4.3.1).
    pub const fn invept_single(&self) -> bool {
        self.invept() && self.ept_vpid_cap & ept_cap::INVEPT_SINGLE != 0
    }
    /// Bit 26: all-context INVEPT.
    pub const fn invept_all(&self) -> bool {
        self.invept() && self.ept_vpid_cap & ept_cap::INVEPT_ALL != 0
    }
    /// Bit 32: INVVPID (only meaningful with VPID).
    pub const fn invvpid(&self) -> bool {
        self.vpid() && self.ept_vpid_cap & ept_cap::INVVPID != 0
    }
    /// Bit 41: single-context INVVPID.
    pub const fn invvpid_single(&self) -> bool {
        self.invvpid() && self.ept_vpid_cap & ept_cap::INVVPID_SINGLE != 0
    }
    /// Bit 42: all-context INVVPID.
    pub const fn invvpid_all(&self) -> bool {
        self.invvpid() && self.ept_vpid_cap & ept_cap::INVVPID_ALL != 0
    }

    /// What the EPT code may use on this processor.
    pub const fn ept_features(&self) -> EptFeatures {
        EptFeatures {
            large_2m: self.large_2m(),
            large_1g: self.large_1g(),
            ad: self.ept_ad(),
            execute_only: self.ept_execute_only(),
            max_phys_bits: self.max_phys_bits,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Control bits and their adjustment (SDM A.3-A.5, 31.5.1)
// ---------------------------------------------------------------------------------------------

/// The control bits, defined once for the capability logic, the VMCS setup and the checker.
pub use super::controls::{entry, exit, pin, primary, secondary};

/// One of the five 32-bit control fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlField {
    /// Pin-based VM-execution controls.
    PinBased,
    /// Primary processor-based VM-execution controls.
    PrimaryProcBased,
    /// Secondary processor-based VM-execution controls.
    SecondaryProcBased,
    /// VM-exit controls.
    Exit,
    /// VM-entry controls.
    Entry,
}

impl ControlField {
    /// How a control of this field is called in messages.
    pub const fn kind(self) -> &'static str {
        match self {
            ControlField::PinBased => "pin-based control",
            ControlField::PrimaryProcBased => "primary processor-based control",
            ControlField::SecondaryProcBased => "secondary control",
            ControlField::Exit => "VM-exit control",
            ControlField::Entry => "VM-entry control",
        }
    }
    /// The MSR that reports the field's allowed settings (the TRUE_* one when `true_ctls`).
    pub const fn msr(self, true_ctls: bool) -> u32 {
        match (self, true_ctls) {
            (ControlField::PinBased, false) => msr::IA32_VMX_PINBASED_CTLS,
            (ControlField::PinBased, true) => msr::IA32_VMX_TRUE_PINBASED_CTLS,
            (ControlField::PrimaryProcBased, false) => msr::IA32_VMX_PROCBASED_CTLS,
            (ControlField::PrimaryProcBased, true) => msr::IA32_VMX_TRUE_PROCBASED_CTLS,
            (ControlField::SecondaryProcBased, _) => msr::IA32_VMX_PROCBASED_CTLS2,
            (ControlField::Exit, false) => msr::IA32_VMX_EXIT_CTLS,
            (ControlField::Exit, true) => msr::IA32_VMX_TRUE_EXIT_CTLS,
            (ControlField::Entry, false) => msr::IA32_VMX_ENTRY_CTLS,
            (ControlField::Entry, true) => msr::IA32_VMX_TRUE_ENTRY_CTLS,
        }
    }
    /// The SDM name of control `bit` of this field.
    pub const fn control_name(self, bit: u32) -> Option<&'static str> {
        match self {
            ControlField::PinBased => pin::name(bit),
            ControlField::PrimaryProcBased => primary::name(bit),
            ControlField::SecondaryProcBased => secondary::name(bit),
            ControlField::Exit => exit::name(bit),
            ControlField::Entry => entry::name(bit),
        }
    }
}

/// Required controls that the processor does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlError {
    /// The field.
    pub field: ControlField,
    /// Every required bit the allowed-1 settings forbid.
    pub missing: u32,
    /// The allowed settings came from a TRUE_* MSR.
    pub true_ctls: bool,
    /// The processor has no secondary controls at all (primary allowed-1 bit 31 is 0).
    pub no_secondary_controls: bool,
}

impl ControlError {
    /// True if control `bit` of `field` is among the missing ones.
    pub fn is_missing(&self, field: ControlField, bit: u32) -> bool {
        self.field == field && bit < 32 && self.missing & (1 << bit) != 0
    }
}

impl fmt::Display for ControlError {
    /// E.g. "secondary control 'enable EPT' (bit 1) not allowed by IA32_VMX_PROCBASED_CTLS2".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msr = self.field.msr(self.true_ctls);
        let mut left = self.missing;
        let mut first = true;
        while left != 0 {
            let bit = left.trailing_zeros();
            left &= left - 1;
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            let name = self.field.control_name(bit).unwrap_or("(unnamed)");
            write!(
                f,
                "{} '{}' (bit {}) not allowed by {}",
                self.field.kind(),
                name,
                bit,
                msr::name(msr)
            )?;
        }
        if self.no_secondary_controls {
            f.write_str(" (no secondary controls: IA32_VMX_PROCBASED_CTLS allowed-1 bit 31 is 0)")?;
        }
        Ok(())
    }
}

impl Ctls {
    /// SDM 31.5.1 (algorithm 3): the value of the field given the controls that must be 1 for
    /// the hypervisor (`required`) and those it would like (`wanted`): the processor's must-be-1
    /// bits are forced on, wanted bits are kept where allowed, every other bit is 0 (which also
    /// clears default1 bits the TRUE MSR allows to clear). `Err` holds the required bits that
    /// the allowed-1 settings forbid.
    pub const fn adjust(&self, required: u32, wanted: u32) -> Result<u32, u32> {
        let missing = required & !self.may_be_1;
        if missing != 0 {
            return Err(missing);
        }
        Ok((required | wanted | self.must_be_1) & self.may_be_1)
    }
}

/// What the hypervisor asks of one control field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Want {
    /// Controls that must be 1, or the VM cannot run as designed.
    pub required: u32,
    /// Controls that are set if the processor allows them.
    pub wanted: u32,
}

/// What the hypervisor asks of all five control fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ControlRequest {
    /// Pin-based controls.
    pub pin: Want,
    /// Primary processor-based controls.
    pub primary: Want,
    /// Secondary processor-based controls (bit 31 of the primary ones follows automatically).
    pub secondary: Want,
    /// VM-exit controls.
    pub exit: Want,
    /// VM-entry controls.
    pub entry: Want,
}

impl ControlRequest {
    /// smudge's baseline for a VM tracked in `mode`: EPT, HLT and unconditional I/O exits
    /// (the serial port is port I/O), external interrupts and NMIs exit to the host, a 64-bit
    /// host, plus VPID, MSR bitmaps, the preemption timer and EFER/PAT switching where offered.
    /// The VMCS builder may add to it (IA-32e mode guest, MSR/IO bitmaps it sets up).
    pub const fn smudge(mode: Mode, unrestricted_guest: bool) -> ControlRequest {
        let mut sec_req = secondary::ENABLE_EPT;
        if unrestricted_guest {
            sec_req |= secondary::UNRESTRICTED_GUEST;
        }
        if let Mode::Pml = mode {
            sec_req |= secondary::ENABLE_PML;
        }
        ControlRequest {
            pin: Want {
                required: pin::EXTERNAL_INTERRUPT_EXITING | pin::NMI_EXITING,
                wanted: pin::ACTIVATE_PREEMPTION_TIMER,
            },
            primary: Want {
                required: primary::HLT_EXITING | primary::UNCONDITIONAL_IO_EXITING,
                wanted: primary::USE_MSR_BITMAPS,
            },
            secondary: Want {
                required: sec_req,
                wanted: secondary::ENABLE_VPID
                    | secondary::ENABLE_RDTSCP
                    | secondary::ENABLE_INVPCID
                    | secondary::ENABLE_XSAVES,
            },
            exit: Want {
                required: exit::HOST_ADDRESS_SPACE_SIZE,
                wanted: exit::SAVE_IA32_EFER
                    | exit::LOAD_IA32_EFER
                    | exit::SAVE_IA32_PAT
                    | exit::LOAD_IA32_PAT
                    | exit::SAVE_PREEMPTION_TIMER,
            },
            entry: Want {
                required: 0,
                wanted: entry::LOAD_IA32_EFER | entry::LOAD_IA32_PAT,
            },
        }
    }
}

/// The five adjusted control fields, ready for the VMCS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Controls {
    /// Pin-based VM-execution controls (VMCS 0x4000).
    pub pin: u32,
    /// Primary processor-based VM-execution controls (VMCS 0x4002).
    pub primary: u32,
    /// Secondary processor-based VM-execution controls (VMCS 0x401E); 0 when primary bit 31 is 0.
    pub secondary: u32,
    /// VM-exit controls (VMCS 0x400C).
    pub exit: u32,
    /// VM-entry controls (VMCS 0x4012).
    pub entry: u32,
}

impl VmxCaps {
    /// The allowed settings of `field`.
    pub const fn ctls(&self, field: ControlField) -> Ctls {
        match field {
            ControlField::PinBased => self.pinbased,
            ControlField::PrimaryProcBased => self.procbased,
            ControlField::SecondaryProcBased => self.procbased2,
            ControlField::Exit => self.exit,
            ControlField::Entry => self.entry,
        }
    }

    /// [`Ctls::adjust`] for one field, with a named error.
    pub const fn adjust(
        &self,
        field: ControlField,
        required: u32,
        wanted: u32,
    ) -> Result<u32, ControlError> {
        match self.ctls(field).adjust(required, wanted) {
            Ok(v) => Ok(v),
            Err(missing) => Err(ControlError {
                field,
                missing,
                true_ctls: self.true_ctls(),
                no_secondary_controls: matches!(field, ControlField::SecondaryProcBased)
                    && !self.secondary_controls(),
            }),
        }
    }

    /// Adjusts all five fields (SDM 31.5.1), keeping these dependencies of the entry checks:
    /// - secondary controls need primary bit 31 (SDM 25.6.2): it is required when a secondary
    ///   control is required, wanted when one is wanted, and the secondary field is 0 without it;
    /// - "unrestricted guest" and "enable PML" need "enable EPT" (SDM 27.2.1.1): EPT joins
    ///   their class (required/wanted), and they are dropped if EPT is not granted;
    /// - "save VMX-preemption-timer value" needs "activate VMX-preemption timer" (SDM 27.2.1.2),
    ///   handled the same way.
    ///
    /// The secondary field is adjusted first, so that a processor without secondary controls
    /// reports the secondary control it lacks (e.g. "enable EPT"), not bit 31.
    pub const fn adjust_controls(&self, req: &ControlRequest) -> Result<Controls, ControlError> {
        let mut sec = req.secondary;
        let needs_ept = secondary::UNRESTRICTED_GUEST | secondary::ENABLE_PML;
        if sec.required & needs_ept != 0 {
            sec.required |= secondary::ENABLE_EPT;
        } else if sec.wanted & needs_ept != 0 {
            sec.wanted |= secondary::ENABLE_EPT;
        }
        let mut pin_req = req.pin;
        if req.exit.required & exit::SAVE_PREEMPTION_TIMER != 0 {
            pin_req.required |= pin::ACTIVATE_PREEMPTION_TIMER;
        } else if req.exit.wanted & exit::SAVE_PREEMPTION_TIMER != 0 {
            pin_req.wanted |= pin::ACTIVATE_PREEMPTION_TIMER;
        }

        let mut secondary_v =
            match self.adjust(ControlField::SecondaryProcBased, sec.required, sec.wanted) {
                Ok(v) => v,
                Err(e) => return Err(e),
            };
        if secondary_v & secondary::ENABLE_EPT == 0 {
            secondary_v &= !needs_ept;
        }
        let mut prim = req.primary;
        if sec.required != 0 {
            prim.required |= primary::ACTIVATE_SECONDARY_CONTROLS;
        } else if secondary_v != 0 {
            prim.wanted |= primary::ACTIVATE_SECONDARY_CONTROLS;
        }
        let primary_v =
            match self.adjust(ControlField::PrimaryProcBased, prim.required, prim.wanted) {
                Ok(v) => v,
                Err(e) => return Err(e),
            };
        if primary_v & primary::ACTIVATE_SECONDARY_CONTROLS == 0 {
            secondary_v = 0;
        }
        let pin_v = match self.adjust(ControlField::PinBased, pin_req.required, pin_req.wanted) {
            Ok(v) => v,
            Err(e) => return Err(e),
        };
        let mut exit_v = match self.adjust(ControlField::Exit, req.exit.required, req.exit.wanted) {
            Ok(v) => v,
            Err(e) => return Err(e),
        };
        if pin_v & pin::ACTIVATE_PREEMPTION_TIMER == 0 {
            exit_v &= !exit::SAVE_PREEMPTION_TIMER;
        }
        let entry_v = match self.adjust(ControlField::Entry, req.entry.required, req.entry.wanted) {
            Ok(v) => v,
            Err(e) => return Err(e),
        };
        Ok(Controls {
            pin: pin_v,
            primary: primary_v,
            secondary: secondary_v,
            exit: exit_v,
            entry: entry_v,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Dirty-tracking mode
// ---------------------------------------------------------------------------------------------

/// Why smudge cannot run (or cannot use a mode) on this processor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// CPUID.1:ECX.VMX[bit 5] = 0.
    VmxAbsent,
    /// IA32_FEATURE_CONTROL is locked with "enable VMX outside SMX" clear (SDM 24.7).
    VmxDisabledLocked {
        /// The MSR value.
        feature_control: u64,
    },
    /// A VMX capability MSR that must exist could not be read.
    MsrUnreadable(UnreadableMsr),
    /// A control smudge needs is not allowed.
    MissingControl(ControlError),
    /// IA32_VMX_EPT_VPID_CAP lacks a capability smudge needs.
    EptCapability {
        /// What is missing, with its bit number(s).
        what: &'static str,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::VmxAbsent => f.write_str("VMX absent: CPUID.1:ECX.VMX[bit 5] = 0"),
            Reason::VmxDisabledLocked { feature_control } => write!(
                f,
                "VMX disabled and locked: IA32_FEATURE_CONTROL (0x3A) = {:#x} has the lock bit (0) set \
                 and 'enable VMX outside SMX' (bit 2) clear; enable VT-x in the firmware setup",
                feature_control
            ),
            Reason::MsrUnreadable(u) => {
                let how = match u.state {
                    MsrValue::Absent => "raised #GP",
                    _ => "is unknown (not in the dump)",
                };
                write!(f, "{} ({:#x}) {}, but the VMX capabilities need it", msr::name(u.msr), u.msr, how)
            }
            Reason::MissingControl(e) => e.fmt(f),
            Reason::EptCapability { what } => {
                write!(f, "IA32_VMX_EPT_VPID_CAP (0x48C) does not report {}", what)
            }
        }
    }
}

/// The processor lacks what smudge (or the requested dirty-tracking mode) needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unsupported {
    /// The precise reason.
    pub reason: Reason,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.reason.fmt(f)
    }
}

impl From<Unsupported> for crate::Error {
    fn from(_: Unsupported) -> crate::Error {
        crate::Error::Unsupported
    }
}

const fn unsupported(reason: Reason) -> Result<(), Unsupported> {
    Err(Unsupported { reason })
}

impl VmxCaps {
    fn missing_secondary(&self, bit: u32) -> Reason {
        Reason::MissingControl(ControlError {
            field: ControlField::SecondaryProcBased,
            missing: 1 << bit,
            true_ctls: self.true_ctls(),
            no_secondary_controls: !self.secondary_controls(),
        })
    }

    /// Whether smudge can run at all: VMX present and enabled, the capability MSRs readable, EPT
    /// with a 4-level walk, WB paging structures and INVEPT, and unrestricted guest when
    /// `unrestricted_guest_required`. An unknown CPUID or FEATURE_CONTROL (a dump without them)
    /// does not block: the VMX MSRs decide.
    pub fn check_usable(&self, unrestricted_guest_required: bool) -> Result<(), Unsupported> {
        if self.cpuid_vmx == Some(false) {
            return unsupported(Reason::VmxAbsent);
        }
        // SDM 24.7: with the lock bit set, bit 2 clear makes VMXON #GP outside SMX.
        if let MsrValue::Value(fc) = self.feature_control {
            if fc & feature_control::LOCK != 0 && fc & feature_control::VMX_OUTSIDE_SMX == 0 {
                return unsupported(Reason::VmxDisabledLocked {
                    feature_control: fc,
                });
            }
        }
        if let Some(u) = self.unreadable {
            return unsupported(Reason::MsrUnreadable(u));
        }
        if !self.ept() {
            return unsupported(self.missing_secondary(secondary::ENABLE_EPT_BIT));
        }
        if unrestricted_guest_required && !self.unrestricted_guest() {
            return unsupported(self.missing_secondary(secondary::UNRESTRICTED_GUEST_BIT));
        }
        // smudge's EPTP is WB with a 4-level walk (SDM 25.6.11; crate::ept::Eptp::new).
        if !self.ept_walk_4() {
            return unsupported(Reason::EptCapability {
                what: "a 4-level EPT page walk (bit 6)",
            });
        }
        if !self.ept_wb() {
            return unsupported(Reason::EptCapability {
                what: "write-back EPT paging structures (bit 14)",
            });
        }
        // SDM 29.4.3.4: every mode clears D or W and must then INVEPT.
        if !self.invept() || !(self.invept_single() || self.invept_all()) {
            return unsupported(Reason::EptCapability {
                what: "INVEPT (bit 20) with single-context (bit 25) or all-context (bit 26) invalidation",
            });
        }
        Ok(())
    }

    /// Whether dirty-tracking `mode` is possible (on top of [`VmxCaps::check_usable`] without
    /// unrestricted guest; ask [`VmxCaps::check_usable`] for that separately):
    /// - write-protect: EPT alone;
    /// - A/D scan: EPT A/D flags (IA32_VMX_EPT_VPID_CAP bit 21, SDM 29.3.5);
    /// - PML: secondary control "enable PML" (bit 17) and EPT A/D, because the processor logs a
    ///   GPA only when a write sets a leaf's dirty flag (SDM 29.3.6).
    pub fn mode_available(&self, mode: Mode) -> Result<(), Unsupported> {
        self.check_usable(false)?;
        self.mode_specific(mode)
    }

    fn mode_specific(&self, mode: Mode) -> Result<(), Unsupported> {
        let ad = Reason::EptCapability {
            what: "EPT accessed and dirty flags (bit 21)",
        };
        match mode {
            Mode::WriteProtect => Ok(()),
            Mode::AdScan if self.ept_ad() => Ok(()),
            Mode::AdScan => unsupported(ad),
            Mode::Pml if !self.pml() => {
                unsupported(self.missing_secondary(secondary::ENABLE_PML_BIT))
            }
            Mode::Pml if !self.ept_ad() => unsupported(ad),
            Mode::Pml => Ok(()),
        }
    }

    /// The best dirty-tracking mode: PML, else A/D scan, else write-protect; or why smudge cannot
    /// run here (see [`VmxCaps::check_usable`]).
    pub fn choose_mode(&self, unrestricted_guest_required: bool) -> Result<Mode, Unsupported> {
        self.check_usable(unrestricted_guest_required)?;
        for mode in [Mode::Pml, Mode::AdScan] {
            if self.mode_specific(mode).is_ok() {
                return Ok(mode);
            }
        }
        Ok(Mode::WriteProtect)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    extern crate std;
    use super::*;
    use core::cell::RefCell;
    use std::vec::Vec;

    /// A reader over a small table that records which MSRs were asked for.
    fn read_with(table: &[(u32, u64)], cpuid_ecx: Option<u32>) -> (VmxCaps, Vec<u32>) {
        let asked = RefCell::new(Vec::new());
        let caps = VmxCaps::from_reader(
            |m| {
                asked.borrow_mut().push(m);
                table
                    .iter()
                    .find(|e| e.0 == m)
                    .map_or(MsrValue::Absent, |e| MsrValue::Value(e.1))
            },
            |leaf, _| {
                if leaf == 1 {
                    cpuid_ecx.map(|ecx| CpuidRegs {
                        ecx,
                        ..CpuidRegs::default()
                    })
                } else {
                    None
                }
            },
        );
        (caps, asked.into_inner())
    }

    #[test]
    fn adjust_follows_sdm_31_5_1() {
        // must-be-1 bits 1,2; may-be-1 bits 1,2,3,5.
        let c = Ctls {
            must_be_1: 0b110,
            may_be_1: 0b10_1110,
        };
        assert_eq!(c.adjust(0, 0), Ok(0b110));
        assert_eq!(c.adjust(0b1000, 0b1_0001), Ok(0b1110)); // bits 0 and 4 wanted, not allowed: dropped
        assert_eq!(c.adjust(0b1_1001, 0), Err(0b1_0001));
        assert!(c.valid(c.adjust(0b10_0000, u32::MAX).unwrap()));
    }

    #[test]
    fn no_vmx_in_cpuid_reads_no_msr() {
        let (caps, asked) = read_with(&[], Some(0));
        assert!(asked.is_empty(), "{:x?}", asked);
        assert_eq!(
            caps.check_usable(false).unwrap_err().reason,
            Reason::VmxAbsent
        );
    }

    #[test]
    fn msr_selection_follows_appendix_a() {
        // No bit 55, primary allowed-1 bit 31 clear: plain MSRs, no 0x48B/0x48C.
        let plain = [
            (0x3a, 5),
            (0x480, 0x001a_0400_0000_0007),
            (0x482, 0x77b9_fffe_0401_e172),
        ];
        let (caps, asked) = read_with(&plain, Some(1 << 5));
        assert!(asked.contains(&0x481) && !asked.contains(&0x48d));
        assert!(!asked.contains(&0x48b) && !asked.contains(&0x48c));
        assert_eq!(caps.procbased, Ctls::from_msr(0x77b9_fffe_0401_e172));
        // Bit 55, bit 31 allowed, secondary allows only bit 0: TRUE MSRs, 0x48B, no 0x48C.
        let t = [(0x480, 1 << 55), (0x48e, 1 << 63), (0x48b, 1 << 32)];
        let (caps, asked) = read_with(&t, None);
        assert!(asked.contains(&0x48e) && !asked.contains(&0x482));
        assert!(asked.contains(&0x48b) && !asked.contains(&0x48c));
        assert!(!caps.ept());
        // ... and with VPID (bit 5) allowed, 0x48C is read.
        let t = [(0x480, 1 << 55), (0x48e, 1 << 63), (0x48b, 1 << 37)];
        let (_, asked) = read_with(&t, None);
        assert!(asked.contains(&0x48c));
    }

    #[test]
    fn unlocked_feature_control_does_not_block_but_asks_for_setup() {
        let (caps, _) = read_with(&[(0x3a, 0)], None);
        assert!(caps.feature_control_needs_setup());
        // It is blocked by the missing VMX MSRs instead (they read as absent here).
        assert_eq!(
            caps.check_usable(false).unwrap_err().reason,
            Reason::MsrUnreadable(UnreadableMsr {
                msr: 0x480,
                state: MsrValue::Absent
            })
        );
    }
}
