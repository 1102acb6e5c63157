//! Running code on a chosen processor: by system-wide index, through a group affinity switch
//! (KeSetSystemGroupAffinityThread), at DISPATCH_LEVEL where per-processor VMX state must not
//! be preempted.

use smudge_windows::status::{NtStatus, STATUS_NOT_SUPPORTED};

use crate::{cpu, nt};

/// Processors the driver tracks VMX state for; DriverEntry refuses machines with more.
pub use smudge_core::vmx::root::MAX_CPUS as MAX_PROCESSORS;

/// Active processors in all groups.
pub fn count() -> u32 {
    // SAFETY: no preconditions (IRQL <= DISPATCH_LEVEL).
    unsafe { nt::KeQueryActiveProcessorCountEx(nt::ALL_PROCESSOR_GROUPS) }
}

/// The system-wide index of the processor this thread runs on (stable only while pinned or at
/// DISPATCH_LEVEL).
pub fn current() -> u32 {
    // SAFETY: a null PROCESSOR_NUMBER pointer is allowed; any IRQL.
    unsafe { nt::KeGetCurrentProcessorNumberEx(core::ptr::null_mut()) }
}

/// The thread is bound to one processor until this is dropped (LIFO with other pins).
pub struct Pinned {
    previous: nt::GroupAffinity,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: `previous` is what KeSetSystemGroupAffinityThread returned for this pin.
        unsafe { nt::KeRevertToUserGroupAffinityThread(&self.previous) };
    }
}

/// Binds the current thread to processor `index` (call at PASSIVE_LEVEL or APC_LEVEL). On
/// return the thread runs there.
pub fn pin(index: u32) -> Result<Pinned, NtStatus> {
    let mut number = nt::ProcessorNumber::default();
    // SAFETY: `number` is a valid out pointer for the duration of the call.
    let status = unsafe { nt::KeGetProcessorNumberFromIndex(index, &mut number) };
    let mask = 1usize.checked_shl(u32::from(number.number)).unwrap_or(0);
    if status < 0 || mask == 0 {
        return Err(if status < 0 {
            status
        } else {
            STATUS_NOT_SUPPORTED
        });
    }
    let affinity = nt::GroupAffinity {
        mask,
        group: number.group,
        reserved: [0; 3],
    };
    let mut previous = nt::GroupAffinity::default();
    // SAFETY: IRQL <= APC_LEVEL (caller); both pointers are valid for the call.
    unsafe { nt::KeSetSystemGroupAffinityThread(&affinity, &mut previous) };
    Ok(Pinned { previous })
}

/// Runs `f` on processor `index` at DISPATCH_LEVEL (call at PASSIVE_LEVEL).
pub fn on_processor<R>(index: u32, f: impl FnOnce() -> R) -> Result<R, NtStatus> {
    let pinned = pin(index)?;
    // SAFETY: at PASSIVE_LEVEL (caller); lowered right after `f`.
    let old = unsafe { cpu::raise_to_dispatch() };
    let r = f();
    // SAFETY: pairs with the raise above.
    unsafe { cpu::lower_irql(old) };
    drop(pinned);
    Ok(r)
}
