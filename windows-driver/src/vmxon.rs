//! Decisions around VMXON and a vCPU's pages that need no processor access.

use smudge_core::vmx::caps::VmxCaps;

/// CR4.VMXE (bit 13).
pub const CR4_VMXE: u64 = 1 << 13;

/// CR0 or CR4 breaks the VMX fixed-bit rules, so VMXON would fail (SDM 24.8, A.7, A.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrMismatch {
    /// CR0 lacks a FIXED0 bit or has a bit FIXED1 forbids.
    Cr0 {
        /// Bits that must be 1 but are 0.
        missing: u64,
        /// Bits that must be 0 but are 1.
        forbidden: u64,
    },
    /// CR4 (with VMXE set) lacks a FIXED0 bit or has a bit FIXED1 forbids.
    Cr4 {
        /// Bits that must be 1 but are 0.
        missing: u64,
        /// Bits that must be 0 but are 1.
        forbidden: u64,
    },
}

fn fits(value: u64, fixed0: u64, fixed1: u64) -> (u64, u64) {
    // SDM A.7/A.8: a bit set in FIXED0 must be 1; a bit clear in FIXED1 must be 0.
    (fixed0 & !value, value & !fixed1)
}

/// The CR4 to load before VMXON: the current CR4 plus VMXE. The driver changes no other bit of a
/// register Windows owns; if anything else breaks the fixed bits it refuses instead.
pub fn cr4_for_vmxon(cr0: u64, cr4: u64, caps: &VmxCaps) -> Result<u64, CrMismatch> {
    let (missing, forbidden) = fits(cr0, caps.cr0_fixed0, caps.cr0_fixed1);
    if missing != 0 || forbidden != 0 {
        return Err(CrMismatch::Cr0 { missing, forbidden });
    }
    let new = cr4 | CR4_VMXE;
    let (missing, forbidden) = fits(new, caps.cr4_fixed0, caps.cr4_fixed1);
    if missing != 0 || forbidden != 0 {
        return Err(CrMismatch::Cr4 { missing, forbidden });
    }
    Ok(new)
}

/// The MSRs a guest reads and writes without an exit: those the VMCS switches on entry and exit
/// (IA32_EFER by the load/save-EFER controls, FS/GS base by the guest-state area). The Linux
/// module passes the same three.
pub const PASSTHROUGH_MSRS: [u32; 3] = [0xC000_0080, 0xC000_0100, 0xC000_0101];

/// Word `index` (0..512) of the 4 KiB MSR bitmap (SDM 25.6.9): all ones (every access exits)
/// except the read and write bits of `passthrough`. The bitmap is four 1 KiB parts: read-low
/// (MSRs 0..=0x1FFF), read-high (0xC0000000..=0xC0001FFF), write-low, write-high.
pub fn msr_bitmap_word(index: usize, passthrough: &[u32]) -> u64 {
    let mut word = u64::MAX;
    for &msr in passthrough {
        let (read_base, write_base) = match msr {
            0..=0x1FFF => (0usize, 2048usize),
            0xC000_0000..=0xC000_1FFF => (1024, 3072),
            _ => continue,
        };
        let bit = (msr & 0x1FFF) as usize;
        for base in [read_base, write_base] {
            let byte = base + bit / 8;
            if byte / 8 == index {
                word &= !(1u64 << ((byte % 8) * 8 + bit % 8));
            }
        }
    }
    word
}

/// The first quadword of a VMXON or VMCS region: the VMCS revision identifier in bits 30:0 and
/// bit 31 clear (SDM 25.2, 25.11.5).
pub const fn region_header(caps: &VmxCaps) -> u64 {
    caps.basic & 0x7FFF_FFFF
}

/// The MSRs of the CAPS answer, in the Linux module's order (the answer has room for 24).
pub const CAPS_MSRS: [u32; 19] =
    [0x3a, 0x480, 0x481, 0x482, 0x483, 0x484, 0x485, 0x486, 0x487, 0x488, 0x489, 0x48a, 0x48b, 0x48c, 0x48d, 0x48e, 0x48f, 0x490, 0x491];

/// Whether `msr` exists on a processor with these capabilities, so that RDMSR cannot #GP
/// (Windows gives a driver no RDMSR-safe; a #GP in the kernel is a bug check). SDM Appendix A:
/// 0x3A and 0x480-0x48A exist with VMX; 0x48B (PROCBASED_CTLS2) when the primary controls allow
/// "activate secondary controls"; 0x48C (EPT_VPID_CAP) when the secondary controls allow EPT or
/// VPID; 0x48D-0x490 (TRUE_*) when IA32_VMX_BASIC bit 55 is set; 0x491 (VMFUNC) when the
/// secondary controls allow "enable VM functions" (bit 13).
pub fn caps_msr_exists(msr: u32, caps: &VmxCaps) -> bool {
    if caps.vmx_supported() != Some(true) {
        return false;
    }
    match msr {
        0x3a | 0x480..=0x48a => true,
        0x48b => caps.secondary_controls(),
        0x48c => caps.secondary_controls() && (caps.procbased2.may_be_1 & (1 << 1 | 1 << 5)) != 0,
        0x48d..=0x490 => caps.true_ctls(),
        0x491 => caps.secondary_controls() && caps.procbased2.may_be_1 & (1 << 13) != 0,
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// Bochs corei7_skylake_x, read from the fixture dump like the driver reads the MSRs: CR0
    /// FIXED0 0x80000021 (PE, NE, PG), CR4 FIXED0 0x2000 (VMXE), CR4 FIXED1 0x3727ff.
    fn caps() -> VmxCaps {
        use smudge_core::vmx::caps::MsrValue;
        use smudge_core::vmx::msr_dump::MsrDump;
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared-tests/fixtures/vmx-msrs/bochs-corei7_skylake_x.msr");
        let d = MsrDump::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
        let caps = VmxCaps::from_reader(|m| d.msr(m), |l, s| d.cpuid(l, s));
        assert!(matches!(d.msr(0x489), MsrValue::Value(0x3727ff)));
        caps
    }

    #[test]
    fn vmxon_adds_only_vmxe() {
        let cr0 = 0x8005_0033; // PG, AM, WP, NE, ET, MP, PE: a Windows x64 CR0
        assert_eq!(cr4_for_vmxon(cr0, 0x0035_06f8, &caps()), Ok(0x0035_26f8));
    }

    #[test]
    fn fixed_bit_violations_are_named() {
        let caps = caps();
        // CR0 without NE (bit 5).
        assert_eq!(cr4_for_vmxon(0x8005_0013, 0x6f8, &caps), Err(CrMismatch::Cr0 { missing: 0x20, forbidden: 0 }));
        // CR4 with bit 22 (PKS, not allowed by this FIXED1).
        assert_eq!(cr4_for_vmxon(0x8005_0033, 0x6f8 | 1 << 22, &caps), Err(CrMismatch::Cr4 { missing: 0, forbidden: 1 << 22 }));
    }

    #[test]
    fn msr_bitmap_clears_exactly_the_passthrough_bits() {
        // SDM 25.6.9 by hand: EFER 0xC0000080 -> bit 0x80 of the read-high part (byte 1024 + 16,
        // quadword 130, bit 0) and of the write-high part (byte 3072 + 16, quadword 386, bit 0).
        // FS_BASE 0xC0000100 and GS_BASE 0xC0000101 -> bits 0x100/0x101: byte 1024 + 32
        // (quadword 132, bits 0 and 1) and byte 3072 + 32 (quadword 388).
        let words: Vec<u64> = (0..512).map(|i| msr_bitmap_word(i, &PASSTHROUGH_MSRS)).collect();
        assert_eq!(words[130], !1);
        assert_eq!(words[386], !1);
        assert_eq!(words[132], !3);
        assert_eq!(words[388], !3);
        let cleared: u32 = words.iter().map(|w| w.count_zeros()).sum();
        assert_eq!(cleared, 6, "three MSRs, read and write each");
        // A low MSR (IA32_SYSENTER_CS 0x174) lands in the read-low and write-low parts.
        assert_eq!(msr_bitmap_word(0x174 / 64, &[0x174]), !(1u64 << (0x174 % 64)));
        assert_eq!(msr_bitmap_word(256 + 0x174 / 64, &[0x174]), !(1u64 << (0x174 % 64)));
        // MSRs outside both ranges cannot be passed through (SDM 25.6.9: they always exit).
        assert!((0..512).all(|i| msr_bitmap_word(i, &[0x4000_0000]) == u64::MAX));
    }

    #[test]
    fn caps_msrs_exist_exactly_where_the_fixture_dumps_have_them() {
        use smudge_core::vmx::caps::MsrValue;
        use smudge_core::vmx::msr_dump::MsrDump;
        // The Bochs dumps record every MSR as a value or `absent` (what RDMSR did there): the
        // existence rule must never claim an absent MSR and must find every present one.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared-tests/fixtures/vmx-msrs");
        let mut checked = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.starts_with("bochs-") || !name.ends_with(".msr") {
                continue;
            }
            let d = MsrDump::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let caps = VmxCaps::from_reader(|m| d.msr(m), |l, s| d.cpuid(l, s));
            for msr in CAPS_MSRS {
                match d.msr(msr) {
                    MsrValue::Value(_) if msr != 0x3a => assert!(caps_msr_exists(msr, &caps), "{name}: {msr:#x} present"),
                    MsrValue::Absent => assert!(!caps_msr_exists(msr, &caps), "{name}: {msr:#x} absent"),
                    _ => {}
                }
                checked += 1;
            }
        }
        assert!(checked >= 10 * CAPS_MSRS.len());
    }

    #[test]
    fn region_header_is_the_revision_with_bit_31_clear() {
        assert_eq!(region_header(&caps()), 0x2b);
        let c = VmxCaps { basic: 0xffff_ffff, ..caps() };
        assert_eq!(region_header(&c), 0x7fff_ffff);
    }
}
