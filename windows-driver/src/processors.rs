//! Running code on a chosen processor: by system-wide index, through a group affinity switch
//! (KeSetSystemGroupAffinityThread), at DISPATCH_LEVEL where per-processor VMX state must not
//! be preempted.

use smudge_core::abi::windows::{NtStatus, STATUS_NOT_SUPPORTED};
use smudge_core::arch;
use smudge_core::vmx::root::{ControlRegs, Processors, RawCr};

use crate::platform::NtPlatform;
use crate::{cpu, nt};

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
    let _pinned = pin(index)?;
    Ok(cpu::at_dispatch(f))
}

/// The active processors, reached by a group-affinity switch at DISPATCH_LEVEL with
/// interrupts off.
pub struct NtProcessors;

// SAFETY: `on` runs `f` on processor `i` at DISPATCH_LEVEL (`on_processor`), here with
// interrupts off, and returns after it.
unsafe impl Processors for NtProcessors {
    fn bound(&self) -> u32 {
        count()
    }
    fn present(&self, _i: u32) -> bool {
        true
    }
    fn current(&self) -> u32 {
        current()
    }
    fn on(&self, i: u32, f: &mut (dyn FnMut() + Send)) -> bool {
        on_processor(i, || {
            let flags = self.irq_save();
            f();
            self.irq_restore(flags);
        })
        .is_ok()
    }
    fn cr(&self) -> &(dyn ControlRegs + Sync) {
        // Windows keeps no shadow of CR4: the register is the truth.
        &RawCr
    }
    fn irq_save(&self) -> usize {
        // SAFETY: CPL 0; the callers pair it with irq_restore on this processor.
        unsafe { arch::irq_save() as usize }
    }
    fn irq_restore(&self, flags: usize) {
        // SAFETY: what irq_save returned on this processor.
        unsafe { arch::irq_restore(flags as u64) }
    }
    fn alloc_region(&self) -> Option<u64> {
        // VMXON regions belong to the driver, not to a VM: out of the page count and its cap.
        NtPlatform::os_alloc()
    }
    fn free_region(&self, pa: u64) {
        NtPlatform::os_free(pa)
    }
}
