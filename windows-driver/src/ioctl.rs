//! DeviceIoControl codes and their answers, independent of the IRP plumbing.
//!
//! Two families share `\\.\Smudge`: the driver's own version query (function 0x800, below) and
//! the VM requests of `smudge_core::abi` (functions 0x801.., `Op::windows_ioctl`), whose lengths
//! [`check_lengths`] validates. Both are METHOD_BUFFERED. The core's codes use FILE_ANY_ACCESS
//! (fixed ABI); see the driver README on why they should demand FILE_WRITE_ACCESS.

use smudge_core::abi::Op;

use crate::status::*;

/// FILE_DEVICE_UNKNOWN (devioctl.h): the device type for software-only devices.
pub const FILE_DEVICE_UNKNOWN: u32 = 0x22;
/// METHOD_BUFFERED: the I/O manager copies input and output through one system buffer.
pub const METHOD_BUFFERED: u32 = 0;
/// FILE_READ_ACCESS: the handle must have been opened with read access.
pub const FILE_READ_ACCESS: u32 = 1;
/// FILE_WRITE_ACCESS: the handle must have been opened with write access.
pub const FILE_WRITE_ACCESS: u32 = 2;

/// The WDK's CTL_CODE macro (devioctl.h).
pub const fn ctl_code(device_type: u32, function: u32, method: u32, access: u32) -> u32 {
    (device_type << 16) | (access << 14) | (function << 2) | method
}

/// Version and capabilities (no input; output [`VersionInfo::SIZE`] bytes).
pub const IOCTL_SMUDGE_GET_VERSION: u32 = ctl_code(
    FILE_DEVICE_UNKNOWN,
    0x800,
    METHOD_BUFFERED,
    FILE_READ_ACCESS,
);

/// "SMDG" as a little-endian u32, so user space can tell it talks to smudge.
pub const MAGIC: u32 = u32::from_le_bytes(*b"SMDG");
/// Version of the ioctl interface; bumped on every incompatible change.
pub const ABI_VERSION: u32 = 1;

/// What [`IOCTL_SMUDGE_GET_VERSION`] returns: six little-endian u32 in this order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VersionInfo {
    /// [`MAGIC`].
    pub magic: u32,
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// Driver version: major << 16 | minor << 8 | patch.
    pub driver_version: u32,
    /// `vtx::Admission::feature_bits()`: bit 0 EPT A/D, 1 PML, 2 VPID, 3 unrestricted guest,
    /// bits 15:8 the dirty-tracking mode (1 A/D scan, 2 PML, 3 write-protect).
    pub features: u32,
    /// VMCS revision identifier (IA32_VMX_BASIC 30:0).
    pub vmcs_revision: u32,
    /// Active logical processors (all checked at load).
    pub processors: u32,
}

impl VersionInfo {
    /// Size of the answer in bytes.
    pub const SIZE: usize = 24;

    fn to_bytes(self) -> [u8; Self::SIZE] {
        let words = [
            self.magic,
            self.abi_version,
            self.driver_version,
            self.features,
            self.vmcs_revision,
            self.processors,
        ];
        let mut out = [0u8; Self::SIZE];
        for (chunk, w) in out.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        out
    }
}

/// Answers one METHOD_BUFFERED request. `input_len` is what the caller sent, `output` is the
/// system buffer cut to the caller's output length. Returns the number of bytes written (the
/// IRP's IoStatus.Information) or the failure status.
pub fn dispatch(
    code: u32,
    input_len: usize,
    output: &mut [u8],
    info: &VersionInfo,
) -> Result<usize, NtStatus> {
    match code {
        IOCTL_SMUDGE_GET_VERSION => {
            if input_len != 0 {
                return Err(STATUS_INVALID_PARAMETER);
            }
            let bytes = info.to_bytes();
            let dst = output
                .get_mut(..VersionInfo::SIZE)
                .ok_or(STATUS_BUFFER_TOO_SMALL)?;
            dst.copy_from_slice(&bytes);
            Ok(VersionInfo::SIZE)
        }
        _ => Err(STATUS_INVALID_DEVICE_REQUEST),
    }
}

/// METHOD_BUFFERED lengths of a VM request: the system buffer must hold the whole request on
/// the way in and the whole response on the way out (the I/O manager sizes it to the larger of
/// the two lengths, so these two checks also bound every access to it).
pub fn check_lengths(op: Op, input_len: usize, output_len: usize) -> Result<(), NtStatus> {
    if input_len < op.request_size() {
        return Err(STATUS_INVALID_PARAMETER);
    }
    if output_len < op.response_size() {
        return Err(STATUS_BUFFER_TOO_SMALL);
    }
    Ok(())
}
