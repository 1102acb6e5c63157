//! The IRQL: on x64 it is CR8 (the local APIC task priority). The WDK's own KeRaiseIrql and
//! KeLowerIrql are inline CR8 accesses on AMD64 (wdm.h defers them to amd64.h), which is why
//! ntoskrnl need not export them and this driver imports nothing for it.

use smudge_core::arch;

/// DISPATCH_LEVEL.
pub const DISPATCH_LEVEL: u8 = 2;

/// Raises the IRQL to DISPATCH_LEVEL; returns the previous IRQL.
///
/// # Safety
/// Called at IRQL <= DISPATCH_LEVEL, paired with [`lower_irql`] with the returned value.
pub unsafe fn raise_to_dispatch() -> u8 {
    // SAFETY: CPL 0; raising CR8 only masks interrupts of lower priority on this processor, and
    // the caller pairs it with the lowering.
    unsafe {
        let old = arch::read_cr8();
        arch::write_cr8(u64::from(DISPATCH_LEVEL));
        old as u8
    }
}

/// Lowers the IRQL back to what [`raise_to_dispatch`] returned.
///
/// # Safety
/// `old` came from the matching `raise_to_dispatch` on this processor.
pub unsafe fn lower_irql(old: u8) {
    // SAFETY: restores the caller's IRQL; pending DPCs are delivered when the priority drops.
    unsafe { arch::write_cr8(u64::from(old)) };
}

/// The current IRQL.
pub fn irql() -> u8 {
    // SAFETY: CPL 0; reading CR8 has no side effects.
    unsafe { arch::read_cr8() as u8 }
}
