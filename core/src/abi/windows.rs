//! The Windows side of the user/kernel ABI, OS-free and host-tested: the DeviceIoControl
//! codes (the VM requests' [`Op::windows_ioctl`] and the driver's version query), the NTSTATUS
//! of every failure (beside `session::Fail::errno` for Linux), the user-range rule of a copy,
//! the device's DACL, and the RUN policy at DISPATCH_LEVEL. smudge.sys adds only the ntoskrnl
//! calls.

use super::Op;
use crate::session::load::{LoadFailure, Loaded};
use crate::session::{Os, RunPolicy, Session};
use crate::vmx::admission::Admission;
use crate::vmx::admission::Refusal;
use crate::vmx::caps::{Reason, Unsupported};
use crate::vmx::root::VmxonFailure;

// ---- DeviceIoControl codes and the version query ----
// DeviceIoControl codes and their answers, independent of the IRP plumbing.
//
// Two families share `\\.\Smudge`: the driver's own version query (function 0x800, below) and
// the VM requests of `crate::abi` (functions 0x801.., `Op::windows_ioctl`), whose lengths
// [`check_lengths`] validates. Both are METHOD_BUFFERED. The VM requests demand
// FILE_WRITE_ACCESS: the I/O manager lets only handles opened for writing send them.

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

/// A version component's decimal digits as a number, at most 255 (a non-digit ends it).
const fn decimal(s: &str) -> u32 {
    let b = s.as_bytes();
    let (mut v, mut i) = (0u32, 0);
    while i < b.len() && b[i].is_ascii_digit() && v < 256 {
        v = v * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    if v > 255 {
        255
    } else {
        v
    }
}

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

    /// The answer of a loaded driver whose Cargo version is `major.minor.patch`.
    pub const fn of(loaded: &Loaded, major: &str, minor: &str, patch: &str) -> VersionInfo {
        let d = &loaded.driver;
        let admission = Admission {
            caps: d.caps,
            mode: d.mode,
        };
        VersionInfo {
            magic: MAGIC,
            abi_version: ABI_VERSION,
            driver_version: decimal(major) << 16 | decimal(minor) << 8 | decimal(patch),
            features: admission.feature_bits(),
            vmcs_revision: d.caps.revision_id(),
            processors: loaded.cpus,
        }
    }

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

/// One IRP_MJ_DEVICE_CONTROL of `\\.\Smudge`: the version query, or a VM request of the
/// handle's `session` (FILE_OBJECT.FsContext; None when it has none). `buf` is the
/// METHOD_BUFFERED system buffer (the larger of the two lengths; empty when it is null),
/// `loaded` the driver's state (None after a shutdown unloaded the core), `version` the
/// driver's Cargo version. Returns the IRP's status and IoStatus.Information.
pub fn device_control<O: Os>(
    os: &O,
    loaded: Option<Loaded>,
    session: Option<&Session<O>>,
    (code, input_len, output_len): (u32, usize, usize),
    buf: &mut [u8],
    version: [&str; 3],
) -> (NtStatus, usize) {
    let answer = (|| {
        if code & 3 != METHOD_BUFFERED {
            return Err(STATUS_INVALID_DEVICE_REQUEST);
        }
        let loaded = loaded.ok_or(STATUS_INVALID_DEVICE_STATE)?;
        let Some(op) = Op::from_windows_ioctl(code) else {
            let info = VersionInfo::of(&loaded, version[0], version[1], version[2]);
            let output = buf.get_mut(..output_len).unwrap_or(&mut []);
            return dispatch(code, input_len, output, &info);
        };
        check_lengths(op, input_len, output_len)?;
        let buf = buf
            .get_mut(..input_len.max(output_len))
            .ok_or(STATUS_INVALID_PARAMETER)?;
        let session = session.ok_or(STATUS_INVALID_DEVICE_STATE)?;
        session
            .request(os, &loaded.driver, op, buf)
            .map_err(from_fail)
    })();
    match answer {
        Ok(n) => (STATUS_SUCCESS, n),
        Err(status) => (status, 0),
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

// ---- NTSTATUS values and the mapping of every failure ----
// The NTSTATUS values smudge.sys returns (values from the WDK's ntstatus.h).

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
/// The handle's VM or vCPU is taken (`share`): a VM-level request while another one of the handle
/// is in progress, or a RUN, GET_REGS or SET_REGS of a vCPU whose RUN is in progress (Linux:
/// EBUSY).
pub const STATUS_DEVICE_BUSY: NtStatus = 0x8000_0011_u32 as i32;
/// A request that needs a VM before Setup, or a second Setup.
pub const STATUS_INVALID_DEVICE_STATE: NtStatus = 0xC000_0184_u32 as i32;
/// The request's ABI version is not `crate::abi::VERSION`.
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
pub const fn from_abi(e: crate::abi::AbiError) -> NtStatus {
    use crate::abi::AbiError as A;
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

/// The NTSTATUS DriverEntry returns for a failed load (what `sc start` reports).
pub const fn from_load(f: LoadFailure) -> NtStatus {
    match f {
        LoadFailure::TooManyProcessors => STATUS_NOT_SUPPORTED,
        LoadFailure::Refused { why: Some(r), .. } => from_refusal(r),
        LoadFailure::Refused { why: None, .. } => STATUS_NOT_SUPPORTED,
        LoadFailure::Pages(_) => STATUS_INSUFFICIENT_RESOURCES,
        LoadFailure::Vmxon { why, .. } => from_vmxon(why),
    }
}

/// The NTSTATUS of a failed session request (Linux: `Fail::errno`).
pub const fn from_fail(f: crate::session::Fail) -> NtStatus {
    use crate::session::Fail as F;
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

// ---- Which user addresses a request may name ----
// Which user addresses a request may name (the range half of ProbeForRead/ProbeForWrite).
//
// The copies themselves are in the driver binary (`usermem.rs`). Before either copy runs, the
// whole range must lie in user space: below `MmUserProbeAddress`, the first address the kernel
// refuses to treat as a user address. Without this check a caller could name a kernel
// address and read or overwrite kernel memory through a guest.

/// True if `[ptr, ptr + len)` is a non-empty, non-wrapping range that ends at or below `probe`
/// (the value of `MmUserProbeAddress`), as ProbeForRead requires (wdm.h: it raises when
/// `Address + Length > MmUserProbeAddress` or the sum wraps).
pub const fn user_range_ok(ptr: u64, len: u64, probe: u64) -> bool {
    if len == 0 || ptr == 0 {
        return false;
    }
    match ptr.checked_add(len) {
        Some(end) => end <= probe,
        None => false,
    }
}

// ---- Who may open the device ----
// Who may open `\\.\Smudge`: LocalSystem and the Administrators group, nobody else (like the
// Linux module's root-only /dev/smudge). The core writes the device's security descriptor out
// in self-relative form (MS-DTYP 2.4.6), which the driver sets on the device object with
// ZwSetSecurityObject; IoCreateDeviceSecure would do the same but lives in wdmsec.lib.

/// `S-1-5-18`, LocalSystem: revision 1, one sub-authority, identifier authority 5 (NT,
/// big-endian 48-bit), sub-authority 18 (little-endian).
pub const SID_LOCAL_SYSTEM: [u8; 12] = [1, 1, 0, 0, 0, 0, 0, 5, 18, 0, 0, 0];
/// `S-1-5-32-544`, BUILTIN\Administrators: sub-authorities 32 (BUILTIN) and 544.
pub const SID_ADMINISTRATORS: [u8; 16] = [1, 2, 0, 0, 0, 0, 0, 5, 32, 0, 0, 0, 0x20, 2, 0, 0];

/// FILE_ALL_ACCESS: every right on the device (STANDARD_RIGHTS_REQUIRED | SYNCHRONIZE | 0x1FF).
pub const FILE_ALL_ACCESS: u32 = 0x001F_01FF;
/// ACL_REVISION.
pub const ACL_REVISION: u8 = 2;
/// SECURITY_DESCRIPTOR_REVISION.
pub const SECURITY_DESCRIPTOR_REVISION: u8 = 1;
/// SECURITY_DESCRIPTOR_CONTROL: SE_DACL_PRESENT | SE_SELF_RELATIVE (MS-DTYP 2.4.6).
pub const SD_CONTROL: u16 = 0x0004 | 0x8000;
/// ACCESS_ALLOWED_ACE_TYPE.
pub const ACCESS_ALLOWED_ACE_TYPE: u8 = 0;
/// DACL_SECURITY_INFORMATION.
pub const DACL_SECURITY_INFORMATION: u32 = 4;
/// WRITE_DAC, the right to set the DACL through a handle.
pub const WRITE_DAC: u32 = 0x0004_0000;
/// OBJ_KERNEL_HANDLE.
pub const OBJ_KERNEL_HANDLE: u32 = 0x200;

/// The self-relative header: revision, Sbz1, control, and the offsets of owner, group, SACL
/// and DACL (0: absent).
const SD_HEADER_LEN: usize = 20;

/// Who may open the device: one ACCESS_ALLOWED_ACE each, in this order.
const DEVICE_SIDS: [&[u8]; 2] = [&SID_LOCAL_SYSTEM, &SID_ADMINISTRATORS];

/// Bytes of an ACL holding one ACCESS_ALLOWED_ACE per SID: the 8-byte ACL header, and per ACE
/// its 4-byte header, 4-byte mask and the SID.
pub const fn acl_len(sids: &[&[u8]]) -> usize {
    let mut n = 8;
    let mut i = 0;
    while i < sids.len() {
        n += 8 + sids[i].len();
        i += 1;
    }
    n
}

/// The DACL of the device, in bytes.
pub const DACL_LEN: usize = acl_len(&DEVICE_SIDS);

/// The length a SID's bytes declare (RtlLengthSid: 8 + 4 per sub-authority).
pub const fn sid_len(sid: &[u8]) -> usize {
    8 + 4 * sid[1] as usize
}

/// A self-relative security descriptor, DWORD aligned as the kernel wants it.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct SecurityDescriptor(pub [u8; SD_HEADER_LEN + DACL_LEN]);

/// The device's security descriptor: no owner, group or SACL; a DACL that allows
/// FILE_ALL_ACCESS to LocalSystem and to Administrators and nothing to anyone else.
pub const DEVICE_SECURITY: SecurityDescriptor = device_security();

#[allow(clippy::indexing_slicing)] // const evaluation: an index out of range fails the build
const fn device_security() -> SecurityDescriptor {
    const fn put(b: &mut [u8], at: usize, v: &[u8]) -> usize {
        let mut i = 0;
        while i < v.len() {
            b[at + i] = v[i];
            i += 1;
        }
        at + v.len()
    }
    let mut b = [0u8; SD_HEADER_LEN + DACL_LEN];
    let mut at = put(&mut b, 0, &[SECURITY_DESCRIPTOR_REVISION, 0]);
    at = put(&mut b, at, &SD_CONTROL.to_le_bytes());
    at = put(&mut b, at + 12, &(SD_HEADER_LEN as u32).to_le_bytes());
    // ACL (MS-DTYP 2.4.5): revision, Sbz1, AclSize, AceCount, Sbz2.
    at = put(&mut b, at, &[ACL_REVISION, 0]);
    at = put(&mut b, at, &(DACL_LEN as u16).to_le_bytes());
    at = put(&mut b, at, &(DEVICE_SIDS.len() as u16).to_le_bytes());
    at += 2;
    // ACCESS_ALLOWED_ACE (2.4.4.2): type, flags, AceSize, mask, SID.
    let mut i = 0;
    while i < DEVICE_SIDS.len() {
        let sid = DEVICE_SIDS[i];
        at = put(&mut b, at, &[ACCESS_ALLOWED_ACE_TYPE, 0]);
        at = put(&mut b, at, &((8 + sid.len()) as u16).to_le_bytes());
        at = put(&mut b, at, &FILE_ALL_ACCESS.to_le_bytes());
        at = put(&mut b, at, sid);
        i += 1;
    }
    assert!(at == b.len());
    SecurityDescriptor(b)
}

// ---- Windows's values for the core's run loop and its waiters ----
// Windows's values for the core's run loop and its waiters.
//
// The guest runs at DISPATCH_LEVEL (no preemption, so the VMCS and the FPU stay on one
// processor). Windows bug-checks with DPC_WATCHDOG_VIOLATION (0x133) when a processor stays at
// DISPATCH_LEVEL or above too long, and a long stay also starves DPCs and the scheduler. So one
// stay is bounded by 1 ms; after it the core's loop drops to PASSIVE_LEVEL and enters again.
// Windows has no signals to interrupt a thread in a driver, so the whole request is bounded by
// 50 ms: then it returns INTERRUPTED, the tool runs again, and a thread whose process is being
// killed can leave the kernel.

/// One stay at DISPATCH_LEVEL: 1 ms; one RUN request before INTERRUPTED: 50 ms.
pub const POLICY: RunPolicy = RunPolicy {
    stay_ns: Some(1_000_000),
    slice_ns: Some(50_000_000),
};

/// How long a waiter of the sharing protocol spins before it sleeps: 2 ms, two stays at
/// DISPATCH_LEVEL, which is how long a kick normally takes.
pub const SPIN_NS: u64 = 2_000_000;

/// One sleep of a waiter past [`SPIN_NS`]: KeDelayExecutionThread's interval for 1 ms, relative
/// (negative), in 100 ns units. The clock's granularity may stretch it to a timer tick.
pub const SLEEP: i64 = -10_000;

/// What a waiter does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pause {
    /// Spin (`core::hint::spin_loop`): the wait is expected to end within [`SPIN_NS`].
    Spin,
    /// Sleep for [`SLEEP`]: the wait is long (a large LOAD_ELF or harvest), give the CPU away.
    Sleep,
}

/// The pause after `waited_ns` of waiting.
pub const fn pause(waited_ns: u64) -> Pause {
    if waited_ns >= SPIN_NS {
        Pause::Sleep
    } else {
        Pause::Spin
    }
}
