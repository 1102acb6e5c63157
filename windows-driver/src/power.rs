//! Leaving VMX operation on the way down (INIT is blocked in VMX root operation, SDM 25.8) and
//! around a sleep (which loses VMX state while Windows restores CR4.VMXE):
//! - a bug check (HIGH_LEVEL, the other processors frozen): this processor only, through
//!   `VmxRoot::emergency_here`;
//! - shutdown (IRP_MJ_SHUTDOWN): every processor, and the core unloads (`load::unload`);
//! - the power-state callback: out before a sleep, in after it (`load::{suspend, resume}`).

use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::ptr::null_mut;

use smudge_core::session::load;
use smudge_core::vmx::root::{Processors, RawCr, ROOT};

use crate::nt::{self, DeviceObject, Irp, NtStatus};
use crate::platform::NtPlatform;
use crate::processors::NtProcessors;

/// The bug-check record (nonpaged, in the image) and the power-state callback's object and
/// registration.
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
    let passive = crate::processors::irql() == nt::PASSIVE_LEVEL;
    if arg1 as usize != nt::PO_CB_SYSTEM_STATE_LOCK || !passive {
        return;
    }
    if arg2.is_null() {
        load::suspend(&NtProcessors);
    } else if let Err(f) = load::resume(&NtProcessors, &NtPlatform) {
        crate::log(nt::DPFLTR_ERROR_LEVEL, f.message().as_cstr());
    }
}

/// IRP_MJ_SHUTDOWN.
pub unsafe extern "system" fn on_shutdown(_device: *mut DeviceObject, irp: *mut Irp) -> NtStatus {
    crate::leave_vmx();
    // SAFETY: the IRP is ours until completed.
    unsafe { crate::complete(irp, 0, 0) }
}

/// Registers the three; on a failure the caller's [`unregister`] undoes what succeeded.
pub fn register(device: *mut DeviceObject) -> NtStatus {
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
    // power slots are valid for the calls.
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
        s
    }
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
