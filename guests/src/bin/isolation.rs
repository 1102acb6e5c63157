//! The isolation guest: everything a guest could do to the host's state at once, checkpointing
//! (exiting to the host tool) between the attempts. Each round it writes its own DR0-DR3 and
//! DR6 (MOV-DR exits, basic reason 29: smudge keeps them for the guest), fills XMM0-XMM15 with
//! its own pattern, runs WBINVD (reason 54, skipped), asks for a checkpoint, and then checks that
//! its registers are still its own. The host tool, meanwhile, checks its own (`smudge-hostile
//! isolation`). It cannot enable XSAVE (hidden, `hostile_xsave`), so XMM is all the vector state
//! it has. Exits with the number of values it found changed.
#![no_std]
#![no_main]

use core::arch::asm;
use smudge_guests as g;

g::entry!(main);

/// Checkpoints.
pub const ROUNDS: u64 = 100;
/// WBINVDs per round.
pub const WBINVDS: u64 = 20;

macro_rules! dr {
    (write $n:literal, $v:expr) => {{
        let v: u64 = $v;
        // SAFETY: writes a debug register; under smudge the write exits and is kept for the guest.
        unsafe { asm!(concat!("mov dr", $n, ", {}"), in(reg) v, options(nostack)) };
    }};
    (read $n:literal) => {{
        let r: u64;
        // SAFETY: reads a debug register (an exit under smudge).
        unsafe { asm!(concat!("mov {}, dr", $n), out(reg) r, options(nostack)) };
        r
    }};
}

/// Loads XMM0-XMM15 from `pattern`, runs WBINVD `WBINVDS` times, checkpoints, and stores
/// XMM0-XMM15 into `after`: one asm block, so no compiler code touches the registers between.
fn vector_round(pattern: &[u64; 32], after: &mut [u64; 32]) {
    // SAFETY: reads and writes the two 256-byte arrays; WBINVD only affects caches (and exits
    // under smudge); VMCALL with RAX = 1 is the checkpoint hypercall, which sets RAX to 0.
    unsafe {
        asm!(
            "movdqu xmm0, [{p}]", "movdqu xmm1, [{p} + 16]", "movdqu xmm2, [{p} + 32]",
            "movdqu xmm3, [{p} + 48]", "movdqu xmm4, [{p} + 64]", "movdqu xmm5, [{p} + 80]",
            "movdqu xmm6, [{p} + 96]", "movdqu xmm7, [{p} + 112]", "movdqu xmm8, [{p} + 128]",
            "movdqu xmm9, [{p} + 144]", "movdqu xmm10, [{p} + 160]", "movdqu xmm11, [{p} + 176]",
            "movdqu xmm12, [{p} + 192]", "movdqu xmm13, [{p} + 208]", "movdqu xmm14, [{p} + 224]",
            "movdqu xmm15, [{p} + 240]",
            "2:",
            "wbinvd",
            "dec {n}",
            "jnz 2b",
            "mov eax, 1",
            "xor edi, edi",
            "vmcall",
            "movdqu [{a}], xmm0", "movdqu [{a} + 16], xmm1", "movdqu [{a} + 32], xmm2",
            "movdqu [{a} + 48], xmm3", "movdqu [{a} + 64], xmm4", "movdqu [{a} + 80], xmm5",
            "movdqu [{a} + 96], xmm6", "movdqu [{a} + 112], xmm7", "movdqu [{a} + 128], xmm8",
            "movdqu [{a} + 144], xmm9", "movdqu [{a} + 160], xmm10", "movdqu [{a} + 176], xmm11",
            "movdqu [{a} + 192], xmm12", "movdqu [{a} + 208], xmm13", "movdqu [{a} + 224], xmm14",
            "movdqu [{a} + 240], xmm15",
            p = in(reg) pattern.as_ptr(),
            a = in(reg) after.as_mut_ptr(),
            n = inout(reg) WBINVDS => _,
            out("rax") _, out("rdi") _,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
            out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
            out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
            options(nostack)
        )
    };
}

fn main(_vcpu: u64) -> u64 {
    let mut wrong = 0u64;
    let mut after = [0u64; 32];
    for r in 0..ROUNDS {
        let base = 0xffff_8000_0010_0000 + r * 0x40;
        dr!(write "0", base);
        dr!(write "1", base + 8);
        dr!(write "2", base + 16);
        dr!(write "3", base + 24);
        // B0, and B1 in odd rounds (DR6 bits 4-11 and 16-31 read as 1, SDM 18.2.3).
        let dr6 = 1 | (r & 1) << 1;
        dr!(write "6", dr6);
        let mut pattern = [0u64; 32];
        for (i, w) in pattern.iter_mut().enumerate() {
            *w = 0x5a5a_0000_0000_0000 ^ (r << 32) ^ i as u64;
        }
        vector_round(&pattern, &mut after);
        wrong += pattern.iter().zip(after.iter()).filter(|(a, b)| a != b).count() as u64;
        for (got, want) in [
            (dr!(read "0"), base),
            (dr!(read "1"), base + 8),
            (dr!(read "2"), base + 16),
            (dr!(read "3"), base + 24),
            (dr!(read "6"), 0xffff_0ff0 | dr6),
        ] {
            wrong += u64::from(got != want);
        }
    }
    g::print("isolation: ");
    g::print_dec(ROUNDS);
    g::print(" rounds of DR0-DR3, DR6, XMM0-XMM15 and ");
    g::print_dec(WBINVDS);
    g::print(" WBINVDs around a checkpoint, ");
    g::print_dec(wrong);
    g::print(" values changed\n");
    wrong
}
