//! Speculative-execution duties around a VM entry: what the processor must be told so that a
//! guest cannot sample the host's (or another guest's) data through its caches and buffers.
//!
//! The same three duties KVM's VMX loop performs, each decided once at load:
//! - L1D flush before every entry (L1TF, "L1 Terminal Fault": a guest's non-present EPT-walked
//!   PTE can speculatively read any host line in L1D). IA32_FLUSH_CMD bit 0 (Intel, "Deep Dive:
//!   Intel Analysis of L1 Terminal Fault"). smudge flushes before every entry (KVM's `always`;
//!   KVM's default `cond` skips entries it can prove harmless, smudge does not try).
//! - VERW before every entry (MDS, TAA, MMIO stale data: the CPU's fill and store buffers). With
//!   the MD_CLEAR microcode, VERW with a memory operand overwrites them (Intel, "Deep Dive: MDS").
//! - IBPB when a CPU enters a different VMCS than the one it entered last (Spectre v2: branch
//!   predictions trained by one guest must not steer another's host work), IA32_PRED_CMD bit 0.
//!
//! Linux decides from the kernel's own bug bits and mitigation choices (as KVM does); Windows
//! has no documented interface to its choices, so it decides from what the processor enumerates
//! ([`Duties::from_cpu`]). Without the L1D_FLUSH command an L1TF-affected CPU stays unmitigated
//! (KVM falls back to reading a 64 KiB buffer; smudge does not): [`Duties::l1tf_unmitigated`].

/// CPUID.(EAX=07H,ECX=0):EDX bit 10: MD_CLEAR (VERW overwrites the CPU buffers).
pub const CPUID7_EDX_MD_CLEAR: u32 = 1 << 10;
/// CPUID.(EAX=07H,ECX=0):EDX bit 26: IBRS and IBPB (IA32_PRED_CMD).
pub const CPUID7_EDX_IBPB: u32 = 1 << 26;
/// CPUID.(EAX=07H,ECX=0):EDX bit 28: L1D_FLUSH (IA32_FLUSH_CMD).
pub const CPUID7_EDX_L1D_FLUSH: u32 = 1 << 28;
/// CPUID.(EAX=07H,ECX=0):EDX bit 29: IA32_ARCH_CAPABILITIES exists.
pub const CPUID7_EDX_ARCH_CAPABILITIES: u32 = 1 << 29;

/// IA32_ARCH_CAPABILITIES.
pub const IA32_ARCH_CAPABILITIES: u32 = 0x10A;
/// ARCH_CAPABILITIES bit 0, RDCL_NO: not affected by Meltdown or L1TF.
pub const ARCH_CAP_RDCL_NO: u64 = 1 << 0;
/// ARCH_CAPABILITIES bit 3, SKIP_L1DFL_VMENTRY: no L1D flush needed before VM entry.
pub const ARCH_CAP_SKIP_L1DFL_VMENTRY: u64 = 1 << 3;
/// ARCH_CAPABILITIES bit 5, MDS_NO: not affected by MDS.
pub const ARCH_CAP_MDS_NO: u64 = 1 << 5;

/// IA32_FLUSH_CMD; bit 0 writes back and invalidates the L1 data cache.
pub const IA32_FLUSH_CMD: u32 = 0x10B;
/// IA32_FLUSH_CMD bit 0.
pub const L1D_FLUSH: u64 = 1;
/// IA32_PRED_CMD; bit 0 is the indirect branch prediction barrier.
pub const IA32_PRED_CMD: u32 = 0x49;
/// IA32_PRED_CMD bit 0.
pub const PRED_CMD_IBPB: u64 = 1;

/// What the Linux kernel knows and chose, read by the shim (KVM reads the same: `vmx.c`
/// `vmx_setup_l1d_flush`, `vmenter.S` CLEAR_CPU_BUFFERS, `vmx_vcpu_load_vmcs`). The Linux C
/// helper fills it: `repr(C)`, its fields in this order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelChoices {
    /// X86_BUG_L1TF.
    pub l1tf_bug: bool,
    /// `l1tf_mitigation` is not L1TF_MITIGATION_OFF.
    pub l1tf_mitigated: bool,
    /// ARCH_CAPABILITIES says SKIP_L1DFL_VMENTRY.
    pub skip_l1d_flush_vmentry: bool,
    /// X86_FEATURE_FLUSH_L1D.
    pub flush_l1d: bool,
    /// X86_FEATURE_CLEAR_CPU_BUF: the kernel clears CPU buffers with VERW (MDS, TAA, MMIO).
    pub clear_cpu_buf: bool,
    /// X86_FEATURE_USE_IBPB: the kernel issues IBPB (its spectre_v2_user choice).
    pub use_ibpb: bool,
}

/// The duties, fixed at load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Duties {
    /// WRMSR IA32_FLUSH_CMD before every VM entry.
    pub l1d_flush: bool,
    /// VERW before every VM entry.
    pub verw: bool,
    /// IBPB when a CPU enters a different VMCS than last time.
    pub ibpb: bool,
    /// The CPU is L1TF-affected and a flush is wanted, but it has no L1D_FLUSH command.
    pub l1tf_unmitigated: bool,
}

impl Duties {
    /// None (a processor that needs none, or `mitigations=off`).
    pub const NONE: Duties = Duties {
        l1d_flush: false,
        verw: false,
        ibpb: false,
        l1tf_unmitigated: false,
    };

    /// Linux: KVM's decisions from the kernel's bug bits and mitigation choices.
    pub fn from_kernel(k: KernelChoices) -> Duties {
        let l1d = k.l1tf_bug && k.l1tf_mitigated && !k.skip_l1d_flush_vmentry;
        Duties {
            l1d_flush: l1d && k.flush_l1d,
            verw: k.clear_cpu_buf,
            ibpb: k.use_ibpb,
            l1tf_unmitigated: l1d && !k.flush_l1d,
        }
    }

    /// From what the processor enumerates: CPUID.(7,0):EDX and IA32_ARCH_CAPABILITIES (0 when
    /// the MSR does not exist). An Intel CPU without RDCL_NO is taken as L1TF-affected, without
    /// MDS_NO as MDS-affected (the rule of Intel's affected-processor guidance).
    pub fn from_cpu(cpuid7_edx: u32, arch_caps: u64) -> Duties {
        let l1d = arch_caps & (ARCH_CAP_RDCL_NO | ARCH_CAP_SKIP_L1DFL_VMENTRY) == 0;
        let has_flush = cpuid7_edx & CPUID7_EDX_L1D_FLUSH != 0;
        Duties {
            l1d_flush: l1d && has_flush,
            verw: cpuid7_edx & CPUID7_EDX_MD_CLEAR != 0 && arch_caps & ARCH_CAP_MDS_NO == 0,
            ibpb: cpuid7_edx & CPUID7_EDX_IBPB != 0,
            l1tf_unmitigated: l1d && !has_flush,
        }
    }

    /// [`Duties::from_cpu`] of this processor; `rdmsr` reads an MSR the CPUID says exists.
    pub fn of_this_cpu(rdmsr: &dyn Fn(u32) -> u64) -> Duties {
        let edx = cpuid7_edx();
        let arch_caps = if edx & CPUID7_EDX_ARCH_CAPABILITIES != 0 {
            rdmsr(IA32_ARCH_CAPABILITIES)
        } else {
            0
        };
        Duties::from_cpu(edx, arch_caps)
    }

    /// [`Duties::all_supported`] of this processor.
    pub fn all_on_this_cpu() -> Duties {
        Duties::all_supported(cpuid7_edx())
    }

    /// Every duty the processor can perform, needed or not (a module parameter, and the way
    /// to run each path on an emulated CPU). VERW exists on every x86-64 processor.
    pub fn all_supported(cpuid7_edx: u32) -> Duties {
        Duties {
            l1d_flush: cpuid7_edx & CPUID7_EDX_L1D_FLUSH != 0,
            verw: true,
            ibpb: cpuid7_edx & CPUID7_EDX_IBPB != 0,
            l1tf_unmitigated: false,
        }
    }

    /// One log line: "L1D flush, VERW, IBPB" or "none", plus the unmitigated warning.
    pub fn describe(&self, out: &mut crate::msg::MsgBuf) {
        use core::fmt::Write;
        let mut first = true;
        for (on, name) in [
            (self.l1d_flush, "L1D flush"),
            (self.verw, "VERW"),
            (self.ibpb, "IBPB on VMCS switch"),
        ] {
            if on {
                let _ = write!(out, "{}{name}", if first { "" } else { ", " });
                first = false;
            }
        }
        if first {
            let _ = write!(out, "none");
        }
        if self.l1tf_unmitigated {
            let _ = write!(out, "; L1TF NOT mitigated (no L1D_FLUSH command)");
        }
    }
}

/// CPUID.(EAX=07H,ECX=0):EDX (leaf 7 exists on every processor with EPT).
fn cpuid7_edx() -> u32 {
    crate::arch::cpuid(7, 0)[3]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_choices_follow_kvm() {
        let affected = KernelChoices {
            l1tf_bug: true,
            l1tf_mitigated: true,
            flush_l1d: true,
            clear_cpu_buf: true,
            use_ibpb: true,
            ..Default::default()
        };
        let d = Duties::from_kernel(affected);
        assert!(d.l1d_flush && d.verw && d.ibpb && !d.l1tf_unmitigated);
        // mitigations=off: nothing.
        assert_eq!(Duties::from_kernel(KernelChoices::default()), Duties::NONE);
        // l1tf=off: no flush even on an affected CPU.
        let off = Duties::from_kernel(KernelChoices {
            l1tf_mitigated: false,
            ..affected
        });
        assert!(!off.l1d_flush && !off.l1tf_unmitigated && off.verw);
        // The processor says the flush is not needed before VM entry.
        let skip = Duties::from_kernel(KernelChoices {
            skip_l1d_flush_vmentry: true,
            ..affected
        });
        assert!(!skip.l1d_flush && !skip.l1tf_unmitigated);
        // Affected, wanted, no L1D_FLUSH command (Bochs's models): reported, not pretended.
        let none = Duties::from_kernel(KernelChoices {
            flush_l1d: false,
            ..affected
        });
        assert!(!none.l1d_flush && none.l1tf_unmitigated);
    }

    #[test]
    fn processor_enumeration() {
        let all = CPUID7_EDX_MD_CLEAR | CPUID7_EDX_IBPB | CPUID7_EDX_L1D_FLUSH;
        // A Skylake with updated microcode: everything.
        let d = Duties::from_cpu(all, 0);
        assert!(d.l1d_flush && d.verw && d.ibpb);
        // An Ice Lake server: RDCL_NO, SKIP_L1DFL_VMENTRY and MDS_NO.
        let d = Duties::from_cpu(
            all | CPUID7_EDX_ARCH_CAPABILITIES,
            ARCH_CAP_RDCL_NO | ARCH_CAP_SKIP_L1DFL_VMENTRY | ARCH_CAP_MDS_NO,
        );
        assert!(!d.l1d_flush && !d.verw && d.ibpb && !d.l1tf_unmitigated);
        // Old microcode: affected and nothing to flush with.
        let d = Duties::from_cpu(0, 0);
        assert!(!d.l1d_flush && !d.verw && !d.ibpb && d.l1tf_unmitigated);
        // Forced: what exists.
        assert_eq!(
            Duties::all_supported(0),
            Duties {
                verw: true,
                ..Duties::NONE
            }
        );
    }

    #[test]
    fn describe_names_each_duty() {
        let mut m = crate::msg::MsgBuf::new();
        Duties::from_cpu(0, 0).describe(&mut m);
        assert_eq!(
            m.as_str(),
            "none; L1TF NOT mitigated (no L1D_FLUSH command)"
        );
        let mut m = crate::msg::MsgBuf::new();
        Duties::all_supported(CPUID7_EDX_IBPB).describe(&mut m);
        assert_eq!(m.as_str(), "VERW, IBPB on VMCS switch");
    }
}
