//! The OS-free half of smudge.sys that only Windows needs: ioctl lengths and answers, the
//! NTSTATUS mapping, the RUN time budget, the device's DACL and the user-range rule. (What a request does is the core's session
//! layer.)
//!
//! Everything here is safe Rust and takes plain values, so the host unit-tests it (`cargo test
//! --lib` in this directory, run by `cargo xtask windows`). The driver binary (`main.rs`) supplies
//! the processor reads and the Windows I/O glue.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

pub mod budget;
pub mod ioctl;
pub mod security;
pub mod status;
pub mod usercopy;

/// The host tests, kept beside the sources in `tests/`.
#[cfg(test)]
#[path = "../tests"]
mod tests {
    mod budget;
    mod ioctl;
    mod security;
    mod status;
    mod usercopy;
}
