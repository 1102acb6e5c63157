//! The processor accesses the shim needs beyond the core's arch layer (CPL 0 only): the reads of
//! the admission check, CR4.VMXE, the IRQL (CR8) and the interrupt flag.

use core::arch::asm;

pub use smudge_core::arch::rdmsr;

/// CR4 of the current processor.
pub fn cr4() -> u64 {
    let v: u64;
    // SAFETY: the driver runs at CPL 0, where reading CR4 is allowed and has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// CR0 of the current processor.
pub fn cr0() -> u64 {
    let v: u64;
    // SAFETY: the driver runs at CPL 0, where reading CR0 is allowed and has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Loads CR4 (Windows keeps no shadow of CR4, unlike Linux: the register is the truth).
///
/// # Safety
/// Interrupts are disabled (the read-modify-write of the caller must not race an interrupt
/// handler that rewrites CR4) and `value` differs from the current CR4 only in VMXE.
pub unsafe fn write_cr4(value: u64) {
    // SAFETY: the caller guarantees that only VMXE changes, which affects nothing but VMXON.
    // Not `nomem`: the write must stay ordered with the memory accesses around it.
    unsafe { asm!("mov cr4, {}", in(reg) value, options(nostack, preserves_flags)) };
}

/// DISPATCH_LEVEL.
pub const DISPATCH_LEVEL: u8 = 2;

/// Raises the IRQL to DISPATCH_LEVEL; returns the previous IRQL.
///
/// On x64 the IRQL is CR8 (the local APIC task priority): the WDK's own KeRaiseIrql and
/// KeLowerIrql are inline CR8 accesses on AMD64 (wdm.h defers them to amd64.h), which is why
/// ntoskrnl need not export them and this driver imports nothing for it.
///
/// # Safety
/// Called at IRQL <= DISPATCH_LEVEL, paired with [`lower_irql`] with the returned value.
pub unsafe fn raise_to_dispatch() -> u8 {
    let old: u64;
    // SAFETY: raising CR8 only masks interrupts of lower priority on this processor. Not
    // `nomem`: like KeRaiseIrql, this is a compiler barrier (what runs at DISPATCH_LEVEL must
    // not be moved before the raise).
    unsafe {
        asm!("mov {old}, cr8", "mov cr8, {new}", old = out(reg) old, new = in(reg) u64::from(DISPATCH_LEVEL), options(nostack, preserves_flags))
    };
    old as u8
}

/// Lowers the IRQL back to what [`raise_to_dispatch`] returned.
///
/// # Safety
/// `old` came from the matching `raise_to_dispatch` on this processor.
pub unsafe fn lower_irql(old: u8) {
    // SAFETY: restores the caller's IRQL; pending software interrupts (DPCs) are delivered
    // when the task priority drops. A compiler barrier, like the raise.
    unsafe { asm!("mov cr8, {}", in(reg) u64::from(old), options(nostack, preserves_flags)) };
}

/// PUSHFQ; CLI: disables interrupts, returns the previous RFLAGS.
pub fn irq_save() -> usize {
    let flags: u64;
    // SAFETY: CPL 0 may clear IF; the stack push/pop is balanced.
    unsafe { asm!("pushfq", "pop {}", "cli", out(reg) flags, options(nomem)) };
    flags as usize
}

/// PUSH; POPFQ: restores the interrupt flag saved by [`irq_save`].
pub fn irq_restore(flags: usize) {
    // SAFETY: reloads the RFLAGS image irq_save took on this processor (only IF differs).
    unsafe { asm!("push {}", "popfq", in(reg) flags as u64, options(nomem)) };
}

/// The current IRQL (CR8).
pub fn irql() -> u8 {
    let v: u64;
    // SAFETY: reading CR8 at CPL 0 has no side effects.
    unsafe { asm!("mov {}, cr8", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v as u8
}
