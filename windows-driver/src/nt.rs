//! The Windows kernel interface smudge.sys uses, declared by hand from the WDK headers (wdm.h,
//! ntddk.h) for x64. Every function here is listed in `ntoskrnl.def`, and nothing else is.
//! Structures carry only the fields the driver touches; their x64 offsets are asserted below.
#![allow(non_snake_case, clippy::upper_case_acronyms)]

use core::ffi::c_void;

pub use smudge_core::abi::windows::NtStatus;

/// UNICODE_STRING: lengths in bytes, not NUL-terminated.
#[repr(C)]
pub struct UnicodeString {
    pub length: u16,
    pub maximum_length: u16,
    pub buffer: *const u16,
}

/// A UNICODE_STRING over a `'static` buffer, the equivalent of the WDK's RTL_CONSTANT_STRING.
/// Its buffer pointer is an absolute address in the image, so the linker emits a base relocation.
#[repr(transparent)]
pub struct StaticUnicodeString(pub UnicodeString);

// SAFETY: the string is immutable and its buffer is a `'static` immutable array; sharing it
// between threads only ever reads it.
unsafe impl Sync for StaticUnicodeString {}

impl StaticUnicodeString {
    /// Wraps a `'static` UTF-16 buffer (no terminating NUL is needed or counted).
    pub const fn new(buf: &'static [u16]) -> Self {
        let bytes = buf.len() * 2;
        assert!(
            bytes <= u16::MAX as usize,
            "UNICODE_STRING is limited to 65535 bytes"
        );
        StaticUnicodeString(UnicodeString {
            length: bytes as u16,
            maximum_length: bytes as u16,
            buffer: buf.as_ptr(),
        })
    }

    /// The pointer the kernel APIs take. They only read through it.
    pub fn as_ptr(&'static self) -> *mut UnicodeString {
        &self.0 as *const UnicodeString as *mut UnicodeString
    }
}

/// `static $name: StaticUnicodeString` over the ASCII literal `$text` (RTL_CONSTANT_STRING).
macro_rules! unicode_string {
    ($name:ident, $text:expr) => {
        static $name: $crate::nt::StaticUnicodeString = {
            static UTF16: [u16; $text.len()] = $crate::nt::utf16($text);
            $crate::nt::StaticUnicodeString::new(&UTF16)
        };
    };
}
pub(crate) use unicode_string;

/// ASCII to UTF-16 at compile time (for the device names). Only called in `static`
/// initialisers, so an out-of-range index is a compile error, never a runtime panic.
#[allow(clippy::indexing_slicing)]
pub const fn utf16<const N: usize>(s: &str) -> [u16; N] {
    let b = s.as_bytes();
    assert!(b.len() == N, "length mismatch");
    let mut out = [0u16; N];
    let mut i = 0;
    while i < N {
        out[i] = b[i] as u16;
        i += 1;
    }
    out
}

/// Opaque DEVICE_OBJECT.
#[repr(C)]
pub struct DeviceObject {
    _opaque: [u8; 0],
}

/// DRIVER_DISPATCH.
pub type DriverDispatch = unsafe extern "system" fn(*mut DeviceObject, *mut Irp) -> NtStatus;
/// DRIVER_UNLOAD.
pub type DriverUnload = unsafe extern "system" fn(*mut DriverObject);

/// IRP_MJ_CREATE, IRP_MJ_CLOSE, IRP_MJ_DEVICE_CONTROL (wdm.h).
pub const IRP_MJ_CREATE: usize = 0x00;
pub const IRP_MJ_CLOSE: usize = 0x02;
pub const IRP_MJ_DEVICE_CONTROL: usize = 0x0e;
/// IRP_MJ_SHUTDOWN: sent to devices registered with IoRegisterShutdownNotification.
pub const IRP_MJ_SHUTDOWN: usize = 0x10;
/// IRP_MJ_MAXIMUM_FUNCTION + 1.
pub const IRP_MJ_COUNT: usize = 0x1c;

/// DRIVER_OBJECT (wdm.h), complete.
#[repr(C)]
pub struct DriverObject {
    pub type_: i16,
    pub size: i16,
    pub device_object: *mut DeviceObject,
    pub flags: u32,
    pub driver_start: *mut c_void,
    pub driver_size: u32,
    pub driver_section: *mut c_void,
    pub driver_extension: *mut c_void,
    pub driver_name: UnicodeString,
    pub hardware_database: *mut UnicodeString,
    pub fast_io_dispatch: *mut c_void,
    pub driver_init: *mut c_void,
    pub driver_start_io: *mut c_void,
    pub driver_unload: Option<DriverUnload>,
    pub major_function: [Option<DriverDispatch>; IRP_MJ_COUNT],
}

/// LIST_ENTRY.
#[repr(C)]
pub struct ListEntry {
    pub flink: *mut ListEntry,
    pub blink: *mut ListEntry,
}

/// IO_STATUS_BLOCK: `Status` shares 8 bytes with `Pointer`.
#[repr(C)]
pub struct IoStatusBlock {
    pub status: NtStatus,
    _pointer_high: u32,
    pub information: usize,
}

/// IRP (wdm.h) up to Tail.Overlay.CurrentStackLocation.
#[repr(C)]
pub struct Irp {
    pub type_: i16,
    pub size: u16,
    pub mdl_address: *mut c_void,
    pub flags: u32,
    /// AssociatedIrp.SystemBuffer (METHOD_BUFFERED data).
    pub system_buffer: *mut c_void,
    pub thread_list_entry: ListEntry,
    pub io_status: IoStatusBlock,
    pub requestor_mode: i8,
    pub pending_returned: u8,
    pub stack_count: i8,
    pub current_location: i8,
    pub cancel: u8,
    pub cancel_irql: u8,
    pub apc_environment: i8,
    pub allocation_flags: u8,
    pub user_iosb: *mut c_void,
    pub user_event: *mut c_void,
    pub overlay: [u64; 2],
    pub cancel_routine: *mut c_void,
    pub user_buffer: *mut c_void,
    pub driver_context: [*mut c_void; 4],
    pub thread: *mut c_void,
    pub auxiliary_buffer: *mut c_void,
    pub list_entry: ListEntry,
    pub current_stack_location: *mut IoStackLocation,
}

/// Parameters.DeviceIoControl of IO_STACK_LOCATION (each ULONG is POINTER_ALIGNMENT, i.e. 8).
#[repr(C)]
pub struct DeviceIoControlParameters {
    pub output_buffer_length: u32,
    _pad0: u32,
    pub input_buffer_length: u32,
    _pad1: u32,
    pub io_control_code: u32,
    _pad2: u32,
    pub type3_input_buffer: *mut c_void,
}

/// IO_STACK_LOCATION (wdm.h) up to FileObject. The Parameters union is four pointers wide.
#[repr(C)]
pub struct IoStackLocation {
    pub major_function: u8,
    pub minor_function: u8,
    pub flags: u8,
    pub control: u8,
    pub device_io_control: DeviceIoControlParameters,
    pub device_object: *mut DeviceObject,
    pub file_object: *mut FileObject,
}

/// FILE_OBJECT (wdm.h) up to FsContext2. A device driver that is not a file system may keep its
/// per-open state in FsContext (the I/O manager never interprets it for such devices).
#[repr(C)]
pub struct FileObject {
    pub type_: i16,
    pub size: i16,
    pub device_object: *mut DeviceObject,
    pub vpb: *mut c_void,
    pub fs_context: *mut c_void,
    pub fs_context2: *mut c_void,
}

/// XSTATE_SAVE (wdm.h, x64): opaque to drivers; Prev, Thread, Level, then a 32-byte
/// XSTATE_CONTEXT. Only its size and alignment matter here.
#[repr(C, align(8))]
pub struct XStateSave {
    _opaque: [u64; 7],
}

impl XStateSave {
    pub const fn new() -> XStateSave {
        XStateSave { _opaque: [0; 7] }
    }
}

/// GROUP_AFFINITY.
#[repr(C)]
#[derive(Default)]
pub struct GroupAffinity {
    pub mask: usize,
    pub group: u16,
    pub reserved: [u16; 3],
}

/// PROCESSOR_NUMBER.
#[repr(C)]
#[derive(Default)]
pub struct ProcessorNumber {
    pub group: u16,
    pub number: u8,
    pub reserved: u8,
}

// The x64 layouts the kernel uses (offsets as compiled from the WDK headers).
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(offset_of!(DriverObject, driver_name) == 0x38);
    assert!(offset_of!(DriverObject, driver_unload) == 0x68);
    assert!(offset_of!(DriverObject, major_function) == 0x70);
    assert!(size_of::<DriverObject>() == 0x150);
    assert!(offset_of!(Irp, system_buffer) == 0x18);
    assert!(offset_of!(Irp, io_status) == 0x30);
    assert!(offset_of!(Irp, user_buffer) == 0x70);
    assert!(offset_of!(Irp, current_stack_location) == 0xb8);
    assert!(offset_of!(IoStackLocation, device_io_control) == 0x08);
    assert!(offset_of!(IoStackLocation, device_object) == 0x28);
    assert!(offset_of!(IoStackLocation, file_object) == 0x30);
    assert!(offset_of!(FileObject, fs_context) == 0x18);
    assert!(size_of::<XStateSave>() == 56);
    assert!(offset_of!(DeviceIoControlParameters, input_buffer_length) == 0x08);
    assert!(offset_of!(DeviceIoControlParameters, io_control_code) == 0x10);
    assert!(size_of::<GroupAffinity>() == 16);
    assert!(size_of::<ProcessorNumber>() == 4);
    assert!(offset_of!(BugCheckCallbackRecord, state) == 0x38);
    assert!(size_of::<BugCheckCallbackRecord>() == 0x40);
    assert!(offset_of!(ObjectAttributes, attributes) == 0x18);
    assert!(size_of::<ObjectAttributes>() == 0x30);
};

/// XSTATE_MASK_LEGACY: x87 and SSE (XSTATE_MASK_LEGACY_FLOATING_POINT | _SSE), what the core's
/// FXSAVE/FXRSTOR of the guest state touches (the guest has no OSXSAVE, so no AVX state).
pub const XSTATE_MASK_LEGACY: u64 = 0x3;
/// NonPagedPoolNx (POOL_TYPE): nonpaged, not executable.
pub const NON_PAGED_POOL_NX: u32 = 512;
/// MM_COPY_MEMORY_PHYSICAL: MmCopyMemory's source is a physical address.
pub const MM_COPY_MEMORY_PHYSICAL: u32 = 0x1;
/// FILE_DEVICE_SECURE_OPEN: apply the device's ACL to opens of names below it too.
pub const FILE_DEVICE_SECURE_OPEN: u32 = 0x100;
/// KernelMode (KPROCESSOR_MODE): a wait that user-mode APCs do not interrupt.
pub const KERNEL_MODE: i8 = 0;
/// IO_NO_INCREMENT.
pub const IO_NO_INCREMENT: i8 = 0;
/// ALL_PROCESSOR_GROUPS.
pub const ALL_PROCESSOR_GROUPS: u16 = 0xffff;
/// MmCached (MEMORY_CACHING_TYPE).
pub const MM_CACHED: u32 = 1;
/// PASSIVE_LEVEL, APC_LEVEL and DISPATCH_LEVEL (wdm.h): IRQLs, the values of CR8 on x64.
pub const PASSIVE_LEVEL: u8 = 0;
pub const APC_LEVEL: u8 = 1;
pub const DISPATCH_LEVEL: u8 = 2;
/// DPFLTR_IHVDRIVER_ID: the component id for third-party drivers.
pub const DPFLTR_IHVDRIVER_ID: u32 = 77;
/// DPFLTR_ERROR_LEVEL: printed by default.
pub const DPFLTR_ERROR_LEVEL: u32 = 0;
/// DPFLTR_INFO_LEVEL: printed when the debug filter mask allows it.
pub const DPFLTR_INFO_LEVEL: u32 = 3;

/// KBUGCHECK_CALLBACK_RECORD (wdm.h). Zeroed is initialised: KeInitializeCallbackRecord only
/// sets `state` to BufferEmpty (0).
#[repr(C)]
pub struct BugCheckCallbackRecord {
    pub entry: ListEntry,
    pub callback_routine: Option<BugCheckCallback>,
    pub buffer: *mut c_void,
    pub length: u32,
    pub component: *const u8,
    pub checksum: usize,
    pub state: u8,
}

impl BugCheckCallbackRecord {
    /// The record before KeRegisterBugCheckCallback fills it.
    pub const ZEROED: Self = BugCheckCallbackRecord {
        entry: ListEntry {
            flink: core::ptr::null_mut(),
            blink: core::ptr::null_mut(),
        },
        callback_routine: None,
        buffer: core::ptr::null_mut(),
        length: 0,
        component: core::ptr::null(),
        checksum: 0,
        state: 0,
    };
}

/// KBUGCHECK_CALLBACK_ROUTINE: runs at HIGH_LEVEL on the processor that bug-checks.
pub type BugCheckCallback = unsafe extern "system" fn(buffer: *mut c_void, length: u32);

/// OBJECT_ATTRIBUTES (wdm.h), filled as InitializeObjectAttributes does.
#[repr(C)]
pub struct ObjectAttributes {
    pub length: u32,
    pub root_directory: *mut c_void,
    pub object_name: *mut UnicodeString,
    pub attributes: u32,
    pub security_descriptor: *mut c_void,
    pub security_quality_of_service: *mut c_void,
}

/// OBJ_CASE_INSENSITIVE.
pub const OBJ_CASE_INSENSITIVE: u32 = 0x40;
/// PO_CB_SYSTEM_STATE_LOCK: the power-state callback's Argument1 around a sleep; Argument2 is
/// 0 before the system sleeps and 1 after it is back in S0.
pub const PO_CB_SYSTEM_STATE_LOCK: usize = 3;

/// PCALLBACK_FUNCTION.
pub type CallbackFunction =
    unsafe extern "system" fn(context: *mut c_void, arg1: *mut c_void, arg2: *mut c_void);

#[link(name = "ntoskrnl")]
extern "system" {
    /// Adds `record` (nonpaged, zeroed) to the bug-check callbacks; false if it is in use.
    pub fn KeRegisterBugCheckCallback(
        record: *mut BugCheckCallbackRecord,
        routine: BugCheckCallback,
        buffer: *mut c_void,
        length: u32,
        component: *const u8,
    ) -> u8;
    pub fn KeDeregisterBugCheckCallback(record: *mut BugCheckCallbackRecord) -> u8;
    /// IRP_MJ_SHUTDOWN reaches `device` when the system shuts down (PASSIVE_LEVEL).
    pub fn IoRegisterShutdownNotification(device: *mut DeviceObject) -> NtStatus;
    pub fn IoUnregisterShutdownNotification(device: *mut DeviceObject);
    /// Opens (here: never creates) the callback object named in `attrs`, referenced.
    pub fn ExCreateCallback(
        object: *mut *mut c_void,
        attrs: *mut ObjectAttributes,
        create: u8,
        allow_multiple: u8,
    ) -> NtStatus;
    /// Registers `f` with a callback object; null on failure.
    pub fn ExRegisterCallback(
        object: *mut c_void,
        f: CallbackFunction,
        context: *mut c_void,
    ) -> *mut c_void;
    pub fn ExUnregisterCallback(registration: *mut c_void);
    /// ObDereferenceObject (a macro over this export).
    pub fn ObfDereferenceObject(object: *mut c_void) -> isize;
    pub fn IoCreateDevice(
        driver: *mut DriverObject,
        extension_size: u32,
        name: *mut UnicodeString,
        device_type: u32,
        characteristics: u32,
        exclusive: u8,
        device: *mut *mut DeviceObject,
    ) -> NtStatus;
    pub fn IoDeleteDevice(device: *mut DeviceObject);
    pub fn IoCreateSymbolicLink(link: *mut UnicodeString, target: *mut UnicodeString) -> NtStatus;
    pub fn IoDeleteSymbolicLink(link: *mut UnicodeString) -> NtStatus;
    pub fn IofCompleteRequest(irp: *mut Irp, priority_boost: i8);
    /// PHYSICAL_ADDRESS arguments are LARGE_INTEGERs, passed by value as 64-bit integers on x64.
    pub fn MmAllocateContiguousMemorySpecifyCache(
        bytes: usize,
        lowest: i64,
        highest: i64,
        boundary: i64,
        cache_type: u32,
    ) -> *mut c_void;
    pub fn MmFreeContiguousMemory(va: *mut c_void);
    pub fn MmGetPhysicalAddress(va: *const c_void) -> i64;
    pub fn MmGetVirtualForPhysical(pa: i64) -> *mut c_void;
    pub fn KeQueryActiveProcessorCountEx(group: u16) -> u32;
    pub fn KeGetProcessorNumberFromIndex(index: u32, number: *mut ProcessorNumber) -> NtStatus;
    pub fn KeSetSystemGroupAffinityThread(
        affinity: *const GroupAffinity,
        previous: *mut GroupAffinity,
    );
    pub fn KeRevertToUserGroupAffinityThread(previous: *const GroupAffinity);
    /// Puts the thread in a wait for `interval` (100 ns units; negative = relative). IRQL <=
    /// APC_LEVEL. With `KERNEL_MODE` and not alertable it returns STATUS_SUCCESS.
    pub fn KeDelayExecutionThread(wait_mode: i8, alertable: u8, interval: *const i64) -> NtStatus;
    /// The system-wide index of the current processor (`number` may be null).
    pub fn KeGetCurrentProcessorNumberEx(number: *mut ProcessorNumber) -> u32;
    pub fn KeSaveExtendedProcessorState(mask: u64, save: *mut XStateSave) -> NtStatus;
    pub fn KeRestoreExtendedProcessorState(save: *mut XStateSave);
    /// Interrupt time in 100 ns units, read precisely (Windows 8.1+; any IRQL).
    pub fn KeQueryInterruptTimePrecise(qpc: *mut u64) -> u64;
    /// MM_COPY_ADDRESS (an 8-byte union) is passed by value, i.e. in a register, on x64.
    pub fn MmCopyMemory(
        target: *mut c_void,
        source: u64,
        bytes: usize,
        flags: u32,
        copied: *mut usize,
    ) -> NtStatus;
    pub fn ExAllocatePoolWithTag(pool_type: u32, bytes: usize, tag: u32) -> *mut c_void;
    pub fn ExFreePoolWithTag(p: *mut c_void, tag: u32);
    /// The first address above user space ProbeForRead/ProbeForWrite accept (a variable).
    pub static MmUserProbeAddress: usize;
    /// The physical memory ranges, ended by an all-zero entry; a nonpaged pool allocation the
    /// caller frees with ExFreePool (ExFreePoolWithTag with tag 0). Null on failure.
    pub fn MmGetPhysicalMemoryRanges() -> *mut PhysicalMemoryRange;
    /// A kernel handle to `object` with `access` (object type null: any type).
    pub fn ObOpenObjectByPointer(
        object: *mut c_void,
        attributes: u32,
        access_state: *mut c_void,
        access: u32,
        object_type: *mut c_void,
        mode: i8,
        handle: *mut *mut c_void,
    ) -> NtStatus;
    pub fn ZwSetSecurityObject(handle: *mut c_void, info: u32, sd: *mut c_void) -> NtStatus;
    pub fn ZwClose(handle: *mut c_void) -> NtStatus;
}

/// PHYSICAL_MEMORY_RANGE.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PhysicalMemoryRange {
    pub base_address: i64,
    pub number_of_bytes: i64,
}

#[link(name = "ntoskrnl")]
extern "C" {
    /// Variadic, so "C" (the same convention as "system" on x64).
    pub fn DbgPrintEx(component: u32, level: u32, format: *const core::ffi::c_char, ...) -> u32;
}
