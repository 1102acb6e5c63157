//! smudge.sys: the Windows kernel driver of smudge. DriverEntry loads the core (`session::load`:
//! every processor admitted, VMX operation on every processor), then creates `\Device\Smudge`
//! (`\\.\Smudge`). Each open is one VM session of the core, as on Linux; `os` supplies Windows
//! to it. DriverUnload leaves VMX operation. Nothing here panics: failures are NTSTATUS values.
#![no_std]
#![no_main]
#![deny(
    unsafe_op_in_unsafe_fn,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod nt;
mod os;
mod platform;
mod power;
mod processors;
mod usermem;

use core::ffi::CStr;

use smudge_core::abi::windows::{self as ioctl, *};
use smudge_core::arch::{self, RawBox};
use smudge_core::session::load;
use smudge_core::spec::Duties;
use smudge_core::vmx::admission;
use smudge_core::vmx::root::RawCr;

use nt::{DeviceObject, DriverObject, Irp, DPFLTR_ERROR_LEVEL as ERROR, DPFLTR_INFO_LEVEL as INFO};
use platform::NtPlatform;
use processors::NtProcessors;
use smudge_core::session::{self, Fail, Session, SessionBox};

nt::unicode_string!(DEVICE_NAME, r"\Device\Smudge");
nt::unicode_string!(DOS_NAME, r"\DosDevices\Smudge");

/// The MSVC toolchain's marker that floating point is in use; ntoskrnl provides no CRT.
#[no_mangle]
#[used]
#[allow(non_upper_case_globals)]
static _fltused: i32 = 0;

/// A line of kernel debug output: ERROR is printed by default, INFO when the filter allows it.
fn log(level: u32, msg: &CStr) {
    let (id, format) = (nt::DPFLTR_IHVDRIVER_ID, c"smudge: %s\n".as_ptr());
    // SAFETY: "%s" with a NUL-terminated string, printable at any IRQL.
    unsafe { nt::DbgPrintEx(id, level, format, msg.as_ptr()) };
}

/// The driver's entry point (`/ENTRY:DriverEntry`).
///
/// # Safety
/// Called once by the I/O manager, at PASSIVE_LEVEL, with this driver's valid DRIVER_OBJECT.
#[no_mangle]
pub unsafe extern "system" fn DriverEntry(
    driver: *mut DriverObject,
    _registry_path: *mut nt::UnicodeString,
) -> NtStatus {
    if !platform::set_cap() {
        log(
            ERROR,
            c"no physical memory ranges: cannot size the page cap",
        );
        return STATUS_INSUFFICIENT_RESOURCES;
    }
    // SAFETY (rdmsr): given the real CPUID, the admission check reads only MSRs the SDM says
    // exist (tested on every fixture dump); CPL 0.
    let here = || admission::check_here(&RawCr, &|m| unsafe { arch::rdmsr(m) });
    // Windows documents no interface to its own mitigation choices for a third-party
    // hypervisor: the barriers follow what the processor enumerates (core `spec`).
    // SAFETY: IA32_ARCH_CAPABILITIES is read only where CPUID enumerates it; CPL 0.
    let duties = Duties::of_this_cpu(&|m| unsafe { arch::rdmsr(m) });
    let loaded = match load::load(&NtProcessors, &NtPlatform, &here, duties, false) {
        Ok(l) => l,
        Err(f) => {
            log(ERROR, f.message().as_cstr());
            platform::drain_deferred();
            return from_load(f);
        }
    };
    for line in loaded.report() {
        log(INFO, line.as_cstr());
    }

    // SAFETY: DriverEntry owns the DRIVER_OBJECT until it returns.
    let status = unsafe { create_device(driver) };
    if status < 0 {
        leave_vmx();
        return status;
    }
    log(INFO, c"loaded: \\\\.\\Smudge is ready");
    STATUS_SUCCESS
}

/// Sets the dispatch table, creates `\Device\Smudge` for SYSTEM and Administrators only,
/// registers the shutdown, bug-check and power callbacks on it and names it `\\.\Smudge`; a
/// failure undoes it all.
///
/// # Safety
/// `driver` is this driver's DRIVER_OBJECT, in DriverEntry.
unsafe fn create_device(driver: *mut DriverObject) -> NtStatus {
    // SAFETY: the caller's DRIVER_OBJECT, whose dispatch table is DriverEntry's to set.
    unsafe {
        let d = &mut *driver;
        d.major_function[nt::IRP_MJ_CREATE] = Some(dispatch_create);
        d.major_function[nt::IRP_MJ_CLOSE] = Some(dispatch_close);
        d.major_function[nt::IRP_MJ_DEVICE_CONTROL] = Some(dispatch_ioctl);
        d.major_function[nt::IRP_MJ_SHUTDOWN] = Some(power::on_shutdown);
        d.driver_unload = Some(driver_unload);
    }
    let mut device: *mut DeviceObject = core::ptr::null_mut();
    // SAFETY: the caller's DRIVER_OBJECT; the name is a valid UNICODE_STRING that IoCreateDevice
    // only reads; `device` is a valid out pointer.
    let status = unsafe {
        nt::IoCreateDevice(
            driver,
            0,
            DEVICE_NAME.as_ptr(),
            ioctl::FILE_DEVICE_UNKNOWN,
            nt::FILE_DEVICE_SECURE_OPEN,
            0,
            &mut device,
        )
    };
    if status < 0 {
        log(ERROR, c"IoCreateDevice(\\Device\\Smudge) failed");
        return status;
    }
    let (mut status, mut what) = (restrict_to_administrators(device), c"cannot set the DACL");
    if status >= 0 {
        status = power::register(device);
        what = c"cannot register the power callbacks";
    }
    if status >= 0 {
        // SAFETY: both names are valid UNICODE_STRINGs that the call only reads.
        status = unsafe { nt::IoCreateSymbolicLink(DOS_NAME.as_ptr(), DEVICE_NAME.as_ptr()) };
        what = c"IoCreateSymbolicLink(\\DosDevices\\Smudge) failed";
    }
    if status < 0 {
        log(ERROR, what);
        power::unregister(device);
        // SAFETY: created above and not yet reachable by name: nothing else references it.
        unsafe { nt::IoDeleteDevice(device) };
    }
    status
}

/// Replaces the device's DACL (the default lets every user open a device) with core's
/// `DEVICE_SECURITY`: LocalSystem and Administrators only.
fn restrict_to_administrators(device: *mut DeviceObject) -> NtStatus {
    let mut sd = ioctl::DEVICE_SECURITY;
    let mut handle = core::ptr::null_mut();
    // SAFETY: `device` is our device object; `handle` is a valid out pointer, and the kernel
    // handle it receives is closed before returning; ZwSetSecurityObject copies the descriptor
    // (a well-formed self-relative one, host-tested), which outlives the call.
    unsafe {
        let status = nt::ObOpenObjectByPointer(
            device.cast(),
            ioctl::OBJ_KERNEL_HANDLE,
            core::ptr::null_mut(),
            ioctl::WRITE_DAC,
            core::ptr::null_mut(),
            nt::KERNEL_MODE,
            &mut handle,
        );
        if status < 0 {
            return status;
        }
        let info = ioctl::DACL_SECURITY_INFORMATION;
        let status = nt::ZwSetSecurityObject(handle, info, (&raw mut sd).cast());
        nt::ZwClose(handle);
        status
    }
}

/// VMXOFF everywhere and forget the capabilities (no device, or no handle, exists).
fn leave_vmx() {
    load::unload(&NtProcessors);
    platform::drain_deferred();
}

/// Removes the symbolic link and the device (the I/O manager calls it once no handle is open,
/// so every VM was already freed by IRP_MJ_CLOSE), then leaves VMX operation.
unsafe extern "system" fn driver_unload(driver: *mut DriverObject) {
    // SAFETY: the link was created in DriverEntry; `driver` is our valid DRIVER_OBJECT and its
    // `device_object` is the one device DriverEntry created.
    unsafe {
        nt::IoDeleteSymbolicLink(DOS_NAME.as_ptr());
        let device = (*driver).device_object;
        if !device.is_null() {
            power::unregister(device);
            nt::IoDeleteDevice(device);
        }
    }
    leave_vmx();
    log(INFO, c"unloaded");
}

/// Sets the IRP's result and completes it. The IRP must not be touched afterwards.
///
/// # Safety
/// `irp` is a valid IRP this driver owns and has not completed.
unsafe fn complete(irp: *mut Irp, status: NtStatus, information: usize) -> NtStatus {
    // SAFETY: the caller owns the IRP; IofCompleteRequest hands it back to the I/O manager.
    unsafe {
        (*irp).io_status.status = status;
        (*irp).io_status.information = information;
        nt::IofCompleteRequest(irp, nt::IO_NO_INCREMENT);
    }
    status
}

/// The FILE_OBJECT of the IRP's current stack location.
///
/// # Safety
/// `irp` is a valid IRP of this driver's device for CREATE, CLOSE or DEVICE_CONTROL.
unsafe fn file_object(irp: *mut Irp) -> *mut nt::FileObject {
    // SAFETY: the I/O manager fills FileObject for these major functions.
    unsafe { (*(*irp).current_stack_location).file_object }
}

/// IRP_MJ_CREATE: one open = one (not yet set up) VM, kept in FILE_OBJECT.FsContext.
unsafe extern "system" fn dispatch_create(_device: *mut DeviceObject, irp: *mut Irp) -> NtStatus {
    // SAFETY: the I/O manager passes a valid IRP whose stack location names the file object.
    let file = unsafe { file_object(irp) };
    let opened = (!file.is_null()).then(session::open::<NtPlatform>);
    let status = match opened.unwrap_or(Err(Fail::Io)) {
        Ok(b) => {
            // SAFETY: the file object is being opened on our device; FsContext is ours.
            unsafe { (*file).fs_context = RawBox::into_raw(b).cast() };
            STATUS_SUCCESS
        }
        Err(Fail::Io) => STATUS_INVALID_DEVICE_STATE,
        Err(f) => ioctl::from_fail(f),
    };
    // SAFETY: the IRP is ours until completed.
    unsafe { complete(irp, status, 0) }
}

/// IRP_MJ_CLOSE: the last reference to the file object is gone, so no request can still use
/// its VM: VMCLEAR every vCPU's VMCS where it is active, INVEPT everywhere, free everything.
unsafe extern "system" fn dispatch_close(_device: *mut DeviceObject, irp: *mut Irp) -> NtStatus {
    // SAFETY: the I/O manager passes a valid IRP whose stack location names the file object.
    let file = unsafe { file_object(irp) };
    if !file.is_null() {
        // SAFETY: FsContext was set by dispatch_create (or is null) and is cleared here once.
        let ctx = unsafe { core::mem::replace(&mut (*file).fs_context, core::ptr::null_mut()) };
        // SAFETY: `ctx` came from RawBox::into_raw in dispatch_create; nobody else owns it.
        if let Some(b) = unsafe { SessionBox::<NtPlatform>::from_raw(ctx.cast()) } {
            session::close(&NtPlatform, b);
        }
    }
    // SAFETY: the IRP is ours until completed.
    unsafe { complete(irp, STATUS_SUCCESS, 0) }
}

/// IRP_MJ_DEVICE_CONTROL: the version query, or a VM request of the handle's session
/// (`abi::windows::device_control`). METHOD_BUFFERED only: the system buffer holds the request
/// on the way in and the answer on the way out.
unsafe extern "system" fn dispatch_ioctl(_device: *mut DeviceObject, irp: *mut Irp) -> NtStatus {
    // SAFETY: for IRP_MJ_DEVICE_CONTROL the I/O manager passes a valid IRP whose current stack
    // location holds the DeviceIoControl parameters.
    let (code, input_len, output_len, buffer, file) = unsafe {
        let p = &(*(*irp).current_stack_location).device_io_control;
        (
            p.io_control_code,
            p.input_buffer_length as usize,
            p.output_buffer_length as usize,
            (*irp).system_buffer.cast::<u8>(),
            file_object(irp),
        )
    };
    // Only METHOD_BUFFERED has a system buffer of both lengths (core refuses the others).
    let buf: &mut [u8] = if buffer.is_null() || code & 3 != ioctl::METHOD_BUFFERED {
        &mut []
    } else {
        // SAFETY: METHOD_BUFFERED: SystemBuffer is a nonpaged buffer of max(input, output) bytes
        // that only this request uses until it completes.
        unsafe { core::slice::from_raw_parts_mut(buffer, input_len.max(output_len)) }
    };
    // SAFETY: FsContext holds this open's session from CREATE until CLOSE, and CLOSE cannot run
    // while this IRP references the file object; shared access only (the session shares its VM
    // between concurrent requests itself).
    let session = unsafe {
        file.as_ref()
            .and_then(|f| f.fs_context.cast::<Session<NtPlatform>>().as_ref())
    };
    let version = [
        env!("CARGO_PKG_VERSION_MAJOR"),
        env!("CARGO_PKG_VERSION_MINOR"),
        env!("CARGO_PKG_VERSION_PATCH"),
    ];
    let lens = (code, input_len, output_len);
    let (status, written) =
        ioctl::device_control(&NtPlatform, load::loaded(), session, lens, buf, version);
    // SAFETY: the IRP is ours until completed; no slice of its buffer is used past this point.
    unsafe { complete(irp, status, written) }
}

/// No path panics (the lints above deny the usual sources). Should one ever, stop with #UD: the
/// kernel turns it into a bug check that names smudge.sys, instead of running on corrupted.
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {
        // SAFETY: UD2 only raises #UD; it touches no memory.
        unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
    }
}
