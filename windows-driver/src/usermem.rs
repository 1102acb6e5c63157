//! User memory named inside requests (guest images, dirty bitmaps, guest-memory buffers), in
//! the calling process: a top-level device's IRP_MJ_DEVICE_CONTROL runs in the caller's thread
//! at PASSIVE_LEVEL. A C driver would wrap ProbeForRead/Write and the copy in `__try`; Rust has
//! no SEH. So a copy checks the range against `MmUserProbeAddress` (`user_range_ok`), then runs
//! `smudge_copy_user`, which is what `__try { RtlCopyMemory } __except(1)` compiles to: a fault
//! on the user address (unmapped, read-only, freed by another thread) unwinds to its recovery
//! label, which returns STATUS_ACCESS_VIOLATION instead of a bug check.

use core::arch::global_asm;

use smudge_core::abi::windows::user_range_ok;
use smudge_core::session::Fail;

use crate::nt;

/// Copies `len` bytes from `src` to `dst`, one of them the user range `user`.
fn copy(user: u64, dst: *mut u8, src: *const u8, len: usize) -> Result<(), Fail> {
    // SAFETY: an ntoskrnl variable set at boot and never written afterwards.
    let limit = unsafe { nt::MmUserProbeAddress } as u64;
    if !user_range_ok(user, len as u64, limit) {
        return Err(Fail::Fault);
    }
    // CR4.SMAP: supervisor accesses to user pages fault unless RFLAGS.AC is set.
    // SAFETY: CPL 0 read of CR4.
    let smap = unsafe { smudge_core::arch::read_cr4() } & smudge_core::regs::CR4_SMAP != 0;
    // SAFETY: the kernel side is a buffer of `len` bytes (the callers' slice); the user side lies
    // in user space (checked above), so the routine can only fault there, never corrupt kernel
    // memory, and a fault is caught by its SEH scope.
    match unsafe { smudge_copy_user(dst, src, len, u64::from(smap)) } {
        0 => Ok(()),
        _ => Err(Fail::Fault),
    }
}

/// Copies `dst.len()` bytes from user address `src` into `dst`. PASSIVE_LEVEL, in the
/// requesting process.
pub fn copy_from_user(dst: &mut [u8], src: u64) -> Result<(), Fail> {
    copy(src, dst.as_mut_ptr(), src as *const u8, dst.len())
}

/// Copies `src` to user address `dst`. PASSIVE_LEVEL, in the requesting process.
pub fn copy_to_user(dst: u64, src: &[u8]) -> Result<(), Fail> {
    copy(dst, dst as *mut u8, src.as_ptr(), src.len())
}

extern "system" {
    /// Returns 0, or STATUS_ACCESS_VIOLATION when an access faulted.
    fn smudge_copy_user(dst: *mut u8, src: *const u8, len: usize, smap: u64) -> nt::NtStatus;
}

// Win64: RCX = destination, RDX = source, R8 = length, R9 = 1 when CR4.SMAP is on (STAC/CLAC
// bracket the user accesses). Volatile registers only and no stack: no unwind codes. The unwind
// info names __C_specific_handler with one scope { begin, end, filter 1 (EXECUTE_HANDLER),
// target }, RVAs: a fault in [begin, end) unwinds to `target` with RSP as at entry, so `ret`
// returns to the caller. RFLAGS is the faulting context's: clear AC if a STAC set it.
global_asm!(
    ".text",
    ".p2align 4",
    ".def smudge_copy_user; .scl 2; .type 32; .endef",
    ".globl smudge_copy_user",
    "smudge_copy_user:",
    ".seh_proc smudge_copy_user",
    ".seh_handler __C_specific_handler, %except",
    ".seh_endprologue",
    "    test r9, r9",
    "    jz 1f",
    "    stac",
    "1:",
    ".Lsmudge_copy_begin:",
    "    test r8, r8",
    "    jz 3f",
    "2:",
    "    mov al, byte ptr [rdx]",
    "    mov byte ptr [rcx], al",
    "    inc rdx",
    "    inc rcx",
    "    dec r8",
    "    jnz 2b",
    "3:",
    ".Lsmudge_copy_end:",
    "    test r9, r9",
    "    jz 4f",
    "    clac",
    "4:",
    "    xor eax, eax",
    "    ret",
    ".Lsmudge_copy_fault:",
    "    pushfq",
    "    pop rax",
    "    bt rax, 18",
    "    jnc 5f",
    "    clac",
    "5:",
    "    mov eax, 0xC0000005",
    "    ret",
    ".seh_handlerdata",
    ".long 1",
    ".rva .Lsmudge_copy_begin",
    ".rva .Lsmudge_copy_end",
    ".long 1",
    ".rva .Lsmudge_copy_fault",
    ".text",
    ".seh_endproc",
);
