//! Leaving VMX operation on the way down, and around a sleep. INIT is blocked in VMX root
//! operation (SDM 25.8), and a sleep loses each processor's VMX state while Windows restores
//! the CR4 it saved, VMXE included.
//!
//! - A bug check runs its callbacks at HIGH_LEVEL on one processor with the others frozen, after
//!   the crash dump is written: that processor VMCLEARs the VMCS it loaded last and leaves VMX
//!   operation (core's `VmxRoot::emergency_here`), so the reset that follows is not blocked
//!   there.
//! - Shutdown (IRP_MJ_SHUTDOWN, PASSIVE_LEVEL): every processor leaves VMX operation and the
//!   driver unloads its core (`session::load::unload`); later requests fail.
//! - The power-state callback (PASSIVE_LEVEL): before a sleep every processor leaves VMX
//!   operation, after it enters it again (`session::load::{suspend, resume}`).

use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::ptr::null_mut;

use smudge_core::session::load;
use smudge_core::vmx::root::{Processors, RawCr, ROOT};

use crate::nt::{self, DeviceObject, Irp, NtStatus};
use crate::platform::NtPlatform;
use crate::processors::NtProcessors;

/// What the registrations need to live in: the bug-check record (nonpaged, in the image) and the
/// power-state callback's object and registration.
struct Registrations {
    bug_check: UnsafeCell<nt::BugCheckCallbackRecord>,
    power: UnsafeCell<(*mut c_void, *mut c_void)>,
}

// SAFETY: written only by `register` (DriverEntry) and `unregister` (DriverUnload, or a failed
// DriverEntry), which never run at once; the kernel reads the record meanwhile.
unsafe impl Sync for Registrations {}

static REG: Registrations = Registrations {
    bug_check: UnsafeCell::new(nt::BugCheckCallbackRecord::ZEROED),
    power: UnsafeCell::new((null_mut(), null_mut())),
};

nt::unicode_string!(POWER_STATE, r"\Callback\PowerState");
unsafe extern "system" fn on_bug_check(_buffer: *mut c_void, _length: u32) {
    ROOT.emergency_here(NtProcessors.current(), &RawCr);
}

unsafe extern "system" fn on_power_state(_ctx: *mut c_void, arg1: *mut c_void, arg2: *mut c_void) {
    // Reaching every processor needs PASSIVE_LEVEL, where Windows calls this callback.
    if arg1 as usize != nt::PO_CB_SYSTEM_STATE_LOCK || crate::processors::irql() != 0 {
        return;
    }
    if arg2.is_null() {
        load::suspend(&NtProcessors);
    } else if let Err(f) = load::resume(&NtProcessors, &NtPlatform) {
        crate::error(f.message().as_cstr());
    }
}

/// IRP_MJ_SHUTDOWN.
pub unsafe extern "system" fn dispatch_shutdown(
    _device: *mut DeviceObject,
    irp: *mut Irp,
) -> NtStatus {
    crate::leave_vmx();
    // SAFETY: the IRP is ours until completed.
    unsafe { crate::complete(irp, 0, 0) }
}

/// Registers the three; a failure leaves none registered.
pub fn register(device: *mut DeviceObject) -> Result<(), NtStatus> {
    let mut attrs = nt::ObjectAttributes {
        length: core::mem::size_of::<nt::ObjectAttributes>() as u32,
        root_directory: null_mut(),
        object_name: POWER_STATE.as_ptr(),
        attributes: nt::OBJ_CASE_INSENSITIVE,
        security_descriptor: null_mut(),
        security_quality_of_service: null_mut(),
    };
    // SAFETY: `device` is the driver's device; the record lives in the image (nonpaged) and
    // stays until `unregister`; the component name is a NUL-terminated static; `attrs` and the
    // power slots are valid for the calls. `unregister` undoes what succeeded.
    unsafe {
        let mut s = nt::IoRegisterShutdownNotification(device);
        let record = REG.bug_check.get();
        if s >= 0
            && nt::KeRegisterBugCheckCallback(
                record,
                on_bug_check,
                null_mut(),
                0,
                c"smudge".as_ptr().cast(),
            ) == 0
        {
            s = smudge_core::abi::windows::STATUS_RESOURCE_IN_USE;
        }
        let (object, registration) = &mut *REG.power.get();
        if s >= 0 {
            s = nt::ExCreateCallback(object, &mut attrs, 0, 1);
        }
        if s >= 0 {
            *registration = nt::ExRegisterCallback(*object, on_power_state, null_mut());
            if registration.is_null() {
                s = smudge_core::abi::windows::STATUS_INSUFFICIENT_RESOURCES;
            }
        }
        if s < 0 {
            unregister(device);
            return Err(s);
        }
    }
    Ok(())
}

/// Undoes [`register`], or what of it succeeded.
pub fn unregister(device: *mut DeviceObject) {
    // SAFETY: what `register` registered, once: the power-state registration is removed before
    // its object is dereferenced; the bug-check record's own state says whether it is
    // registered, and a device without a shutdown registration is not in the list.
    unsafe {
        let (object, registration) =
            core::mem::replace(&mut *REG.power.get(), (null_mut(), null_mut()));
        if !registration.is_null() {
            nt::ExUnregisterCallback(registration);
        }
        if !object.is_null() {
            nt::ObfDereferenceObject(object);
        }
        nt::KeDeregisterBugCheckCallback(REG.bug_check.get());
        nt::IoUnregisterShutdownNotification(device);
    }
}
