//! Executes UD2. The guest has no IDT, so the #UD cannot be delivered: triple fault.
#![no_std]
#![no_main]

use smudge_guests as g;

g::entry!(main);

fn main(_vcpu: u64) -> u64 {
    g::print("hostile_triple: ud2\n");
    // SAFETY: raises #UD on purpose.
    unsafe { core::arch::asm!("ud2", options(nomem, nostack, noreturn)) }
}
