//! Writes into its own page tables, which live in the reserved region: it clears R/W in the
//! first guest PD's entry 511 (the 2 MiB page at 1022 MiB, never used by this guest, beyond the
//! default 64 MiB of RAM), checks the byte changed, prints "ptwrite ok" and exits 0. The code,
//! data and stack mappings stay as they are.
#![no_std]
#![no_main]

use smudge_guests as g;

g::entry!(main);

/// The PDE written: index 511 of the first page directory (GPA 0x3fe0_0000).
const PDE_INDEX: u64 = 511;

fn main(_vcpu: u64) -> u64 {
    let pd = g::reserved_base() + g::PD_OFF;
    let pde = pd + PDE_INDEX * 8;
    g::print("hostile_ptwrite: PDE at ");
    g::print_hex(pde);
    g::print("\n");
    let before = g::read_byte(pde);
    // Bit 1 (R/W): the region becomes read-only; nothing here touches it.
    g::write_byte(pde, before & !0x2);
    let after = g::read_byte(pde);
    if after != before & !0x2 || before & 0x1 == 0 {
        g::print("hostile_ptwrite: unexpected PDE byte ");
        g::print_hex(u64::from(before));
        g::print(" -> ");
        g::print_hex(u64::from(after));
        g::print("\n");
        return 1;
    }
    g::print("ptwrite ok\n");
    0
}
