//! Host tests of `smudge_windows::budget` (the driver's OS-free half).

use crate::budget::*;

#[test]
fn the_stay_is_far_below_the_dpc_watchdog_and_the_slice_holds_many_stays() {
    let (Some(stay), Some(slice)) = (POLICY.stay_ns, POLICY.slice_ns) else {
        panic!("Windows bounds both");
    };
    // The single-DPC watchdog limit is on the order of seconds; 1 ms is three orders below.
    assert!(stay * 1000 <= 1_000_000_000);
    assert!(slice >= 10 * stay);
}

#[test]
fn waiters_spin_first_then_sleep() {
    assert_eq!(pause(0), Pause::Spin);
    assert_eq!(pause(SPIN_NS - 1), Pause::Spin);
    assert_eq!(pause(SPIN_NS), Pause::Sleep);
    // The spin lasts a couple of stays; the sleep is relative (negative) and one stay long
    // (100 ns units).
    let stay = POLICY.stay_ns.unwrap_or(0);
    assert!(SPIN_NS >= 2 * stay);
    assert!(SLEEP < 0 && (-SLEEP as u64) * 100 == stay);
}
