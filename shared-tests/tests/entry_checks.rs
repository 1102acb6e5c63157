//! The software VM-entry checker against the SDM (Vol. 3C 27.2, 27.3.1).
//!
//! A 64-bit guest VMCS is built with controls adjusted from real capability-MSR dumps
//! (`fixtures/vmx-msrs`, Bochs 2.7 corei7_skylake_x and tigerlake), read with a local parser so
//! this test does not depend on the crate's own. That VMCS must pass. Then each case breaks one
//! SDM rule (the comment on a case says which text it follows) and the checker must name exactly
//! that rule. Where a rule needs a feature these CPUs lack, the case widens the capabilities
//! ("permissive"), as a CPU with the feature would report them.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use smudge_core::vmx::caps::{Ctls, VmxCaps};
use smudge_core::vmx::checks::{all_violations, check_entry, find, Stage, Violation, CHECKS};
use smudge_core::vmx::fields::Field;
use smudge_core::vmx::vmcs::ctl::{entry, exit, pin, proc, proc2};
use smudge_core::vmx::vmcs::{InterruptionInfo, VmcsAccess, VmcsError, VmcsImage};

// ---------------------------------------------------------------------------------------------
// Fixtures: a tiny parser of `0xNNN 0xVALUE` lines (and CPUID 80000008H for MAXPHYADDR)
// ---------------------------------------------------------------------------------------------

struct Dump {
    msrs: HashMap<u32, u64>,
    max_phys_bits: Option<u8>,
}

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.strip_prefix("0x")?, 16).ok()
}

fn load(name: &str) -> Dump {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/vmx-msrs")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut msrs = HashMap::new();
    let mut max_phys_bits = None;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["cpuid", "0x80000008", _, eax, ..] => {
                let eax = hex(eax.trim_start_matches("eax=")).expect("cpuid eax");
                max_phys_bits = Some((eax & 0xFF) as u8);
            }
            [msr, value] if msr.starts_with("0x") => {
                if let (Some(m), Some(v)) = (hex(msr), hex(value)) {
                    msrs.insert(m as u32, v);
                }
            }
            _ => {}
        }
    }
    Dump {
        msrs,
        max_phys_bits,
    }
}

fn ctls(v: u64) -> Ctls {
    Ctls {
        must_be_1: v as u32,
        may_be_1: (v >> 32) as u32,
    }
}

/// VmxCaps as SDM Appendix A defines them: TRUE_* controls when IA32_VMX_BASIC[55] (A.2),
/// secondary controls only when the primary "activate secondary controls" may be 1 (A.3.3).
fn caps_of(d: &Dump) -> VmxCaps {
    let m = |n: u32| d.msrs.get(&n).copied().unwrap_or(0);
    let basic = m(0x480);
    let true_ctls = basic & (1 << 55) != 0;
    let pick = |plain: u32, tru: u32| ctls(if true_ctls { m(tru) } else { m(plain) });
    let procbased = pick(0x482, 0x48E);
    VmxCaps {
        basic,
        pinbased: pick(0x481, 0x48D),
        procbased,
        procbased2: if procbased.may_be_1 & (1 << 31) != 0 {
            ctls(m(0x48B))
        } else {
            Ctls::default()
        },
        exit: pick(0x483, 0x48F),
        entry: pick(0x484, 0x490),
        misc: m(0x485),
        cr0_fixed0: m(0x486),
        cr0_fixed1: m(0x487),
        cr4_fixed0: m(0x488),
        cr4_fixed1: m(0x489),
        ept_vpid_cap: m(0x48C),
        vmfunc: m(0x491),
        max_phys_bits: d.max_phys_bits.unwrap_or(36),
        ..VmxCaps::default()
    }
}

const SKYLAKE: &str = "bochs-corei7_skylake_x.msr";
const TIGERLAKE: &str = "bochs-tigerlake.msr";

/// A CPU that allows every control and VM function (used only where a rule needs a feature
/// the dumped CPUs lack).
fn permissive(mut c: VmxCaps) -> VmxCaps {
    for x in [
        &mut c.pinbased,
        &mut c.procbased,
        &mut c.procbased2,
        &mut c.exit,
        &mut c.entry,
    ] {
        x.may_be_1 = u32::MAX;
    }
    c.vmfunc = 1;
    c
}

// ---------------------------------------------------------------------------------------------
// The valid 64-bit guest
// ---------------------------------------------------------------------------------------------

/// SDM A.3.1: a control is 1 if it must be, 0 if it must be, else what we want.
fn adjust(c: &Ctls, want: u32) -> u32 {
    (want | c.must_be_1) & c.may_be_1
}

trait Ext {
    fn set(&mut self, f: Field, v: u64);
    fn get(&self, f: Field) -> u64;
    fn or(&mut self, f: Field, bits: u64) {
        let v = self.get(f);
        self.set(f, v | bits);
    }
    fn clear(&mut self, f: Field, bits: u64) {
        let v = self.get(f);
        self.set(f, v & !bits);
    }
}

impl Ext for VmcsImage {
    fn set(&mut self, f: Field, v: u64) {
        assert_eq!(self.write(f, v), Ok(()));
    }
    fn get(&self, f: Field) -> u64 {
        self.read(f).expect("image fields are readable")
    }
}

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_PGE: u64 = 1 << 7;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_VMXE: u64 = 1 << 13;
const CR4_PCIDE: u64 = 1 << 17;
const CR4_CET: u64 = 1 << 23;
const EFER_SCE: u64 = 1;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const PAT_LINUX: u64 = 0x0007_0406_0007_0406;
const NONCANONICAL: u64 = 0x0000_8000_0000_0000; // not canonical with 48 linear-address bits (no LA57 here)
const NONCANONICAL_57: u64 = 0x0100_0000_0000_0000; // not canonical at 48 nor 57 bits

// Access rights (SDM 25.4.1 Table 25-2).
const AR_CODE64: u64 = 0xA09B; // type 11, S, DPL 0, P, L, G
const AR_DATA: u64 = 0xC093; // type 3, S, DPL 0, P, D/B, G
const AR_TSS64_BUSY: u64 = 0x008B; // type 11, P
const AR_UNUSABLE: u64 = 0x1_0000;
const AR_LDT: u64 = 0x0082; // type 2, P

fn valid_vmcs(caps: &VmxCaps) -> VmcsImage {
    let mut v = VmcsImage::new();
    let cap = |bit: u32| caps.ept_vpid_cap & (1 << bit) != 0;

    // Controls.
    let pin = adjust(
        &caps.pinbased,
        pin::EXTERNAL_INTERRUPT_EXITING | pin::NMI_EXITING | pin::VIRTUAL_NMIS,
    );
    let proc = adjust(
        &caps.procbased,
        proc::HLT_EXITING
            | proc::USE_IO_BITMAPS
            | proc::USE_MSR_BITMAPS
            | proc::ACTIVATE_SECONDARY_CONTROLS,
    );
    let mut want2 = proc2::ENABLE_EPT | proc2::ENABLE_VPID | proc2::UNRESTRICTED_GUEST;
    if cap(21) {
        want2 |= proc2::ENABLE_PML; // PML needs EPT A/D (SDM 29.3.6)
    }
    let proc2 = adjust(&caps.procbased2, want2);
    let exit = adjust(
        &caps.exit,
        exit::HOST_ADDRESS_SPACE_SIZE
            | exit::LOAD_IA32_EFER
            | exit::LOAD_IA32_PAT
            | exit::ACK_INTERRUPT_ON_EXIT,
    );
    let entry = adjust(
        &caps.entry,
        entry::IA32E_MODE_GUEST
            | entry::LOAD_IA32_EFER
            | entry::LOAD_IA32_PAT
            | entry::LOAD_DEBUG_CONTROLS,
    );
    v.set(Field::PinBasedControls, pin as u64);
    v.set(Field::PrimaryProcessorBasedControls, proc as u64);
    v.set(Field::SecondaryProcessorBasedControls, proc2 as u64);
    v.set(Field::VmExitControls, exit as u64);
    v.set(Field::VmEntryControls, entry as u64);
    v.set(Field::IoBitmapAAddress, 0x1000);
    v.set(Field::IoBitmapBAddress, 0x2000);
    v.set(Field::MsrBitmapAddress, 0x3000);
    let ad = if cap(21) { 1 << 6 } else { 0 };
    v.set(Field::EptPointer, 0x4000 | ad | 3 << 3 | 6); // WB, 4-level (SDM 25.6.11)
    v.set(Field::PmlAddress, 0x5000);
    v.set(Field::GuestPmlIndex, 511);
    v.set(Field::VirtualProcessorId, 1);

    // Host: 64-bit, flat, canonical bases.
    v.set(
        Field::HostCr0,
        CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG | caps.cr0_fixed0,
    );
    v.set(Field::HostCr3, 0x10_0000);
    v.set(
        Field::HostCr4,
        CR4_PAE | CR4_PGE | CR4_OSFXSR | CR4_OSXMMEXCPT | caps.cr4_fixed0,
    );
    v.set(Field::HostCsSelector, 0x10);
    v.set(Field::HostSsSelector, 0x18);
    for f in [
        Field::HostDsSelector,
        Field::HostEsSelector,
        Field::HostFsSelector,
        Field::HostGsSelector,
    ] {
        v.set(f, 0x18);
    }
    v.set(Field::HostTrSelector, 0x40);
    v.set(Field::HostFsBase, 0);
    v.set(Field::HostGsBase, 0xFFFF_8880_0000_0000);
    v.set(Field::HostTrBase, 0xFFFF_FE00_0000_3000);
    v.set(Field::HostGdtrBase, 0xFFFF_FE00_0000_1000);
    v.set(Field::HostIdtrBase, 0xFFFF_FE00_0000_0000);
    v.set(Field::HostIa32SysenterEsp, 0xFFFF_FE00_0000_5000);
    v.set(Field::HostIa32SysenterEip, 0xFFFF_FFFF_8100_0000);
    v.set(Field::HostRsp, 0xFFFF_C900_0000_8000);
    v.set(Field::HostRip, 0xFFFF_FFFF_8100_1000);
    v.set(
        Field::HostIa32Efer,
        EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE,
    );
    v.set(Field::HostIa32Pat, PAT_LINUX);

    // Guest: 64-bit mode, flat segments, busy 64-bit TSS, LDTR unusable.
    v.set(
        Field::GuestCr0,
        CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG | caps.cr0_fixed0,
    );
    v.set(Field::GuestCr3, 0x1000);
    v.set(
        Field::GuestCr4,
        CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | caps.cr4_fixed0,
    );
    v.set(Field::GuestIa32Efer, EFER_LME | EFER_LMA | EFER_NXE);
    v.set(Field::GuestIa32Pat, PAT_LINUX);
    v.set(Field::GuestDr7, 0x400);
    v.set(Field::GuestRflags, 0x2);
    v.set(Field::GuestRip, 0x10_0000);
    v.set(Field::GuestRsp, 0x20_0000);
    v.set(Field::GuestCsSelector, 0x08);
    v.set(Field::GuestCsLimit, 0xFFFF_FFFF);
    v.set(Field::GuestCsAccessRights, AR_CODE64);
    for (sel, limit, ar) in [
        (
            Field::GuestSsSelector,
            Field::GuestSsLimit,
            Field::GuestSsAccessRights,
        ),
        (
            Field::GuestDsSelector,
            Field::GuestDsLimit,
            Field::GuestDsAccessRights,
        ),
        (
            Field::GuestEsSelector,
            Field::GuestEsLimit,
            Field::GuestEsAccessRights,
        ),
        (
            Field::GuestFsSelector,
            Field::GuestFsLimit,
            Field::GuestFsAccessRights,
        ),
        (
            Field::GuestGsSelector,
            Field::GuestGsLimit,
            Field::GuestGsAccessRights,
        ),
    ] {
        v.set(sel, 0x10);
        v.set(limit, 0xFFFF_FFFF);
        v.set(ar, AR_DATA);
    }
    v.set(Field::GuestTrSelector, 0x18);
    v.set(Field::GuestTrBase, 0x3000);
    v.set(Field::GuestTrLimit, 0x67);
    v.set(Field::GuestTrAccessRights, AR_TSS64_BUSY);
    v.set(Field::GuestLdtrAccessRights, AR_UNUSABLE);
    v.set(Field::GuestGdtrBase, 0x2000);
    v.set(Field::GuestGdtrLimit, 0x27);
    v.set(Field::GuestIdtrBase, 0x2800);
    v.set(Field::GuestIdtrLimit, 0xFFF);
    v.set(Field::GuestActivityState, 0);
    v.set(Field::VmcsLinkPointer, u64::MAX);
    v
}

// ---------------------------------------------------------------------------------------------
// Mutations: one SDM rule broken per case
// ---------------------------------------------------------------------------------------------

type Mutation = fn(&mut VmcsImage, &mut VmxCaps);

struct Case {
    id: &'static str,
    permissive: bool,
    mutate: Mutation,
}

const fn case(id: &'static str, mutate: Mutation) -> Case {
    Case {
        id,
        permissive: false,
        mutate,
    }
}
const fn wide(id: &'static str, mutate: Mutation) -> Case {
    Case {
        id,
        permissive: true,
        mutate,
    }
}

fn first_disallowed(c: &Ctls) -> u64 {
    let bit = (!c.may_be_1).trailing_zeros();
    assert!(bit < 32, "every control allowed");
    1 << bit
}

fn inject(v: &mut VmcsImage, ty: u8, vector: u8, error_code: bool) {
    v.set(
        Field::VmEntryInterruptionInformation,
        InterruptionInfo::new(ty, vector, error_code).0 as u64,
    );
}

fn no_ept(v: &mut VmcsImage) {
    v.clear(
        Field::SecondaryProcessorBasedControls,
        (proc2::ENABLE_EPT | proc2::ENABLE_PML | proc2::UNRESTRICTED_GUEST) as u64,
    );
}

fn restricted(v: &mut VmcsImage) {
    v.clear(
        Field::SecondaryProcessorBasedControls,
        proc2::UNRESTRICTED_GUEST as u64,
    );
}

fn tpr_shadow(v: &mut VmcsImage) {
    v.or(
        Field::PrimaryProcessorBasedControls,
        proc::USE_TPR_SHADOW as u64,
    );
    v.set(Field::VirtualApicAddress, 0x6000);
}

/// Posted interrupts with everything they require (SDM 27.2.1.1).
fn posted(v: &mut VmcsImage) {
    tpr_shadow(v);
    v.or(
        Field::SecondaryProcessorBasedControls,
        proc2::VIRTUAL_INTERRUPT_DELIVERY as u64,
    );
    v.or(
        Field::PinBasedControls,
        (pin::PROCESS_POSTED_INTERRUPTS | pin::EXTERNAL_INTERRUPT_EXITING) as u64,
    );
    v.set(Field::PostedInterruptNotificationVector, 0xF2);
    v.set(Field::PostedInterruptDescriptorAddress, 0x7040);
}

fn usable_ldtr(v: &mut VmcsImage) {
    v.set(Field::GuestLdtrSelector, 0x28);
    v.set(Field::GuestLdtrLimit, 0xFFFF);
    v.set(Field::GuestLdtrAccessRights, AR_LDT);
}

const SEGS: [(Field, Field, Field, Field); 6] = [
    (
        Field::GuestCsSelector,
        Field::GuestCsBase,
        Field::GuestCsLimit,
        Field::GuestCsAccessRights,
    ),
    (
        Field::GuestSsSelector,
        Field::GuestSsBase,
        Field::GuestSsLimit,
        Field::GuestSsAccessRights,
    ),
    (
        Field::GuestDsSelector,
        Field::GuestDsBase,
        Field::GuestDsLimit,
        Field::GuestDsAccessRights,
    ),
    (
        Field::GuestEsSelector,
        Field::GuestEsBase,
        Field::GuestEsLimit,
        Field::GuestEsAccessRights,
    ),
    (
        Field::GuestFsSelector,
        Field::GuestFsBase,
        Field::GuestFsLimit,
        Field::GuestFsAccessRights,
    ),
    (
        Field::GuestGsSelector,
        Field::GuestGsBase,
        Field::GuestGsLimit,
        Field::GuestGsAccessRights,
    ),
];

/// Virtual-8086 segments: base = selector << 4, limit FFFFH, access rights F3H (SDM 27.3.1.2).
fn v8086_segments(v: &mut VmcsImage, base: bool, limit: bool, ar: bool) {
    v.or(Field::GuestRflags, 1 << 17);
    for (sel, b, l, a) in SEGS {
        if base {
            let s = v.get(sel);
            v.set(b, s << 4);
        }
        if limit {
            v.set(l, 0xFFFF);
        }
        if ar {
            v.set(a, 0xF3);
        }
    }
}

fn cases() -> Vec<Case> {
    use Field as F;
    vec![
        // ---- 27.2.1.1: "Reserved bits in the ... controls must be set properly" ----
        case("ctrl.pin.reserved", |v, c| {
            v.clear(F::PinBasedControls, c.pinbased.must_be_1 as u64)
        }),
        case("ctrl.proc.reserved", |v, c| {
            v.or(
                F::PrimaryProcessorBasedControls,
                first_disallowed(&c.procbased),
            )
        }),
        case("ctrl.proc2.reserved", |v, c| {
            v.or(
                F::SecondaryProcessorBasedControls,
                first_disallowed(&c.procbased2),
            )
        }),
        // "The CR3-target count must not be greater than 4" (IA32_VMX_MISC[24:16] = 4 here).
        case("ctrl.cr3_target_count", |v, _| v.set(F::Cr3TargetCount, 5)),
        // I/O, MSR bitmaps: "Bits 11:0 of each I/O bitmap address must be 0 ... not beyond the width".
        case("ctrl.io_bitmap_a.addr", |v, _| {
            v.set(F::IoBitmapAAddress, 0x1004)
        }),
        case("ctrl.io_bitmap_b.addr", |v, _| {
            v.set(F::IoBitmapBAddress, 1 << 50)
        }),
        case("ctrl.msr_bitmap.addr", |v, _| {
            v.set(F::MsrBitmapAddress, 0x3800)
        }),
        case("ctrl.virtual_apic.addr", |v, _| {
            tpr_shadow(v);
            v.set(F::VirtualApicAddress, 0x6001)
        }),
        // "use TPR shadow" and no "virtual-interrupt delivery": TPR threshold bits 31:4 = 0.
        case("ctrl.tpr_threshold.reserved", |v, _| {
            tpr_shadow(v);
            v.set(F::TprThreshold, 0x10)
        }),
        // "If the use TPR shadow control is 0, ... virtualize x2APIC mode, APIC-register
        // virtualization, virtual-interrupt delivery must also be 0."
        case("ctrl.x2apic_mode_requires_tpr_shadow", |v, _| {
            v.or(
                F::SecondaryProcessorBasedControls,
                proc2::VIRTUALIZE_X2APIC_MODE as u64,
            )
        }),
        case("ctrl.apic_register_virt_requires_tpr_shadow", |v, _| {
            v.or(
                F::SecondaryProcessorBasedControls,
                proc2::APIC_REGISTER_VIRTUALIZATION as u64,
            )
        }),
        case("ctrl.vid_requires_tpr_shadow", |v, _| {
            v.or(
                F::SecondaryProcessorBasedControls,
                proc2::VIRTUAL_INTERRUPT_DELIVERY as u64,
            )
        }),
        case("ctrl.virtual_nmis_requires_nmi_exiting", |v, _| {
            v.clear(F::PinBasedControls, pin::NMI_EXITING as u64)
        }),
        case("ctrl.nmi_window_requires_virtual_nmis", |v, _| {
            v.clear(F::PinBasedControls, pin::VIRTUAL_NMIS as u64);
            v.or(
                F::PrimaryProcessorBasedControls,
                proc::NMI_WINDOW_EXITING as u64,
            )
        }),
        case("ctrl.apic_access.addr", |v, _| {
            v.or(
                F::SecondaryProcessorBasedControls,
                proc2::VIRTUALIZE_APIC_ACCESSES as u64,
            );
            v.set(F::ApicAccessAddress, 0x123)
        }),
        case("ctrl.x2apic_mode_excludes_apic_access", |v, _| {
            tpr_shadow(v);
            v.or(
                F::SecondaryProcessorBasedControls,
                (proc2::VIRTUALIZE_APIC_ACCESSES | proc2::VIRTUALIZE_X2APIC_MODE) as u64,
            );
            v.set(F::ApicAccessAddress, 0x7000)
        }),
        case("ctrl.vid_requires_ext_int_exiting", |v, _| {
            tpr_shadow(v);
            v.or(
                F::SecondaryProcessorBasedControls,
                proc2::VIRTUAL_INTERRUPT_DELIVERY as u64,
            );
            v.clear(F::PinBasedControls, pin::EXTERNAL_INTERRUPT_EXITING as u64)
        }),
        wide("ctrl.posted_int.requires_vid", |v, _| {
            posted(v);
            v.clear(
                F::SecondaryProcessorBasedControls,
                proc2::VIRTUAL_INTERRUPT_DELIVERY as u64,
            )
        }),
        wide("ctrl.posted_int.requires_ack_on_exit", |v, _| {
            posted(v);
            v.clear(F::VmExitControls, exit::ACK_INTERRUPT_ON_EXIT as u64)
        }),
        wide("ctrl.posted_int.vector", |v, _| {
            posted(v);
            v.set(F::PostedInterruptNotificationVector, 0x100)
        }),
        wide("ctrl.posted_int.desc_addr", |v, _| {
            posted(v);
            v.set(F::PostedInterruptDescriptorAddress, 0x7020)
        }),
        case("ctrl.vpid_nonzero", |v, _| v.set(F::VirtualProcessorId, 0)),
        // EPTP (27.2.1.1 and 25.6.11): memory type 1 (WC) is never allowed.
        case("ctrl.eptp.memory_type", |v, _| {
            let e = v.get(F::EptPointer);
            v.set(F::EptPointer, (e & !7) | 1)
        }),
        case("ctrl.eptp.walk_length", |v, _| {
            let e = v.get(F::EptPointer);
            v.set(F::EptPointer, (e & !0x38) | 1 << 3)
        }),
        case("ctrl.eptp.accessed_dirty", |v, c| {
            c.ept_vpid_cap &= !(1 << 21);
            v.or(F::EptPointer, 1 << 6)
        }),
        case("ctrl.eptp.reserved", |v, _| v.or(F::EptPointer, 1 << 8)),
        case("ctrl.pml_requires_ept", |v, _| {
            v.clear(F::SecondaryProcessorBasedControls, proc2::ENABLE_EPT as u64);
            v.or(F::SecondaryProcessorBasedControls, proc2::ENABLE_PML as u64)
        }),
        case("ctrl.pml.addr", |v, _| {
            v.or(F::SecondaryProcessorBasedControls, proc2::ENABLE_PML as u64);
            v.set(F::PmlAddress, 0x5008)
        }),
        case("ctrl.unrestricted_guest_requires_ept", |v, _| {
            no_ept(v);
            v.or(
                F::SecondaryProcessorBasedControls,
                proc2::UNRESTRICTED_GUEST as u64,
            )
        }),
        wide("ctrl.mbec_requires_ept", |v, _| {
            no_ept(v);
            v.or(
                F::SecondaryProcessorBasedControls,
                proc2::MODE_BASED_EXECUTE_CONTROL as u64,
            )
        }),
        wide("ctrl.spp_requires_ept", |v, _| {
            no_ept(v);
            v.or(
                F::SecondaryProcessorBasedControls,
                proc2::SUB_PAGE_WRITE_PERMISSIONS as u64,
            )
        }),
        wide("ctrl.spptp.addr", |v, _| {
            v.or(
                F::SecondaryProcessorBasedControls,
                proc2::SUB_PAGE_WRITE_PERMISSIONS as u64,
            );
            v.set(F::SubPagePermissionTablePointer, 0x10)
        }),
        wide("ctrl.pt_gpa_requires_ept", |v, _| {
            no_ept(v);
            v.or(
                F::SecondaryProcessorBasedControls,
                proc2::PT_USES_GUEST_PHYSICAL_ADDRESSES as u64,
            )
        }),
        wide("ctrl.pt_gpa_requires_rtit_ctl_controls", |v, _| {
            v.or(
                F::SecondaryProcessorBasedControls,
                proc2::PT_USES_GUEST_PHYSICAL_ADDRESSES as u64,
            )
        }),
        // IA32_VMX_VMFUNC is 1 here: only EPTP switching (bit 0) is allowed.
        case("ctrl.vmfunc.reserved", |v, _| {
            v.or(
                F::SecondaryProcessorBasedControls,
                proc2::ENABLE_VM_FUNCTIONS as u64,
            );
            v.set(F::VmFunctionControls, 2)
        }),
        case("ctrl.vmfunc.eptp_switching_requires_ept", |v, _| {
            no_ept(v);
            v.or(
                F::SecondaryProcessorBasedControls,
                proc2::ENABLE_VM_FUNCTIONS as u64,
            );
            v.set(F::VmFunctionControls, 1)
        }),
        case("ctrl.eptp_list.addr", |v, _| {
            v.or(
                F::SecondaryProcessorBasedControls,
                proc2::ENABLE_VM_FUNCTIONS as u64,
            );
            v.set(F::VmFunctionControls, 1);
            v.set(F::EptpListAddress, 0x8100)
        }),
        case("ctrl.vmread_bitmap.addr", |v, _| {
            v.or(
                F::SecondaryProcessorBasedControls,
                proc2::VMCS_SHADOWING as u64,
            );
            v.set(F::VmreadBitmapAddress, 0x9001);
            v.set(F::VmwriteBitmapAddress, 0xA000)
        }),
        case("ctrl.vmwrite_bitmap.addr", |v, _| {
            v.or(
                F::SecondaryProcessorBasedControls,
                proc2::VMCS_SHADOWING as u64,
            );
            v.set(F::VmreadBitmapAddress, 0x9000);
            v.set(F::VmwriteBitmapAddress, 1 << 45)
        }),
        case("ctrl.ve_info.addr", |v, _| {
            v.or(
                F::SecondaryProcessorBasedControls,
                proc2::EPT_VIOLATION_VE as u64,
            );
            v.set(F::VirtualizationExceptionInformationAddress, 0xB080)
        }),
        // ---- 27.2.1.2 ----
        case("ctrl.exit.reserved", |v, c| {
            v.clear(F::VmExitControls, c.exit.must_be_1 as u64)
        }),
        case("ctrl.exit.save_timer_requires_timer", |v, _| {
            v.or(F::VmExitControls, exit::SAVE_PREEMPTION_TIMER as u64)
        }),
        case("ctrl.exit.msr_store.addr", |v, _| {
            v.set(F::VmExitMsrStoreCount, 1);
            v.set(F::VmExitMsrStoreAddress, 0x1008)
        }),
        // The last byte, address + count * 16 - 1, must be within MAXPHYADDR (40 bits here).
        case("ctrl.exit.msr_load.addr", |v, c| {
            v.set(F::VmExitMsrLoadCount, 2);
            v.set(F::VmExitMsrLoadAddress, (1 << c.max_phys_bits) - 16)
        }),
        // ---- 27.2.1.3 ----
        case("ctrl.entry.reserved", |v, c| {
            v.or(F::VmEntryControls, first_disallowed(&c.entry))
        }),
        case("ctrl.entry.event.type", |v, _| inject(v, 1, 0x20, false)),
        // Type 7 (other event) is reserved without the monitor trap flag.
        case("ctrl.entry.event.type", |v, c| {
            c.procbased.may_be_1 &= !proc::MONITOR_TRAP_FLAG;
            inject(v, 7, 0, false)
        }),
        case("ctrl.entry.event.nmi_vector", |v, _| inject(v, 2, 3, false)),
        case("ctrl.entry.event.exception_vector", |v, _| {
            inject(v, 3, 32, false)
        }),
        case("ctrl.entry.event.other_vector", |v, c| {
            c.procbased.may_be_1 |= proc::MONITOR_TRAP_FLAG;
            inject(v, 7, 1, false)
        }),
        // #GP without its error code, on a CPU without IA32_VMX_BASIC[56].
        case("ctrl.entry.event.error_code", |v, c| {
            c.basic &= !(1 << 56);
            inject(v, 3, 13, false)
        }),
        // An external interrupt never delivers an error code, whatever IA32_VMX_BASIC[56] says.
        case("ctrl.entry.event.error_code", |v, _| {
            inject(v, 0, 0x20, true)
        }),
        case("ctrl.entry.event.reserved", |v, _| {
            inject(v, 0, 0x20, false);
            v.or(F::VmEntryInterruptionInformation, 1 << 12)
        }),
        case("ctrl.entry.event.error_code_reserved", |v, _| {
            inject(v, 3, 13, true);
            v.set(F::VmEntryExceptionErrorCode, 0x1_0000)
        }),
        case("ctrl.entry.event.instruction_length", |v, _| {
            inject(v, 6, 3, false);
            v.set(F::VmEntryInstructionLength, 16)
        }),
        case("ctrl.entry.msr_load.addr", |v, _| {
            v.set(F::VmEntryMsrLoadCount, 1);
            v.set(F::VmEntryMsrLoadAddress, 0x2004)
        }),
        case("ctrl.entry.smm", |v, _| {
            v.or(F::VmEntryControls, entry::ENTRY_TO_SMM as u64)
        }),
        case("ctrl.entry.dual_monitor", |v, _| {
            v.or(F::VmEntryControls, entry::DEACTIVATE_DUAL_MONITOR as u64)
        }),
        // ---- 27.2.2 ----
        case("host.cr0.fixed", |v, _| v.clear(F::HostCr0, CR0_NE)),
        case("host.cr4.fixed", |v, _| v.clear(F::HostCr4, CR4_VMXE)),
        case("host.cr3.reserved", |v, _| v.or(F::HostCr3, 1 << 45)),
        case("host.sysenter_esp.canonical", |v, _| {
            v.set(F::HostIa32SysenterEsp, NONCANONICAL_57)
        }),
        case("host.sysenter_eip.canonical", |v, _| {
            v.set(F::HostIa32SysenterEip, NONCANONICAL)
        }),
        wide("host.cet.ssp_table.canonical", |v, _| {
            v.or(F::VmExitControls, exit::LOAD_CET_STATE as u64);
            v.set(F::HostIa32InterruptSspTableAddr, NONCANONICAL_57)
        }),
        case("host.pat", |v, _| {
            v.set(F::HostIa32Pat, PAT_LINUX | 2 << 56)
        }),
        case("host.efer.reserved", |v, _| v.or(F::HostIa32Efer, 1 << 1)),
        case("host.efer.lma", |v, _| v.clear(F::HostIa32Efer, EFER_LMA)),
        case("host.efer.lme", |v, _| v.clear(F::HostIa32Efer, EFER_LME)),
        wide("host.pkrs.reserved", |v, _| {
            v.or(F::VmExitControls, exit::LOAD_PKRS as u64);
            v.set(F::HostIa32Pkrs, 1 << 32)
        }),
        // ---- 27.2.3 ----
        case("host.es.selector", |v, _| v.set(F::HostEsSelector, 0x1B)),
        case("host.cs.selector", |v, _| v.set(F::HostCsSelector, 0x13)),
        case("host.ss.selector", |v, _| v.set(F::HostSsSelector, 0x1C)),
        case("host.ds.selector", |v, _| v.set(F::HostDsSelector, 0x19)),
        case("host.fs.selector", |v, _| v.set(F::HostFsSelector, 0x04)),
        case("host.gs.selector", |v, _| v.set(F::HostGsSelector, 0x03)),
        case("host.tr.selector", |v, _| v.set(F::HostTrSelector, 0x44)),
        case("host.cs.null", |v, _| v.set(F::HostCsSelector, 0)),
        case("host.tr.null", |v, _| v.set(F::HostTrSelector, 0)),
        case("host.ss.null", |v, _| {
            v.clear(
                F::VmExitControls,
                (exit::HOST_ADDRESS_SPACE_SIZE | exit::LOAD_IA32_EFER) as u64,
            );
            v.set(F::HostSsSelector, 0)
        }),
        case("host.fs.base_canonical", |v, _| {
            v.set(F::HostFsBase, NONCANONICAL_57)
        }),
        case("host.gs.base_canonical", |v, _| {
            v.set(F::HostGsBase, 0x7FFF_8880_0000_0000)
        }),
        case("host.gdtr.base_canonical", |v, _| {
            v.set(F::HostGdtrBase, NONCANONICAL)
        }),
        case("host.idtr.base_canonical", |v, _| {
            v.set(F::HostIdtrBase, NONCANONICAL)
        }),
        case("host.tr.base_canonical", |v, _| {
            v.set(F::HostTrBase, NONCANONICAL)
        }),
        // ---- 27.2.4 (we enter from IA-32e mode) ----
        case("host.address_space_size", |v, _| {
            v.clear(
                F::VmExitControls,
                (exit::HOST_ADDRESS_SPACE_SIZE | exit::LOAD_IA32_EFER) as u64,
            )
        }),
        case("host.cr4.pae", |v, _| v.clear(F::HostCr4, CR4_PAE)),
        case("host.rip.canonical", |v, _| v.set(F::HostRip, NONCANONICAL)),
        // ---- 27.3.1.1 ----
        case("guest.cr0.fixed", |v, _| v.clear(F::GuestCr0, CR0_NE)),
        // Unrestricted guest exempts PE from FIXED0, but PG=1 still needs PE=1.
        case("guest.cr0.pg_requires_pe", |v, _| {
            v.clear(F::GuestCr0, CR0_PE)
        }),
        case("guest.cr4.fixed", |v, _| v.clear(F::GuestCr4, CR4_VMXE)),
        case("guest.cr4.cet_requires_wp", |v, c| {
            c.cr4_fixed1 |= CR4_CET;
            v.or(F::GuestCr4, CR4_CET);
            v.clear(F::GuestCr0, CR0_WP)
        }),
        case("guest.debugctl.reserved", |v, _| {
            v.set(F::GuestIa32Debugctl, 1 << 16)
        }),
        case("guest.ia32e.cr0_pg", |v, _| v.clear(F::GuestCr0, CR0_PG)),
        case("guest.ia32e.cr4_pae", |v, _| v.clear(F::GuestCr4, CR4_PAE)),
        case("guest.cr4.pcide_requires_ia32e", |v, _| {
            v.clear(F::VmEntryControls, entry::IA32E_MODE_GUEST as u64);
            v.or(F::GuestCr4, CR4_PCIDE)
        }),
        case("guest.cr3.reserved", |v, _| v.or(F::GuestCr3, 1 << 50)),
        case("guest.dr7.high", |v, _| v.or(F::GuestDr7, 1 << 32)),
        case("guest.sysenter_esp.canonical", |v, _| {
            v.set(F::GuestIa32SysenterEsp, NONCANONICAL)
        }),
        case("guest.sysenter_eip.canonical", |v, _| {
            v.set(F::GuestIa32SysenterEip, NONCANONICAL)
        }),
        wide("guest.cet.ssp_table.canonical", |v, _| {
            v.or(F::VmEntryControls, entry::LOAD_CET_STATE as u64);
            v.set(F::GuestIa32InterruptSspTableAddr, NONCANONICAL_57)
        }),
        case("guest.pat", |v, _| {
            v.set(F::GuestIa32Pat, (PAT_LINUX & !0xFF) | 3)
        }),
        case("guest.efer.reserved", |v, _| v.or(F::GuestIa32Efer, 1 << 2)),
        case("guest.efer.lma", |v, _| v.clear(F::GuestIa32Efer, EFER_LMA)),
        case("guest.efer.lme", |v, _| v.clear(F::GuestIa32Efer, EFER_LME)),
        wide("guest.bndcfgs.reserved", |v, _| {
            v.or(F::VmEntryControls, entry::LOAD_IA32_BNDCFGS as u64);
            v.set(F::GuestIa32Bndcfgs, 0x1004)
        }),
        wide("guest.bndcfgs.canonical", |v, _| {
            v.or(F::VmEntryControls, entry::LOAD_IA32_BNDCFGS as u64);
            v.set(F::GuestIa32Bndcfgs, NONCANONICAL_57 | 1)
        }),
        wide("guest.pkrs.reserved", |v, _| {
            v.or(F::VmEntryControls, entry::LOAD_PKRS as u64);
            v.set(F::GuestIa32Pkrs, 1 << 40)
        }),
        // ---- 27.3.1.2 selectors ----
        case("guest.tr.selector_ti", |v, _| {
            v.set(F::GuestTrSelector, 0x1C)
        }),
        case("guest.ldtr.selector_ti", |v, _| {
            usable_ldtr(v);
            v.set(F::GuestLdtrSelector, 0x2C)
        }),
        case("guest.ss.rpl_eq_cs_rpl", |v, _| {
            restricted(v);
            v.set(F::GuestSsSelector, 0x13)
        }),
        // ---- bases ----
        case("guest.v8086.base", |v, _| {
            v8086_segments(v, false, true, true)
        }),
        case("guest.tr.base_canonical", |v, _| {
            v.set(F::GuestTrBase, NONCANONICAL)
        }),
        case("guest.fs.base_canonical", |v, _| {
            v.set(F::GuestFsBase, NONCANONICAL)
        }),
        case("guest.gs.base_canonical", |v, _| {
            v.set(F::GuestGsBase, NONCANONICAL_57)
        }),
        case("guest.ldtr.base_canonical", |v, _| {
            usable_ldtr(v);
            v.set(F::GuestLdtrBase, NONCANONICAL)
        }),
        case("guest.cs.base_high", |v, _| v.set(F::GuestCsBase, 1 << 32)),
        case("guest.ss.base_high", |v, _| v.set(F::GuestSsBase, 1 << 40)),
        case("guest.ds.base_high", |v, _| v.set(F::GuestDsBase, 1 << 63)),
        case("guest.es.base_high", |v, _| v.set(F::GuestEsBase, 1 << 33)),
        // ---- limits, access rights in virtual-8086 mode ----
        case("guest.v8086.limit", |v, _| {
            v8086_segments(v, true, false, true)
        }),
        case("guest.v8086.access_rights", |v, _| {
            v8086_segments(v, true, true, false)
        }),
        // ---- access rights ----
        case("guest.cs.type", |v, _| {
            v.set(F::GuestCsAccessRights, AR_CODE64 & !1)
        }),
        case("guest.ss.type", |v, _| {
            v.set(F::GuestSsAccessRights, (AR_DATA & !0xF) | 1)
        }),
        case("guest.ds.type", |v, _| {
            v.set(F::GuestDsAccessRights, AR_DATA & !1)
        }),
        case("guest.es.type", |v, _| {
            v.set(F::GuestEsAccessRights, AR_DATA & !1)
        }),
        case("guest.fs.type", |v, _| {
            v.set(F::GuestFsAccessRights, AR_DATA & !1)
        }),
        // An execute-only code segment (type 9) is not readable.
        case("guest.gs.type", |v, _| {
            v.set(F::GuestGsAccessRights, (AR_DATA & !0xF) | 9)
        }),
        case("guest.cs.s", |v, _| v.clear(F::GuestCsAccessRights, 1 << 4)),
        case("guest.ss.s", |v, _| v.clear(F::GuestSsAccessRights, 1 << 4)),
        case("guest.ds.s", |v, _| v.clear(F::GuestDsAccessRights, 1 << 4)),
        case("guest.es.s", |v, _| v.clear(F::GuestEsAccessRights, 1 << 4)),
        case("guest.fs.s", |v, _| v.clear(F::GuestFsAccessRights, 1 << 4)),
        case("guest.gs.s", |v, _| v.clear(F::GuestGsAccessRights, 1 << 4)),
        // Non-conforming code: CS DPL must equal SS DPL.
        case("guest.cs.dpl", |v, _| v.or(F::GuestCsAccessRights, 3 << 5)),
        case("guest.ss.dpl_eq_rpl", |v, _| {
            restricted(v);
            v.set(F::GuestCsAccessRights, (AR_CODE64 & !0xF) | 15); // conforming: CS DPL 0 <= SS DPL
            v.or(F::GuestSsAccessRights, 3 << 5)
        }),
        // CS type 3 (unrestricted guest): SS DPL must be 0.
        case("guest.ss.dpl_zero", |v, _| {
            v.set(F::GuestCsAccessRights, (AR_CODE64 & !0xF) | 3);
            v.or(F::GuestSsAccessRights, 3 << 5)
        }),
        case("guest.ds.dpl", |v, _| {
            restricted(v);
            v.set(F::GuestDsSelector, 0x13)
        }),
        case("guest.es.dpl", |v, _| {
            restricted(v);
            v.set(F::GuestEsSelector, 0x11)
        }),
        case("guest.fs.dpl", |v, _| {
            restricted(v);
            v.set(F::GuestFsSelector, 0x12)
        }),
        case("guest.gs.dpl", |v, _| {
            restricted(v);
            v.set(F::GuestGsSelector, 0x13)
        }),
        case("guest.cs.p", |v, _| v.clear(F::GuestCsAccessRights, 1 << 7)),
        case("guest.ss.p", |v, _| v.clear(F::GuestSsAccessRights, 1 << 7)),
        case("guest.ds.p", |v, _| v.clear(F::GuestDsAccessRights, 1 << 7)),
        case("guest.es.p", |v, _| v.clear(F::GuestEsAccessRights, 1 << 7)),
        case("guest.fs.p", |v, _| v.clear(F::GuestFsAccessRights, 1 << 7)),
        case("guest.gs.p", |v, _| v.clear(F::GuestGsAccessRights, 1 << 7)),
        case("guest.cs.ar_reserved", |v, _| {
            v.or(F::GuestCsAccessRights, 1 << 8)
        }),
        case("guest.ss.ar_reserved", |v, _| {
            v.or(F::GuestSsAccessRights, 1 << 17)
        }),
        case("guest.ds.ar_reserved", |v, _| {
            v.or(F::GuestDsAccessRights, 1 << 11)
        }),
        case("guest.es.ar_reserved", |v, _| {
            v.or(F::GuestEsAccessRights, 1 << 31)
        }),
        case("guest.fs.ar_reserved", |v, _| {
            v.or(F::GuestFsAccessRights, 1 << 9)
        }),
        case("guest.gs.ar_reserved", |v, _| {
            v.or(F::GuestGsAccessRights, 1 << 20)
        }),
        case("guest.cs.l_and_d", |v, _| {
            v.or(F::GuestCsAccessRights, 1 << 14)
        }),
        // Limit FFFFFFFFH sets bits 31:20, so G must be 1.
        case("guest.cs.granularity", |v, _| {
            v.clear(F::GuestCsAccessRights, 1 << 15)
        }),
        case("guest.ss.granularity", |v, _| {
            v.clear(F::GuestSsAccessRights, 1 << 15)
        }),
        case("guest.ds.granularity", |v, _| {
            v.clear(F::GuestDsAccessRights, 1 << 15)
        }),
        case("guest.es.granularity", |v, _| {
            v.clear(F::GuestEsAccessRights, 1 << 15)
        }),
        case("guest.fs.granularity", |v, _| {
            v.clear(F::GuestFsAccessRights, 1 << 15)
        }),
        // Limit 0xFFE with G=1: limit bits 11:0 are not all 1, so G must be 0.
        case("guest.gs.granularity", |v, _| v.set(F::GuestGsLimit, 0xFFE)),
        case("guest.tr.type", |v, _| {
            v.set(F::GuestTrAccessRights, (AR_TSS64_BUSY & !0xF) | 3)
        }),
        case("guest.tr.s", |v, _| v.or(F::GuestTrAccessRights, 1 << 4)),
        case("guest.tr.p", |v, _| v.clear(F::GuestTrAccessRights, 1 << 7)),
        case("guest.tr.ar_reserved", |v, _| {
            v.or(F::GuestTrAccessRights, 1 << 8)
        }),
        case("guest.tr.granularity", |v, _| {
            v.or(F::GuestTrAccessRights, 1 << 15)
        }),
        case("guest.tr.unusable", |v, _| {
            v.or(F::GuestTrAccessRights, AR_UNUSABLE)
        }),
        case("guest.ldtr.type", |v, _| {
            usable_ldtr(v);
            v.set(F::GuestLdtrAccessRights, (AR_LDT & !0xF) | 3)
        }),
        case("guest.ldtr.s", |v, _| {
            usable_ldtr(v);
            v.or(F::GuestLdtrAccessRights, 1 << 4)
        }),
        case("guest.ldtr.p", |v, _| {
            usable_ldtr(v);
            v.clear(F::GuestLdtrAccessRights, 1 << 7)
        }),
        case("guest.ldtr.ar_reserved", |v, _| {
            usable_ldtr(v);
            v.or(F::GuestLdtrAccessRights, 1 << 10)
        }),
        case("guest.ldtr.granularity", |v, _| {
            usable_ldtr(v);
            v.set(F::GuestLdtrLimit, 0x10_0000)
        }),
        // ---- 27.3.1.3 ----
        case("guest.gdtr.base_canonical", |v, _| {
            v.set(F::GuestGdtrBase, NONCANONICAL)
        }),
        case("guest.idtr.base_canonical", |v, _| {
            v.set(F::GuestIdtrBase, NONCANONICAL_57)
        }),
        case("guest.gdtr.limit", |v, _| {
            v.set(F::GuestGdtrLimit, 0x1_0000)
        }),
        case("guest.idtr.limit", |v, _| {
            v.set(F::GuestIdtrLimit, 0x1_0FFF)
        }),
        // ---- 27.3.1.4 ----
        // Compatibility mode (CS.L = 0): RIP bits 63:32 must be 0.
        case("guest.rip.high", |v, _| {
            v.set(F::GuestCsAccessRights, 0xC09B);
            v.set(F::GuestRip, 1 << 32)
        }),
        case("guest.rip.canonical", |v, _| {
            v.set(F::GuestRip, NONCANONICAL)
        }),
        case("guest.rflags.reserved", |v, _| v.set(F::GuestRflags, 0)),
        case("guest.rflags.reserved", |v, _| {
            v.set(F::GuestRflags, 0x2 | 1 << 15)
        }),
        // RFLAGS.VM with an IA-32e mode guest (segments made virtual-8086-valid first).
        case("guest.rflags.vm", |v, _| {
            v8086_segments(v, true, true, true)
        }),
        case("guest.rflags.if_for_ext_int", |v, _| {
            inject(v, 0, 0x20, false)
        }),
        // ---- 27.3.1.5 ----
        case("guest.activity.supported", |v, _| {
            v.set(F::GuestActivityState, 4)
        }),
        case("guest.activity.supported", |v, c| {
            c.misc &= !(1 << 8);
            v.set(F::GuestActivityState, 3)
        }),
        case("guest.activity.hlt_ss_dpl", |v, _| {
            v.set(F::GuestCsAccessRights, (AR_CODE64 & !0xF) | 15);
            v.or(F::GuestSsAccessRights, 3 << 5);
            v.set(F::GuestActivityState, 1)
        }),
        case("guest.activity.blocking_requires_active", |v, _| {
            v.set(F::GuestActivityState, 1);
            v.set(F::GuestInterruptibilityState, 2)
        }),
        case("guest.activity.event_injection", |v, _| {
            v.set(F::GuestActivityState, 1);
            inject(v, 3, 13, true)
        }),
        case("guest.activity.event_injection", |v, _| {
            v.set(F::GuestActivityState, 2);
            inject(v, 3, 1, false)
        }),
        case("guest.interruptibility.reserved", |v, _| {
            v.set(F::GuestInterruptibilityState, 1 << 5)
        }),
        case("guest.interruptibility.sti_and_mov_ss", |v, _| {
            v.set(F::GuestRflags, 0x202);
            v.set(F::GuestInterruptibilityState, 3)
        }),
        case("guest.interruptibility.sti_requires_if", |v, _| {
            v.set(F::GuestInterruptibilityState, 1)
        }),
        case("guest.interruptibility.ext_int_blocking", |v, _| {
            v.set(F::GuestRflags, 0x202);
            inject(v, 0, 0x20, false);
            v.set(F::GuestInterruptibilityState, 2)
        }),
        case("guest.interruptibility.nmi_mov_ss", |v, _| {
            inject(v, 2, 2, false);
            v.set(F::GuestInterruptibilityState, 2)
        }),
        case("guest.interruptibility.smi", |v, _| {
            v.set(F::GuestInterruptibilityState, 1 << 2)
        }),
        case("guest.interruptibility.virtual_nmi_blocking", |v, _| {
            inject(v, 2, 2, false);
            v.set(F::GuestInterruptibilityState, 1 << 3)
        }),
        case("guest.interruptibility.enclave_mov_ss", |v, _| {
            v.set(F::GuestInterruptibilityState, 0x12)
        }),
        case("guest.pending_dbg.reserved", |v, _| {
            v.set(F::GuestPendingDebugExceptions, 1 << 4)
        }),
        case("guest.pending_dbg.bs_set", |v, _| {
            v.set(F::GuestRflags, 0x302); // TF, IF
            v.set(F::GuestInterruptibilityState, 1)
        }),
        case("guest.pending_dbg.bs_clear", |v, _| {
            v.set(F::GuestRflags, 0x202);
            v.set(F::GuestInterruptibilityState, 1);
            v.set(F::GuestPendingDebugExceptions, 1 << 14)
        }),
        // TF with IA32_DEBUGCTL.BTF is a branch trap, not a single step: BS must be 0.
        case("guest.pending_dbg.bs_clear", |v, _| {
            v.set(F::GuestRflags, 0x302);
            v.set(F::GuestIa32Debugctl, 1 << 1);
            v.set(F::GuestInterruptibilityState, 1);
            v.set(F::GuestPendingDebugExceptions, 1 << 14)
        }),
        case("guest.pending_dbg.rtm", |v, _| {
            v.set(F::GuestPendingDebugExceptions, 1 << 16 | 1)
        }),
        case("guest.link_pointer.addr", |v, _| {
            v.set(F::VmcsLinkPointer, 0x1234)
        }),
        // ---- 27.3.1.6: a PAE-paging guest with EPT ----
        case("guest.pdpte.reserved", |v, _| {
            v.clear(F::VmEntryControls, entry::IA32E_MODE_GUEST as u64);
            v.set(F::GuestIa32Efer, EFER_NXE);
            v.set(F::GuestCsAccessRights, 0xC09B);
            v.set(F::GuestPdpte0, 0x9001);
            v.set(F::GuestPdpte1, 0xA001 | 1 << 1)
        }),
    ]
}

fn fixture_caps() -> Vec<(&'static str, VmxCaps)> {
    vec![
        (SKYLAKE, caps_of(&load(SKYLAKE))),
        (TIGERLAKE, caps_of(&load(TIGERLAKE))),
    ]
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn fixtures_decode_as_the_readme_describes() {
    // Independent facts from fixtures/vmx-msrs/README.md and TOOLCHAIN.md.
    let sky = caps_of(&load(SKYLAKE));
    let tgl = caps_of(&load(TIGERLAKE));
    assert_eq!(sky.basic & 0x7FFF_FFFF, 0x2B);
    assert_eq!(tgl.basic & 0x7FFF_FFFF, 0x4);
    assert_eq!(
        sky.procbased.may_be_1 & proc::MONITOR_TRAP_FLAG,
        0,
        "skylake_x lacks MTF"
    );
    assert_ne!(tgl.procbased.may_be_1 & proc::MONITOR_TRAP_FLAG, 0);
    assert_ne!(
        tgl.basic & (1 << 56),
        0,
        "only tigerlake sets VMX_BASIC bit 56"
    );
    assert_eq!(sky.basic & (1 << 56), 0);
    assert_eq!(sky.max_phys_bits, 40);
    for c in [sky, tgl] {
        assert_ne!(c.procbased2.may_be_1 & proc2::ENABLE_PML, 0);
        assert_ne!(c.ept_vpid_cap & (1 << 21), 0);
    }
}

#[test]
fn the_64_bit_guest_passes_on_every_fixture_cpu() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/vmx-msrs");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).expect("fixtures") {
        let name = entry
            .expect("dir entry")
            .file_name()
            .into_string()
            .expect("utf-8 name");
        if !name.ends_with(".msr") {
            continue;
        }
        let caps = caps_of(&load(&name));
        let v = valid_vmcs(&caps);
        if let Err(e) = check_entry(&v, &caps) {
            panic!("{name}: {e}");
        }
        n += 1;
    }
    assert!(n >= 13, "only {n} fixtures");
}

#[test]
fn each_mutation_fails_with_exactly_its_check() {
    let mut covered = BTreeSet::new();
    let mut failures = Vec::new();
    for (cpu, base) in fixture_caps() {
        for (i, c) in cases().iter().enumerate() {
            assert!(find(c.id).is_some(), "case {i}: unknown check id {}", c.id);
            let mut caps = if c.permissive { permissive(base) } else { base };
            let mut v = valid_vmcs(&caps);
            assert_eq!(
                check_entry(&v, &caps),
                Ok(()),
                "{cpu} case {i} ({}): base state invalid",
                c.id
            );
            (c.mutate)(&mut v, &mut caps);
            match check_entry(&v, &caps) {
                Err(e) if e.id() == c.id => {
                    covered.insert(c.id);
                    // The violation is also among all violations.
                    let mut out = [None; 16];
                    let n = all_violations(&v, &caps, &mut out);
                    assert!(n >= 1);
                    assert_eq!(
                        out[0],
                        Some(e),
                        "{cpu} {}: all_violations starts with check_entry's",
                        c.id
                    );
                }
                Err(e) => failures.push(format!("{cpu} case {i} ({}): got {e}", c.id)),
                Ok(()) => failures.push(format!("{cpu} case {i} ({}): passed", c.id)),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        covered.len() >= 60,
        "only {} distinct checks covered",
        covered.len()
    );
    // Every check in the table has a case, except those the table documents as untestable here.
    let untested: Vec<_> = CHECKS
        .iter()
        .map(|c| c.id)
        .filter(|id| !covered.contains(id))
        .collect();
    assert!(
        untested.is_empty(),
        "checks without a failing case: {untested:?}"
    );
}

#[test]
fn messages_name_the_rule_the_field_and_the_section() {
    let caps = caps_of(&load(SKYLAKE));
    let mut v = valid_vmcs(&caps);
    v.clear(Field::GuestCr4, CR4_PAE);
    let e = check_entry(&v, &caps).expect_err("PAE cleared");
    assert_eq!(e.id(), "guest.ia32e.cr4_pae");
    assert_eq!(e.field(), Field::GuestCr4);
    assert_eq!(
        e.check().stage,
        Stage::GuestState {
            exit_qualification: 0
        }
    );
    let text = e.to_string();
    for part in [
        "guest.ia32e.cr4_pae",
        "CR4.PAE",
        "27.3.1.1",
        "GuestCr4",
        "exit reason 33",
    ] {
        assert!(text.contains(part), "{text:?} lacks {part:?}");
    }
    // Control and host failures are VMfailValid 7 and 8 (SDM 31.4).
    assert_eq!(
        find("ctrl.vpid_nonzero").map(|c| c.stage),
        Some(Stage::Controls)
    );
    assert_eq!(
        find("host.rip.canonical").map(|c| c.stage),
        Some(Stage::HostState)
    );
    assert_eq!(
        find("guest.link_pointer.addr").map(|c| c.stage),
        Some(Stage::GuestState {
            exit_qualification: 4
        })
    );
}

#[test]
fn all_violations_reports_every_broken_rule_in_sdm_order() {
    let caps = caps_of(&load(SKYLAKE));
    let mut v = valid_vmcs(&caps);
    v.set(Field::VirtualProcessorId, 0); // 27.2.1.1
    v.set(Field::HostTrSelector, 0); // 27.2.3
    v.set(Field::GuestGdtrLimit, 0x1_0000); // 27.3.1.3
    v.set(Field::VmcsLinkPointer, 0x10); // 27.3.1.5
    let mut out = [None; 8];
    let n = all_violations(&v, &caps, &mut out);
    let ids: Vec<_> = out.iter().flatten().map(Violation::id).collect();
    assert_eq!(
        ids,
        [
            "ctrl.vpid_nonzero",
            "host.tr.null",
            "guest.gdtr.limit",
            "guest.link_pointer.addr"
        ]
    );
    assert_eq!(n, 4);
    // A short buffer still counts them all.
    let mut one = [None; 1];
    assert_eq!(all_violations(&v, &caps, &mut one), 4);
    assert_eq!(one[0].map(|x| x.id()), Some("ctrl.vpid_nonzero"));
}

/// A VMCS whose hardware does not support one field (VMREAD fails with error 12).
struct MissingField(VmcsImage, Field);

impl VmcsAccess for MissingField {
    fn read(&self, f: Field) -> Result<u64, VmcsError> {
        if f == self.1 {
            Err(VmcsError::UnsupportedField(f))
        } else {
            self.0.read(f)
        }
    }
    fn write(&mut self, f: Field, v: u64) -> Result<(), VmcsError> {
        self.0.write(f, v)
    }
}

#[test]
fn an_unreadable_field_is_reported_not_guessed() {
    let caps = caps_of(&load(SKYLAKE));
    let v = MissingField(valid_vmcs(&caps), Field::GuestIa32Pat);
    let e = check_entry(&v, &caps).expect_err("PAT unreadable");
    assert_eq!(e.id(), "guest.pat");
    assert!(
        matches!(
            e,
            Violation::Unreadable {
                field: Field::GuestIa32Pat,
                ..
            }
        ),
        "{e:?}"
    );
    // A field no enabled check needs is never read.
    let v = MissingField(valid_vmcs(&caps), Field::PostedInterruptDescriptorAddress);
    assert_eq!(check_entry(&v, &caps), Ok(()));
}

#[test]
fn states_the_sdm_allows_are_accepted() {
    // Guards against a checker stricter than the SDM.
    let caps = caps_of(&load(SKYLAKE));
    let ok = |f: &dyn Fn(&mut VmcsImage)| {
        let mut v = valid_vmcs(&caps);
        f(&mut v);
        check_entry(&v, &caps)
    };
    // Unusable data segments are not checked (27.3.1.2: "if the register is usable").
    assert_eq!(
        ok(&|v| {
            v.set(Field::GuestDsAccessRights, AR_UNUSABLE | 0xFF00);
            v.set(Field::GuestDsBase, u64::MAX);
        }),
        Ok(())
    );
    // With "unrestricted guest", CR0.PE = PG = 0 is allowed by FIXED0 for a non-IA-32e guest.
    assert_eq!(
        ok(&|v| {
            v.clear(Field::VmEntryControls, entry::IA32E_MODE_GUEST as u64);
            v.set(Field::GuestIa32Efer, 0);
            v.clear(Field::GuestCr0, CR0_PE | CR0_PG);
            v.set(Field::GuestCsAccessRights, 0x9B);
            v.set(Field::GuestCsLimit, 0xFFFF);
            for f in [
                Field::GuestSsAccessRights,
                Field::GuestDsAccessRights,
                Field::GuestEsAccessRights,
                Field::GuestFsAccessRights,
                Field::GuestGsAccessRights,
            ] {
                v.set(f, 0x93);
            }
            for f in [
                Field::GuestSsLimit,
                Field::GuestDsLimit,
                Field::GuestEsLimit,
                Field::GuestFsLimit,
                Field::GuestGsLimit,
            ] {
                v.set(f, 0xFFFF);
            }
            v.set(Field::GuestTrAccessRights, 0x8B);
        }),
        Ok(())
    );
    // CR0.NW/CD are never checked (VM entry does not load them).
    assert_eq!(ok(&|v| v.or(Field::GuestCr0, 1 << 29)), Ok(()));
    // HLT with an injected external interrupt, and wait-for-SIPI without injection.
    assert_eq!(
        ok(&|v| {
            v.set(Field::GuestRflags, 0x202);
            v.set(Field::GuestActivityState, 1);
            inject(v, 0, 0x20, false);
        }),
        Ok(())
    );
    assert_eq!(ok(&|v| v.set(Field::GuestActivityState, 3)), Ok(()));
    // Software exceptions: length 0 is allowed when IA32_VMX_MISC[30] (set on skylake_x).
    assert_ne!(caps.misc & (1 << 30), 0);
    assert_eq!(ok(&|v| inject(v, 6, 3, false)), Ok(()));
    // An MSR area that ends exactly at the top of the physical address space.
    assert_eq!(
        ok(&|v| {
            v.set(Field::VmEntryMsrLoadCount, 1);
            v.set(Field::VmEntryMsrLoadAddress, (1 << 40) - 16);
        }),
        Ok(())
    );
    // STI blocking with TF set and BS set is the single-step case.
    assert_eq!(
        ok(&|v| {
            v.set(Field::GuestRflags, 0x302);
            v.set(Field::GuestInterruptibilityState, 1);
            v.set(Field::GuestPendingDebugExceptions, 1 << 14);
        }),
        Ok(())
    );
    // A VMCS link pointer that is aligned and within MAXPHYADDR passes (its contents are not read).
    assert_eq!(ok(&|v| v.set(Field::VmcsLinkPointer, 0x7000)), Ok(()));
    // Tigerlake (IA32_VMX_BASIC[56]): #GP may be injected without its error code.
    let tgl = caps_of(&load(TIGERLAKE));
    let mut v = valid_vmcs(&tgl);
    inject(&mut v, 3, 13, false);
    assert_eq!(check_entry(&v, &tgl), Ok(()));
}

#[test]
fn the_doc_lists_every_check_with_its_section() {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/entry-checks.md"),
    )
    .expect("docs/entry-checks.md");
    let mut section = "";
    let mut listed = HashMap::new();
    for line in doc.lines() {
        if let Some(h) = line.strip_prefix("### ") {
            section = h.split_whitespace().next().unwrap_or("");
        } else if let Some(rest) = line.strip_prefix("| `") {
            let id = rest.split('`').next().unwrap_or("");
            listed.insert(id.to_string(), section.to_string());
        }
    }
    for c in CHECKS {
        assert_eq!(
            listed.get(c.id).map(String::as_str),
            Some(c.section),
            "{} in docs/entry-checks.md",
            c.id
        );
    }
    assert_eq!(listed.len(), CHECKS.len());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
    /// The checker must not panic on any VMCS contents or capabilities (core rule: no panic
    /// reachable from input); it may only report.
    #[test]
    fn never_panics_on_arbitrary_state(
        values in proptest::collection::vec(proptest::prelude::any::<u64>(), Field::COUNT),
        caps_words in proptest::collection::vec(proptest::prelude::any::<u64>(), 12),
        phys in proptest::prelude::any::<u8>(),
        keep_valid_mask in proptest::prelude::any::<u64>(),
    ) {
        let base = caps_of(&load(SKYLAKE));
        let w = |i: usize| caps_words.get(i).copied().unwrap_or(0);
        let caps = VmxCaps {
            basic: w(0), pinbased: ctls(w(1)), procbased: ctls(w(2)), procbased2: ctls(w(3)),
            exit: ctls(w(4)), entry: ctls(w(5)), misc: w(6), cr0_fixed0: w(7), cr0_fixed1: w(8),
            cr4_fixed0: w(9), cr4_fixed1: w(10), ept_vpid_cap: w(11), max_phys_bits: phys,
            ..base
        };
        // Start from the valid guest and overwrite a random subset of fields with random values.
        let mut v = valid_vmcs(&base);
        for (i, f) in Field::ALL.iter().enumerate() {
            if keep_valid_mask.rotate_left(i as u32) & 1 == 0 {
                v.set(*f, values[i]);
            }
        }
        let first = check_entry(&v, &caps);
        let mut out = [None; 4];
        let n = all_violations(&v, &caps, &mut out);
        proptest::prop_assert_eq!(first.is_ok(), n == 0);
        if let Err(e) = first {
            proptest::prop_assert_eq!(out[0], Some(e));
            let _ = e.to_string();
        }
    }
}
