//! Prints a greeting and exits 0.
#![no_std]
#![no_main]

use smudge_guests as g;

g::entry!(main);

fn main(_vcpu: u64) -> u64 {
    g::print("hello from the smudge guest\n");
    0
}
