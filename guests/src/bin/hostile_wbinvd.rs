//! Executes WBINVD in a loop: on the host CPU it would write back and invalidate every cache
//! level, a noisy-neighbour attack on everything else running there. With "WBINVD exiting"
//! (SDM Table 25-7, bit 6) each one exits (basic reason 54) and smudge skips it; the run's
//! exit counts show them all.
#![no_std]
#![no_main]

use smudge_guests as g;

g::entry!(main);

/// WBINVDs executed.
const ROUNDS: u64 = 2000;

fn main(_vcpu: u64) -> u64 {
    for _ in 0..ROUNDS {
        // SAFETY: WBINVD only affects caches (and exits under smudge); no memory is touched.
        unsafe { core::arch::asm!("wbinvd", options(nostack)) };
    }
    g::print("hostile_wbinvd: ");
    g::print_dec(ROUNDS);
    g::print(" WBINVDs\n");
    0
}
