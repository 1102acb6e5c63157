//! The VMX controls (SDM 25.6-25.8, Tables 25-5 to 25-15; 24.6-24.8 in older editions), defined
//! once: `*_BIT` is the bit number, the plain name the mask. The capability logic
//! (`vmx::caps`), the VMCS setup (`vmx::setup`), the software entry checker (`vmx::checks`) and
//! the run loop all use these.

/// Pin-based VM-execution controls (SDM 25.6.1, Table 25-5). `*_BIT` is the bit number, the
/// plain name the mask.
pub mod pin {
    /// Bit 0: external interrupts cause VM exits.
    pub const EXTERNAL_INTERRUPT_EXITING_BIT: u32 = 0;
    /// Bit 3: NMIs cause VM exits.
    pub const NMI_EXITING_BIT: u32 = 3;
    /// Bit 5: virtual NMIs.
    pub const VIRTUAL_NMIS_BIT: u32 = 5;
    /// Bit 6: activate the VMX-preemption timer.
    pub const ACTIVATE_PREEMPTION_TIMER_BIT: u32 = 6;
    /// Bit 7: process posted interrupts.
    pub const PROCESS_POSTED_INTERRUPTS_BIT: u32 = 7;

    /// Mask of bit 0.
    pub const EXTERNAL_INTERRUPT_EXITING: u32 = 1 << EXTERNAL_INTERRUPT_EXITING_BIT;
    /// Mask of bit 3.
    pub const NMI_EXITING: u32 = 1 << NMI_EXITING_BIT;
    /// Mask of bit 5.
    pub const VIRTUAL_NMIS: u32 = 1 << VIRTUAL_NMIS_BIT;
    /// Mask of bit 6.
    pub const ACTIVATE_PREEMPTION_TIMER: u32 = 1 << ACTIVATE_PREEMPTION_TIMER_BIT;

    /// The SDM name of control `bit`.
    pub const fn name(bit: u32) -> Option<&'static str> {
        Some(match bit {
            0 => "external-interrupt exiting",
            3 => "NMI exiting",
            5 => "virtual NMIs",
            6 => "activate VMX-preemption timer",
            7 => "process posted interrupts",
            _ => return None,
        })
    }

    /// Mask of bit 7.
    pub const PROCESS_POSTED_INTERRUPTS: u32 = 1 << PROCESS_POSTED_INTERRUPTS_BIT;
}

/// Primary processor-based VM-execution controls (SDM 25.6.2, Table 25-6).
pub mod primary {
    /// Bit 2.
    pub const INTERRUPT_WINDOW_EXITING_BIT: u32 = 2;
    /// Bit 3.
    pub const USE_TSC_OFFSETTING_BIT: u32 = 3;
    /// Bit 7: HLT causes a VM exit.
    pub const HLT_EXITING_BIT: u32 = 7;
    /// Bit 15: MOV to CR3 exits (a default1 control; clearable with the TRUE MSR).
    pub const CR3_LOAD_EXITING_BIT: u32 = 15;
    /// Bit 16: MOV from CR3 exits (a default1 control; clearable with the TRUE MSR).
    pub const CR3_STORE_EXITING_BIT: u32 = 16;
    /// Bit 19: MOV to CR8 exits.
    pub const CR8_LOAD_EXITING_BIT: u32 = 19;
    /// Bit 20: MOV from CR8 exits.
    pub const CR8_STORE_EXITING_BIT: u32 = 20;
    /// Bit 23: MOV DR causes VM exits.
    pub const MOV_DR_EXITING_BIT: u32 = 23;
    /// Bit 24: every I/O instruction exits (the I/O bitmaps are ignored).
    pub const UNCONDITIONAL_IO_EXITING_BIT: u32 = 24;
    /// Bit 25: use I/O bitmaps.
    pub const USE_IO_BITMAPS_BIT: u32 = 25;
    /// Bit 27: monitor trap flag.
    pub const MONITOR_TRAP_FLAG_BIT: u32 = 27;
    /// Bit 28: use MSR bitmaps.
    pub const USE_MSR_BITMAPS_BIT: u32 = 28;
    /// Bit 31: activate secondary controls.
    pub const ACTIVATE_SECONDARY_CONTROLS_BIT: u32 = 31;

    /// Mask of bit 7.
    pub const HLT_EXITING: u32 = 1 << HLT_EXITING_BIT;
    /// Mask of bit 15.
    pub const CR3_LOAD_EXITING: u32 = 1 << CR3_LOAD_EXITING_BIT;
    /// Mask of bit 16.
    pub const CR3_STORE_EXITING: u32 = 1 << CR3_STORE_EXITING_BIT;
    /// Mask of bit 19.
    pub const CR8_LOAD_EXITING: u32 = 1 << CR8_LOAD_EXITING_BIT;
    /// Mask of bit 20.
    pub const CR8_STORE_EXITING: u32 = 1 << CR8_STORE_EXITING_BIT;
    /// Mask of bit 23.
    pub const MOV_DR_EXITING: u32 = 1 << MOV_DR_EXITING_BIT;
    /// Mask of bit 24.
    pub const UNCONDITIONAL_IO_EXITING: u32 = 1 << UNCONDITIONAL_IO_EXITING_BIT;
    /// Mask of bit 25.
    pub const USE_IO_BITMAPS: u32 = 1 << USE_IO_BITMAPS_BIT;
    /// Mask of bit 28.
    pub const USE_MSR_BITMAPS: u32 = 1 << USE_MSR_BITMAPS_BIT;
    /// Mask of bit 31.
    pub const ACTIVATE_SECONDARY_CONTROLS: u32 = 1 << ACTIVATE_SECONDARY_CONTROLS_BIT;

    /// The SDM name of control `bit`.
    pub const fn name(bit: u32) -> Option<&'static str> {
        Some(match bit {
            2 => "interrupt-window exiting",
            3 => "use TSC offsetting",
            7 => "HLT exiting",
            9 => "INVLPG exiting",
            10 => "MWAIT exiting",
            11 => "RDPMC exiting",
            12 => "RDTSC exiting",
            15 => "CR3-load exiting",
            16 => "CR3-store exiting",
            17 => "activate tertiary controls",
            19 => "CR8-load exiting",
            20 => "CR8-store exiting",
            21 => "use TPR shadow",
            22 => "NMI-window exiting",
            23 => "MOV-DR exiting",
            24 => "unconditional I/O exiting",
            25 => "use I/O bitmaps",
            27 => "monitor trap flag",
            28 => "use MSR bitmaps",
            29 => "MONITOR exiting",
            30 => "PAUSE exiting",
            31 => "activate secondary controls",
            _ => return None,
        })
    }

    /// Bit 21: use TPR shadow
    pub const USE_TPR_SHADOW_BIT: u32 = 21;
    /// Mask of bit 21.
    pub const USE_TPR_SHADOW: u32 = 1 << USE_TPR_SHADOW_BIT;
    /// Bit 22: nMI-window exiting
    pub const NMI_WINDOW_EXITING_BIT: u32 = 22;
    /// Mask of bit 22.
    pub const NMI_WINDOW_EXITING: u32 = 1 << NMI_WINDOW_EXITING_BIT;

    /// Mask of bit 2.
    pub const INTERRUPT_WINDOW_EXITING: u32 = 1 << INTERRUPT_WINDOW_EXITING_BIT;
    /// Mask of bit 3.
    pub const USE_TSC_OFFSETTING: u32 = 1 << USE_TSC_OFFSETTING_BIT;
    /// Mask of bit 27.
    pub const MONITOR_TRAP_FLAG: u32 = 1 << MONITOR_TRAP_FLAG_BIT;
}

/// Secondary processor-based VM-execution controls (SDM 25.6.2, Table 25-7).
pub mod secondary {
    /// Bit 0.
    pub const VIRTUALIZE_APIC_ACCESSES_BIT: u32 = 0;
    /// Bit 1: enable EPT.
    pub const ENABLE_EPT_BIT: u32 = 1;
    /// Bit 3: enable RDTSCP.
    pub const ENABLE_RDTSCP_BIT: u32 = 3;
    /// Bit 6: WBINVD (and WBNOINVD) cause VM exits.
    pub const WBINVD_EXITING_BIT: u32 = 6;
    /// Bit 5: enable VPID.
    pub const ENABLE_VPID_BIT: u32 = 5;
    /// Bit 7: unrestricted guest (requires enable EPT; SDM 27.2.1.1).
    pub const UNRESTRICTED_GUEST_BIT: u32 = 7;
    /// Bit 12: enable INVPCID.
    pub const ENABLE_INVPCID_BIT: u32 = 12;
    /// Bit 13: enable VM functions.
    pub const ENABLE_VM_FUNCTIONS_BIT: u32 = 13;
    /// Bit 17: enable PML (requires enable EPT; SDM 27.2.1.1).
    pub const ENABLE_PML_BIT: u32 = 17;
    /// Bit 20: enable XSAVES/XRSTORS.
    pub const ENABLE_XSAVES_BIT: u32 = 20;

    /// Mask of bit 1.
    pub const ENABLE_EPT: u32 = 1 << ENABLE_EPT_BIT;
    /// Mask of bit 3.
    pub const ENABLE_RDTSCP: u32 = 1 << ENABLE_RDTSCP_BIT;
    /// Mask of bit 6.
    pub const WBINVD_EXITING: u32 = 1 << WBINVD_EXITING_BIT;
    /// Mask of bit 5.
    pub const ENABLE_VPID: u32 = 1 << ENABLE_VPID_BIT;
    /// Mask of bit 7.
    pub const UNRESTRICTED_GUEST: u32 = 1 << UNRESTRICTED_GUEST_BIT;
    /// Mask of bit 12.
    pub const ENABLE_INVPCID: u32 = 1 << ENABLE_INVPCID_BIT;
    /// Mask of bit 17.
    pub const ENABLE_PML: u32 = 1 << ENABLE_PML_BIT;
    /// Mask of bit 20.
    pub const ENABLE_XSAVES: u32 = 1 << ENABLE_XSAVES_BIT;

    /// The SDM name of control `bit`.
    pub const fn name(bit: u32) -> Option<&'static str> {
        Some(match bit {
            0 => "virtualize APIC accesses",
            1 => "enable EPT",
            2 => "descriptor-table exiting",
            3 => "enable RDTSCP",
            4 => "virtualize x2APIC mode",
            5 => "enable VPID",
            6 => "WBINVD exiting",
            7 => "unrestricted guest",
            8 => "APIC-register virtualization",
            9 => "virtual-interrupt delivery",
            10 => "PAUSE-loop exiting",
            11 => "RDRAND exiting",
            12 => "enable INVPCID",
            13 => "enable VM functions",
            14 => "VMCS shadowing",
            15 => "enable ENCLS exiting",
            16 => "RDSEED exiting",
            17 => "enable PML",
            18 => "EPT-violation #VE",
            19 => "conceal VMX from PT",
            20 => "enable XSAVES/XRSTORS",
            22 => "mode-based execute control for EPT",
            23 => "sub-page write permissions for EPT",
            24 => "Intel PT uses guest physical addresses",
            25 => "use TSC scaling",
            26 => "enable user wait and pause",
            27 => "enable PCONFIG",
            28 => "enable ENCLV exiting",
            30 => "VMM bus-lock detection",
            31 => "instruction timeout",
            _ => return None,
        })
    }

    /// Bit 4: virtualize x2APIC mode
    pub const VIRTUALIZE_X2APIC_MODE_BIT: u32 = 4;
    /// Mask of bit 4.
    pub const VIRTUALIZE_X2APIC_MODE: u32 = 1 << VIRTUALIZE_X2APIC_MODE_BIT;
    /// Bit 8: aPIC-register virtualization
    pub const APIC_REGISTER_VIRTUALIZATION_BIT: u32 = 8;
    /// Mask of bit 8.
    pub const APIC_REGISTER_VIRTUALIZATION: u32 = 1 << APIC_REGISTER_VIRTUALIZATION_BIT;
    /// Bit 9: virtual-interrupt delivery
    pub const VIRTUAL_INTERRUPT_DELIVERY_BIT: u32 = 9;
    /// Mask of bit 9.
    pub const VIRTUAL_INTERRUPT_DELIVERY: u32 = 1 << VIRTUAL_INTERRUPT_DELIVERY_BIT;
    /// Bit 14: vMCS shadowing
    pub const VMCS_SHADOWING_BIT: u32 = 14;
    /// Mask of bit 14.
    pub const VMCS_SHADOWING: u32 = 1 << VMCS_SHADOWING_BIT;
    /// Bit 18: ePT-violation #VE
    pub const EPT_VIOLATION_VE_BIT: u32 = 18;
    /// Mask of bit 18.
    pub const EPT_VIOLATION_VE: u32 = 1 << EPT_VIOLATION_VE_BIT;
    /// Bit 22: mode-based execute control for EPT
    pub const MODE_BASED_EXECUTE_CONTROL_BIT: u32 = 22;
    /// Mask of bit 22.
    pub const MODE_BASED_EXECUTE_CONTROL: u32 = 1 << MODE_BASED_EXECUTE_CONTROL_BIT;
    /// Bit 23: sub-page write permissions for EPT
    pub const SUB_PAGE_WRITE_PERMISSIONS_BIT: u32 = 23;
    /// Mask of bit 23.
    pub const SUB_PAGE_WRITE_PERMISSIONS: u32 = 1 << SUB_PAGE_WRITE_PERMISSIONS_BIT;
    /// Bit 24: intel PT uses guest physical addresses
    pub const PT_USES_GUEST_PHYSICAL_ADDRESSES_BIT: u32 = 24;
    /// Mask of bit 24.
    pub const PT_USES_GUEST_PHYSICAL_ADDRESSES: u32 = 1 << PT_USES_GUEST_PHYSICAL_ADDRESSES_BIT;

    /// Mask of bit 0.
    pub const VIRTUALIZE_APIC_ACCESSES: u32 = 1 << VIRTUALIZE_APIC_ACCESSES_BIT;
    /// Mask of bit 13.
    pub const ENABLE_VM_FUNCTIONS: u32 = 1 << ENABLE_VM_FUNCTIONS_BIT;
}

/// VM-exit controls (SDM 25.7.1, Table 25-13).
pub mod exit {
    /// Bit 2: save debug controls (default1).
    pub const SAVE_DEBUG_CONTROLS_BIT: u32 = 2;
    /// Bit 9: host address-space size (1 = the host is 64-bit).
    pub const HOST_ADDRESS_SPACE_SIZE_BIT: u32 = 9;
    /// Bit 15: acknowledge interrupt on exit.
    pub const ACK_INTERRUPT_ON_EXIT_BIT: u32 = 15;
    /// Bit 18: save IA32_PAT.
    pub const SAVE_IA32_PAT_BIT: u32 = 18;
    /// Bit 19: load IA32_PAT.
    pub const LOAD_IA32_PAT_BIT: u32 = 19;
    /// Bit 20: save IA32_EFER.
    pub const SAVE_IA32_EFER_BIT: u32 = 20;
    /// Bit 21: load IA32_EFER.
    pub const LOAD_IA32_EFER_BIT: u32 = 21;
    /// Bit 22: save VMX-preemption-timer value (requires the pin-based timer; SDM 27.2.1.2).
    pub const SAVE_PREEMPTION_TIMER_BIT: u32 = 22;

    /// Mask of bit 2.
    pub const SAVE_DEBUG_CONTROLS: u32 = 1 << SAVE_DEBUG_CONTROLS_BIT;
    /// Mask of bit 9.
    pub const HOST_ADDRESS_SPACE_SIZE: u32 = 1 << HOST_ADDRESS_SPACE_SIZE_BIT;
    /// Mask of bit 15.
    pub const ACK_INTERRUPT_ON_EXIT: u32 = 1 << ACK_INTERRUPT_ON_EXIT_BIT;
    /// Mask of bit 18.
    pub const SAVE_IA32_PAT: u32 = 1 << SAVE_IA32_PAT_BIT;
    /// Mask of bit 19.
    pub const LOAD_IA32_PAT: u32 = 1 << LOAD_IA32_PAT_BIT;
    /// Mask of bit 20.
    pub const SAVE_IA32_EFER: u32 = 1 << SAVE_IA32_EFER_BIT;
    /// Mask of bit 21.
    pub const LOAD_IA32_EFER: u32 = 1 << LOAD_IA32_EFER_BIT;
    /// Mask of bit 22.
    pub const SAVE_PREEMPTION_TIMER: u32 = 1 << SAVE_PREEMPTION_TIMER_BIT;

    /// The SDM name of control `bit`.
    pub const fn name(bit: u32) -> Option<&'static str> {
        Some(match bit {
            2 => "save debug controls",
            9 => "host address-space size",
            12 => "load IA32_PERF_GLOBAL_CTRL",
            15 => "acknowledge interrupt on exit",
            18 => "save IA32_PAT",
            19 => "load IA32_PAT",
            20 => "save IA32_EFER",
            21 => "load IA32_EFER",
            22 => "save VMX-preemption-timer value",
            23 => "clear IA32_BNDCFGS",
            24 => "conceal VMX from PT",
            25 => "clear IA32_RTIT_CTL",
            26 => "clear IA32_LBR_CTL",
            28 => "load CET state",
            29 => "load PKRS",
            30 => "save IA32_PERF_GLOBAL_CTL",
            31 => "activate secondary controls",
            _ => return None,
        })
    }

    /// Bit 12: load IA32_PERF_GLOBAL_CTRL
    pub const LOAD_IA32_PERF_GLOBAL_CTRL_BIT: u32 = 12;
    /// Mask of bit 12.
    pub const LOAD_IA32_PERF_GLOBAL_CTRL: u32 = 1 << LOAD_IA32_PERF_GLOBAL_CTRL_BIT;
    /// Bit 25: clear IA32_RTIT_CTL
    pub const CLEAR_IA32_RTIT_CTL_BIT: u32 = 25;
    /// Mask of bit 25.
    pub const CLEAR_IA32_RTIT_CTL: u32 = 1 << CLEAR_IA32_RTIT_CTL_BIT;
    /// Bit 28: load CET state
    pub const LOAD_CET_STATE_BIT: u32 = 28;
    /// Mask of bit 28.
    pub const LOAD_CET_STATE: u32 = 1 << LOAD_CET_STATE_BIT;
    /// Bit 29: load PKRS
    pub const LOAD_PKRS_BIT: u32 = 29;
    /// Mask of bit 29.
    pub const LOAD_PKRS: u32 = 1 << LOAD_PKRS_BIT;
}

/// VM-entry controls (SDM 25.8.1, Table 25-15).
pub mod entry {
    /// Bit 2: load debug controls (default1).
    pub const LOAD_DEBUG_CONTROLS_BIT: u32 = 2;
    /// Bit 9: IA-32e mode guest.
    pub const IA32E_MODE_GUEST_BIT: u32 = 9;
    /// Bit 14: load IA32_PAT.
    pub const LOAD_IA32_PAT_BIT: u32 = 14;
    /// Bit 15: load IA32_EFER.
    pub const LOAD_IA32_EFER_BIT: u32 = 15;

    /// Mask of bit 2.
    pub const LOAD_DEBUG_CONTROLS: u32 = 1 << LOAD_DEBUG_CONTROLS_BIT;
    /// Mask of bit 9.
    pub const IA32E_MODE_GUEST: u32 = 1 << IA32E_MODE_GUEST_BIT;
    /// Mask of bit 14.
    pub const LOAD_IA32_PAT: u32 = 1 << LOAD_IA32_PAT_BIT;
    /// Mask of bit 15.
    pub const LOAD_IA32_EFER: u32 = 1 << LOAD_IA32_EFER_BIT;

    /// The SDM name of control `bit`.
    pub const fn name(bit: u32) -> Option<&'static str> {
        Some(match bit {
            2 => "load debug controls",
            9 => "IA-32e mode guest",
            10 => "entry to SMM",
            11 => "deactivate dual-monitor treatment",
            13 => "load IA32_PERF_GLOBAL_CTRL",
            14 => "load IA32_PAT",
            15 => "load IA32_EFER",
            16 => "load IA32_BNDCFGS",
            17 => "conceal VMX from PT",
            18 => "load IA32_RTIT_CTL",
            20 => "load CET state",
            21 => "load guest IA32_LBR_CTL",
            22 => "load PKRS",
            _ => return None,
        })
    }

    /// Bit 10: entry to SMM
    pub const ENTRY_TO_SMM_BIT: u32 = 10;
    /// Mask of bit 10.
    pub const ENTRY_TO_SMM: u32 = 1 << ENTRY_TO_SMM_BIT;
    /// Bit 11: deactivate dual-monitor treatment
    pub const DEACTIVATE_DUAL_MONITOR_BIT: u32 = 11;
    /// Mask of bit 11.
    pub const DEACTIVATE_DUAL_MONITOR: u32 = 1 << DEACTIVATE_DUAL_MONITOR_BIT;
    /// Bit 13: load IA32_PERF_GLOBAL_CTRL
    pub const LOAD_IA32_PERF_GLOBAL_CTRL_BIT: u32 = 13;
    /// Mask of bit 13.
    pub const LOAD_IA32_PERF_GLOBAL_CTRL: u32 = 1 << LOAD_IA32_PERF_GLOBAL_CTRL_BIT;
    /// Bit 16: load IA32_BNDCFGS
    pub const LOAD_IA32_BNDCFGS_BIT: u32 = 16;
    /// Mask of bit 16.
    pub const LOAD_IA32_BNDCFGS: u32 = 1 << LOAD_IA32_BNDCFGS_BIT;
    /// Bit 18: load IA32_RTIT_CTL
    pub const LOAD_IA32_RTIT_CTL_BIT: u32 = 18;
    /// Mask of bit 18.
    pub const LOAD_IA32_RTIT_CTL: u32 = 1 << LOAD_IA32_RTIT_CTL_BIT;
    /// Bit 20: load CET state
    pub const LOAD_CET_STATE_BIT: u32 = 20;
    /// Mask of bit 20.
    pub const LOAD_CET_STATE: u32 = 1 << LOAD_CET_STATE_BIT;
    /// Bit 22: load PKRS
    pub const LOAD_PKRS_BIT: u32 = 22;
    /// Mask of bit 22.
    pub const LOAD_PKRS: u32 = 1 << LOAD_PKRS_BIT;
}
