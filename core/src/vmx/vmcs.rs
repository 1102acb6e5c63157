//! The VMCS as smudge sees it: a field-level access trait, an in-memory image, and typed views of
//! the fields the VM-entry checker interprets (SDM Vol. 3C chapter 25, "Virtual-Machine Control
//! Structures"; chapter 24 in older editions).
//!
//! The hardware implementation of [`VmcsAccess`] (VMREAD/VMWRITE on the current VMCS) lives in the
//! arch layer; [`VmcsImage`] is the software one used by tests and to prepare a VMCS before it is
//! written out.

use super::fields::Field;

/// Why a VMCS field could not be read or written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmcsError {
    /// There is no current VMCS (VMfailInvalid, SDM 31.2).
    NoCurrentVmcs,
    /// The field is not supported by this processor (VM-instruction error 12, SDM 31.4).
    UnsupportedField(Field),
    /// VMWRITE to a read-only field (VM-instruction error 13, SDM 31.4).
    ReadOnlyField(Field),
    /// Any other VMfailValid, with its VM-instruction error number (SDM 31.4).
    InstructionError(u32),
}

impl VmcsError {
    /// A one-line description.
    pub const fn message(&self) -> &'static str {
        match self {
            VmcsError::NoCurrentVmcs => "no current VMCS (VMfailInvalid)",
            VmcsError::UnsupportedField(_) => {
                "VMREAD/VMWRITE of a field this processor does not support (VM-instruction error 12)"
            }
            VmcsError::ReadOnlyField(_) => "VMWRITE to a read-only VMCS field (VM-instruction error 13)",
            VmcsError::InstructionError(_) => "VMREAD/VMWRITE failed (VMfailValid)",
        }
    }
}

impl core::fmt::Display for VmcsError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VmcsError::UnsupportedField(x) | VmcsError::ReadOnlyField(x) => {
                write!(f, "{}: {}", self.message(), x)
            }
            VmcsError::InstructionError(n) => write!(f, "{}: error {}", self.message(), n),
            VmcsError::NoCurrentVmcs => f.write_str(self.message()),
        }
    }
}

/// Field-level access to a VMCS. Object-safe: the checker takes `&dyn VmcsAccess`.
pub trait VmcsAccess {
    /// Reads a field, zero-extended to 64 bits.
    fn read(&self, field: Field) -> Result<u64, VmcsError>;
    /// Writes a field; bits beyond the field's width are dropped, as VMWRITE does.
    fn write(&mut self, field: Field, value: u64) -> Result<(), VmcsError>;
}

/// An in-memory VMCS: every field smudge knows, fixed size, no allocation. Unwritten fields read
/// as 0; writes are truncated to the field width (SDM 31.3, VMWRITE: "bits of the source operand
/// beyond the field width are ignored"). Unlike hardware it also accepts writes to the read-only
/// exit-information fields, so tests can stage a VM exit.
#[derive(Clone, PartialEq, Eq)]
pub struct VmcsImage {
    values: [u64; Field::COUNT],
}

impl VmcsImage {
    /// An image with every field 0.
    pub const fn new() -> VmcsImage {
        VmcsImage {
            values: [0; Field::COUNT],
        }
    }
}

impl Default for VmcsImage {
    fn default() -> Self {
        VmcsImage::new()
    }
}

impl core::fmt::Debug for VmcsImage {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut m = f.debug_map();
        for field in Field::ALL {
            if let Some(v) = self.values.get(field.slot()) {
                if *v != 0 {
                    m.entry(&field.name(), &format_args!("{v:#x}"));
                }
            }
        }
        m.finish()
    }
}

impl VmcsAccess for VmcsImage {
    fn read(&self, field: Field) -> Result<u64, VmcsError> {
        self.values
            .get(field.slot())
            .copied()
            .ok_or(VmcsError::UnsupportedField(field))
    }
    fn write(&mut self, field: Field, value: u64) -> Result<(), VmcsError> {
        let slot = self
            .values
            .get_mut(field.slot())
            .ok_or(VmcsError::UnsupportedField(field))?;
        *slot = value & field.width().mask();
        Ok(())
    }
}

/// The controls the checker interprets, under the names it uses (defined once in
/// `vmx::controls`).
pub mod ctl {
    pub use crate::vmx::controls::primary as proc;
    pub use crate::vmx::controls::secondary as proc2;
    pub use crate::vmx::controls::{entry, exit, pin};
}

/// A segment selector (SDM Vol. 3A 3.4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selector(pub u16);

impl Selector {
    /// Requested privilege level, bits 1:0.
    pub const fn rpl(self) -> u8 {
        (self.0 & 3) as u8
    }
    /// Table indicator, bit 2 (1 = LDT).
    pub const fn ti(self) -> bool {
        self.0 & 4 != 0
    }
    /// Descriptor index, bits 15:3.
    pub const fn index(self) -> u16 {
        self.0 >> 3
    }
}

/// Segment access rights as the VMCS stores them (SDM 25.4.1, Table 25-2; 24.4.1 Table 24-2 in
/// older editions): bits 3:0 type, 4 S, 6:5 DPL, 7 P, 11:8 reserved, 12 AVL, 13 L, 14 D/B,
/// 15 G, 16 segment unusable, 31:17 reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessRights(pub u32);

impl AccessRights {
    /// The value VM exits and smudge use for an unusable segment (only bit 16 set).
    pub const UNUSABLE: AccessRights = AccessRights(1 << 16);
    /// Bits that are reserved (11:8 and 31:17).
    pub const RESERVED_MASK: u32 = 0xF00 | 0xFFFE_0000;

    /// Builds access rights from their parts; `unusable` sets bit 16.
    #[allow(clippy::too_many_arguments)]
    pub const fn new(
        seg_type: u8,
        s: bool,
        dpl: u8,
        p: bool,
        l: bool,
        db: bool,
        g: bool,
        unusable: bool,
    ) -> AccessRights {
        AccessRights(
            (seg_type as u32 & 0xF)
                | (s as u32) << 4
                | (dpl as u32 & 3) << 5
                | (p as u32) << 7
                | (l as u32) << 13
                | (db as u32) << 14
                | (g as u32) << 15
                | (unusable as u32) << 16,
        )
    }
    /// Segment type, bits 3:0.
    pub const fn seg_type(self) -> u8 {
        (self.0 & 0xF) as u8
    }
    /// Descriptor type S, bit 4 (1 = code or data).
    pub const fn s(self) -> bool {
        self.0 & (1 << 4) != 0
    }
    /// Descriptor privilege level, bits 6:5.
    pub const fn dpl(self) -> u8 {
        ((self.0 >> 5) & 3) as u8
    }
    /// Present, bit 7.
    pub const fn p(self) -> bool {
        self.0 & (1 << 7) != 0
    }
    /// 64-bit code segment L, bit 13.
    pub const fn l(self) -> bool {
        self.0 & (1 << 13) != 0
    }
    /// Default operation size D/B, bit 14.
    pub const fn db(self) -> bool {
        self.0 & (1 << 14) != 0
    }
    /// Granularity G, bit 15.
    pub const fn g(self) -> bool {
        self.0 & (1 << 15) != 0
    }
    /// Segment unusable, bit 16.
    pub const fn unusable(self) -> bool {
        self.0 & (1 << 16) != 0
    }
    /// True if any reserved bit (11:8, 31:17) is set.
    pub const fn reserved_bits_set(self) -> bool {
        self.0 & Self::RESERVED_MASK != 0
    }
}

/// Interruption type in bits 10:8 of the VM-entry interruption-information field
/// (SDM 25.8.3, Table 25-17).
pub mod interruption_type {
    /// External interrupt.
    pub const EXTERNAL_INTERRUPT: u8 = 0;
    /// Reserved on all processors.
    pub const RESERVED: u8 = 1;
    /// Non-maskable interrupt.
    pub const NMI: u8 = 2;
    /// Hardware exception.
    pub const HARDWARE_EXCEPTION: u8 = 3;
    /// Software interrupt (INT n).
    pub const SOFTWARE_INTERRUPT: u8 = 4;
    /// Privileged software exception (INT1).
    pub const PRIVILEGED_SOFTWARE_EXCEPTION: u8 = 5;
    /// Software exception (INT3, INTO).
    pub const SOFTWARE_EXCEPTION: u8 = 6;
    /// Other event (pending MTF VM exit).
    pub const OTHER_EVENT: u8 = 7;
}

/// The VM-entry interruption-information field (SDM 25.8.3, Table 25-17): bits 7:0 vector,
/// 10:8 type, 11 deliver error code, 30:12 reserved, 31 valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterruptionInfo(pub u32);

impl InterruptionInfo {
    /// Builds a valid event of `ty` with `vector`.
    pub const fn new(ty: u8, vector: u8, deliver_error_code: bool) -> InterruptionInfo {
        InterruptionInfo(
            1 << 31 | (deliver_error_code as u32) << 11 | (ty as u32 & 7) << 8 | vector as u32,
        )
    }
    /// Valid, bit 31.
    pub const fn valid(self) -> bool {
        self.0 & (1 << 31) != 0
    }
    /// Vector, bits 7:0.
    pub const fn vector(self) -> u8 {
        (self.0 & 0xFF) as u8
    }
    /// Interruption type, bits 10:8 (see [`interruption_type`]).
    pub const fn ty(self) -> u8 {
        ((self.0 >> 8) & 7) as u8
    }
    /// Deliver error code, bit 11.
    pub const fn deliver_error_code(self) -> bool {
        self.0 & (1 << 11) != 0
    }
    /// Reserved bits 30:12.
    pub const fn reserved_bits(self) -> u32 {
        self.0 & 0x7FFF_F000
    }
}

/// Guest activity states (SDM 25.4.2).
pub mod activity {
    /// Active.
    pub const ACTIVE: u64 = 0;
    /// HLT.
    pub const HLT: u64 = 1;
    /// Shutdown.
    pub const SHUTDOWN: u64 = 2;
    /// Wait-for-SIPI.
    pub const WAIT_FOR_SIPI: u64 = 3;
}

/// Guest interruptibility-state bits (SDM 25.4.2, Table 25-3).
pub mod interruptibility {
    /// Blocking by STI.
    pub const STI: u64 = 1 << 0;
    /// Blocking by MOV SS.
    pub const MOV_SS: u64 = 1 << 1;
    /// Blocking by SMI.
    pub const SMI: u64 = 1 << 2;
    /// Blocking by NMI.
    pub const NMI: u64 = 1 << 3;
    /// Enclave interruption.
    pub const ENCLAVE_INTERRUPTION: u64 = 1 << 4;
}

/// True if `addr` is canonical for a processor with `linear_bits` linear-address bits
/// (SDM Vol. 1 3.3.7.1): bits 63:linear_bits-1 all equal.
pub const fn is_canonical(addr: u64, linear_bits: u32) -> bool {
    if linear_bits == 0 || linear_bits >= 64 {
        return true;
    }
    let shift = 64 - linear_bits;
    (((addr << shift) as i64) >> shift) as u64 == addr
}

/// True if `addr` sets a bit at or above `phys_bits` (the processor's physical-address width).
pub const fn beyond_phys(addr: u64, phys_bits: u32) -> bool {
    phys_bits < 64 && addr >> phys_bits != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwritten_fields_read_zero_and_writes_truncate_to_the_field_width() {
        let mut v = VmcsImage::new();
        for f in Field::ALL {
            assert_eq!(v.read(*f), Ok(0));
        }
        assert_eq!(v.write(Field::GuestCsSelector, 0xDEAD_BEEF_0008), Ok(()));
        assert_eq!(v.read(Field::GuestCsSelector), Ok(0x0008));
        assert_eq!(v.write(Field::GuestCsLimit, 0x1_FFFF_FFFF), Ok(()));
        assert_eq!(v.read(Field::GuestCsLimit), Ok(0xFFFF_FFFF));
        assert_eq!(v.write(Field::VmcsLinkPointer, u64::MAX), Ok(()));
        assert_eq!(v.read(Field::VmcsLinkPointer), Ok(u64::MAX));
        assert_eq!(v.write(Field::GuestRip, 0xFFFF_8000_0000_1000), Ok(()));
        assert_eq!(v.read(Field::GuestRip), Ok(0xFFFF_8000_0000_1000));
        // Other fields are untouched.
        assert_eq!(v.read(Field::GuestSsSelector), Ok(0));
    }

    #[test]
    fn access_rights_layout_follows_table_25_2() {
        // 64-bit code: type 11, S, DPL 0, P, L, G -> 0xA09B (the value Linux/KVM use).
        let cs = AccessRights::new(11, true, 0, true, true, false, true, false);
        assert_eq!(cs.0, 0xA09B);
        assert!(cs.l() && !cs.db() && cs.g() && cs.p() && cs.s());
        // Flat data: type 3, S, P, D/B, G -> 0xC093.
        assert_eq!(
            AccessRights::new(3, true, 0, true, false, true, true, false).0,
            0xC093
        );
        assert_eq!(AccessRights(0x60).dpl(), 3);
        assert!(AccessRights::UNUSABLE.unusable());
        assert!(AccessRights(0x100).reserved_bits_set());
        assert!(AccessRights(0x2_0000).reserved_bits_set());
        assert!(!AccessRights(0x1_F0FF).reserved_bits_set());
    }

    #[test]
    fn canonical_and_physical_width() {
        assert!(is_canonical(0x0000_7FFF_FFFF_FFFF, 48));
        assert!(!is_canonical(0x0000_8000_0000_0000, 48));
        assert!(is_canonical(0xFFFF_8000_0000_0000, 48));
        assert!(is_canonical(0x0000_8000_0000_0000, 57));
        assert!(!is_canonical(0x0100_0000_0000_0000, 57));
        assert!(beyond_phys(1 << 40, 40));
        assert!(!beyond_phys((1 << 40) - 1, 40));
        let s = Selector(0x1F);
        assert_eq!((s.rpl(), s.ti(), s.index()), (3, true, 3));
    }
}
