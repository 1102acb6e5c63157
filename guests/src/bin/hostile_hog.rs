//! Touches every page of guest RAM below the reserved region, so that every page needs a host
//! backing page: with a page limit or a failing host allocator, the run must stop with a clean
//! error instead of hurting the host. Prints its progress every 2048 pages; exits 0 when every
//! page was touched.
#![no_std]
#![no_main]

use smudge_guests as g;

g::entry!(main);

/// First page touched: 2 MiB (the image lies at 1 MiB).
const FIRST_GFN: u64 = 0x200;

fn main(_vcpu: u64) -> u64 {
    let end = g::reserved_base() / g::PAGE;
    g::print("hostile_hog: touching pages ");
    g::print_hex(FIRST_GFN);
    g::print("..");
    g::print_hex(end);
    g::print("\n");
    let mut n = 0u64;
    for gfn in FIRST_GFN..end {
        g::write_byte(gfn * g::PAGE, 0xa5);
        n += 1;
        if n % 2048 == 0 {
            g::print("hostile_hog: ");
            g::print_dec(n);
            g::print(" pages\n");
        }
    }
    g::print("hostile_hog: touched ");
    g::print_dec(n);
    g::print(" pages\n");
    0
}
