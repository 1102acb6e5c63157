//! The processor loops both drivers share (`vmx::root::Processors`): the admission check on
//! every processor with the first one's capabilities, and VMXON on every processor undone
//! everywhere when one fails. The failures here are the ones decided before the VMXON
//! instruction (another VMM's CR4.VMXE, a CR0 outside the fixed bits, no page for a region);
//! VMXON itself runs under Bochs.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use smudge_core::platform::Platform;
use smudge_core::regs::CR4_VMXE;
use smudge_core::vmx::admission::{self, Admission, Refusal};
use smudge_core::vmx::caps::VmxCaps;
use smudge_core::vmx::root::{ControlRegs, CrMismatch, Processors, VmxRoot, VmxonFailure};
use smudge_tests::MockPlatform;

/// A Windows x64 CR0 (PG, AM, WP, NE, ET, MP, PE) and a CR4 inside every fixture's FIXED1.
const CR0: u64 = 0x8005_0033;
const CR4: u64 = 0x6f8;

/// Four processors; `current` is the one `on` runs a function on.
struct Fake {
    p: MockPlatform,
    present: [bool; 4],
    reachable: [bool; 4],
    cr0: [u64; 4],
    cr4: Mutex<[u64; 4]>,
    current: AtomicU32,
    /// Regions the fake hands out before it has no page left.
    pages_left: AtomicU32,
    ran: Mutex<Vec<u32>>,
}

impl Fake {
    fn new() -> Fake {
        Fake {
            p: MockPlatform::new(),
            present: [true; 4],
            reachable: [true; 4],
            cr0: [CR0; 4],
            cr4: Mutex::new([CR4; 4]),
            current: AtomicU32::new(u32::MAX),
            pages_left: AtomicU32::new(4),
            ran: Mutex::new(Vec::new()),
        }
    }
    fn here(&self) -> usize {
        self.current.load(Ordering::SeqCst) as usize
    }
}

impl ControlRegs for Fake {
    fn cr0(&self) -> u64 {
        self.cr0[self.here()]
    }
    fn cr4(&self) -> u64 {
        self.cr4.lock().unwrap()[self.here()]
    }
    fn set_vmxe(&self, on: bool) {
        let mut c = self.cr4.lock().unwrap();
        let i = self.here();
        c[i] = if on {
            c[i] | CR4_VMXE
        } else {
            c[i] & !CR4_VMXE
        };
    }
}

// SAFETY: `on` runs `f` in place, on the thread that asks (the fake has no other processors).
unsafe impl Processors for Fake {
    fn bound(&self) -> u32 {
        4
    }
    fn present(&self, i: u32) -> bool {
        self.present[i as usize]
    }
    fn on(&self, i: u32, f: &mut (dyn FnMut() + Send)) -> bool {
        if !self.reachable[i as usize] {
            return false;
        }
        self.current.store(i, Ordering::SeqCst);
        self.ran.lock().unwrap().push(i);
        f();
        self.current.store(u32::MAX, Ordering::SeqCst);
        true
    }
    fn cr(&self) -> &(dyn ControlRegs + Sync) {
        self
    }
    fn alloc_region(&self) -> Option<u64> {
        let left = self.pages_left.load(Ordering::SeqCst);
        (left > 0).then(|| {
            self.pages_left.store(left - 1, Ordering::SeqCst);
            self.p.alloc_page().expect("page")
        })
    }
    fn free_region(&self, pa: u64) {
        self.p.free_page(pa)
    }
}

fn caps(name: &str) -> VmxCaps {
    smudge_tests::fixtures::all_caps()
        .into_iter()
        .find(|(n, _)| n.contains(name))
        .map(|(_, c)| c)
        .expect("fixture")
}

#[test]
fn every_processor_must_pass_with_the_first_ones_capabilities() {
    let skylake = caps("skylake_x");
    let haswell = caps("haswell");
    assert_ne!(skylake, haswell);
    let mode = skylake.choose_mode(false).expect("mode");
    let f = Fake::new();
    // Each processor's verdict, as `check` would give it there.
    let verdicts: Mutex<[Result<Admission, Refusal>; 4]> = Mutex::new(
        [Ok(Admission {
            caps: skylake,
            mode,
        }); 4],
    );
    let check = || verdicts.lock().unwrap()[f.here()];
    assert_eq!(
        admission::check_every(&f, &check),
        Ok(Admission {
            caps: skylake,
            mode
        })
    );
    assert_eq!(*f.ran.lock().unwrap(), [0, 1, 2, 3], "run on each, there");
    verdicts.lock().unwrap()[2] = Ok(Admission {
        caps: haswell,
        mode,
    });
    assert_eq!(
        admission::check_every(&f, &check),
        Err((2, Some(Refusal::AsymmetricProcessors)))
    );
    verdicts.lock().unwrap()[1] = Err(Refusal::VmxInUse);
    assert_eq!(
        admission::check_every(&f, &check),
        Err((1, Some(Refusal::VmxInUse))),
        "the first failure, with its own reason"
    );
    // An absent processor is skipped; an unreachable one fails.
    let mut g = Fake::new();
    g.present[1] = false;
    let ok = || {
        Ok(Admission {
            caps: skylake,
            mode,
        })
    };
    assert!(admission::check_every(&g, &ok).is_ok());
    assert_eq!(*g.ran.lock().unwrap(), [0, 2, 3]);
    g.reachable[3] = false;
    assert_eq!(admission::check_every(&g, &ok), Err((3, None)));
    g.present = [false; 4];
    assert_eq!(
        admission::check_every(&g, &ok),
        Err((0, None)),
        "none at all"
    );
}

#[test]
fn vmxon_stops_at_a_processor_that_cannot_enter_and_returns_every_region() {
    let caps = caps("skylake_x");
    let root: VmxRoot<4> = VmxRoot::new();
    // Processor 0 is in another VMM's VMX operation (CR4.VMXE set): VMXON is never tried.
    // (A failure after processors that did enter is Bochs's to show: the host cannot VMXON.)
    let f = Fake::new();
    f.cr4.lock().unwrap()[0] |= CR4_VMXE;
    assert_eq!(
        root.vmxon_all(&f, &f.p, &caps),
        Err((0, Some(VmxonFailure::InUse)))
    );
    assert_eq!(
        f.cr4.lock().unwrap()[0],
        CR4 | CR4_VMXE,
        "the other VMM's CR4 untouched"
    );
    assert!((0..4).all(|i| !root.is_on(i)));
    f.p.assert_all_freed();
    // CR0 without NE breaks the fixed bits: named, CR4.VMXE never set, the region returned.
    let mut g = Fake::new();
    g.cr0[0] = CR0 & !0x20;
    assert_eq!(
        root.vmxon_all(&g, &g.p, &caps),
        Err((
            0,
            Some(VmxonFailure::FixedBits(CrMismatch::Cr0 {
                missing: 0x20,
                forbidden: 0
            }))
        ))
    );
    assert_eq!(*g.cr4.lock().unwrap(), [CR4; 4]);
    g.p.assert_all_freed();
    // No page for a region, or no way to reach the processor.
    let h = Fake::new();
    h.pages_left.store(0, Ordering::SeqCst);
    assert_eq!(
        root.vmxon_all(&h, &h.p, &caps),
        Err((0, Some(VmxonFailure::NoRegion)))
    );
    let mut u = Fake::new();
    u.reachable[0] = false;
    assert_eq!(root.vmxon_all(&u, &u.p, &caps), Err((0, None)));
    u.p.assert_all_freed();
}
