//! The host-memory policy, the same on every OS: every page smudge takes from the OS for a VM
//! (guest backing, EPT tables, PML buffers, bitmaps, VMCS) counts against one driver-wide cap,
//! on top of each VM's own page limit. The OS's allocation itself must fail rather than make
//! the OS reclaim by killing processes (Linux: `__GFP_RETRY_MAYFAIL | __GFP_NOWARN`, charged
//! to the opener's memory cgroup with `__GFP_ACCOUNT`); the cap keeps such failures rare,
//! because when they happen memory is nearly gone for everyone on the host.
//!
//! A shim keeps one [`PageBudget`] counter for the whole driver and allocates through
//! [`PageBudget::alloc`] and [`PageBudget::free`], so that the counting and the cap check are
//! written once.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::platform::AllocError;

/// Pages smudge leaves to the rest of the host: where the OS can tell how much memory is still
/// available without reclaiming by force (Linux: `si_mem_available`, the MemAvailable of
/// /proc/meminfo), a page is refused once less than this is left, so that the processes beside
/// a VM still find memory (a 1/64 of RAM, at least 16 MiB).
pub const fn host_reserve(total_ram_pages: u64) -> u64 {
    let r = total_ram_pages / 64;
    if r < 4096 {
        4096
    } else {
        r
    }
}

/// True when the OS's available memory leaves room for one more page above the reserve
/// (`setting` 0 = [`host_reserve`], else exactly that many pages).
pub const fn above_reserve(available_pages: u64, setting: u64, total_ram_pages: u64) -> bool {
    let reserve = if setting == 0 {
        host_reserve(total_ram_pages)
    } else {
        setting
    };
    available_pages > reserve
}

/// The cap when the administrator sets none: half of the host's RAM.
pub const fn default_cap(total_ram_pages: u64) -> u64 {
    total_ram_pages / 2
}

/// The cap in force for a setting (`0` = the default, [`default_cap`]).
pub const fn cap_pages(setting: u64, total_ram_pages: u64) -> u64 {
    if setting == 0 {
        default_cap(total_ram_pages)
    } else {
        setting
    }
}

/// The driver-wide count of pages held, checked against a cap.
#[derive(Clone, Copy, Debug)]
pub struct PageBudget<'a> {
    /// Pages held by all VMs of the driver (the shim's one counter).
    pub held: &'a AtomicU64,
    /// The cap in force (see [`cap_pages`]).
    pub cap: u64,
}

impl PageBudget<'_> {
    /// Counts one more page, or refuses when the cap is reached (never exceeds it, even when
    /// several CPUs charge at once).
    pub fn charge(&self) -> Result<(), AllocError> {
        let mut cur = self.held.load(Ordering::Relaxed);
        loop {
            if cur >= self.cap {
                return Err(AllocError::HostPageCap);
            }
            match self.held.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }

    /// Counts one page less.
    pub fn uncharge(&self) {
        // Saturating: a shim bug must not wrap the count to 2^64 and lock every VM out.
        let _ = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(1))
            });
    }

    /// A page from `os_alloc` (which returns its host-physical address, or `None` when the OS
    /// has none), charged to the budget first; nothing stays charged when the OS fails.
    pub fn alloc(&self, os_alloc: impl FnOnce() -> Option<u64>) -> Result<u64, AllocError> {
        self.charge()?;
        match os_alloc() {
            Some(hpa) => Ok(hpa),
            None => {
                self.uncharge();
                Err(AllocError::OutOfMemory)
            }
        }
    }

    /// Returns a page through `os_free` and uncharges it.
    pub fn free(&self, os_free: impl FnOnce()) {
        os_free();
        self.uncharge();
    }

    /// Pages held now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

/// Pages given back where the OS cannot free them now (Windows above APC_LEVEL, where
/// MmFreeContiguousMemory may not run): a lock-free list threaded through the pages themselves
/// (each listed page's first quadword holds the next one, 0 ends it), emptied by
/// [`DeferredFree::drain`] where the OS can free.
#[derive(Debug, Default)]
pub struct DeferredFree {
    head: AtomicU64,
}

impl DeferredFree {
    /// An empty list.
    pub const fn new() -> DeferredFree {
        DeferredFree {
            head: AtomicU64::new(0),
        }
    }

    /// Lists page `hpa`, which the caller gives up (nobody else reads or writes it any more).
    pub fn push<P: crate::platform::Platform + ?Sized>(&self, p: &P, hpa: u64) {
        let Some(link) = p.page(hpa).first() else {
            return;
        };
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            link.store(head, Ordering::Relaxed);
            match self
                .head
                .compare_exchange_weak(head, hpa, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(h) => head = h,
            }
        }
    }

    /// Takes the whole list and gives each page to `free` (the OS's own free), after reading its
    /// link. Taking all at once has no ABA problem: pushers only swap the head.
    pub fn drain<P: crate::platform::Platform + ?Sized>(&self, p: &P, mut free: impl FnMut(u64)) {
        let mut hpa = self.head.swap(0, Ordering::Acquire);
        while hpa != 0 {
            let next = p.page(hpa).first().map_or(0, |l| l.load(Ordering::Relaxed));
            free(hpa);
            hpa = next;
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::sync::Arc;
    use std::vec::Vec;

    #[test]
    fn reserve_is_a_64th_of_ram_and_at_least_16_mib() {
        // 512 MiB: 131,072 pages, a 64th is 8 MiB, so the 16 MiB floor holds.
        assert_eq!(host_reserve(131_072), 4096);
        // 64 GiB: 1 GiB.
        assert_eq!(host_reserve(16 << 20), 262_144);
        assert!(!above_reserve(4096, 0, 131_072));
        assert!(above_reserve(4097, 0, 131_072));
        assert!(
            above_reserve(2, 1, 131_072),
            "a setting replaces the default"
        );
        assert!(!above_reserve(1, 1, 131_072));
    }

    #[test]
    fn default_is_half_of_ram_and_a_setting_wins() {
        assert_eq!(cap_pages(0, 131_072), 65_536);
        assert_eq!(cap_pages(1000, 131_072), 1000);
        assert_eq!(
            cap_pages(1 << 40, 131_072),
            1 << 40,
            "a cap above RAM is allowed"
        );
    }

    #[test]
    fn cap_refuses_and_os_failure_uncharges() {
        let held = AtomicU64::new(0);
        let b = PageBudget {
            held: &held,
            cap: 3,
        };
        let mut next = 0x1000u64;
        let mut os = || {
            next += 0x1000;
            Some(next)
        };
        assert_eq!(b.alloc(&mut os), Ok(0x2000));
        assert_eq!(b.alloc(&mut os), Ok(0x3000));
        assert_eq!(b.alloc(|| None), Err(AllocError::OutOfMemory));
        assert_eq!(b.held(), 2, "a failed OS allocation stays uncharged");
        assert_eq!(b.alloc(&mut os), Ok(0x4000));
        let mut called = false;
        assert_eq!(
            b.alloc(|| {
                called = true;
                Some(0)
            }),
            Err(AllocError::HostPageCap)
        );
        assert!(!called, "the OS is not asked past the cap");
        b.free(|| {});
        assert_eq!(b.held(), 2);
        assert!(b.alloc(&mut os).is_ok());
        held.store(0, Ordering::Relaxed);
        b.uncharge();
        assert_eq!(b.held(), 0, "never wraps");
    }

    #[test]
    fn concurrent_charges_never_exceed_the_cap() {
        let held = Arc::new(AtomicU64::new(0));
        let cap = 10_000u64;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let held = Arc::clone(&held);
                std::thread::spawn(move || {
                    let b = PageBudget { held: &held, cap };
                    (0..5_000).filter(|_| b.charge().is_ok()).count() as u64
                })
            })
            .collect();
        let granted: u64 = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
        assert_eq!(granted, cap, "20,000 asked, exactly the cap granted");
        assert_eq!(held.load(Ordering::Relaxed), cap);
    }
}
