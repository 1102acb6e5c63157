//! Writes every page of [4 MiB, 36 MiB) once, checkpoint, writes them all again, checkpoint,
//! exits 0. Two passes over 8192 pages: the second pass re-dirties pages whose dirty state the
//! first harvest cleared, so the exit counts per page of each mode can be compared.
#![no_std]
#![no_main]

use smudge_guests as g;

g::entry!(main);

/// First page: 4 MiB.
const FIRST_GFN: u64 = 0x400;
/// One past the last page: 36 MiB.
const END_GFN: u64 = 0x2400;

fn main(_vcpu: u64) -> u64 {
    for pass in 1..=2u64 {
        for gfn in FIRST_GFN..END_GFN {
            g::write_byte(gfn * g::PAGE, pass as u8);
        }
        g::print("seqwriter pass ");
        g::print_dec(pass);
        g::print(": wrote pages ");
        g::print_hex(FIRST_GFN);
        g::print("..");
        g::print_hex(END_GFN - 1);
        g::print("\n");
        g::checkpoint();
    }
    0
}
