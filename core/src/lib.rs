//! smudge-core: the platform-independent half of the smudge hypervisor.
//!
//! `#![no_std]`, no `alloc`. Everything here is safe Rust over the [`platform::Platform`] trait,
//! except the small `arch` layer (VMX instructions), so it runs in host tests against software
//! models of the processor.
#![no_std]
#![forbid(unsafe_op_in_unsafe_fn)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod abi;
pub mod answer;
pub mod arch;
pub mod dirty;
pub mod ept;
pub mod error;
pub mod guest;
pub mod hostmem;
pub mod hostpt;
pub mod kvm;
pub mod msg;
pub mod platform;
pub mod regs;
pub mod session;
pub mod spec;
pub mod vcpu;
pub mod vm;
pub mod vmx;

pub use error::Error;
pub use platform::Platform;
