//! The multi-vCPU page writer. Each vCPU (index in RDI) writes pseudo-random pages of its own
//! 8 MiB region, prints `W <gfn>` after each write, asks for a checkpoint after every round, and
//! finally halts. The run ends when every vCPU has halted, so every W line reaches the tool; the
//! union of all harvested logs must equal the union of all W lines (no page lost, none spurious),
//! while the other vCPUs keep running during each checkpoint's harvest.
#![no_std]
#![no_main]

use smudge_guests as g;

g::entry!(main);

/// Rounds per vCPU.
const ROUNDS: u64 = 6;
/// First page of vCPU 0's region: 4 MiB; each vCPU gets 8 MiB.
const FIRST_GFN: u64 = 0x400;
/// Pages per vCPU region.
const REGION_PAGES: u64 = 0x800;

fn main(vcpu: u64) -> u64 {
    let mut rng = g::Lcg(0x736d_7564_6765_0100 + vcpu);
    let base = FIRST_GFN + (vcpu % 3) * REGION_PAGES;
    for round in 1..=ROUNDS {
        let n = 5 + rng.below(20);
        for _ in 0..n {
            let gfn = base + u64::from(rng.below(REGION_PAGES as u32));
            g::write_byte(gfn * g::PAGE + (round * 8) % g::PAGE, round as u8);
            g::print("W ");
            g::print_hex(gfn);
            g::print("\n");
        }
        g::checkpoint();
    }
    loop {
        // SAFETY: HLT stops this vCPU; smudge does not resume a halted vCPU.
        unsafe { core::arch::asm!("hlt", options(nomem, nostack)) };
    }
}
