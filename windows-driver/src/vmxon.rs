//! Decisions around VMXON that need no processor access.

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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// Bochs corei7_skylake_x, read from the fixture dump like the driver reads the MSRs: CR0
    /// FIXED0 0x80000021 (PE, NE, PG), CR4 FIXED0 0x2000 (VMXE), CR4 FIXED1 0x3727ff.
    fn caps() -> VmxCaps {
        use smudge_core::vmx::caps::MsrValue;
        use smudge_core::vmx::msr_dump::MsrDump;
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared-tests/fixtures/vmx-msrs/bochs-corei7_skylake_x.msr"
        );
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
        assert_eq!(
            cr4_for_vmxon(0x8005_0013, 0x6f8, &caps),
            Err(CrMismatch::Cr0 {
                missing: 0x20,
                forbidden: 0
            })
        );
        // CR4 with bit 22 (PKS, not allowed by this FIXED1).
        assert_eq!(
            cr4_for_vmxon(0x8005_0033, 0x6f8 | 1 << 22, &caps),
            Err(CrMismatch::Cr4 {
                missing: 0,
                forbidden: 1 << 22
            })
        );
    }
}
