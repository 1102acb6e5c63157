//! CR2 is the guest's own: VMX does not switch it (no VMCS field holds it, SDM 25.4.1), and
//! MOV to/from CR2 never exits, so the host must save it at every VM exit and put it back before
//! every VM entry, as KVM does. The guest writes a value to CR2, leaves to the host through a
//! checkpoint (the tool runs in between, and the vCPU may come back on another CPU: either
//! changes the processor's CR2 when the host takes a page fault), and reads CR2 back. Exits 0
//! when every round read back its own value, else the number of rounds that did not.
#![no_std]
#![no_main]

use core::arch::asm;

use smudge_guests as g;

g::entry!(main);

const ROUNDS: u64 = 40;

fn write_cr2(v: u64) {
    // SAFETY: CR2 only matters to a page-fault handler; this guest has none.
    unsafe { asm!("mov cr2, {}", in(reg) v, options(nomem, nostack, preserves_flags)) };
}

fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effect.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

fn main(_vcpu: u64) -> u64 {
    let mut lost = 0;
    for round in 0..ROUNDS {
        let mine = 0x5eed_c2c2_0000_0000 | round;
        write_cr2(mine);
        g::checkpoint();
        g::print(".");
        let back = read_cr2();
        if back != mine {
            lost += 1;
            g::print("\ncr2keeper: round ");
            g::print_dec(round);
            g::print(" wrote ");
            g::print_hex(mine);
            g::print(", read back ");
            g::print_hex(back);
        }
    }
    g::print("\ncr2keeper: ");
    g::print_dec(ROUNDS - lost);
    g::print(" of ");
    g::print_dec(ROUNDS);
    g::print(" rounds kept CR2\n");
    lost
}
