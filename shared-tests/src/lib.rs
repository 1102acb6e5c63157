//! Shared tests of smudge: the test platform, the software model of the processor's EPT walk
//! (A/D flags, TLB and paging-structure caches, PML), and a small VM harness built on them.
//!
//! - [`platform::MockPlatform`]: pages in host memory, accounting, fault injection.
//! - [`model::Cpu`]: the SDM's EPT translation, the oracle the core is tested against.
//! - [`fixtures::all_caps`]: the real VMX capability MSR dumps, decoded.
//! - [`harness::TrackedVm`]: slots, dirty logs and the exit handling of the VM loop.
//! - [`session_model::MockOs`]: an OS for `core::session` whose CPUs are the model behind a
//!   model of VMX operation, so the session layer and the run loop run on host threads.

pub mod arena;
pub mod elf;
pub mod fixtures;
pub mod harness;
pub mod model;
pub mod platform;
pub mod selftest;
pub mod session_model;

pub use arena::ArenaPlatform;
pub use harness::{Backing, InveptPolicy, TrackedVm};
pub use model::{AccessKind, Cpu, Exit};
pub use platform::MockPlatform;
