//! An exception storm that never reaches the host. The guest installs its own IDT (smudge starts
//! it with an empty one) with handlers for #DE, #BP, #UD and #GP, then raises each of them
//! thousands of times. With the exception bitmap empty, exceptions are delivered through the
//! guest IDT without a VM exit (SDM 26.2: only exceptions whose bitmap bit is 1 exit), so the
//! handlers count them and return past the faulting instruction. Exits 0 when every count
//! matches, and prints the counts.
//!
//! The handlers run on their own stack (IST1 of the TSS smudge set up): an exception at CPL 0
//! does not switch stacks otherwise (SDM 6.14.2), and the compiled code may keep data in the red
//! zone below RSP, which the pushed frame would overwrite.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

use smudge_guests as g;

g::entry!(main);

/// Exceptions of each kind raised.
const ROUNDS: u64 = 5000;
/// Offset of the 64-bit TSS in the reserved region (core::guest::TSS_OFF).
const TSS_OFF: u64 = 0x7000;
/// Offset of IST1 in the 64-bit TSS (SDM Figure 8-11).
const TSS_IST1: u64 = 0x24;
/// The code selector smudge's GDT holds (core::guest::CS_SELECTOR).
const CS_SELECTOR: u64 = 0x08;

#[no_mangle]
static UD_COUNT: AtomicU64 = AtomicU64::new(0);
#[no_mangle]
static BP_COUNT: AtomicU64 = AtomicU64::new(0);
#[no_mangle]
static DE_COUNT: AtomicU64 = AtomicU64::new(0);
#[no_mangle]
static GP_COUNT: AtomicU64 = AtomicU64::new(0);

/// The IDT: vectors 0..=13, two quadwords each.
static mut IDT: [u64; 28] = [0; 28];

#[repr(C, align(16))]
struct Stack([u8; 8192]);
static mut IST_STACK: Stack = Stack([0; 8192]);

// The handlers. #UD (vector 6, fault, no error code): skip the 2-byte UD2. #BP (3, trap): RIP is
// already past INT3. #DE (0, fault): skip the 3-byte `div rcx`. #GP (13, fault, error code): pop
// the error code, skip the 3-byte `mov rax, [rsi]` (SDM Table 6-1 for the classes).
global_asm!(
    ".section .text.smudge_handlers, \"ax\"",
    ".globl smudge_ud_handler",
    "smudge_ud_handler:",
    "add qword ptr [rsp], 2",
    "lock inc qword ptr [rip + {ud}]",
    "iretq",
    ".globl smudge_bp_handler",
    "smudge_bp_handler:",
    "lock inc qword ptr [rip + {bp}]",
    "iretq",
    ".globl smudge_de_handler",
    "smudge_de_handler:",
    "add qword ptr [rsp], 3",
    "lock inc qword ptr [rip + {de}]",
    "iretq",
    ".globl smudge_gp_handler",
    "smudge_gp_handler:",
    "add rsp, 8",
    "add qword ptr [rsp], 3",
    "lock inc qword ptr [rip + {gp}]",
    "iretq",
    ud = sym UD_COUNT,
    bp = sym BP_COUNT,
    de = sym DE_COUNT,
    gp = sym GP_COUNT,
);

extern "C" {
    fn smudge_ud_handler();
    fn smudge_bp_handler();
    fn smudge_de_handler();
    fn smudge_gp_handler();
}

/// A 64-bit interrupt gate (SDM 6.14.1, Figure 6-8): present, DPL 0, type 0xE, IST 1.
fn gate(handler: u64) -> (u64, u64) {
    let lo = (handler & 0xffff)
        | (CS_SELECTOR << 16)
        | (1 << 32) // IST1
        | (0x8e << 40)
        | (((handler >> 16) & 0xffff) << 48);
    (lo, handler >> 32)
}

#[repr(C, packed)]
struct Idtr {
    limit: u16,
    base: u64,
}

fn main(_vcpu: u64) -> u64 {
    g::print("hostile_ud_storm: installing an IDT\n");
    // SAFETY: one vCPU; the IDT, the IST stack and the TSS are this guest's own memory.
    unsafe {
        let idt = core::ptr::addr_of_mut!(IDT) as *mut u64;
        for (vec, h) in [
            (0usize, smudge_de_handler as *const () as u64),
            (3, smudge_bp_handler as *const () as u64),
            (6, smudge_ud_handler as *const () as u64),
            (13, smudge_gp_handler as *const () as u64),
        ] {
            let (lo, hi) = gate(h);
            core::ptr::write_volatile(idt.add(vec * 2), lo);
            core::ptr::write_volatile(idt.add(vec * 2 + 1), hi);
        }
        let stack_top = core::ptr::addr_of_mut!(IST_STACK) as u64 + 8192;
        let ist1 = (g::reserved_base() + TSS_OFF + TSS_IST1) as *mut u64;
        core::ptr::write_unaligned(ist1, stack_top);
        let idtr = Idtr {
            limit: (28 * 8 - 1) as u16,
            base: idt as u64,
        };
        asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack));
    }
    for _ in 0..ROUNDS {
        // SAFETY: each instruction faults or traps into the handlers above, which return past it.
        unsafe {
            asm!("ud2", options(nostack));
            asm!("int3", options(nostack));
            // div rcx with RCX = 0: #DE. Encoded by hand so the handler knows its length.
            asm!(".byte 0x48, 0xf7, 0xf1", inout("rax") 1u64 => _, inout("rdx") 0u64 => _, in("rcx") 0u64, options(nostack));
            // mov rax, [rsi] with a non-canonical RSI: #GP(0) (SDM 3.3.7.1).
            asm!(".byte 0x48, 0x8b, 0x06", in("rsi") 0x8000_0000_0000_0000u64, out("rax") _, options(nostack));
        }
    }
    let counts = [
        ("#UD", UD_COUNT.load(Ordering::Relaxed)),
        ("#BP", BP_COUNT.load(Ordering::Relaxed)),
        ("#DE", DE_COUNT.load(Ordering::Relaxed)),
        ("#GP", GP_COUNT.load(Ordering::Relaxed)),
    ];
    g::print("hostile_ud_storm: handled");
    let mut total = 0;
    let mut ok = true;
    for (name, n) in counts {
        g::print(" ");
        g::print(name);
        g::print("=");
        g::print_dec(n);
        total += n;
        ok &= n == ROUNDS;
    }
    g::print(" total=");
    g::print_dec(total);
    g::print(" expected=");
    g::print_dec(4 * ROUNDS);
    g::print("\n");
    if ok {
        0
    } else {
        1
    }
}
