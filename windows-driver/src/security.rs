//! Who may open `\\.\Smudge`: LocalSystem and the Administrators group, nobody else (like the
//! Linux module's root-only /dev/smudge). The driver builds the DACL with the Rtl security
//! functions from the SIDs and the sizes here (MS-DTYP 2.4.2.2 SID, 2.4.4.2 ACCESS_ALLOWED_ACE,
//! 2.4.5 ACL) and sets it on the device object.

/// `S-1-5-18`, LocalSystem: revision 1, one sub-authority, identifier authority 5 (NT,
/// big-endian 48-bit), sub-authority 18 (little-endian).
pub const SID_LOCAL_SYSTEM: [u8; 12] = [1, 1, 0, 0, 0, 0, 0, 5, 18, 0, 0, 0];
/// `S-1-5-32-544`, BUILTIN\Administrators: sub-authorities 32 (BUILTIN) and 544.
pub const SID_ADMINISTRATORS: [u8; 16] = [1, 2, 0, 0, 0, 0, 0, 5, 32, 0, 0, 0, 0x20, 2, 0, 0];

/// FILE_ALL_ACCESS: every right on the device (STANDARD_RIGHTS_REQUIRED | SYNCHRONIZE | 0x1FF).
pub const FILE_ALL_ACCESS: u32 = 0x001F_01FF;
/// ACL_REVISION.
pub const ACL_REVISION: u32 = 2;
/// SECURITY_DESCRIPTOR_REVISION.
pub const SECURITY_DESCRIPTOR_REVISION: u32 = 1;
/// DACL_SECURITY_INFORMATION.
pub const DACL_SECURITY_INFORMATION: u32 = 4;
/// WRITE_DAC, the right to set the DACL through a handle.
pub const WRITE_DAC: u32 = 0x0004_0000;
/// OBJ_KERNEL_HANDLE.
pub const OBJ_KERNEL_HANDLE: u32 = 0x200;
/// SECURITY_DESCRIPTOR_MIN_LENGTH on x64 (absolute form: 4 bytes of header, 4 pointers).
pub const SECURITY_DESCRIPTOR_LEN: usize = 40;

/// Bytes of an ACL holding one ACCESS_ALLOWED_ACE per SID: the 8-byte ACL header, and per ACE
/// its 4-byte header, 4-byte mask and the SID.
pub const fn acl_len(sid_lens: &[usize]) -> usize {
    let mut n = 8;
    let mut i = 0;
    while i < sid_lens.len() {
        n += 8 + sid_lens[i];
        i += 1;
    }
    n
}

/// The DACL of the device, in bytes.
pub const DACL_LEN: usize = acl_len(&[SID_LOCAL_SYSTEM.len(), SID_ADMINISTRATORS.len()]);

/// The length a SID's bytes declare (RtlLengthSid: 8 + 4 per sub-authority).
pub const fn sid_len(sid: &[u8]) -> usize {
    8 + 4 * sid[1] as usize
}
