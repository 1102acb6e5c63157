//! Which user addresses a request may name (the range half of ProbeForRead/ProbeForWrite).
//!
//! The copies themselves are in the driver binary (`usermem.rs`). Before either copy runs, the
//! whole range must lie in user space: below `MmUserProbeAddress`, the first address the kernel
//! refuses to treat as a user address. Without this check a caller could name a kernel
//! address and read or overwrite kernel memory through a guest.

/// True if `[ptr, ptr + len)` is a non-empty, non-wrapping range that ends at or below `probe`
/// (the value of `MmUserProbeAddress`), as ProbeForRead requires (wdm.h: it raises when
/// `Address + Length > MmUserProbeAddress` or the sum wraps).
pub const fn user_range_ok(ptr: u64, len: u64, probe: u64) -> bool {
    if len == 0 || ptr == 0 {
        return false;
    }
    match ptr.checked_add(len) {
        Some(end) => end <= probe,
        None => false,
    }
}
