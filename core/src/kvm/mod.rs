//! The KVM personality: the subset of KVM's user API that KVM's own dirty-log selftests use,
//! served over the same session layer, VM, EPT and dirty logs as smudge's own ABI (issue
//! "A KVM personality"). Built in steps: [`abi`] (the request numbers and layouts) first.

pub mod abi;
pub mod cpuid;
pub mod ring;
pub mod state;
