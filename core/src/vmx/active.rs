//! Which VMCSs each CPU holds active (SDM 25.11.1): made active there by VMPTRLD, until a
//! VMCLEAR there. VMXOFF does not write an active VMCS back to memory, and a CPU that leaves VMX
//! operation (taken offline, a host sleep, an emergency) loses its copy; so before VMXOFF a CPU
//! VMCLEARs every VMCS it lists (KVM's `loaded_vmcss_on_cpu`), and their vCPUs run on, there
//! later or on another CPU, from the data in memory.
//!
//! An entry comes just before the VMPTRLD there and goes only after a VMCLEAR there (or a
//! VMPTRLD that failed). So a VMCS that no CPU lists is active nowhere and its data is in
//! memory, with the launch state clear (SDM 25.11.3). A CPU that lost VMX operation without
//! those VMCLEARs (a sleep the driver could not reach it before) marks its entries lost: their
//! data is gone.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::vmx::root::MAX_CPUS;

/// VMCSs one CPU lists at most; making one more active there VMCLEARs another first (its vCPU
/// then VMLAUNCHes again).
pub const PER_CPU: usize = 16;

/// The mark of an entry whose CPU left VMX operation without a VMCLEAR of it (VMCS regions are
/// 4 KiB aligned, so bit 0 of their address is free).
const LOST: u64 = 1;

/// Where a VMCS stands with respect to one CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// Active there: VMCLEAR it there before it becomes active elsewhere.
    Active,
    /// Not active there (VMCLEARed, or never loaded): its data is in memory.
    Clear,
    /// It was active there when the CPU left VMX operation without a VMCLEAR: its data is gone.
    Lost,
}

/// One CPU's entries (0: free).
pub type List = [AtomicU64; PER_CPU];

static ACTIVE: [List; MAX_CPUS] = [const { [const { AtomicU64::new(0) }; PER_CPU] }; MAX_CPUS];

/// CPU `cpu`'s list (None beyond [`MAX_CPUS`], where the driver does not load).
pub fn list(cpu: u32) -> Option<&'static List> {
    ACTIVE.get(cpu as usize)
}

/// Where `vmcs` stands on the CPU of `list`.
pub fn held(list: &List, vmcs: u64) -> Held {
    let mut held = Held::Clear;
    for e in list {
        match e.load(Ordering::Acquire) {
            v if v == vmcs => return Held::Active,
            v if v == vmcs | LOST => held = Held::Lost,
            _ => {}
        }
    }
    held
}

/// Lists `vmcs`, about to be made active by VMPTRLD on the CPU of `list`, which runs this with
/// interrupts off (a cross-CPU VMCLEAR of the entry it evicts must not come in between its
/// choice and its VMCLEAR). When the list is full, `vmclear` VMCLEARs another entry there
/// first, which then makes room. False when every entry is a lost one (nothing can be
/// VMCLEARed to make room): the caller stops instead of running a VMCS it cannot track.
pub fn enlist(list: &List, vmcs: u64, vmclear: &mut dyn FnMut(u64)) -> bool {
    loop {
        if list.iter().any(|e| e.load(Ordering::Acquire) == vmcs) {
            return true;
        }
        // (A failed exchange: `forget` of another CPU took an entry meanwhile; look again.)
        if let Some(e) = list.iter().find(|e| e.load(Ordering::Acquire) == 0) {
            if e.compare_exchange(0, vmcs, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return true;
            }
            continue;
        }
        let Some((e, v)) = list.iter().find_map(|e| {
            let v = e.load(Ordering::Acquire);
            (v & LOST == 0 && v != 0).then_some((e, v))
        }) else {
            return false;
        };
        // VMCLEAR first, the entry after: until then another CPU must still see it active.
        vmclear(v);
        let _ = e.compare_exchange(v, vmcs, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// Takes `vmcs` off `list` after its VMCLEAR on that CPU. (Not a lost entry: a VMCLEAR does
/// not bring the data back.)
pub fn delist(list: &List, vmcs: u64) {
    for e in list {
        let _ = e.compare_exchange(vmcs, 0, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// Takes `vmcs`, whose page is being freed, off every list, lost or not.
pub fn forget(vmcs: u64) {
    for e in ACTIVE.iter().flatten() {
        for v in [vmcs, vmcs | LOST] {
            let _ = e.compare_exchange(v, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

/// Before VMXOFF on the CPU of `list`, which runs this with interrupts off: `vmclear` VMCLEARs
/// every VMCS it lists, and the list is left with only lost entries.
pub fn clear_all(list: &List, vmclear: &mut dyn FnMut(u64)) {
    for e in list {
        let v = e.load(Ordering::Acquire);
        if v != 0 && v & LOST == 0 {
            vmclear(v);
            let _ = e.compare_exchange(v, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

/// The CPU of `list` lost VMX operation without VMCLEARs: every VMCS it lists is lost.
pub fn mark_lost(list: &List) {
    for e in list {
        let _ = e.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (v != 0).then_some(v | LOST)
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn empty() -> List {
        [const { AtomicU64::new(0) }; PER_CPU]
    }

    /// VMCS addresses: 4 KiB aligned, never 0.
    fn vmcs(i: u64) -> u64 {
        (i + 1) << 12
    }

    fn listed(list: &List) -> Vec<u64> {
        list.iter()
            .map(|e| e.load(Ordering::Acquire))
            .filter(|&v| v != 0)
            .collect()
    }

    #[test]
    fn a_full_list_vmclears_one_other_entry_before_it_lists_another() {
        let list = empty();
        let none = &mut |v: u64| panic!("VMCLEAR of {v:#x} with room left");
        for i in 0..PER_CPU as u64 {
            assert!(enlist(&list, vmcs(i), none));
        }
        // Listed already: nothing to do.
        assert!(enlist(&list, vmcs(3), none));
        let new = vmcs(PER_CPU as u64);
        let mut cleared = Vec::new();
        assert!(enlist(&list, new, &mut |v| {
            // The entry goes after its VMCLEAR: until then it still reads as active.
            assert_eq!(held(&list, v), Held::Active);
            cleared.push(v);
        }));
        assert_eq!(cleared.len(), 1);
        assert_ne!(cleared[0], new);
        assert_eq!(held(&list, cleared[0]), Held::Clear);
        assert_eq!(held(&list, new), Held::Active);
        assert_eq!(listed(&list).len(), PER_CPU);
    }

    #[test]
    fn leaving_vmx_operation_clears_all_but_the_lost() {
        let list = empty();
        for i in 0..3 {
            assert!(enlist(&list, vmcs(i), &mut |_| {}));
        }
        mark_lost(&list);
        for i in 3..5 {
            assert!(enlist(&list, vmcs(i), &mut |_| {}));
        }
        let mut cleared = Vec::new();
        clear_all(&list, &mut |v| cleared.push(v));
        assert_eq!(cleared, [vmcs(3), vmcs(4)]);
        let states: Vec<Held> = (0..5).map(|i| held(&list, vmcs(i))).collect();
        use Held::*;
        assert_eq!(states, [Lost, Lost, Lost, Clear, Clear]);
        // A VMCLEAR does not bring a lost VMCS back; only its free takes the mark off.
        delist(&list, vmcs(0));
        assert_eq!(held(&list, vmcs(0)), Lost);
    }

    #[test]
    fn a_list_of_lost_entries_cannot_make_room() {
        let list = empty();
        for i in 0..PER_CPU as u64 {
            assert!(enlist(&list, vmcs(i), &mut |_| {}));
        }
        mark_lost(&list);
        let mut cleared = 0;
        assert!(!enlist(&list, vmcs(99), &mut |_| cleared += 1));
        assert_eq!((cleared, held(&list, vmcs(99))), (0, Held::Clear));
    }

    #[test]
    fn a_freed_vmcs_leaves_every_list() {
        let (a, b) = (list(7).unwrap(), list(8).unwrap());
        let (x, y) = (0xdead_0000, 0xbeef_0000);
        assert!(enlist(a, x, &mut |_| {}));
        assert!(enlist(b, x, &mut |_| {}));
        assert!(enlist(b, y, &mut |_| {}));
        mark_lost(b);
        forget(x);
        assert_eq!(
            (held(a, x), held(b, x), held(b, y)),
            (Held::Clear, Held::Clear, Held::Lost)
        );
        forget(y);
        assert!(listed(a).is_empty() && listed(b).is_empty());
    }
}
