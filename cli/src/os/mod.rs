//! The OS seam: open the smudge device, send one request, interrupt a running vCPU.
//! Everything above it is OS-independent.

cfg_if::cfg_if! {
    if #[cfg(target_os = "linux")] {
        mod linux;
        pub use linux::{install_interrupt_handler, is_host_page_cap, is_unsupported, Alarm, Device, ThreadHandle};
    } else if #[cfg(windows)] {
        mod windows;
        pub use windows::{install_interrupt_handler, is_host_page_cap, is_unsupported, Alarm, Device, ThreadHandle};
    } else {
        compile_error!("smudge has backends for Linux and Windows only");
    }
}
