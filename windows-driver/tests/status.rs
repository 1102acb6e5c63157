//! Host tests of `smudge_windows::status` (the driver's OS-free half).

use crate::status::*;
use smudge_core::abi::AbiError;
use smudge_core::vmx::admission::Refusal;
use smudge_core::vmx::caps::{Reason, Unsupported};
use smudge_core::vmx::root::VmxonFailure;

#[test]
fn every_failure_status_has_error_severity() {
    // ntstatus.h: bits 31:30 are the severity; 3 = error, 2 = warning (STATUS_DEVICE_BUSY is a
    // warning, which NT_SUCCESS still counts as failure: the value is negative).
    for s in [
        STATUS_DEVICE_BUSY,
        STATUS_INVALID_DEVICE_STATE,
        STATUS_REVISION_MISMATCH,
        STATUS_ACCESS_VIOLATION,
        STATUS_IO_DEVICE_ERROR,
        STATUS_QUOTA_EXCEEDED,
        STATUS_WORKING_SET_QUOTA,
        STATUS_OBJECT_NAME_COLLISION,
    ] {
        assert!(s < 0, "{s:#x} must fail NT_SUCCESS");
    }
    assert_eq!((STATUS_DEVICE_BUSY as u32) >> 30, 2);
}

#[test]
fn refusals_map_to_what_sc_start_reports() {
    assert_eq!(
        from_refusal(Refusal::Core(Unsupported {
            reason: Reason::VmxAbsent
        })),
        STATUS_NOT_SUPPORTED
    );
    assert_eq!(
        from_refusal(Refusal::FeatureControlUnlocked),
        STATUS_DEVICE_CONFIGURATION_ERROR
    );
    assert_eq!(from_refusal(Refusal::VmxInUse), STATUS_RESOURCE_IN_USE);
    assert_eq!(
        from_refusal(Refusal::VmxHiddenByHypervisor),
        STATUS_RESOURCE_IN_USE
    );
    assert_eq!(
        from_refusal(Refusal::AsymmetricProcessors),
        STATUS_HV_FEATURE_UNAVAILABLE
    );
    assert_eq!(from_vmxon(None), STATUS_DEVICE_CONFIGURATION_ERROR);
    assert_eq!(
        from_vmxon(Some(VmxonFailure::InUse)),
        STATUS_RESOURCE_IN_USE
    );
}

#[test]
fn abi_errors_map_like_the_linux_errnos() {
    // Linux: EFAULT for pointers, ENOTTY for unknown requests, EINVAL for the rest.
    assert_eq!(from_abi(AbiError::BadPointer), STATUS_ACCESS_VIOLATION);
    assert_eq!(
        from_abi(AbiError::UnknownRequest),
        STATUS_INVALID_DEVICE_REQUEST
    );
    assert_eq!(from_abi(AbiError::BadMemSize), STATUS_INVALID_PARAMETER);
    assert_eq!(
        from_fail(smudge_core::Error::OutOfMemory.into()),
        STATUS_INSUFFICIENT_RESOURCES
    );
    assert_eq!(
        from_fail(smudge_core::Error::Unsupported.into()),
        STATUS_NOT_SUPPORTED
    );
    assert_eq!(
        from_fail(smudge_core::Error::GpaOutOfRange.into()),
        STATUS_INVALID_PARAMETER
    );
}
