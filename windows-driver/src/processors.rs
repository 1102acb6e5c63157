//! Running code on a chosen processor: by system-wide index, through a group affinity switch
//! (KeSetSystemGroupAffinityThread), at DISPATCH_LEVEL where per-processor VMX state must not
//! be preempted. The IRQL is CR8 on x64 (the local APIC task priority): the WDK's own
//! KeRaiseIrql and KeLowerIrql are inline CR8 accesses on AMD64 (wdm.h defers them to amd64.h),
//! which is why ntoskrnl need not export them and this driver imports nothing for them.

use smudge_core::vmx::root::Processors;

use crate::platform::NtPlatform;
use smudge_core::arch;

use crate::nt::{self, DISPATCH_LEVEL};

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
/// return the thread runs there. None when no such processor is active.
pub fn pin(index: u32) -> Option<Pinned> {
    let mut number = nt::ProcessorNumber::default();
    // SAFETY: `number` is a valid out pointer for the duration of the call.
    let status = unsafe { nt::KeGetProcessorNumberFromIndex(index, &mut number) };
    let mask = 1usize
        .checked_shl(u32::from(number.number))
        .filter(|_| status >= 0)?;
    let affinity = nt::GroupAffinity {
        mask,
        group: number.group,
        reserved: [0; 3],
    };
    let mut previous = nt::GroupAffinity::default();
    // SAFETY: IRQL <= APC_LEVEL (caller); both pointers are valid for the call.
    unsafe { nt::KeSetSystemGroupAffinityThread(&affinity, &mut previous) };
    Some(Pinned { previous })
}

/// The active processors, reached by a group-affinity switch at DISPATCH_LEVEL with
/// interrupts off; CR4 and RFLAGS.IF are the registers themselves (the trait's defaults).
pub struct NtProcessors;

// SAFETY: `on` runs `f` on processor `i` (pinned there) at DISPATCH_LEVEL, with interrupts
// off, and returns after it.
unsafe impl Processors for NtProcessors {
    fn bound(&self) -> u32 {
        // SAFETY: no preconditions (IRQL <= DISPATCH_LEVEL). Active processors in all groups.
        unsafe { nt::KeQueryActiveProcessorCountEx(nt::ALL_PROCESSOR_GROUPS) }
    }
    /// The system-wide index of the calling processor (stable only while pinned or at
    /// DISPATCH_LEVEL).
    fn current(&self) -> u32 {
        // SAFETY: a null PROCESSOR_NUMBER pointer is allowed; any IRQL.
        unsafe { nt::KeGetCurrentProcessorNumberEx(core::ptr::null_mut()) }
    }
    fn on(&self, i: u32, f: &mut (dyn FnMut() + Send)) -> bool {
        let Some(_pinned) = pin(i) else {
            return false;
        };
        at_dispatch(|| self.with_irqs_off(f));
        true
    }
    fn alloc_region(&self) -> Option<u64> {
        // VMXON regions belong to the driver, not to a VM: out of the page count and its cap.
        NtPlatform::os_alloc()
    }
    fn free_region(&self, pa: u64) {
        NtPlatform::os_free(pa)
    }
}

/// Runs `f` at DISPATCH_LEVEL, where the thread is not preempted and so stays on its processor,
/// then goes back to the caller's IRQL. Above DISPATCH_LEVEL, `f` runs where it is.
pub fn at_dispatch<R>(f: impl FnOnce() -> R) -> R {
    let old = irql();
    if old >= DISPATCH_LEVEL {
        return f();
    }
    // SAFETY: CPL 0; raising CR8 from below DISPATCH_LEVEL only masks lower-priority interrupts
    // on this processor, and the IRQL goes back below once `f` returns (pending DPCs are
    // delivered then).
    unsafe { arch::write_cr8(u64::from(DISPATCH_LEVEL)) };
    let r = f();
    // SAFETY: as above, back to the IRQL read on this same processor (no preemption between).
    unsafe { arch::write_cr8(u64::from(old)) };
    r
}

/// The current IRQL.
pub fn irql() -> u8 {
    // SAFETY: CPL 0; reading CR8 has no side effects.
    unsafe { arch::read_cr8() as u8 }
}
