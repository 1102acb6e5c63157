//! VMX: capabilities and controls, the VMCS, the software VM-entry checker, VM exits.

pub mod caps;
