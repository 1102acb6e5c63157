//! The NTSTATUS values smudge.sys returns (values from the WDK's ntstatus.h).

/// An NTSTATUS: negative (severity bits 11) means error.
pub type NtStatus = i32;

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
