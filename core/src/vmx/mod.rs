//! VMX: the admission check, capabilities and controls, VMX operation on every CPU, the VMCS,
//! the software VM-entry checker, the run loop.

pub mod active;
pub mod admission;
pub mod caps;
pub mod checks;
pub mod controls;
pub mod fields;
pub mod guest_state;
pub mod hw;
pub mod msr_dump;
pub mod root;
pub mod setup;
pub mod vmcs;
