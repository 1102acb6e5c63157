//! What every smudge test guest shares: the entry point, the console, the hypercalls, and the
//! few memory routines the compiler may call.
//!
//! The guest ABI (core/src/guest.rs): 64-bit mode, paging on with the first 4 GiB identity-mapped
//! by 2 MiB pages, RSP at the top of a 16 KiB stack in the reserved top 1 MiB of RAM, RDI = the
//! vCPU index. Port 0x3f8 is the console; `vmcall` with RAX = 0 exits (code in RDI) and with
//! RAX = 1 asks the host for a checkpoint. There is no IDT: any exception is a triple fault.
#![no_std]

use core::arch::asm;

/// The console port (COM1 data register).
pub const CONSOLE_PORT: u16 = 0x3f8;
/// Hypercall 0: exit with the code in RDI.
pub const HC_EXIT: u64 = 0;
/// Hypercall 1: checkpoint (the host harvests the dirty log, then resumes the guest with RAX = 0).
pub const HC_CHECKPOINT: u64 = 1;
/// Size of the region smudge reserves at the top of guest RAM (page tables, GDT, TSS, stacks).
pub const RESERVED: u64 = 1 << 20;
/// Offset of the first guest page directory inside the reserved region (core::guest::PD_OFF).
pub const PD_OFF: u64 = 0x2000;
/// Bytes of a page.
pub const PAGE: u64 = 4096;

/// Defines `_start` for a guest whose main is `$main: fn(vcpu: u64) -> u64`: align RSP to 16,
/// call main with the vCPU index (RDI, untouched), then exit with its result.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[no_mangle]
        extern "C" fn smudge_guest_main(vcpu: u64) -> u64 {
            $main(vcpu)
        }
        ::core::arch::global_asm!(
            ".section .text._start, \"ax\"",
            ".globl _start",
            "_start:",
            "and rsp, -16",
            "call {main}",
            "mov rdi, rax",
            "xor eax, eax",
            "vmcall",
            ".Lsmudge_halt:",
            "hlt",
            "jmp .Lsmudge_halt",
            main = sym smudge_guest_main,
        );
    };
}

/// Writes one byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, byte: u8) {
    // SAFETY: port output has no memory effect; smudge intercepts every I/O instruction.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") byte, options(nomem, nostack, preserves_flags))
    };
}

/// Prints one byte on the console.
pub fn putc(byte: u8) {
    outb(CONSOLE_PORT, byte);
}

/// Prints a string on the console.
pub fn print(s: &str) {
    for &b in s.as_bytes() {
        putc(b);
    }
}

/// Prints `v` as `0x` and lowercase hex digits without leading zeros.
pub fn print_hex(v: u64) {
    print("0x");
    let mut started = false;
    for shift in (0..16).rev() {
        let d = ((v >> (shift * 4)) & 0xf) as u8;
        if d != 0 || started || shift == 0 {
            started = true;
            putc(if d < 10 { b'0' + d } else { b'a' + d - 10 });
        }
    }
}

/// Prints `v` in decimal.
pub fn print_dec(mut v: u64) {
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    while n > 0 {
        n -= 1;
        putc(digits[n]);
    }
}

/// A hypercall: `vmcall` with RAX = `nr`, RDI = `arg`; returns RAX.
pub fn vmcall(nr: u64, arg: u64) -> u64 {
    let ret: u64;
    // SAFETY: VMCALL in VMX non-root operation always exits to smudge, which sets RAX.
    unsafe { asm!("vmcall", inlateout("rax") nr => ret, in("rdi") arg, options(nostack)) };
    ret
}

/// Asks the host for a checkpoint (it harvests the dirty log, then resumes us).
pub fn checkpoint() {
    vmcall(HC_CHECKPOINT, 0);
}

/// Ends the VM with `code`.
pub fn exit(code: u64) -> ! {
    vmcall(HC_EXIT, code);
    // smudge does not resume a guest after hypercall 0; halt in case it does.
    loop {
        // SAFETY: HLT only stops this vCPU.
        unsafe { asm!("hlt", options(nomem, nostack)) };
    }
}

/// Writes one byte at guest-physical (= virtual, identity-mapped) address `addr`.
pub fn write_byte(addr: u64, v: u8) {
    // SAFETY: the guest owns its RAM; each caller picks an address it means to touch.
    unsafe { core::ptr::write_volatile(addr as *mut u8, v) };
}

/// Reads one byte at `addr`.
pub fn read_byte(addr: u64) -> u8 {
    // SAFETY: as for write_byte.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// The first address of the reserved region. The stack lies in it, and the region starts on a
/// 1 MiB boundary (RAM is a multiple of 2 MiB), so the stack pointer gives it away.
pub fn reserved_base() -> u64 {
    let rsp: u64;
    // SAFETY: reads RSP.
    unsafe { asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags)) };
    rsp & !(RESERVED - 1)
}

/// A small deterministic pseudo-random generator (64-bit LCG, Knuth's MMIX constants); the high
/// bits are the good ones.
pub struct Lcg(pub u64);

impl Lcg {
    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 32) as u32
    }
    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u32) -> u32 {
        self.next_u32() % n
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    print("guest panic\n");
    exit(99)
}

// The C memory routines the compiler may emit calls to (no libc here). `rep movsb`/`rep stosb`
// so that the compiler cannot turn the loop back into a call to itself.

/// memcpy.
///
/// # Safety
/// The usual: `n` bytes readable at `src`, writable at `dst`, no overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; DF is clear in the ABI.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags))
    };
    dst
}

/// memmove.
///
/// # Safety
/// `n` bytes readable at `src`, writable at `dst`; they may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: a forward copy is right when dst is below src or the ranges do not overlap.
        unsafe { memcpy(dst, src, n) };
    } else if n > 0 {
        // SAFETY: backwards from the last byte (DF set, then cleared again as the ABI requires).
        unsafe {
            asm!("std", "rep movsb", "cld",
                inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
                options(nostack))
        };
    }
    dst
}

/// memset.
///
/// # Safety
/// `n` bytes writable at `dst`.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack, preserves_flags))
    };
    dst
}

/// memcmp.
///
/// # Safety
/// `n` bytes readable at `a` and `b`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller's contract; volatile so this is not recognised as a memcmp call.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// bcmp (what LLVM calls for equality-only comparisons).
///
/// # Safety
/// As for memcmp.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

/// Never called (panic = abort), but the precompiled libcore's unwind tables name it.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
