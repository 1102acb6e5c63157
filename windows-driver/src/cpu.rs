//! The IRQL: on x64 it is CR8 (the local APIC task priority). The WDK's own KeRaiseIrql and
//! KeLowerIrql are inline CR8 accesses on AMD64 (wdm.h defers them to amd64.h), which is why
//! ntoskrnl need not export them and this driver imports nothing for it.

use smudge_core::arch;

/// DISPATCH_LEVEL.
pub const DISPATCH_LEVEL: u8 = 2;

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
