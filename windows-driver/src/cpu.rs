//! The three processor reads the admission check needs (CPL 0 only).

use core::arch::asm;

use smudge_core::vmx::caps::CpuidRegs;

/// CPUID(leaf, subleaf) on the current processor.
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidRegs {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    CpuidRegs { eax: r.eax, ebx: r.ebx, ecx: r.ecx, edx: r.edx }
}

/// CR4 of the current processor.
pub fn cr4() -> u64 {
    let v: u64;
    // SAFETY: the driver runs at CPL 0, where reading CR4 is allowed and has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// RDMSR.
///
/// # Safety
/// The MSR must exist on this processor (else #GP, a bug check) and the caller must run at CPL 0.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller guarantees the MSR exists and that we run at CPL 0.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    u64::from(hi) << 32 | u64::from(lo)
}
