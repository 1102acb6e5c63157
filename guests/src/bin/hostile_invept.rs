//! Executes INVEPT. INVEPT in VMX non-root operation always exits (SDM 26.1.2, basic exit
//! reason 50); smudge stops the run with a precise reason, and no host EPT is invalidated.
#![no_std]
#![no_main]

use smudge_guests as g;

g::entry!(main);

fn main(_vcpu: u64) -> u64 {
    g::print("hostile_invept: invept (all-context)\n");
    let desc = [0u64; 2];
    // SAFETY: exits to the host; the descriptor is never used.
    unsafe {
        core::arch::asm!("invept {t}, xmmword ptr [{d}]", t = in(reg) 2u64, d = in(reg) &desc, options(nostack))
    };
    g::print("hostile_invept: invept returned\n");
    1
}
