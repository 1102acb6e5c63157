//! Looks for extended state beyond x87/SSE and tries to enable it. smudge hides XSAVE, AVX and
//! AVX-512 in CPUID and keeps CR4.OSXSAVE host-owned, so the guest can never run with the
//! host's XCR0 or touch its YMM/ZMM state: the MOV to CR4 that sets OSXSAVE exits (basic
//! reason 28) and smudge stops the VM.
#![no_std]
#![no_main]

use core::arch::x86_64::__cpuid_count;
use smudge_guests as g;

g::entry!(main);

fn main(_vcpu: u64) -> u64 {
    // CPUID exits to smudge, which answers with the filtered leaves.
    let (l1, ld) = (__cpuid_count(1, 0), __cpuid_count(0xd, 0));
    let visible = l1.ecx & (0x7 << 26) != 0 || ld.eax != 0;
    g::print(if visible {
        "hostile_xsave: XSAVE/AVX visible in CPUID\n"
    } else {
        "hostile_xsave: XSAVE/AVX hidden in CPUID\n"
    });
    g::print("hostile_xsave: setting CR4.OSXSAVE\n");
    // SAFETY: under smudge this MOV exits; on a machine that allowed it the guest would only
    // gain XSAVE.
    unsafe {
        core::arch::asm!(
            "mov {t}, cr4",
            "or {t}, {b}",
            "mov cr4, {t}",
            t = out(reg) _,
            b = in(reg) 1u64 << 18,
            options(nostack)
        )
    };
    g::print("hostile_xsave: CR4.OSXSAVE set\n");
    1
}
