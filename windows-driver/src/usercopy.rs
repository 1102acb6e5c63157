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

#[cfg(test)]
mod tests {
    use super::*;

    /// MmUserProbeAddress on x64 Windows (4-level paging): 0x7FFF_FFFF_0000, the 64 KiB below the
    /// end of the 128 TiB user space being a no-access guard region.
    const PROBE: u64 = 0x7FFF_FFFF_0000;

    #[test]
    fn user_ranges_end_at_the_probe_address() {
        assert!(user_range_ok(0x1000, 0x1000, PROBE));
        assert!(user_range_ok(PROBE - 8, 8, PROBE));
        assert!(!user_range_ok(PROBE - 8, 9, PROBE));
        assert!(!user_range_ok(PROBE, 1, PROBE));
    }

    #[test]
    fn kernel_null_empty_and_wrapping_ranges_are_refused() {
        assert!(!user_range_ok(0xFFFF_F800_0000_0000, 8, PROBE));
        assert!(!user_range_ok(0, 8, PROBE));
        assert!(!user_range_ok(0x1000, 0, PROBE));
        assert!(!user_range_ok(u64::MAX - 3, 8, u64::MAX));
    }
}
