//! Host tests of `smudge_windows::ioctl` (the driver's OS-free half).
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use crate::ioctl::*;
use crate::status::*;
use smudge_core::abi::Op;

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
