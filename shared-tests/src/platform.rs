//! `MockPlatform`: a [`Platform`] whose pages live in host memory, with page accounting and
//! allocation fault injection.
//!
//! - Host-physical addresses are fake and strictly increasing, with a one-page hole after every
//!   page (`hpa + 4096` is never a page), so an off-by-one-page access by the core panics instead
//!   of silently reading a neighbour. HPAs are never reused.
//! - Every misuse fails the test with a panic: freeing a page twice, freeing or touching a page
//!   this platform never handed out (foreign, misaligned), touching a page after it was freed.
//! - [`Platform::with_page_mut`] lends the page as plain memory (`&mut [u64; 512]`), as a kernel
//!   shim overriding it does; while it is lent, touching, lending or freeing that page panics (the
//!   trait's exclusivity contract). [`MockPlatform::lend_through_atomics`] switches to the
//!   trait's default (lent through the atomics), so tests reach both forms.
//! - A freed page is not reused while the platform lives, so a stale reference cannot alias a
//!   new owner. Pages return to a process-wide pool when the platform is dropped.
//! - [`MockPlatform::fail_nth_alloc`] / [`MockPlatform::fail_allocs_after`] make `alloc_page`
//!   return `None` on chosen calls.
//!
//! Lookups are lock-free (two-level table indexed by the page number), so benchmarks that go
//! through [`Platform::page`] measure the core, not the mock.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

use smudge_core::hostmem::PageBudget;
use smudge_core::platform::{AllocError, PageMut, PageWords, PinError, Platform};
use std::collections::HashMap;

/// First fake HPA handed out (64 GiB: above the identity-mapped guest memory the tests use).
pub const DEFAULT_HPA_BASE: u64 = 1 << 36;
/// Distance between two consecutive pages: one page plus a hole.
pub const HPA_STRIDE: u64 = 2 * 4096;

const SEG_SHIFT: u32 = 12;
const SEG_PAGES: usize = 1 << SEG_SHIFT;
const SEGMENTS: usize = 1 << 14; // 64 Mi pages (256 GiB) per platform

const NEVER: u8 = 0;
const LIVE: u8 = 1;
const FREED: u8 = 2;
/// Live and lent by `with_page_mut` as plain memory.
const LENT: u8 = 3;

#[derive(Default)]
struct Slot {
    page: OnceLock<&'static PageWords>,
    state: AtomicU8,
}

/// Pages of dropped platforms, reused (zeroed) by later ones.
static POOL: Mutex<Vec<&'static PageWords>> = Mutex::new(Vec::new());

fn fresh_page() -> &'static PageWords {
    let recycled = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
    match recycled {
        Some(p) => {
            for w in p.iter() {
                w.store(0, Ordering::Relaxed);
            }
            p
        }
        None => Box::leak(Box::new(std::array::from_fn(|_| AtomicU64::new(0)))),
    }
}

#[derive(Debug, Default)]
struct Faults {
    /// `alloc_page` calls so far (successful or not).
    calls: u64,
    /// The call number (1-based, absolute) that fails once.
    fail_call: Option<u64>,
    /// Every call with a number above this fails.
    fail_above: Option<u64>,
    /// Calls that returned `None`.
    failed: u64,
}

/// Page counters of a [`MockPlatform`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageStats {
    /// Pages handed out by `alloc_page`.
    pub allocated: u64,
    /// Pages returned by `free_page`.
    pub freed: u64,
    /// `alloc_page` calls that were made to fail.
    pub failed_allocs: u64,
}

impl PageStats {
    /// Pages allocated and not yet freed.
    pub fn live(&self) -> u64 {
        self.allocated - self.freed
    }
}

/// The test platform. See the module documentation.
pub struct MockPlatform {
    base: u64,
    segments: Box<[OnceLock<Box<[Slot]>>]>,
    next: AtomicU64,
    allocated: AtomicU64,
    freed: AtomicU64,
    faults: Mutex<Faults>,
    /// `with_page_mut` lends through the atomics (the trait default) instead of plain memory.
    lend_atomic: AtomicBool,
    /// The driver-wide page count and cap, kept by core's `hostmem::PageBudget` as a shim
    /// keeps them (no cap unless [`MockPlatform::set_host_cap`]).
    held: AtomicU64,
    cap: AtomicU64,
    /// The "process" whose memory user-memory slots pin.
    user: Mutex<UserMem>,
}

/// A process's memory for [`Platform::pin_user_pages`]: pages appear at their first pin or
/// access (as anonymous memory faults in), holes are unmapped, and every pin is counted.
#[derive(Debug, Default)]
struct UserMem {
    /// Page-aligned user address to the page backing it.
    pages: HashMap<u64, u64>,
    /// Pins per backing page.
    pins: HashMap<u64, u32>,
    /// Unmapped ranges `[start, end)`.
    holes: Vec<(u64, u64)>,
}

impl Default for MockPlatform {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MockPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockPlatform")
            .field("base", &self.base)
            .field("stats", &self.stats())
            .finish()
    }
}

impl MockPlatform {
    /// A platform whose first page is at [`DEFAULT_HPA_BASE`].
    pub fn new() -> MockPlatform {
        Self::with_base(DEFAULT_HPA_BASE)
    }

    /// A platform whose first page is at `base` (4 KiB aligned).
    pub fn with_base(base: u64) -> MockPlatform {
        assert_eq!(base % 4096, 0, "MockPlatform base must be page aligned");
        MockPlatform {
            base,
            segments: (0..SEGMENTS).map(|_| OnceLock::new()).collect(),
            next: AtomicU64::new(0),
            allocated: AtomicU64::new(0),
            freed: AtomicU64::new(0),
            faults: Mutex::new(Faults::default()),
            lend_atomic: AtomicBool::new(false),
            held: AtomicU64::new(0),
            cap: AtomicU64::new(u64::MAX),
            user: Mutex::new(UserMem::default()),
        }
    }

    fn user(&self) -> std::sync::MutexGuard<'_, UserMem> {
        self.user.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The page backing user address `uaddr` (faulted in at the first use); None in a hole.
    fn user_page(&self, uaddr: u64) -> Option<u64> {
        let page = uaddr & !4095;
        let mut u = self.user();
        if u.holes.iter().any(|&(a, b)| page >= a && page < b) {
            return None;
        }
        if let Some(&hpa) = u.pages.get(&page) {
            return Some(hpa);
        }
        let hpa = self.os_alloc_from(false)?;
        u.pages.insert(page, hpa);
        Some(hpa)
    }

    /// Makes `[start, end)` of the process's memory unmapped (pins there fail with EFAULT).
    pub fn unmap_user(&self, start: u64, end: u64) {
        self.user().holes.push((start, end));
    }

    /// Writes `bytes` at user address `uaddr` (within one page), as the process would.
    pub fn user_write(&self, uaddr: u64, bytes: &[u8]) {
        let hpa = self.user_page(uaddr).expect("user_write into a hole");
        smudge_core::platform::write_bytes(self, hpa, (uaddr & 4095) as usize, bytes);
    }

    /// Reads `n` bytes at user address `uaddr` (within one page), as the process would.
    pub fn user_read(&self, uaddr: u64, n: usize) -> Vec<u8> {
        let hpa = self.user_page(uaddr).expect("user_read from a hole");
        let mut out = vec![0u8; n];
        smudge_core::platform::read_bytes(self, hpa, (uaddr & 4095) as usize, &mut out);
        out
    }

    /// User pages pinned now (each pin counted).
    pub fn user_pins(&self) -> u64 {
        self.user().pins.values().map(|&n| u64::from(n)).sum()
    }

    /// Caps the pages held at `pages` through core's driver-wide budget, as the drivers do:
    /// past it `alloc_page` fails with `AllocError::HostPageCap`.
    pub fn set_host_cap(&self, pages: u64) {
        self.cap.store(pages, Ordering::SeqCst);
    }

    fn budget(&self) -> PageBudget<'_> {
        PageBudget {
            held: &self.held,
            cap: self.cap.load(Ordering::SeqCst),
        }
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// With `on`, [`Platform::with_page_mut`] lends pages through the atomics, as the trait's
    /// default does (a platform without the override); without, as plain memory (the default
    /// of the mock, as a kernel shim overriding it does).
    pub fn lend_through_atomics(&self, on: bool) {
        self.lend_atomic.store(on, Ordering::SeqCst);
    }

    /// The `n`-th `alloc_page` call from now (1-based) returns `None`; the others succeed.
    pub fn fail_nth_alloc(&self, n: u64) {
        assert!(n >= 1);
        let mut f = self.faults();
        f.fail_call = Some(f.calls + n);
        f.fail_above = None;
    }

    /// The next `n` `alloc_page` calls succeed, every later one returns `None`.
    pub fn fail_allocs_after(&self, n: u64) {
        let mut f = self.faults();
        f.fail_above = Some(f.calls + n);
        f.fail_call = None;
    }

    /// Stops injecting faults.
    pub fn clear_faults(&self) {
        let mut f = self.faults();
        f.fail_call = None;
        f.fail_above = None;
    }

    /// The page counters.
    pub fn stats(&self) -> PageStats {
        PageStats {
            allocated: self.allocated.load(Ordering::SeqCst),
            freed: self.freed.load(Ordering::SeqCst),
            failed_allocs: self.faults().failed,
        }
    }

    /// Pages allocated and not yet freed.
    pub fn live_pages(&self) -> u64 {
        self.stats().live()
    }

    /// Fails the test unless every page was returned and no user page stays pinned (the
    /// process's own pages stay: they are its memory).
    #[track_caller]
    pub fn assert_all_freed(&self) {
        let s = self.stats();
        let user = self.user().pages.len() as u64;
        assert_eq!(s.live() - user, 0, "pages leaked: {s:?}, {user} user pages");
        assert_eq!(self.user_pins(), 0, "user pages left pinned");
    }

    /// True when `hpa` is a page of this platform that is allocated now.
    pub fn is_live(&self, hpa: u64) -> bool {
        self.slot(hpa)
            .is_some_and(|s| matches!(s.state.load(Ordering::Acquire), LIVE | LENT))
    }

    fn slot(&self, hpa: u64) -> Option<&Slot> {
        if hpa < self.base || (hpa - self.base) % HPA_STRIDE != 0 {
            return None;
        }
        let idx = usize::try_from((hpa - self.base) / HPA_STRIDE).ok()?;
        let seg = self.segments.get(idx >> SEG_SHIFT)?.get()?;
        seg.get(idx & (SEG_PAGES - 1))
    }
}

impl MockPlatform {
    /// The "OS" allocator behind the budget, with the injected faults.
    fn os_alloc(&self) -> Option<u64> {
        self.os_alloc_from(true)
    }

    /// The allocator; with `inject`, the injected faults apply (user memory faulting in does not
    /// count as one of the driver's allocations).
    fn os_alloc_from(&self, inject: bool) -> Option<u64> {
        if inject {
            let mut f = self.faults();
            f.calls += 1;
            let n = f.calls;
            if f.fail_call == Some(n) || f.fail_above.is_some_and(|a| n > a) {
                f.failed += 1;
                return None;
            }
        }
        let idx = self.next.fetch_add(1, Ordering::SeqCst) as usize;
        let seg = self.segments.get(idx >> SEG_SHIFT).unwrap_or_else(|| {
            panic!(
                "MockPlatform: more than {} pages allocated",
                SEGMENTS * SEG_PAGES
            )
        });
        let seg = seg.get_or_init(|| (0..SEG_PAGES).map(|_| Slot::default()).collect());
        let slot = &seg[idx & (SEG_PAGES - 1)];
        if slot.page.set(fresh_page()).is_err() {
            panic!("MockPlatform: page index {idx} handed out twice");
        }
        slot.state.store(LIVE, Ordering::Release);
        self.allocated.fetch_add(1, Ordering::SeqCst);
        Some(self.base + idx as u64 * HPA_STRIDE)
    }
}

impl Platform for MockPlatform {
    fn alloc_page(&self) -> Result<u64, AllocError> {
        self.budget().alloc(|| self.os_alloc())
    }

    fn free_page(&self, hpa: u64) {
        let Some(slot) = self.slot(hpa) else {
            panic!("free_page({hpa:#x}): not a page of this platform (foreign or misaligned)");
        };
        match slot
            .state
            .compare_exchange(LIVE, FREED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                self.freed.fetch_add(1, Ordering::SeqCst);
                self.budget().uncharge();
            }
            Err(FREED) => panic!("free_page({hpa:#x}): double free"),
            Err(LENT) => panic!("free_page({hpa:#x}): page is lent by with_page_mut"),
            Err(_) => panic!("free_page({hpa:#x}): page was never allocated"),
        }
    }

    fn page(&self, hpa: u64) -> &PageWords {
        self.live_page(hpa, "page").1
    }

    /// Lends the page as plain memory, as a kernel shim may (unless `lend_through_atomics`).
    fn with_page_mut(&self, hpa: u64, f: &mut dyn FnMut(PageMut<'_>)) {
        let (slot, page) = self.live_page(hpa, "with_page_mut");
        if self.lend_atomic.load(Ordering::SeqCst) {
            return f(PageMut::Shared(page));
        }
        // Until `f` returns, `page`, `with_page_mut` and `free_page` of this page panic.
        if slot
            .state
            .compare_exchange(LIVE, LENT, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            panic!("with_page_mut({hpa:#x}): page touched by another thread");
        }
        let words = page.as_ptr().cast_mut().cast::<[u64; 512]>();
        // SAFETY: `words` points to the live, leaked 4 KiB of the page: 512 AtomicU64, which
        // have the size and alignment of u64 and may be mutated through a shared reference
        // (UnsafeCell). The caller guarantees nothing else accesses the page while `f` runs
        // (trait contract; the LENT state catches this process's own accesses), so this is the
        // only reference in use until `f` returns.
        let plain = unsafe { &mut *words };
        f(PageMut::Exclusive(plain));
        slot.state.store(LIVE, Ordering::Release);
    }

    /// As Linux's `pin_user_pages`: the pages up to the first hole, or EFAULT when that is the
    /// first.
    fn pin_user_pages(&self, uaddr: u64, hpas: &mut [u64]) -> Result<usize, PinError> {
        let mut n = 0;
        for (i, out) in hpas.iter_mut().enumerate() {
            let Some(hpa) = self.user_page(uaddr + i as u64 * 4096) else {
                break;
            };
            *self.user().pins.entry(hpa).or_default() += 1;
            *out = hpa;
            n += 1;
        }
        if n == 0 {
            return Err(PinError::Fault);
        }
        Ok(n)
    }

    fn unpin_user_page(&self, hpa: u64) {
        let mut u = self.user();
        match u.pins.get_mut(&hpa) {
            Some(n) if *n > 0 => *n -= 1,
            _ => panic!("unpin_user_page({hpa:#x}): not pinned"),
        }
    }
}

impl MockPlatform {
    /// The slot and storage of the live, not lent page at `hpa`; panics on any misuse.
    fn live_page(&self, hpa: u64, what: &str) -> (&Slot, &'static PageWords) {
        let Some(slot) = self.slot(hpa) else {
            panic!("{what}({hpa:#x}): not a page of this platform (foreign or misaligned)");
        };
        match slot.state.load(Ordering::Acquire) {
            LIVE => match slot.page.get() {
                Some(p) => (slot, p),
                None => panic!("{what}({hpa:#x}): live page without storage"),
            },
            FREED => panic!("{what}({hpa:#x}): use after free"),
            LENT => panic!("{what}({hpa:#x}): page is lent by with_page_mut"),
            s => {
                debug_assert_eq!(s, NEVER);
                panic!("{what}({hpa:#x}): page was never allocated")
            }
        }
    }
}

impl Drop for MockPlatform {
    fn drop(&mut self) {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        for seg in self.segments.iter_mut() {
            if let Some(seg) = seg.take() {
                for slot in seg.iter() {
                    if let Some(p) = slot.page.get() {
                        pool.push(p);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_zeroed_distinct_and_accounted() {
        let p = MockPlatform::new();
        let a = p.alloc_page().unwrap();
        let b = p.alloc_page().unwrap();
        assert_ne!(a, b);
        assert_eq!(a % 4096, 0);
        assert!(p.page(a).iter().all(|w| w.load(Ordering::Relaxed) == 0));
        p.page(a)[3].store(7, Ordering::Relaxed);
        assert_eq!(p.page(b)[3].load(Ordering::Relaxed), 0);
        assert_eq!(p.live_pages(), 2);
        p.free_page(a);
        p.free_page(b);
        p.assert_all_freed();
        assert!(!p.is_live(a));
    }

    #[test]
    fn fault_injection() {
        let p = MockPlatform::new();
        p.fail_nth_alloc(2);
        assert!(p.alloc_page().is_ok());
        assert!(p.alloc_page().is_err());
        assert!(p.alloc_page().is_ok());
        p.fail_allocs_after(1);
        assert!(p.alloc_page().is_ok());
        assert!(p.alloc_page().is_err());
        assert!(p.alloc_page().is_err());
        p.clear_faults();
        assert!(p.alloc_page().is_ok());
        assert_eq!(p.stats().failed_allocs, 3);
        assert_eq!(p.live_pages(), 4);
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_fails() {
        let p = MockPlatform::new();
        let a = p.alloc_page().unwrap();
        p.free_page(a);
        p.free_page(a);
    }

    #[test]
    #[should_panic(expected = "not a page of this platform")]
    fn foreign_free_fails() {
        let p = MockPlatform::new();
        let a = p.alloc_page().unwrap();
        p.free_page(a + 4096);
    }

    #[test]
    fn with_page_mut_lends_plain_or_atomic_memory() {
        let p = MockPlatform::new();
        let a = p.alloc_page().unwrap();
        p.page(a)[5].store(7, Ordering::Relaxed);
        let mut plain = false;
        p.with_page_mut(a, &mut |page| match page {
            PageMut::Exclusive(w) => {
                plain = true;
                assert_eq!(w[5], 7);
                w[5] = 9;
            }
            PageMut::Shared(_) => {}
        });
        assert!(plain);
        assert_eq!(p.page(a)[5].load(Ordering::Relaxed), 9);
        p.lend_through_atomics(true);
        let mut shared = false;
        p.with_page_mut(a, &mut |page| {
            if let PageMut::Shared(w) = page {
                shared = true;
                w[5].store(11, Ordering::Relaxed);
            }
        });
        assert!(shared);
        assert_eq!(p.page(a)[5].load(Ordering::Relaxed), 11);
        p.free_page(a);
        p.assert_all_freed();
    }

    #[test]
    #[should_panic(expected = "lent by with_page_mut")]
    fn touching_a_lent_page_fails() {
        let p = MockPlatform::new();
        let a = p.alloc_page().unwrap();
        p.with_page_mut(a, &mut |_| {
            let _ = p.page(a);
        });
    }

    #[test]
    #[should_panic(expected = "use after free")]
    fn use_after_free_fails() {
        let p = MockPlatform::new();
        let a = p.alloc_page().unwrap();
        p.free_page(a);
        let _ = p.page(a);
    }
}
