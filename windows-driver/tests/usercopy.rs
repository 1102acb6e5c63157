//! Host tests of `smudge_windows::usercopy` (the driver's OS-free half).

use crate::usercopy::*;

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
