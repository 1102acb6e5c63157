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
