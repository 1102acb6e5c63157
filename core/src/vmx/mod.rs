//! VMX: capabilities and controls, the VMCS, the software VM-entry checker, VM exits.

pub mod caps;
pub mod checks;
pub mod fields;
pub mod hw;
pub mod msr_dump;
pub mod setup;
pub mod vmcs;
