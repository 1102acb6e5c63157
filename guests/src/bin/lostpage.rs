//! The lost-page hunt. Each vCPU (index in RDI, at most 2) writes pseudo-random pages of its own
//! region (vCPU 0: 4-32 MiB, vCPU 1: 32-60 MiB), prints `W <gfn in hex>` after each write, and
//! asks for a checkpoint after a random number of writes, printing `C <vcpu> <round>` just
//! before. After the last round it halts. A quarter of the writes go to a hot set of 64 pages,
//! so pages re-dirtied after the harvest that cleared them are exercised while the other vCPU
//! keeps running. The tool's checkpoint and exit events must account for every write in the
//! window the output order allows (hostile/src/lostpage.rs).
//!
//! Every console byte is a VM exit, so the lines are short (no `0x`).
//!
//! All state lives in registers and on the stack (the reserved region): a write to .data or
//! .bss would dirty a page no W line names.
#![no_std]
#![no_main]

use smudge_guests as g;

g::entry!(main);

/// Checkpoints per vCPU.
const ROUNDS: u64 = 40;
/// Writes per round: 10..=10 + SPREAD - 1.
const SPREAD: u32 = 101;
/// First page of vCPU 0's region: 4 MiB.
const FIRST_GFN: u64 = 0x400;
/// Pages per vCPU region: 28 MiB.
const REGION_PAGES: u64 = 0x1c00;
/// Seed of the generator; vCPU i uses SEED ^ i.
const SEED: u64 = 0x6c6f_7374_7061_6765;

/// Prints `W <gfn>` (lowercase hex, no prefix).
fn print_w(gfn: u64) {
    g::print("W ");
    let mut started = false;
    for shift in (0..16).rev() {
        let d = ((gfn >> (shift * 4)) & 0xf) as u8;
        if d != 0 || started || shift == 0 {
            started = true;
            g::putc(if d < 10 { b'0' + d } else { b'a' + d - 10 });
        }
    }
    g::putc(b'\n');
}

fn main(vcpu: u64) -> u64 {
    let v = vcpu % 2;
    let mut rng = g::Lcg(SEED ^ v);
    let base = FIRST_GFN + v * REGION_PAGES;
    // A small hot set per vCPU: a quarter of the writes go to its 64 pages, so the same page is
    // written in many rounds.
    let hot = base + u64::from(rng.below((REGION_PAGES - 64) as u32));
    for round in 1..=ROUNDS {
        let n = 10 + u64::from(rng.below(SPREAD));
        for k in 0..n {
            let gfn = if rng.below(4) == 0 {
                hot + u64::from(rng.below(64))
            } else {
                base + u64::from(rng.below(REGION_PAGES as u32))
            };
            g::write_byte(gfn * g::PAGE + (k * 16) % g::PAGE, round as u8);
            print_w(gfn);
        }
        g::print("C ");
        g::print_dec(v);
        g::print(" ");
        g::print_dec(round);
        g::print("\n");
        g::checkpoint();
    }
    // A last few writes after the final checkpoint: only the exit event can report them.
    let n = 5 + u64::from(rng.below(10));
    for k in 0..n {
        let gfn = base + u64::from(rng.below(REGION_PAGES as u32));
        g::write_byte(gfn * g::PAGE + (k * 16) % g::PAGE, 0xee);
        print_w(gfn);
    }
    loop {
        // SAFETY: HLT stops this vCPU; smudge does not resume a halted vCPU.
        unsafe { core::arch::asm!("hlt", options(nomem, nostack)) };
    }
}
