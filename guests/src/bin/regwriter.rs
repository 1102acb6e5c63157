//! Writes the pages the host names in registers (SET_REGS): RSI = first guest-physical address,
//! RDX = pages, RCX = the quadword written at the start of each page. Exits with code R8 + 1.
//! It touches no memory but those pages (no stack, no data), so the host can check GET_REGS
//! (R9 = one past the last page written, RDX = 0) and the dirty log of any slot exactly.
#![no_std]
#![no_main]

use smudge_guests as _;

core::arch::global_asm!(
    ".section .text._start, \"ax\"",
    ".globl _start",
    "_start:",
    "mov r9, rsi",
    "2:",
    "test rdx, rdx",
    "jz 3f",
    "mov [r9], rcx",
    "add r9, 4096",
    "dec rdx",
    "jmp 2b",
    "3:",
    "lea rdi, [r8 + 1]",
    "xor eax, eax",
    "vmcall",
    "4:",
    "hlt",
    "jmp 4b",
);
