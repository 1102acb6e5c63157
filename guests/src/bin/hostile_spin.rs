//! Spins forever. The host must still get control back (preemption timer, signals).
#![no_std]
#![no_main]

use smudge_guests as g;

g::entry!(main);

fn main(_vcpu: u64) -> u64 {
    g::print("hostile_spin: spinning\n");
    loop {
        core::hint::spin_loop(); // PAUSE
    }
}
