//! DeviceIoControl codes and their answers, independent of the IRP plumbing.
//!
//! For now one query: the driver's version and the VT-x features it found. The VM ioctls come
//! with `smudge_core::abi`; their codes must carry FILE_WRITE_ACCESS so that the I/O manager
//! demands a handle opened for writing (only administrators get one on `\Device\Smudge`).

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
pub const IOCTL_SMUDGE_GET_VERSION: u32 = ctl_code(FILE_DEVICE_UNKNOWN, 0x800, METHOD_BUFFERED, FILE_READ_ACCESS);

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
        let words =
            [self.magic, self.abi_version, self.driver_version, self.features, self.vmcs_revision, self.processors];
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
pub fn dispatch(code: u32, input_len: usize, output: &mut [u8], info: &VersionInfo) -> Result<usize, NtStatus> {
    match code {
        IOCTL_SMUDGE_GET_VERSION => {
            if input_len != 0 {
                return Err(STATUS_INVALID_PARAMETER);
            }
            let bytes = info.to_bytes();
            let dst = output.get_mut(..VersionInfo::SIZE).ok_or(STATUS_BUFFER_TOO_SMALL)?;
            dst.copy_from_slice(&bytes);
            Ok(VersionInfo::SIZE)
        }
        _ => Err(STATUS_INVALID_DEVICE_REQUEST),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn ctl_code_matches_the_devioctl_h_formula() {
        // CTL_CODE(0x22, 0x800, METHOD_BUFFERED, FILE_READ_ACCESS), worked by hand:
        // 0x22 << 16 = 0x220000, 1 << 14 = 0x4000, 0x800 << 2 = 0x2000 -> 0x226000.
        assert_eq!(IOCTL_SMUDGE_GET_VERSION, 0x0022_6000);
        // The method and access fields decode back out of the code (devioctl.h's METHOD_FROM_CTL_CODE).
        assert_eq!(IOCTL_SMUDGE_GET_VERSION & 3, METHOD_BUFFERED);
        assert_eq!((IOCTL_SMUDGE_GET_VERSION >> 14) & 3, FILE_READ_ACCESS);
    }

    fn info() -> VersionInfo {
        VersionInfo {
            magic: MAGIC,
            abi_version: ABI_VERSION,
            driver_version: 0x000100,
            features: 0b0011,
            vmcs_revision: 0x2b,
            processors: 2,
        }
    }

    #[test]
    fn version_answer_layout() {
        let mut buf = [0xAAu8; 32];
        assert_eq!(dispatch(IOCTL_SMUDGE_GET_VERSION, 0, &mut buf, &info()), Ok(24));
        assert_eq!(&buf[0..4], b"SMDG");
        assert_eq!(&buf[4..8], &[1, 0, 0, 0]);
        assert_eq!(&buf[12..16], &[3, 0, 0, 0]);
        assert_eq!(&buf[16..20], &[0x2b, 0, 0, 0]);
        assert_eq!(&buf[20..24], &[2, 0, 0, 0]);
        // Bytes past the answer are untouched.
        assert_eq!(&buf[24..], &[0xAA; 8]);
    }

    #[test]
    fn lengths_are_validated() {
        let mut short = [0u8; 23];
        assert_eq!(dispatch(IOCTL_SMUDGE_GET_VERSION, 0, &mut short, &info()), Err(STATUS_BUFFER_TOO_SMALL));
        assert_eq!(short, [0u8; 23]);
        let mut buf = [0u8; 24];
        assert_eq!(dispatch(IOCTL_SMUDGE_GET_VERSION, 4, &mut buf, &info()), Err(STATUS_INVALID_PARAMETER));
        assert_eq!(dispatch(IOCTL_SMUDGE_GET_VERSION, 0, &mut [], &info()), Err(STATUS_BUFFER_TOO_SMALL));
    }

    #[test]
    fn unknown_codes_are_invalid_device_requests() {
        let mut buf = [0u8; 64];
        for code in [0, IOCTL_SMUDGE_GET_VERSION ^ 1, ctl_code(FILE_DEVICE_UNKNOWN, 0x801, 0, FILE_READ_ACCESS)] {
            assert_eq!(dispatch(code, 0, &mut buf, &info()), Err(STATUS_INVALID_DEVICE_REQUEST));
        }
    }
}
