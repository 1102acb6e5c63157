//! Writes pages of its own 4 MiB region (vCPU i: 8 MiB + i * 4 MiB) forever, without printing
//! or exiting: the guest side of smudge-hostile's races (harvest, explain, load and close while
//! the vCPUs run). Only a signal to the RUN thread gets control back to user space.
#![no_std]
#![no_main]

use smudge_guests as g;

g::entry!(main);

/// Pages per vCPU region.
const REGION_PAGES: u64 = 1024;
/// First page of vCPU 0's region: 8 MiB.
const FIRST_GFN: u64 = 0x800;

fn main(vcpu: u64) -> u64 {
    let base = FIRST_GFN + (vcpu % 8) * REGION_PAGES;
    let mut i = 0u64;
    let mut round = 0u8;
    loop {
        g::write_byte((base + i) * g::PAGE + u64::from(round) * 8, round);
        // A full-period walk of the region (7 is coprime with 1024).
        i = (i * 5 + 7) % REGION_PAGES;
        if i == 0 {
            round = round.wrapping_add(1);
        }
    }
}
