//! Dirty logging through the session layer, as user space drives it: random writes by two
//! vCPUs (RUN to a checkpoint, through the SDM model's EPT walk, TLB and PML) into guest RAM and
//! two added slots, interleaved with GET, CLEAR (64-page masks, KVM's rules) and HARVEST
//! requests. Single-threaded, so the oracle is exact: every log must hold exactly the pages
//! written since they were last harvested or cleared. The kick, the PML drain on every exit,
//! the INVEPT after each request and the VMCS handling are the session's and the run loop's own.

use std::collections::BTreeSet;

use proptest::prelude::*;
use smudge_core::abi::{self, exit_kind, Op as AbiOp, Wire};
use smudge_core::session::{Driver, Fail, Session};
use smudge_tests::session_model::{MockOs, Step, ALL_DUTIES};

const PAGE: u64 = 4096;
/// Guest RAM: 8 MiB; the guests write below smudge's reserved top 1 MiB.
const MEM: u64 = 8 << 20;
const RAM_PAGES: u64 = (MEM - (1 << 20)) / PAGE;
/// The added slots' GPAs.
const SLOT_BASE: [u64; 2] = [1 << 30, (1 << 30) + (64 << 20)];

#[derive(Clone, Debug)]
enum Op {
    /// vCPU `cpu` writes `count` consecutive pages of `slot` from `page` (wrapping), then
    /// checkpoints.
    Write {
        cpu: u32,
        slot: usize,
        page: u64,
        count: u64,
    },
    Get {
        slot: usize,
    },
    Harvest {
        slot: usize,
    },
    Clear {
        slot: usize,
        first_word: u64,
        /// Words of 64 pages; None: to the slot's end.
        words: Option<u64>,
        masks: Vec<u64>,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let slot = 0usize..3;
    prop_oneof![
        8 => (0u32..2, slot.clone(), any::<u16>(), prop_oneof![4 => Just(1u64), 1 => 1u64..600])
            .prop_map(|(cpu, slot, page, count)| Op::Write { cpu, slot, page: u64::from(page), count }),
        1 => slot.clone().prop_map(|slot| Op::Get { slot }),
        2 => slot.clone().prop_map(|slot| Op::Harvest { slot }),
        2 => (slot, 0u64..8, prop_oneof![2 => (0u64..4).prop_map(Some), 1 => Just(None)],
              prop::collection::vec(prop_oneof![Just(u64::MAX), any::<u64>(), Just(0u64)], 0..12))
            .prop_map(|(slot, first_word, words, masks)| Op::Clear { slot, first_word, words, masks }),
    ]
}

struct Vm {
    d: Driver,
    os: MockOs<false>,
    s: Session<MockOs<false>>,
}

impl Vm {
    fn call(&self, op: AbiOp, fill: &dyn Fn(&mut [u8])) -> Result<Vec<u8>, Fail> {
        let mut buf = vec![0u8; op.buffer_size()];
        fill(&mut buf);
        let n = self.s.request(&self.os, &self.d, op, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }
    fn wire<T: Wire>(&self, op: AbiOp, r: &T) -> Result<Vec<u8>, Fail> {
        self.call(op, &|b| {
            r.to_bytes(b).expect("fits");
        })
    }
    fn log(&self, slot: usize, pages: u64, harvest: bool) -> BTreeSet<u64> {
        let mut bits = vec![0u64; pages.div_ceil(64) as usize];
        let r = abi::DirtyLogReq {
            version: abi::VERSION,
            slot: slot as u32,
            bitmap: bits.as_mut_ptr() as u64,
            bitmap_len: bits.len() as u64 * 8,
        };
        let op = if harvest {
            AbiOp::HarvestDirtyLog
        } else {
            AbiOp::GetDirtyLog
        };
        self.wire(op, &r).expect("dirty log");
        (0..pages)
            .filter(|&i| bits[(i / 64) as usize] & (1 << (i % 64)) != 0)
            .collect()
    }
}

fn run(mode: u32, slot_pages: [u64; 2], ops: Vec<Op>) {
    let caps = smudge_tests::fixtures::all_caps()
        .into_iter()
        .find(|(n, _)| n.contains("skylake_x"))
        .map(|(_, c)| c)
        .expect("skylake_x dump");
    let mut vm = Vm {
        d: Driver {
            caps,
            mode: caps.choose_mode(false).expect("mode"),
            duties: ALL_DUTIES,
            probe: true,
        },
        os: MockOs::new(caps, 2, ALL_DUTIES),
        s: Session::new(),
    };
    let setup = abi::SetupReq {
        version: abi::VERSION,
        mode,
        mem_bytes: MEM,
        vcpus: 2,
        page_limit: 0,
    };
    vm.wire(AbiOp::Setup, &setup).expect("SETUP");
    let mut pages = vec![RAM_PAGES];
    let mut base = vec![0u64];
    for (i, n) in slot_pages.into_iter().enumerate() {
        let r = abi::AddSlotReq {
            version: abi::VERSION,
            reserved: 0,
            gpa: SLOT_BASE[i],
            size: n * PAGE,
        };
        let resp = vm.wire(AbiOp::AddSlot, &r).expect("ADD_SLOT");
        assert_eq!(
            abi::AddSlotResp::from_bytes(&resp).expect("resp").slot,
            i as u32 + 1
        );
        pages.push(n);
        base.push(SLOT_BASE[i]);
    }
    // The log of slot 0 covers all of RAM; the guests write below the reserved top.
    let log_pages = |slot: usize| if slot == 0 { MEM / PAGE } else { pages[slot] };
    let mut written: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); 3];
    for op in ops {
        match op {
            Op::Write {
                cpu,
                slot,
                page,
                count,
            } => {
                let mut steps = Vec::new();
                for k in 0..count {
                    let p = (page + k) % pages[slot];
                    steps.push(Step::Write(base[slot] + p * PAGE + k % PAGE));
                    written[slot].insert(p);
                }
                steps.push(Step::Checkpoint);
                vm.os.m.program(cpu, steps);
                let b = vm
                    .call(AbiOp::Run, &|b| {
                        b[..4].copy_from_slice(&abi::VERSION.to_le_bytes());
                        b[4..8].copy_from_slice(&cpu.to_le_bytes());
                    })
                    .expect("RUN");
                let r = abi::RunResp::from_bytes(&b).expect("resp");
                assert_eq!(
                    r.kind,
                    exit_kind::CHECKPOINT,
                    "{}",
                    String::from_utf8_lossy(&r.message)
                );
            }
            Op::Get { slot } => {
                assert_eq!(
                    vm.log(slot, log_pages(slot), false),
                    written[slot],
                    "GET slot {slot}"
                );
            }
            Op::Harvest { slot } => {
                let got = vm.log(slot, log_pages(slot), true);
                assert_eq!(got, written[slot], "HARVEST slot {slot}");
                written[slot].clear();
            }
            Op::Clear {
                slot,
                first_word,
                words,
                masks,
            } => {
                let total = log_pages(slot);
                let first = first_word * 64;
                let num = match words {
                    Some(w) => w * 64,
                    None => total.saturating_sub(first),
                };
                // The mask is `num` bits of user memory (the caller's to provide, as in KVM):
                // the generated words, then clear ones.
                let mut masks = masks;
                masks.resize(num.div_ceil(64).max(1) as usize, 0);
                let r = abi::ClearDirtyLogReq {
                    version: abi::VERSION,
                    slot: slot as u32,
                    first_page: first,
                    num_pages: num,
                    mask: masks.as_ptr() as u64,
                };
                // KVM's rules, stated here: the range inside the slot, `first` a multiple of 64,
                // `num` too unless it ends at the slot's end.
                let valid =
                    num > 0 && first + num <= total && (num % 64 == 0 || first + num == total);
                let got = vm.wire(AbiOp::ClearDirtyLog, &r);
                if !valid {
                    assert!(got.is_err(), "CLEAR {first}+{num} of {total} accepted");
                    continue;
                }
                got.expect("CLEAR");
                for p in first..first + num {
                    let k = p - first;
                    if masks[(k / 64) as usize] & (1 << (k % 64)) != 0 {
                        written[slot].remove(&p);
                    }
                }
            }
        }
    }
    for (slot, w) in written.iter().enumerate() {
        assert_eq!(
            vm.log(slot, log_pages(slot), true),
            *w,
            "final harvest of slot {slot}"
        );
    }
    let violations = vm.os.m.violations();
    assert!(violations.is_empty(), "{violations:?}");
    vm.s.release(&vm.os);
    vm.os.p.assert_all_freed();
}

fn case_strategy() -> impl Strategy<Value = ([u64; 2], Vec<Op>)> {
    (
        [64u64..400, 1u64..300],
        prop::collection::vec(op_strategy(), 1..40),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn ad_scan_through_the_session((slots, ops) in case_strategy()) {
        run(1, slots, ops);
    }

    #[test]
    fn pml_through_the_session((slots, ops) in case_strategy()) {
        run(2, slots, ops);
    }

    #[test]
    fn write_protect_through_the_session((slots, ops) in case_strategy()) {
        run(3, slots, ops);
    }
}
