//! How long a RUN request may keep a processor, in interrupt-time units (100 ns).
//!
//! The guest runs at DISPATCH_LEVEL (no preemption, so the VMCS and the FPU stay on one
//! processor). Windows bug-checks with DPC_WATCHDOG_VIOLATION (0x133) when a processor stays at
//! DISPATCH_LEVEL or above too long, and a long stay also starves DPCs and the scheduler. So one
//! stay is bounded by [`DISPATCH_STAY`]; after it the driver drops to PASSIVE_LEVEL and enters
//! again. Windows has no signals to interrupt a thread in a driver, so the whole request is
//! bounded by [`USER_SLICE`]: then it returns INTERRUPTED, the tool runs again, and a thread
//! whose process is being killed can leave the kernel.

/// One stay at DISPATCH_LEVEL: 1 ms.
pub const DISPATCH_STAY: u64 = 10_000;
/// One RUN request before INTERRUPTED: 50 ms.
pub const USER_SLICE: u64 = 500_000;

/// True when a stay that began at `start` must end at `now`. A clock that seems to go backwards
/// counts as no time passed.
pub const fn stay_over(start: u64, now: u64) -> bool {
    now.saturating_sub(start) >= DISPATCH_STAY
}

/// True when a request that began at `start` must return to user space at `now`.
pub const fn slice_over(start: u64, now: u64) -> bool {
    now.saturating_sub(start) >= USER_SLICE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stay_is_one_millisecond_of_100ns_units() {
        // 1 ms = 1e6 ns = 1e4 units of 100 ns (KeQueryInterruptTimePrecise's unit).
        assert!(!stay_over(5_000_000, 5_009_999));
        assert!(stay_over(5_000_000, 5_010_000));
        assert!(!stay_over(5_000_000, 4_000_000));
    }

    #[test]
    fn the_stay_is_far_below_the_dpc_watchdog_and_the_slice_holds_many_stays() {
        // The single-DPC watchdog limit is on the order of seconds; 1 ms is three orders below.
        assert!(DISPATCH_STAY * 1000 <= 10_000_000);
        assert!(USER_SLICE >= 10 * DISPATCH_STAY);
        assert!(!slice_over(0, USER_SLICE - 1));
        assert!(slice_over(0, USER_SLICE));
        assert!(!slice_over(u64::MAX, 0));
    }
}
