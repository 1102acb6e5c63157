//! VMX capability MSRs (SDM Vol. 3D Appendix A) decoded into one typed struct.

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
        Ctls { must_be_1: v as u32, may_be_1: (v >> 32) as u32 }
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
}
