//! Writes its own values into DR0-DR3, DR6 and DR7 and reads them back. With MOV-DR exiting
//! smudge keeps them for the guest (every access exits, basic reason 29), so the guest sees its
//! own values while the host's debug registers stay the host's. Exits 0 when every value read
//! back is what the guest wrote (DR6/DR7 with their fixed bits, SDM 18.2.4, 18.2.6).
#![no_std]
#![no_main]

use smudge_guests as g;

g::entry!(main);

macro_rules! mov_dr {
    ($n:literal, $v:expr) => {{
        let v: u64 = $v;
        // SAFETY: writes a debug register; under smudge the write exits and is kept for the guest.
        unsafe { core::arch::asm!(concat!("mov dr", $n, ", {}"), in(reg) v, options(nostack)) };
        let r: u64;
        // SAFETY: reads it back (another exit).
        unsafe { core::arch::asm!(concat!("mov {}, dr", $n), out(reg) r, options(nostack)) };
        r
    }};
}

fn main(_vcpu: u64) -> u64 {
    let mut bad = 0u64;
    for round in 0..50u64 {
        let base = 0xffff_8000_0000_1000 + round * 0x10;
        for (got, want) in [
            (mov_dr!("0", base), base),
            (mov_dr!("1", base + 1), base + 1),
            (mov_dr!("2", base + 2), base + 2),
            (mov_dr!("3", base + 3), base + 3),
            // DR6: bits 4-11 and 16-31 read as 1.
            (mov_dr!("6", 0x1), 0xffff_0ff1),
            // DR7: L0 and G1 enabled, bit 10 reads as 1.
            (mov_dr!("7", 0x9), 0x409),
        ] {
            if got != want {
                bad += 1;
            }
        }
    }
    g::print("debugregs: 300 values written and read back, ");
    g::print_dec(bad);
    g::print(" wrong\n");
    bad
}
