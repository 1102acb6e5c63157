//! Dirty-log harvest benchmark (A/D scan), in the spirit of KVM's `dirty_log_perf_test`.
//!
//! Slots of 1, 16 and 64 GiB mapped with 4 KiB leaves (identity fake HPAs, no guest memory), with
//! 0.1 % / 1 % of the pages dirty (scattered at random, or clustered in 2 MiB runs) and 100 %.
//! Pages are dirtied as the processor's write would (D|A in the leaf, A in the PML4E, PDPTE and
//! PDE, with locked ORs; checked against the model CPU once), outside the timed region. Measured:
//! - `get`: `DirtyLog::get` (KVM_GET_DIRTY_LOG: read-only pruned scan),
//! - `clear`: `DirtyLog::clear` of the dirty pages (KVM_CLEAR_DIRTY_LOG),
//! - `harvest`: `DirtyLog::harvest` (get + clear in one pruned pass),
//! - `naive`: `dirty::scan_naive` (every leaf, no pruning),
//! - `memcpy`: copying as many bytes as the slot has leaf entries (8 per page): the memory
//!   bandwidth bound of any scan that reads every leaf and writes some back.
//! - `ring`: KVM's dirty ring (`kvm::ring::Ring`, 1 MiB, 65,536 entries) where the dirty pages
//!   were pushed in a random order (the guest's writes; untimed): user space collecting the
//!   entries (acquire the flags, read the offset, store RESET) and `KVM_RESET_DIRTY_RINGS`
//!   re-arming the pages in batches (`dirty::rearm_batch`, as `Vm::rearm_ring_pages` does). Where the dirty
//!   pages fit in the ring.
//! - `touch`: the same random order touching one 8-byte word per dirty page in an array of one
//!   word per page (read and write): the limit of any work that follows the dirty pages.
//!
//! After criterion's own report, a summary table is printed from the same measurements (median
//! time per iteration). `SMUDGE_BENCH_GIB=1,16` limits the slot sizes. The platform is
//! `ArenaPlatform`: pages in one arena, found by address arithmetic as in a kernel's direct map
//! (the checked mock of the tests spends more on its page lookups than a ring reset spends per
//! page). It lends page tables to clearing scans as plain memory, as a kernel shim may;
//! `SMUDGE_BENCH_ATOMICS=1` lends them through the atomics instead (the default of
//! `Platform::with_page_mut`).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{black_box, BenchmarkId, Criterion, SamplingMode};
use smudge_core::dirty::{self, scan_naive, DirtyLog, Mode};
use smudge_core::ept::{Ept, EptFeatures, Invept, MemoryType, Perms, TableCache};
use smudge_core::kvm::abi::{DIRTY_GFN_F_DIRTY, DIRTY_GFN_F_RESET};
use smudge_core::kvm::ring::{self, Ring};
use smudge_core::platform::Platform;
use smudge_tests::model::{bit, eptp, Cpu};
use smudge_tests::ArenaPlatform;

const PAGE: u64 = 4096;
const GIB: u64 = 1 << 30;
const SIZES_GIB: [u64; 3] = [1, 16, 64];

#[derive(Clone, Copy, Debug)]
enum Pattern {
    Scattered(f64),
    Clustered(f64),
    All,
}

const PATTERNS: [Pattern; 5] = [
    Pattern::Scattered(0.001),
    Pattern::Clustered(0.001),
    Pattern::Scattered(0.01),
    Pattern::Clustered(0.01),
    Pattern::All,
];

impl Pattern {
    fn name(self) -> String {
        match self {
            Pattern::Scattered(f) => format!("{}% scattered", f * 100.0),
            Pattern::Clustered(f) => format!("{}% clustered", f * 100.0),
            Pattern::All => "100%".to_string(),
        }
    }
    fn id(self) -> String {
        self.name().replace(['%', ' '], "").replace('.', "_")
    }

    /// The dirty page indices, sorted and distinct.
    fn pages(self, pages: u64) -> Vec<u64> {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut v: Vec<u64> = match self {
            Pattern::Scattered(f) => (0..(pages as f64 * f) as u64)
                .map(|_| next() % pages)
                .collect(),
            Pattern::Clustered(f) => {
                // Runs of up to 512 pages (2 MiB) at random 2 MiB-aligned places.
                let mut left = (pages as f64 * f) as u64;
                let mut v = Vec::new();
                while left > 0 {
                    let run = left.min(512);
                    let start = (next() % (pages / 512)) * 512;
                    v.extend(start..start + run);
                    left -= run;
                }
                v
            }
            Pattern::All => (0..pages).collect(),
        };
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// An EPT mapping one slot with 4 KiB leaves, its A/D dirty log, and where its entries are.
struct Fixture {
    p: ArenaPlatform,
    ept: Ept,
    log: DirtyLog,
    pages: u64,
    /// HPA of the PT of every 2 MiB of the slot, and of the PD of every GiB.
    pts: Vec<u64>,
    pds: Vec<u64>,
    pdpt: u64,
}

impl Fixture {
    fn new(gib: u64) -> Fixture {
        // Every table of the slot, the ring and a few more.
        let p = ArenaPlatform::new((gib * 513 + 400) as usize);
        p.lend_through_atomics(std::env::var("SMUDGE_BENCH_ATOMICS").is_ok_and(|v| v == "1"));
        let mut ept = Ept::new(&p, EptFeatures::ALL).expect("EPT");
        ept.map(&p, 0, 0, gib * GIB, Perms::RW, MemoryType::WriteBack, false)
            .expect("map");
        let pages = gib * GIB / PAGE;
        let mut log = DirtyLog::new(&p, Mode::AdScan, 0, pages).expect("log");
        let owed = log.enable(&p, &mut ept).expect("enable");
        ept.invept_done(&p, owed);
        // Find the tables by reading the entries (SDM layout), not through the core.
        let addr = |table: u64, i: u64| p.page(table)[i as usize].load(Relaxed) & bit::ADDR;
        let pdpt = addr(ept.pml4(), 0);
        let pds: Vec<u64> = (0..gib).map(|g| addr(pdpt, g)).collect();
        let pts: Vec<u64> = (0..gib * 512)
            .map(|m| addr(pds[(m / 512) as usize], m % 512))
            .collect();
        Fixture {
            p,
            ept,
            log,
            pages,
            pts,
            pds,
            pdpt,
        }
    }

    /// Sets what the processor's writes to `dirty` would set: D and A in the leaf, A in every
    /// entry above it (SDM 29.3.5), with locked ORs.
    fn dirty(&self, dirty: &[u64]) {
        let mut last_pt = u64::MAX;
        for &i in dirty {
            let pt = i / 512;
            if pt != last_pt {
                last_pt = pt;
                let gib = pt / 512;
                self.p.page(self.ept.pml4())[0].fetch_or(bit::A, Relaxed);
                self.p.page(self.pdpt)[gib as usize].fetch_or(bit::A, Relaxed);
                self.p.page(self.pds[gib as usize])[(pt % 512) as usize].fetch_or(bit::A, Relaxed);
            }
            self.p.page(self.pts[pt as usize])[(i % 512) as usize]
                .fetch_or(bit::A | bit::D, Relaxed);
        }
    }

    /// The helper sets exactly the flags the model CPU sets for a write.
    fn check_dirty_helper(&mut self) {
        let i = 777u64;
        let pt = i / 512;
        let words = [
            &self.p.page(self.ept.pml4())[0],
            &self.p.page(self.pdpt)[(pt / 512) as usize],
            &self.p.page(self.pds[(pt / 512) as usize])[(pt % 512) as usize],
            &self.p.page(self.pts[pt as usize])[(i % 512) as usize],
        ];
        let before: Vec<u64> = words.iter().map(|w| w.load(Relaxed)).collect();
        let mut cpu = Cpu::new(EptFeatures::ALL);
        cpu.access(&self.p, eptp(self.ept.pml4(), true), i * PAGE, true)
            .expect("model write");
        let by_model: Vec<u64> = words.iter().map(|w| w.load(Relaxed)).collect();
        assert_ne!(before, by_model);
        for (w, v) in words.iter().zip(&before) {
            w.store(*v, Relaxed);
        }
        self.dirty(&[i]);
        let by_helper: Vec<u64> = words.iter().map(|w| w.load(Relaxed)).collect();
        assert_eq!(
            by_helper, by_model,
            "dirty helper differs from the model's write"
        );
        let mut out = vec![0u64; self.pages.div_ceil(64) as usize];
        let owed = self
            .log
            .harvest(&self.p, &mut self.ept, &mut out)
            .expect("harvest");
        self.ept.invept_done(&self.p, owed);
    }

    fn bitmap(&self, dirty: &[u64]) -> Vec<u64> {
        let mut m = vec![0u64; self.pages.div_ceil(64) as usize];
        for &i in dirty {
            m[(i / 64) as usize] |= 1 << (i % 64);
        }
        m
    }
}

const SAMPLES: usize = 10;

type Key = (u64, String, &'static str);

/// Per call of the timing closure, the mean time per iteration. Criterion calls it for warm-up
/// first, then once per sample: the last `SAMPLES` entries are criterion's samples.
static TIMES: Mutex<BTreeMap<Key, Vec<Duration>>> = Mutex::new(BTreeMap::new());

/// Runs `one` (untimed setup, then a timed routine whose duration it returns) `iters` times and
/// records the mean.
fn timed(key: Key, iters: u64, mut one: impl FnMut() -> Duration) -> Duration {
    let total: Duration = (0..iters).map(|_| one()).sum();
    TIMES
        .lock()
        .unwrap()
        .entry(key)
        .or_default()
        .push(total / iters.max(1) as u32);
    total
}

/// Times `routine`.
fn time(routine: impl FnOnce()) -> Duration {
    let t = Instant::now();
    routine();
    t.elapsed()
}

/// The median of criterion's samples (time per iteration).
fn median(key: &Key) -> Option<Duration> {
    let t = TIMES.lock().unwrap();
    let v = t.get(key)?;
    let mut v = v[v.len().saturating_sub(SAMPLES)..].to_vec();
    v.sort();
    v.get(v.len() / 2).copied()
}

fn bench_size(c: &mut Criterion, gib: u64) {
    let mut f = Fixture::new(gib);
    f.check_dirty_helper();
    let mut out = vec![0u64; f.pages.div_ceil(64) as usize];
    let mut group = c.benchmark_group(format!("dirty_log_{gib}GiB"));
    group.sampling_mode(SamplingMode::Flat);
    for pattern in PATTERNS {
        let dirty = pattern.pages(f.pages);
        let mask = f.bitmap(&dirty);
        let pid = pattern.id();
        let key = |what: &'static str| (gib, pattern.name(), what);

        // Correctness guard (untimed): one harvest reports exactly the dirty pages.
        f.dirty(&dirty);
        let owed = f.log.harvest(&f.p, &mut f.ept, &mut out).expect("harvest");
        f.ept.invept_done(&f.p, owed);
        assert!(
            out == mask,
            "{gib} GiB {}: harvest disagrees with the dirtied pages",
            pattern.name()
        );

        f.dirty(&dirty);
        group.bench_function(BenchmarkId::new("get", &pid), |b| {
            b.iter_custom(|iters| {
                timed(key("get"), iters, || {
                    time(|| f.log.get(&f.p, &f.ept, black_box(&mut out)).expect("get"))
                })
            })
        });
        group.bench_function(BenchmarkId::new("clear", &pid), |b| {
            b.iter_custom(|iters| {
                timed(key("clear"), iters, || {
                    f.dirty(&dirty);
                    let mut owed = Invept::NONE;
                    let d = time(|| {
                        owed = f
                            .log
                            .clear(&f.p, &mut f.ept, 0, f.pages, black_box(&mask))
                            .expect("clear")
                    });
                    f.ept.invept_done(&f.p, owed);
                    d
                })
            })
        });
        // clear leaves the upper A flags set; a harvest resets them before the next benchmark.
        let owed = f.log.harvest(&f.p, &mut f.ept, &mut out).expect("harvest");
        f.ept.invept_done(&f.p, owed);
        group.bench_function(BenchmarkId::new("harvest", &pid), |b| {
            b.iter_custom(|iters| {
                timed(key("harvest"), iters, || {
                    f.dirty(&dirty);
                    let mut owed = Invept::NONE;
                    let d = time(|| {
                        owed = f
                            .log
                            .harvest(&f.p, &mut f.ept, black_box(&mut out))
                            .expect("harvest")
                    });
                    f.ept.invept_done(&f.p, owed);
                    d
                })
            })
        });
        group.bench_function(BenchmarkId::new("naive", &pid), |b| {
            b.iter_custom(|iters| {
                timed(key("naive"), iters, || {
                    f.dirty(&dirty);
                    out.fill(0);
                    time(|| {
                        scan_naive(&f.p, &f.ept, 0, f.pages * PAGE, &mut |gpa| {
                            let i = gpa / PAGE;
                            out[(i / 64) as usize] |= 1 << (i % 64);
                        })
                    })
                })
            })
        });
        if let Pattern::Scattered(_) = pattern {
            bench_ring(&mut group, &f, &dirty, &pid, key("ring"), key("touch"));
        }
        black_box(&out);
        // The naive scan leaves A set above clean leaves; reset for the next pattern.
        let owed = f.log.harvest(&f.p, &mut f.ept, &mut out).expect("harvest");
        f.ept.invept_done(&f.p, owed);
    }
    let src = vec![0x5a5a_5a5a_5a5a_5a5au64; f.pages as usize];
    let mut dst = vec![0u64; f.pages as usize];
    group.bench_function(BenchmarkId::new("memcpy", "leaf_entries"), |b| {
        b.iter_custom(|iters| {
            timed((gib, String::new(), "memcpy"), iters, || {
                time(|| {
                    dst.copy_from_slice(black_box(&src));
                    black_box(&mut dst);
                })
            })
        })
    });
    group.finish();
    drop((src, dst));
    f.log.free(&f.p);
    f.ept.destroy(&f.p);
    assert_eq!(f.p.live_pages(), 0, "pages leaked");
}

/// The shuffled order of `dirty` (xorshift, fixed seed): the order a guest's writes push them.
fn write_order(dirty: &[u64]) -> Vec<u64> {
    let mut v = dirty.to_vec();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for i in (1..v.len()).rev() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        v.swap(i, (rng % (i as u64 + 1)) as usize);
    }
    v
}

/// What `Vm::rearm_ring_pages` does for a batch of one slot's entries (the fixture has a log,
/// not a VM).
fn rearm_batch(f: &Fixture, batch: &[(u32, u64)], cache: &mut TableCache) {
    dirty::rearm_batch(batch.len(), |i| {
        let w = f.log.leaf(&f.p, &f.ept, batch.get(i)?.1 * PAGE, cache)?;
        Some((&f.log, w))
    });
}

/// KVM's dirty ring against the work-follows-the-dirty-pages limit (see the module comment).
fn bench_ring(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    f: &Fixture,
    dirty: &[u64],
    pid: &str,
    ring_key: Key,
    touch_key: Key,
) {
    let mut r = Ring::alloc(&f.p, ring::MAX_BYTES, true).expect("ring");
    if dirty.len() as u32 >= r.soft_limit {
        r.free(&f.p);
        return;
    }
    let order = write_order(dirty);
    // User space's view of the ring: its pages, as the mmap shows them.
    let pages: Vec<&[AtomicU64]> = (0..ring::MAX_BYTES / PAGE)
        .map(|i| &f.p.page(r.page(&f.p, i).expect("ring page"))[..])
        .collect();
    let entries = r.entries;
    let entry = |i: u32| {
        let w = (u64::from(i % entries) * ring::ENTRY / 8) as usize;
        (&pages[w / 512][w % 512], &pages[w / 512][w % 512 + 1])
    };
    let mut fetch = 0u32;
    let mut collected: Vec<u64> = Vec::with_capacity(order.len());
    // Correctness guard (untimed): the ring gives back exactly the pages, and re-arms them.
    let mut once = |r: &mut Ring, collected: &mut Vec<u64>| {
        collected.clear();
        loop {
            let (flags, offset) = entry(fetch);
            let v = flags.load(Acquire);
            if v as u32 & DIRTY_GFN_F_DIRTY == 0 {
                break;
            }
            collected.push(offset.load(Relaxed));
            flags.store(v | u64::from(DIRTY_GFN_F_RESET), Release);
            fetch = fetch.wrapping_add(1);
        }
        let mut cache = TableCache::default();
        r.reset(&f.p, &mut |batch| {
            rearm_batch(f, batch, &mut cache);
        })
    };
    let push = |r: &mut Ring| {
        f.dirty(&order);
        for &i in &order {
            assert!(r.push(&f.p, 1, i));
        }
    };
    push(&mut r);
    let n = once(&mut r, &mut collected);
    assert_eq!((n, &collected), (order.len() as u64, &order));
    let mut out = vec![0u64; f.pages.div_ceil(64) as usize];
    f.log.get(&f.p, &f.ept, &mut out).expect("get");
    assert!(
        out.iter().all(|&w| w == 0),
        "the ring reset left dirty pages"
    );

    group.bench_function(BenchmarkId::new("ring", pid), |b| {
        b.iter_custom(|iters| {
            timed(ring_key.clone(), iters, || {
                push(&mut r);
                time(|| {
                    black_box(once(&mut r, &mut collected));
                })
            })
        })
    });
    let mut words = vec![0u64; f.pages as usize];
    group.bench_function(BenchmarkId::new("touch", pid), |b| {
        b.iter_custom(|iters| {
            timed(touch_key.clone(), iters, || {
                time(|| {
                    for &i in black_box(&order) {
                        words[i as usize] += 1;
                    }
                })
            })
        })
    });
    black_box(&words);
    r.free(&f.p);
}

fn fmt(d: Option<Duration>) -> String {
    match d {
        None => "-".into(),
        Some(d) => {
            let ns = d.as_nanos() as f64;
            if ns < 1e3 {
                format!("{ns:.0} ns")
            } else if ns < 1e6 {
                format!("{:.1} µs", ns / 1e3)
            } else if ns < 1e9 {
                format!("{:.2} ms", ns / 1e6)
            } else {
                format!("{:.3} s", ns / 1e9)
            }
        }
    }
}

fn ratio(a: Option<Duration>, b: Option<Duration>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.as_nanos() > 0 => {
            format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64())
        }
        _ => "-".into(),
    }
}

fn summary() {
    println!();
    println!("smudge dirty-log summary (A/D scan, 4 KiB leaves; median of criterion's samples, time per iteration)");
    println!(
        "{:<7} {:<16} {:>9} {:>10} {:>10} {:>10} {:>13} {:>10} {:>10} {:>9} {:>10} {:>13}",
        "slot",
        "dirty",
        "pages",
        "get",
        "clear",
        "harvest",
        "harvest/GiB",
        "naive",
        "memcpy",
        "vs naive",
        "vs memcpy",
        "clear/memcpy"
    );
    for gib in SIZES_GIB {
        let memcpy = median(&(gib, String::new(), "memcpy"));
        for pattern in PATTERNS {
            let k = |w: &'static str| (gib, pattern.name(), w);
            let harvest = median(&k("harvest"));
            if harvest.is_none() && median(&k("get")).is_none() {
                continue;
            }
            let n = pattern.pages(gib * GIB / PAGE).len();
            println!(
                "{:<7} {:<16} {:>9} {:>10} {:>10} {:>10} {:>13} {:>10} {:>10} {:>9} {:>10} {:>13}",
                format!("{gib} GiB"),
                pattern.name(),
                n,
                fmt(median(&k("get"))),
                fmt(median(&k("clear"))),
                fmt(harvest),
                fmt(harvest.map(|h| h / gib as u32)),
                fmt(median(&k("naive"))),
                fmt(memcpy),
                ratio(median(&k("naive")), harvest),
                ratio(harvest, memcpy),
                ratio(median(&k("clear")), memcpy),
            );
        }
    }
    println!("vs naive: naive / harvest (speedup); vs memcpy: harvest / memcpy of the leaf entries (1.00x = bandwidth bound); clear/memcpy: the same for the masked clear");
    println!();
    println!(
        "smudge dirty ring (collect + KVM_RESET_DIRTY_RINGS of the dirty pages in write order)"
    );
    println!(
        "{:<7} {:<16} {:>9} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "slot", "dirty", "pages", "ring", "touch", "harvest", "vs touch", "vs harvest"
    );
    for gib in SIZES_GIB {
        for pattern in PATTERNS {
            let k = |w: &'static str| (gib, pattern.name(), w);
            let Some(ring) = median(&k("ring")) else {
                continue;
            };
            println!(
                "{:<7} {:<16} {:>9} {:>10} {:>10} {:>10} {:>10} {:>12}",
                format!("{gib} GiB"),
                pattern.name(),
                pattern.pages(gib * GIB / PAGE).len(),
                fmt(Some(ring)),
                fmt(median(&k("touch"))),
                fmt(median(&k("harvest"))),
                ratio(Some(ring), median(&k("touch"))),
                ratio(Some(ring), median(&k("harvest"))),
            );
        }
    }
    println!("vs touch: ring / one word per dirty page (1.00x = the limit); vs harvest: ring / the pruned bitmap scan");
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(SAMPLES)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(800))
        .configure_from_args();
    // SMUDGE_BENCH_GIB=1,16 limits the slot sizes (building the 64 GiB tables takes seconds).
    let sizes: Vec<u64> = match std::env::var("SMUDGE_BENCH_GIB") {
        Ok(s) => s.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        Err(_) => SIZES_GIB.to_vec(),
    };
    for gib in sizes {
        bench_size(&mut c, gib);
    }
    c.final_summary();
    summary();
}
