//! How the requests of one session share its VM.
//!
//! One session (one open of the device) is one VM; RUN calls for different vCPUs may run at once
//! from different threads.
//!
//! * A **VM-level request** (everything but RUN and CAPS) claims the session
//!   ([`Share::vm_request`]); a second one meanwhile is refused (busy). Unless it only touches an
//!   idle vCPU (GET_REGS, SET_REGS) or comes before any vCPU can run (SETUP), it also **kicks**:
//!   vCPUs leave guest mode at their next VM exit, and the request waits until none is in the run
//!   loop. It then has the VM, the controls and every vCPU's state to itself until it ends.
//! * A **RUN** claims its vCPU ([`Busy::claim`]; a second RUN of it, or a GET_REGS/SET_REGS of
//!   it, is refused) and counts itself **in the loop** ([`Share::enter`]) around everything it
//!   does with the vCPU and the VM. Entering while a kick is on waits until the request ends.
//!   Inside, it reads [`Share::kicked`] at every VM exit and leaves when it is set.
//!
//! Entering (`running += 1`, then read `kick`) and kicking (`kick = true`, then read `running`)
//! are both SeqCst, so of a vCPU and a request that meet, at least one sees the other: either
//! the request waits for the vCPU to leave, or the vCPU backs out and waits. Waiting is the
//! caller's `pause` (the OS's [`super::Os::pause`]; the tests yield).

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// A flag one user at a time may hold: a vCPU's "a RUN (or GET_REGS/SET_REGS) has it".
#[derive(Debug, Default)]
pub struct Busy(AtomicBool);

impl Busy {
    pub const fn new() -> Busy {
        Busy(AtomicBool::new(false))
    }

    /// Takes the flag, or None when someone holds it.
    pub fn claim(&self) -> Option<Claim<'_>> {
        if self.0.swap(true, Ordering::Acquire) {
            None
        } else {
            Some(Claim(&self.0))
        }
    }
}

/// A held [`Busy`] flag; released on drop.
#[must_use]
#[derive(Debug)]
pub struct Claim<'a>(&'a AtomicBool);

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The handle-wide half of the protocol.
#[derive(Debug, Default)]
pub struct Share {
    /// A VM-level request is in progress.
    busy: Busy,
    /// vCPUs must leave the run loop and wait.
    kick: AtomicBool,
    /// vCPUs inside the run loop.
    running: AtomicU32,
}

impl Share {
    pub const fn new() -> Share {
        Share {
            busy: Busy::new(),
            kick: AtomicBool::new(false),
            running: AtomicU32::new(0),
        }
    }

    /// Starts a VM-level request: None when another one is in progress. With `kick`, every vCPU
    /// is asked out of the run loop, and this returns (calling `pause` meanwhile) once none is
    /// in it; no vCPU enters until the returned value is dropped.
    pub fn vm_request(&self, kick: bool, mut pause: impl FnMut()) -> Option<VmRequest<'_>> {
        let claim = self.busy.claim()?;
        if kick {
            self.kick.store(true, Ordering::SeqCst);
            while self.running.load(Ordering::SeqCst) != 0 {
                pause();
            }
        }
        Some(VmRequest {
            share: self,
            kicked: kick,
            _claim: claim,
        })
    }

    /// Enters the run loop: returns once no kick is on, counted in `running` until the returned
    /// value is dropped. Calls `pause` while it waits for a VM-level request to end.
    pub fn enter(&self, mut pause: impl FnMut()) -> InLoop<'_> {
        loop {
            self.running.fetch_add(1, Ordering::SeqCst);
            if !self.kick.load(Ordering::SeqCst) {
                return InLoop(self);
            }
            self.running.fetch_sub(1, Ordering::SeqCst);
            while self.kick.load(Ordering::SeqCst) {
                pause();
            }
        }
    }

    /// True while a VM-level request wants every vCPU out of the loop (read at VM exits).
    pub fn kicked(&self) -> bool {
        self.kick.load(Ordering::SeqCst)
    }
}

/// A VM-level request in progress; ends on drop (the kick, if any, is lifted, then the handle
/// released).
#[must_use]
#[derive(Debug)]
pub struct VmRequest<'a> {
    share: &'a Share,
    kicked: bool,
    // Dropped after `drop` below ran: the kick ends before the next request may start.
    _claim: Claim<'a>,
}

impl VmRequest<'_> {
    /// True when every vCPU is out of the loop for the whole request.
    pub fn kicked(&self) -> bool {
        self.kicked
    }
}

impl Drop for VmRequest<'_> {
    fn drop(&mut self) {
        if self.kicked {
            self.share.kick.store(false, Ordering::SeqCst);
        }
    }
}

/// A vCPU inside the run loop; leaves on drop.
#[must_use]
#[derive(Debug)]
pub struct InLoop<'a>(&'a Share);

impl Drop for InLoop<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    extern crate std;
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::thread;
    use std::time::{Duration, Instant};

    const Y: fn() = thread::yield_now;

    /// Waits (yielding) until `cond` holds; false after 60 s.
    fn eventually(cond: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cond() {
            if Instant::now() > deadline {
                return false;
            }
            thread::yield_now();
        }
        true
    }

    #[test]
    fn a_kicking_request_never_overlaps_a_vcpu_in_the_loop() {
        let s = Share::new();
        let inside = AtomicUsize::new(0);
        let requesting = AtomicBool::new(false);
        let stop = AtomicBool::new(false);
        let entries = AtomicUsize::new(0);
        let requests = AtomicUsize::new(0);
        thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    // vCPUs keep entering for as long as requests come.
                    while !stop.load(Ordering::SeqCst) {
                        let g = s.enter(Y);
                        inside.fetch_add(1, Ordering::SeqCst);
                        entries.fetch_add(1, Ordering::Relaxed);
                        // The "guest" runs until a VM exit sees the kick (or its stay ends).
                        for _ in 0..50 {
                            assert!(
                                !requesting.load(Ordering::SeqCst),
                                "request inside the loop"
                            );
                            if s.kicked() {
                                break;
                            }
                            core::hint::spin_loop();
                        }
                        inside.fetch_sub(1, Ordering::SeqCst);
                        drop(g);
                    }
                });
            }
            sc.spawn(|| {
                // Stops the vCPUs however this thread ends (a failed assertion included).
                struct Stop<'a>(&'a AtomicBool);
                impl Drop for Stop<'_> {
                    fn drop(&mut self) {
                        self.0.store(true, Ordering::SeqCst);
                    }
                }
                let _stop = Stop(&stop);
                let deadline = Instant::now() + Duration::from_secs(60);
                let pause = || {
                    assert!(Instant::now() < deadline, "the vCPUs never left the loop");
                    thread::yield_now();
                };
                for _ in 0..300 {
                    let r = loop {
                        if let Some(r) = s.vm_request(true, pause) {
                            break r;
                        }
                        thread::yield_now();
                    };
                    requesting.store(true, Ordering::SeqCst);
                    for _ in 0..20 {
                        assert_eq!(inside.load(Ordering::SeqCst), 0, "vCPU in the loop");
                        thread::yield_now();
                    }
                    requesting.store(false, Ordering::SeqCst);
                    requests.fetch_add(1, Ordering::Relaxed);
                    drop(r);
                    // Let the vCPUs in again before the next request.
                    let before = entries.load(Ordering::Relaxed);
                    while entries.load(Ordering::Relaxed) == before {
                        pause();
                    }
                }
            });
        });
        assert_eq!(requests.load(Ordering::Relaxed), 300);
        assert!(entries.load(Ordering::Relaxed) >= 300);
        assert!(!s.kicked());
    }

    #[test]
    fn the_request_waits_for_a_vcpu_already_in_the_loop() {
        let s = Share::new();
        let g = s.enter(Y);
        let left = AtomicBool::new(false);
        thread::scope(|sc| {
            sc.spawn(|| {
                // The vCPU notices the kick at its next exit and leaves.
                assert!(eventually(|| s.kicked()));
                left.store(true, Ordering::SeqCst);
                drop(g);
            });
            let r = s.vm_request(true, Y).unwrap();
            assert!(r.kicked());
            assert!(left.load(Ordering::SeqCst), "returned before the vCPU left");
        });
    }

    #[test]
    fn a_kick_holds_vcpus_out_until_the_request_ends() {
        let s = Share::new();
        let r = s
            .vm_request(true, || panic!("no vCPU to wait for"))
            .unwrap();
        let entered = AtomicBool::new(false);
        let waits = AtomicUsize::new(0);
        thread::scope(|sc| {
            sc.spawn(|| {
                let _g = s.enter(|| {
                    waits.fetch_add(1, Ordering::Relaxed);
                    thread::yield_now();
                });
                entered.store(true, Ordering::SeqCst);
            });
            assert!(eventually(|| waits.load(Ordering::Relaxed) > 100));
            thread::sleep(Duration::from_millis(20));
            assert!(!entered.load(Ordering::SeqCst), "entered during the kick");
            drop(r);
            assert!(eventually(|| entered.load(Ordering::SeqCst)));
        });
        assert!(!s.kicked());
    }

    #[test]
    fn runs_of_two_vcpus_proceed_together() {
        let s = Share::new();
        let vcpus = [Busy::new(), Busy::new()];
        let inside = AtomicUsize::new(0);
        thread::scope(|sc| {
            for v in &vcpus {
                let (s, inside) = (&s, &inside);
                sc.spawn(move || {
                    let _c = v.claim().unwrap();
                    let _g = s.enter(Y);
                    inside.fetch_add(1, Ordering::SeqCst);
                    // Both are in the loop at once: neither RUN waits for the other.
                    assert!(eventually(|| inside.load(Ordering::SeqCst) == 2));
                });
            }
        });
    }

    #[test]
    fn two_runs_of_one_vcpu_one_gets_busy() {
        let v = Busy::new();
        let c = v.claim().unwrap();
        thread::scope(|sc| {
            sc.spawn(|| assert!(v.claim().is_none(), "second RUN admitted"));
        });
        drop(c);
        thread::scope(|sc| {
            sc.spawn(|| assert!(v.claim().is_some(), "free vCPU refused"));
        });
    }

    #[test]
    fn a_second_vm_request_gets_busy() {
        let s = Share::new();
        let r = s.vm_request(true, Y).unwrap();
        thread::scope(|sc| {
            sc.spawn(|| {
                assert!(s.vm_request(true, Y).is_none());
                assert!(s.vm_request(false, Y).is_none());
            });
        });
        drop(r);
        assert!(!s.kicked());
        let r = s.vm_request(false, Y).unwrap();
        assert!(!r.kicked());
    }

    #[test]
    fn a_request_without_kick_does_not_wait_for_running_vcpus() {
        // GET_REGS/SET_REGS of an idle vCPU while another runs.
        let s = Share::new();
        let g = s.enter(Y);
        let r = s
            .vm_request(false, || panic!("waited for a running vCPU"))
            .unwrap();
        assert!(!s.kicked());
        // The running vCPU may enter again meanwhile (a new stay in the loop).
        drop(g);
        let g = s.enter(|| panic!("held out without a kick"));
        drop(r);
        drop(g);
    }
}
