//! Windows's values for the core's run loop and its waiters.
//!
//! The guest runs at DISPATCH_LEVEL (no preemption, so the VMCS and the FPU stay on one
//! processor). Windows bug-checks with DPC_WATCHDOG_VIOLATION (0x133) when a processor stays at
//! DISPATCH_LEVEL or above too long, and a long stay also starves DPCs and the scheduler. So one
//! stay is bounded by 1 ms; after it the core's loop drops to PASSIVE_LEVEL and enters again.
//! Windows has no signals to interrupt a thread in a driver, so the whole request is bounded by
//! 50 ms: then it returns INTERRUPTED, the tool runs again, and a thread whose process is being
//! killed can leave the kernel.

use smudge_core::session::RunPolicy;

/// One stay at DISPATCH_LEVEL: 1 ms; one RUN request before INTERRUPTED: 50 ms.
pub const POLICY: RunPolicy = RunPolicy {
    stay_ns: Some(1_000_000),
    slice_ns: Some(50_000_000),
};

/// How long a waiter of the sharing protocol spins before it sleeps: 2 ms, two stays at
/// DISPATCH_LEVEL, which is how long a kick normally takes.
pub const SPIN_NS: u64 = 2_000_000;

/// One sleep of a waiter past [`SPIN_NS`]: KeDelayExecutionThread's interval for 1 ms, relative
/// (negative), in 100 ns units. The clock's granularity may stretch it to a timer tick.
pub const SLEEP: i64 = -10_000;

/// What a waiter does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pause {
    /// Spin (`core::hint::spin_loop`): the wait is expected to end within [`SPIN_NS`].
    Spin,
    /// Sleep for [`SLEEP`]: the wait is long (a large LOAD_ELF or harvest), give the CPU away.
    Sleep,
}

/// The pause after `waited_ns` of waiting.
pub const fn pause(waited_ns: u64) -> Pause {
    if waited_ns >= SPIN_NS {
        Pause::Sleep
    } else {
        Pause::Spin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
