//! The processor loops both drivers share (`vmx::root::Processors`): the admission check on
//! every processor with the first one's capabilities, and VMXON on every processor undone
//! everywhere when one fails. The failures here are the ones decided before the VMXON
//! instruction (another VMM's CR4.VMXE, a CR0 outside the fixed bits, no page for a region);
//! VMXON itself runs under Bochs.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

use smudge_core::platform::Platform;
use smudge_core::regs::CR4_VMXE;
use smudge_core::vmx::admission::{self, Admission, Refusal};
use smudge_core::vmx::caps::VmxCaps;
use smudge_core::vmx::root::{ControlRegs, CrMismatch, Processors, ThisCpu, VmxRoot, VmxonFailure};
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
    /// Interrupts are off (the OS's `irq_save` ran and its `irq_restore` did not yet).
    irqs_off: AtomicBool,
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
            irqs_off: AtomicBool::new(false),
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
    fn current(&self) -> u32 {
        self.current.load(Ordering::SeqCst)
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
    fn irq_save(&self) -> usize {
        usize::from(self.irqs_off.swap(true, Ordering::SeqCst))
    }
    fn irq_restore(&self, flags: usize) {
        self.irqs_off.store(flags != 0, Ordering::SeqCst);
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
    // A region kept from an earlier generation (a host sleep) is used again: with no page left
    // to allocate, VMXON is still tried, and refused for the other VMM, not for want of a region.
    let kept = f.p.alloc_page().expect("page");
    assert!(root.set_region(0, kept, &f.p, &caps));
    f.pages_left.store(0, Ordering::SeqCst);
    assert_eq!(
        root.vmxon_all(&f, &f.p, &caps),
        Err((0, Some(VmxonFailure::InUse)))
    );
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

/// A page seam that maps every page to one scratch page, as a shim whose lookup fails would.
struct OneScratch {
    next: AtomicU32,
    scratch: smudge_core::platform::PageWords,
}

impl Platform for OneScratch {
    fn alloc_page(&self) -> Result<u64, smudge_core::platform::AllocError> {
        Ok(u64::from(self.next.fetch_add(1, Ordering::SeqCst) + 1) << 12)
    }
    fn free_page(&self, _hpa: u64) {}
    fn page(&self, _hpa: u64) -> &smudge_core::platform::PageWords {
        &self.scratch
    }
}

/// Processor 299 of 300: beyond the driver's table.
struct Beyond;

// SAFETY: `on` never runs `f` and says so.
unsafe impl Processors for Beyond {
    fn bound(&self) -> u32 {
        300
    }
    fn present(&self, i: u32) -> bool {
        i == 299
    }
    fn current(&self) -> u32 {
        0
    }
    fn on(&self, _i: u32, _f: &mut (dyn FnMut() + Send)) -> bool {
        false
    }
    fn cr(&self) -> &(dyn ControlRegs + Sync) {
        unreachable!("no processor is reached")
    }
    fn irq_save(&self) -> usize {
        unreachable!("no processor is reached")
    }
    fn irq_restore(&self, _flags: usize) {}
    fn alloc_region(&self) -> Option<u64> {
        None
    }
    fn free_region(&self, _pa: u64) {}
}

/// The load both drivers run (`session::load`): each failure leaves no processor in VMX
/// operation, no region and no driver, and maps to the errno and NTSTATUS the shims return. One
/// test, because `load` acts on the driver's one `ROOT`. (A load that succeeds runs VMXON: Bochs.)
#[test]
fn a_failed_load_leaves_nothing_behind() {
    use smudge_core::abi::windows::{self as w, from_load};
    use smudge_core::session::load::{self, LoadFailure};
    use smudge_core::spec::Duties;
    use smudge_core::vmx::root::ROOT;
    let caps = caps("skylake_x");
    let mode = caps.choose_mode(false).expect("mode");
    let ok = || Ok(Admission { caps, mode });
    let nothing_left = |f: &Fake| {
        assert!(load::driver().is_none());
        assert!((0..4).all(|i| !ROOT.is_on(i)));
        f.p.assert_all_freed();
    };

    let f = Fake::new();
    let in_use = |i: u32| {
        let f = &f;
        move || {
            if f.here() == i as usize {
                Err(Refusal::VmxInUse)
            } else {
                ok()
            }
        }
    };
    let e = load::load(&f, &f.p, &in_use(1), Duties::NONE, false).unwrap_err();
    assert_eq!(
        e,
        LoadFailure::Refused {
            cpu: 1,
            why: Some(Refusal::VmxInUse)
        }
    );
    assert_eq!((e.errno(), from_load(e)), (16, w::STATUS_RESOURCE_IN_USE));
    assert!(e.message().as_str().contains("processor 1"));
    nothing_left(&f);

    // Pages that all land on one scratch page fail the self-test before any VMXON region.
    let scratch = OneScratch {
        next: AtomicU32::new(0),
        scratch: [const { std::sync::atomic::AtomicU64::new(0) }; 512],
    };
    let e = load::load(&f, &scratch, &ok, Duties::NONE, false).unwrap_err();
    assert!(matches!(e, LoadFailure::Pages(m) if m.contains("distinct")));
    assert_eq!(
        (e.errno(), from_load(e)),
        (12, w::STATUS_INSUFFICIENT_RESOURCES)
    );
    assert_eq!(f.pages_left.load(Ordering::SeqCst), 4, "no region taken");
    nothing_left(&f);
    assert_eq!(smudge_core::platform::self_test(&f.p), Ok(()));
    nothing_left(&f);

    // Another VMM on processor 0: VMXON is never tried, the region goes back.
    let g = Fake::new();
    g.cr4.lock().unwrap()[0] |= CR4_VMXE;
    let e = load::load(&g, &g.p, &ok, Duties::NONE, false).unwrap_err();
    assert_eq!(
        e,
        LoadFailure::Vmxon {
            cpu: 0,
            why: Some(VmxonFailure::InUse)
        }
    );
    assert_eq!((e.errno(), from_load(e)), (16, w::STATUS_RESOURCE_IN_USE));
    nothing_left(&g);

    let e = load::load(&Beyond, &g.p, &ok, Duties::NONE, false).unwrap_err();
    assert_eq!(e, LoadFailure::TooManyProcessors);
    assert_eq!((e.errno(), from_load(e)), (19, w::STATUS_NOT_SUPPORTED));
    nothing_left(&g);

    // What a load that succeeded reports.
    let loaded = load::Loaded {
        cpus: 2,
        driver: smudge_core::session::Driver {
            caps,
            mode,
            duties: Duties::NONE,
            probe: false,
        },
    };
    let [vmx, spec] = loaded.report();
    let want = format!(
        "VMX on 2 CPUs: VMCS revision {:#x}, EPT A/D true, PML true",
        caps.revision_id()
    );
    assert!(vmx.as_str().starts_with(&want), "{}", vmx.as_str());
    assert!(vmx.as_str().ends_with(mode.name()));
    assert_eq!(
        spec.as_str(),
        "speculation barriers before each VM entry: none"
    );
}

/// The CPU-hotplug and sleep paths (`ThisCpu`): they reach only the processor they run on,
/// without asking the OS for a cross-processor call, with interrupts off the OS's way.
#[test]
fn this_cpu_reaches_only_itself_with_interrupts_off() {
    let f = Fake::new();
    // SAFETY: the fake's processor 2 is this thread's for the test.
    let here = unsafe { ThisCpu::new(&f, 2) };
    assert_eq!((here.bound(), here.current()), (4, 2));
    assert!(here.present(2) && !here.present(1));
    let mut off = None;
    assert!(here.on(2, &mut || off = Some(f.irqs_off.load(Ordering::SeqCst))));
    assert_eq!(off, Some(true), "f ran with interrupts on");
    assert!(!f.irqs_off.load(Ordering::SeqCst), "interrupts left off");
    assert!(!here.on(1, &mut || panic!("ran on another processor")));
    let hits = Mutex::new(Vec::new());
    here.on_all(&|i| hits.lock().unwrap().push(i));
    assert_eq!(*hits.lock().unwrap(), [2]);
    assert!(
        f.ran.lock().unwrap().is_empty(),
        "the OS was asked for a cross-processor call"
    );
}
