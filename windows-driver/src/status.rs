//! The NTSTATUS values smudge.sys returns (values from the WDK's ntstatus.h).

/// An NTSTATUS: negative (severity bits 11) means error.
pub type NtStatus = i32;

use smudge_core::vmx::admission::Refusal;
use smudge_core::vmx::caps::{Reason, Unsupported};
use smudge_core::vmx::root::VmxonFailure;

/// Success.
pub const STATUS_SUCCESS: NtStatus = 0;
/// Unknown ioctl code or major function.
pub const STATUS_INVALID_DEVICE_REQUEST: NtStatus = 0xC000_0010_u32 as i32;
/// A malformed request (e.g. input where none is expected).
pub const STATUS_INVALID_PARAMETER: NtStatus = 0xC000_000D_u32 as i32;
/// The output buffer is smaller than the answer.
pub const STATUS_BUFFER_TOO_SMALL: NtStatus = 0xC000_0023_u32 as i32;
/// Out of memory.
pub const STATUS_INSUFFICIENT_RESOURCES: NtStatus = 0xC000_009A_u32 as i32;
/// The processor has no VMX (CPUID.1:ECX.VMX = 0).
pub const STATUS_NOT_SUPPORTED: NtStatus = 0xC000_00BB_u32 as i32;
/// The firmware disabled VMX, or left IA32_FEATURE_CONTROL unlocked.
pub const STATUS_DEVICE_CONFIGURATION_ERROR: NtStatus = 0xC000_0182_u32 as i32;
/// Another hypervisor is already in VMX operation (CR4.VMXE = 1).
pub const STATUS_RESOURCE_IN_USE: NtStatus = 0xC000_0708_u32 as i32;
/// VMX is there but without EPT (or without what smudge's EPT needs).
pub const STATUS_HV_FEATURE_UNAVAILABLE: NtStatus = 0xC035_001E_u32 as i32;
/// The handle's VM or vCPU is taken (`share`): a VM-level request while another one of the handle
/// is in progress, or a RUN, GET_REGS or SET_REGS of a vCPU whose RUN is in progress (Linux:
/// EBUSY).
pub const STATUS_DEVICE_BUSY: NtStatus = 0x8000_0011_u32 as i32;
/// A request that needs a VM before Setup, or a second Setup.
pub const STATUS_INVALID_DEVICE_STATE: NtStatus = 0xC000_0184_u32 as i32;
/// The request's ABI version is not `smudge_core::abi::VERSION`.
pub const STATUS_REVISION_MISMATCH: NtStatus = 0xC000_0059_u32 as i32;
/// A user pointer that is null, wraps, lies outside user space, or faults.
pub const STATUS_ACCESS_VIOLATION: NtStatus = 0xC000_0005_u32 as i32;
/// A VMX instruction failed where it should not (VMXON lost on this processor).
pub const STATUS_IO_DEVICE_ERROR: NtStatus = 0xC000_0185_u32 as i32;

/// ADD_SLOT with every slot in use, CREATE_VCPU with every vCPU created (Linux: ENOSPC).
pub const STATUS_QUOTA_EXCEEDED: NtStatus = 0xC000_0044_u32 as i32;
/// The driver-wide page cap is reached (Linux: EDQUOT; Win32 ERROR_WORKING_SET_QUOTA, 1453).
pub const STATUS_WORKING_SET_QUOTA: NtStatus = 0xC000_00A1_u32 as i32;
/// ADD_SLOT overlapping a slot (Linux: EEXIST).
pub const STATUS_OBJECT_NAME_COLLISION: NtStatus = 0xC000_0035_u32 as i32;

/// LOAD_ELF: the image is not a static ELF64 the core accepts (Linux: ENOEXEC).
pub const STATUS_INVALID_IMAGE_FORMAT: NtStatus = 0xC000_007B_u32 as i32;

/// The NTSTATUS of a request the core's ABI decoder refused (Linux: `AbiError::errno`).
pub const fn from_abi(e: smudge_core::abi::AbiError) -> NtStatus {
    use smudge_core::abi::AbiError as A;
    match e {
        A::UnknownRequest => STATUS_INVALID_DEVICE_REQUEST,
        A::Truncated => STATUS_BUFFER_TOO_SMALL,
        A::BadVersion => STATUS_REVISION_MISMATCH,
        A::BadPointer => STATUS_ACCESS_VIOLATION,
        A::ReservedNonZero
        | A::BadMode
        | A::BadMemSize
        | A::BadVcpu
        | A::BadLength
        | A::BadSlot
        | A::BadRflags
        | A::BadRip => STATUS_INVALID_PARAMETER,
    }
}

/// The NTSTATUS DriverEntry returns for an admission refusal (what `sc start` reports).
pub const fn from_refusal(r: Refusal) -> NtStatus {
    match r {
        Refusal::Core(Unsupported {
            reason: Reason::VmxAbsent,
        }) => STATUS_NOT_SUPPORTED,
        Refusal::Core(Unsupported {
            reason: Reason::VmxDisabledLocked { .. },
        })
        | Refusal::FeatureControlUnlocked => STATUS_DEVICE_CONFIGURATION_ERROR,
        // Missing controls, EPT capabilities, unreadable capability MSRs.
        Refusal::Core(_) | Refusal::AsymmetricProcessors => STATUS_HV_FEATURE_UNAVAILABLE,
        Refusal::VmxHiddenByHypervisor | Refusal::VmxInUse => STATUS_RESOURCE_IN_USE,
    }
}

/// The NTSTATUS DriverEntry returns when VMXON fails on a processor (None: it could not be
/// selected).
pub const fn from_vmxon(f: Option<VmxonFailure>) -> NtStatus {
    match f {
        Some(VmxonFailure::NoRegion) => STATUS_INSUFFICIENT_RESOURCES,
        Some(VmxonFailure::InUse) => STATUS_RESOURCE_IN_USE,
        _ => STATUS_DEVICE_CONFIGURATION_ERROR,
    }
}

/// The NTSTATUS of a failed session request (Linux: `Fail::errno`).
pub const fn from_fail(f: smudge_core::session::Fail) -> NtStatus {
    use smudge_core::session::Fail as F;
    match f {
        F::Invalid => STATUS_INVALID_PARAMETER,
        F::Fault => STATUS_ACCESS_VIOLATION,
        F::Busy => STATUS_DEVICE_BUSY,
        F::NoMemory => STATUS_INSUFFICIENT_RESOURCES,
        F::HostPageCap => STATUS_WORKING_SET_QUOTA,
        F::NotSupported => STATUS_NOT_SUPPORTED,
        F::NoSpace => STATUS_QUOTA_EXCEEDED,
        F::Exists => STATUS_OBJECT_NAME_COLLISION,
        F::NoExec => STATUS_INVALID_IMAGE_FORMAT,
        F::Io => STATUS_IO_DEVICE_ERROR,
        // Failures of KVM's user API, which only the Linux module serves.
        F::NoEntry | F::NoDevice | F::Interrupted | F::NoSuchRequest => {
            STATUS_INVALID_DEVICE_REQUEST
        }
        F::TooBig => STATUS_BUFFER_TOO_SMALL,

        F::Abi(e) => from_abi(e),
    }
}
