//! Writes one byte to a pseudo-random set of pages per round, prints `W <gfn>` for each page,
//! then asks for a checkpoint. The host's dirty log at each checkpoint must equal the W lines
//! since the previous one (plus the reserved region, which the tool filters out).
//!
//! Rounds pick 5-40 distinct pages in [4 MiB, 32 MiB); about a quarter of the picks repeat a
//! page of the previous round, so re-dirtied pages (whose D bit or W permission the harvest
//! cleared) are exercised. The guest keeps all its state on the stack: a write to .data/.bss
//! would dirty an image page that no W line names.
#![no_std]
#![no_main]

use smudge_guests as g;

g::entry!(main);

/// Rounds (= checkpoints).
const ROUNDS: u64 = 8;
/// First page: 4 MiB.
const FIRST_GFN: u64 = 0x400;
/// One past the last page: 32 MiB.
const END_GFN: u64 = 0x2000;
/// Most pages per round.
const MAX_PER_ROUND: usize = 40;

fn main(_vcpu: u64) -> u64 {
    let mut rng = g::Lcg(0x736d_7564_6765_0001);
    let mut prev = [0u64; MAX_PER_ROUND];
    let mut prev_n = 0usize;
    for round in 1..=ROUNDS {
        let n = 5 + rng.below(36) as usize; // 5..=40
        let mut chosen = [0u64; MAX_PER_ROUND];
        let mut k = 0usize;
        g::print("round ");
        g::print_dec(round);
        g::print(": ");
        g::print_dec(n as u64);
        g::print(" pages\n");
        while k < n {
            let gfn = if prev_n > 0 && rng.below(4) == 0 {
                prev[rng.below(prev_n as u32) as usize]
            } else {
                FIRST_GFN + u64::from(rng.below((END_GFN - FIRST_GFN) as u32))
            };
            if chosen[..k].contains(&gfn) {
                continue;
            }
            chosen[k] = gfn;
            k += 1;
            g::write_byte(gfn * g::PAGE + (round * 64) % g::PAGE, round as u8);
            g::print("W ");
            g::print_hex(gfn);
            g::print("\n");
        }
        g::checkpoint();
        prev = chosen;
        prev_n = n;
    }
    g::print("pagewriter done\n");
    0
}
