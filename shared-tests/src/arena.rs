//! A platform whose pages are one contiguous arena, for the benchmarks: `page(hpa)` is address
//! arithmetic, as in a kernel's direct map (the Linux shim's `page` is `phys_to_virt`). The
//! [`crate::MockPlatform`] checks every access against a page's state (live, lent, freed), which
//! costs a lookup in its own tables per call: more than the work a ring reset does per page. The
//! arena checks nothing; the property tests run the same core code on the checked mock.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use smudge_core::platform::{AllocError, PageMut, PageWords, Platform};

/// Host-physical address of the arena's first page (not 0, so a zero entry names no page).
const BASE: u64 = 1 << 40;
const WORDS: usize = 512;

/// A fixed number of pages, allocated up front (untouched memory stays unbacked until used).
pub struct ArenaPlatform {
    words: Box<[AtomicU64]>,
    next: AtomicUsize,
    free: Mutex<Vec<usize>>,
    lend_atomic: AtomicBool,
}

impl ArenaPlatform {
    /// An arena of `pages` pages.
    pub fn new(pages: usize) -> ArenaPlatform {
        ArenaPlatform {
            words: (0..pages * WORDS).map(|_| AtomicU64::new(0)).collect(),
            next: AtomicUsize::new(0),
            free: Mutex::new(Vec::new()),
            lend_atomic: AtomicBool::new(false),
        }
    }

    /// Lends pages to `with_page_mut` through the atomics (the trait's default) instead of as
    /// plain memory.
    pub fn lend_through_atomics(&self, on: bool) {
        self.lend_atomic.store(on, Ordering::SeqCst);
    }

    /// Pages allocated and not freed.
    pub fn live_pages(&self) -> usize {
        self.next.load(Ordering::SeqCst) - self.free.lock().unwrap().len()
    }

    /// The page index of `hpa`; beyond the arena, `page` panics on the slice bounds.
    #[inline]
    fn index(&self, hpa: u64) -> usize {
        debug_assert!(
            hpa >= BASE && hpa % 4096 == 0,
            "not an arena page: {hpa:#x}"
        );
        (hpa.wrapping_sub(BASE) / 4096) as usize
    }
}

impl Platform for ArenaPlatform {
    fn alloc_page(&self) -> Result<u64, AllocError> {
        let i = match self.free.lock().unwrap().pop() {
            Some(i) => {
                for w in &self.words[i * WORDS..(i + 1) * WORDS] {
                    w.store(0, Ordering::Relaxed);
                }
                i
            }
            None => {
                let i = self.next.fetch_add(1, Ordering::SeqCst);
                if (i + 1) * WORDS > self.words.len() {
                    self.next.fetch_sub(1, Ordering::SeqCst);
                    return Err(AllocError::OutOfMemory);
                }
                i
            }
        };
        Ok(BASE + i as u64 * 4096)
    }

    fn free_page(&self, hpa: u64) {
        let i = self.index(hpa);
        self.free.lock().unwrap().push(i);
    }

    #[inline]
    fn page(&self, hpa: u64) -> &PageWords {
        let i = self.index(hpa);
        self.words[i * WORDS..(i + 1) * WORDS]
            .try_into()
            .expect("a page is 512 words")
    }

    fn with_page_mut(&self, hpa: u64, f: &mut dyn FnMut(PageMut<'_>)) {
        let page = self.page(hpa);
        if self.lend_atomic.load(Ordering::Relaxed) {
            return f(PageMut::Shared(page));
        }
        let words = page.as_ptr() as *mut [u64; WORDS];
        // SAFETY: `words` points to 512 live AtomicU64 of the arena, which have the size and
        // alignment of u64 and may be mutated through a shared reference (UnsafeCell). The
        // trait's contract says nothing else accesses the page while `f` runs, so this is the
        // only reference in use until `f` returns.
        f(PageMut::Exclusive(unsafe { &mut *words }))
    }
}
