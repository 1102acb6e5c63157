//! User memory named inside requests (guest images, dirty bitmaps, guest-memory buffers).
//!
//! The METHOD_BUFFERED system buffer holds only the fixed request; the pointers inside it are
//! addresses in the calling process, which this driver reaches directly because a top-level
//! device's IRP_MJ_DEVICE_CONTROL runs in the caller's thread at PASSIVE_LEVEL. A C driver
//! would wrap ProbeForRead/ProbeForWrite and the copy in `__try`; Rust has no SEH. So:
//!
//! * both directions first check the range against `MmUserProbeAddress`
//!   (`smudge_core::abi::windows::user_range_ok`), the range half of ProbeForRead/Write;
//! * **in** (user -> kernel): `MmCopyMemory(MM_COPY_MEMORY_VIRTUAL)`, documented (ntddk.h,
//!   Windows 8.1+) to accept "a buffer in the user address space of the current process" and to
//!   fail, "not crash the system", on an invalid one. It wants a nonpaged target.
//! * **out** (kernel -> user): no documented routine copies *to* user memory without raising an
//!   exception, so `smudge_copy_to_user` below is what `__try { RtlCopyMemory } __except(1)`
//!   compiles to: a leaf routine whose unwind data names ntoskrnl's `__C_specific_handler`
//!   with a one-entry scope table around the copy loop. A fault on the user address (unmapped,
//!   read-only, freed by another thread) is dispatched to that handler, which unwinds to the
//!   recovery label; the routine returns STATUS_ACCESS_VIOLATION instead of bug-checking.

use core::arch::global_asm;
use core::ffi::c_void;

use smudge_core::abi::windows::*;

use crate::nt;

fn probe_limit() -> u64 {
    // SAFETY: an ntoskrnl variable set at boot and never written afterwards.
    unsafe { nt::MmUserProbeAddress as u64 }
}

/// Copies `dst.len()` bytes from user address `src` into `dst`, which must be nonpaged (a
/// request buffer in the pool). Call at PASSIVE_LEVEL in the requesting process.
pub fn copy_from_user(dst: &mut [u8], src: u64) -> Result<(), NtStatus> {
    if !user_range_ok(src, dst.len() as u64, probe_limit()) {
        return Err(STATUS_ACCESS_VIOLATION);
    }
    let mut copied = 0usize;
    // SAFETY: `dst` is a writable nonpaged buffer of dst.len() bytes; the source is a user
    // range, which MmCopyMemory reads without faulting (it returns an error instead).
    let status = unsafe {
        nt::MmCopyMemory(
            dst.as_mut_ptr().cast::<c_void>(),
            src,
            dst.len(),
            nt::MM_COPY_MEMORY_VIRTUAL,
            &mut copied,
        )
    };
    if status < 0 || copied != dst.len() {
        return Err(STATUS_ACCESS_VIOLATION);
    }
    Ok(())
}

/// Copies `src` to user address `dst`. Call at PASSIVE_LEVEL in the requesting process.
pub fn copy_to_user(dst: u64, src: &[u8]) -> Result<(), NtStatus> {
    if !user_range_ok(dst, src.len() as u64, probe_limit()) {
        return Err(STATUS_ACCESS_VIOLATION);
    }
    // CR4.SMAP: supervisor accesses to user pages fault unless RFLAGS.AC is set.
    // SAFETY: CPL 0 read of CR4.
    let smap =
        u64::from(unsafe { smudge_core::arch::read_cr4() } & smudge_core::regs::CR4_SMAP != 0);
    // SAFETY: the destination range lies in user space (checked above), so the routine can
    // only fault, never corrupt kernel memory; a fault is caught by its SEH scope.
    let status = unsafe { smudge_copy_to_user(dst, src.as_ptr(), src.len(), smap) };
    if status < 0 {
        return Err(status);
    }
    Ok(())
}

extern "system" {
    /// Returns 0, or STATUS_ACCESS_VIOLATION when a store to `dst` faulted.
    fn smudge_copy_to_user(dst: u64, src: *const u8, len: usize, smap: u64) -> NtStatus;
}

// Win64 convention: RCX = user destination, RDX = kernel source, R8 = length, R9 = 1 when
// CR4.SMAP is on (then STAC/CLAC bracket the user accesses). Uses only volatile registers and
// no stack, so the prologue is empty and the unwind data needs no unwind codes.
//
// The unwind info carries UNW_FLAG_EHANDLER with __C_specific_handler and its scope table:
// { count = 1, { begin, end, filter = 1 (EXCEPTION_EXECUTE_HANDLER), target } }, all RVAs
// (ADDR32NB). On a fault in [begin, end) the handler unwinds to `target` in this frame with
// RSP as at entry, so `ret` returns to the caller. RFLAGS comes from the faulting context, so
// AC may still be set there: clear it if so (AC can only be set after a successful STAC).
global_asm!(
    ".text",
    ".p2align 4",
    ".def smudge_copy_to_user",
    ".scl 2",
    ".type 32",
    ".endef",
    ".globl smudge_copy_to_user",
    "smudge_copy_to_user:",
    ".seh_proc smudge_copy_to_user",
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
