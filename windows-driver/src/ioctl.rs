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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn core_codes_do_not_collide_with_the_version_query_and_are_buffered() {
        for op in Op::ALL {
            let code = op.windows_ioctl();
            assert_ne!(code, IOCTL_SMUDGE_GET_VERSION);
            assert_eq!(code & 3, METHOD_BUFFERED, "{op:?}");
            assert_eq!(code >> 16, FILE_DEVICE_UNKNOWN, "{op:?}");
            assert_eq!(Op::from_windows_ioctl(code), Some(op));
        }
        assert_eq!(Op::from_windows_ioctl(IOCTL_SMUDGE_GET_VERSION), None);
    }

    #[test]
    fn request_and_response_lengths_are_both_enforced() {
        // RunReq is two u32 (8 bytes); RunResp is the fields of abi.rs added up.
        let resp = 4 + 4 + 8 + 8 + 4 + 4 + 256 + smudge_core::abi::MESSAGE_LEN;
        assert_eq!(check_lengths(Op::Run, 8, resp), Ok(()));
        assert_eq!(
            check_lengths(Op::Run, 7, resp),
            Err(STATUS_INVALID_PARAMETER)
        );
        assert_eq!(
            check_lengths(Op::Run, 8, resp - 1),
            Err(STATUS_BUFFER_TOO_SMALL)
        );
        assert_eq!(check_lengths(Op::Run, 4096, 4096), Ok(()));
        assert_eq!(Op::Run.response_size(), resp);
        // Setup answers nothing: an empty output buffer is fine, a short input is not.
        assert_eq!(check_lengths(Op::Setup, 24, 0), Ok(()));
        assert_eq!(
            check_lengths(Op::Setup, 23, 0),
            Err(STATUS_INVALID_PARAMETER)
        );
        // Stats takes only the version word.
        assert_eq!(
            check_lengths(Op::Stats, 4, Op::Stats.response_size()),
            Ok(())
        );
        assert_eq!(
            check_lengths(Op::Stats, 0, Op::Stats.response_size()),
            Err(STATUS_INVALID_PARAMETER)
        );
    }

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
        assert_eq!(
            dispatch(IOCTL_SMUDGE_GET_VERSION, 0, &mut buf, &info()),
            Ok(24)
        );
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
        assert_eq!(
            dispatch(IOCTL_SMUDGE_GET_VERSION, 0, &mut short, &info()),
            Err(STATUS_BUFFER_TOO_SMALL)
        );
        assert_eq!(short, [0u8; 23]);
        let mut buf = [0u8; 24];
        assert_eq!(
            dispatch(IOCTL_SMUDGE_GET_VERSION, 4, &mut buf, &info()),
            Err(STATUS_INVALID_PARAMETER)
        );
        assert_eq!(
            dispatch(IOCTL_SMUDGE_GET_VERSION, 0, &mut [], &info()),
            Err(STATUS_BUFFER_TOO_SMALL)
        );
    }

    #[test]
    fn unknown_codes_are_invalid_device_requests() {
        let mut buf = [0u8; 64];
        for code in [
            0,
            IOCTL_SMUDGE_GET_VERSION ^ 1,
            ctl_code(FILE_DEVICE_UNKNOWN, 0x801, 0, FILE_READ_ACCESS),
        ] {
            assert_eq!(
                dispatch(code, 0, &mut buf, &info()),
                Err(STATUS_INVALID_DEVICE_REQUEST)
            );
        }
    }
}
