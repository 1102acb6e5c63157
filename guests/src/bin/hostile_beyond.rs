//! Writes to 0x8000_0000, which the guest page tables map (they cover 4 GiB) but which lies
//! beyond guest RAM (64 MiB by default): EPT has no slot there, so the run ends with an MMIO
//! exit at that GPA. Needs less than 2 GiB of guest RAM.
#![no_std]
#![no_main]

use smudge_guests as g;

g::entry!(main);

/// The address written.
const TARGET: u64 = 0x8000_0000;

fn main(_vcpu: u64) -> u64 {
    g::print("hostile_beyond: writing ");
    g::print_hex(TARGET);
    g::print("\n");
    g::write_byte(TARGET, 0x5a);
    g::print("hostile_beyond: the write was not stopped\n");
    1
}
