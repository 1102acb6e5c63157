//! Linux: `/dev/smudge` and `ioctl(2)` with the numbers of `abi::Op::linux_ioctl`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use smudge_core::abi::Op;

/// The device node of the driver.
pub const DEVICE_PATH: &str = "/dev/smudge";

/// One open of the device: one VM.
pub struct Device {
    file: File,
}

impl Device {
    /// Opens the device.
    pub fn open() -> anyhow::Result<Device> {
        match OpenOptions::new().read(true).write(true).open(DEVICE_PATH) {
            Ok(file) => Ok(Device { file }),
            Err(e) => {
                let hint = match e.kind() {
                    io::ErrorKind::NotFound => " (is smudge.ko loaded?)",
                    io::ErrorKind::PermissionDenied => {
                        " (only root may open it by default: run as root, or let a group open it \
                         with a udev rule, see the README's \"Who may open the device\")"
                    }
                    _ => "",
                };
                Err(anyhow!(
                    "cannot open {DEVICE_PATH}: {}{hint}",
                    std_message(&e)
                ))
            }
        }
    }

    /// Sends request `op`; `buf` holds the request and receives the response (its length is
    /// `op.buffer_size()`, the size encoded in the ioctl number).
    pub fn ioctl(&self, op: Op, buf: &mut [u8]) -> io::Result<()> {
        if buf.len() < op.buffer_size() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "ioctl buffer too short",
            ));
        }
        // SAFETY: the driver reads op.request_size() and writes at most op.response_size()
        // bytes at `buf`, both within its op.buffer_size() bytes; user pointers inside the
        // request (image, bitmap) point into buffers the caller keeps alive across the call.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                op.linux_ioctl() as _,
                buf.as_mut_ptr(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Device {
    /// Maps `len` bytes of guest RAM read-only (the driver refuses writable mappings: a user
    /// write would bypass the EPT and the dirty log). Returns the address of GPA 0.
    pub fn map_ro(&self, len: u64) -> Option<u64> {
        // SAFETY: a fresh read-only shared mapping of the VM's descriptor; never dereferenced
        // here (only its page-table entries are inspected, by the driver).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            None
        } else {
            Some(p as u64)
        }
    }

    /// A second handle on the same VM (dup of the descriptor): RUN of another vCPU from
    /// another thread.
    pub fn try_clone(&self) -> anyhow::Result<Device> {
        Ok(Device {
            file: self
                .file
                .try_clone()
                .map_err(|e| anyhow!("cannot duplicate the VM descriptor: {}", std_message(&e)))?,
        })
    }
}

/// A thread that can be interrupted: a signal makes its pending RUN return INTERRUPTED.
#[derive(Clone, Copy)]
pub struct ThreadHandle(libc::pthread_t);

impl ThreadHandle {
    /// The calling thread.
    pub fn current() -> ThreadHandle {
        // SAFETY: pthread_self has no preconditions.
        ThreadHandle(unsafe { libc::pthread_self() })
    }
    /// Sends SIGALRM (handler installed by `install_interrupt_handler`).
    pub fn interrupt(&self) {
        // SAFETY: callers interrupt only threads they joined after (scoped threads).
        unsafe { libc::pthread_kill(self.0, libc::SIGALRM) };
    }
}

/// Installs the do-nothing SIGALRM handler (no SA_RESTART).
pub fn install_interrupt_handler() -> io::Result<()> {
    // SAFETY: installs a handler that does nothing (async-signal-safe).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigalrm as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = 0;
        if libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// True when the driver refused a request as unsupported by the CPU (EOPNOTSUPP).
pub fn is_unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

/// True when the driver refused a page because all VMs together hold its cap (EDQUOT).
pub fn is_host_page_cap(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EDQUOT)
}

/// The error text without std's " (os error N)" suffix.
fn std_message(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

extern "C" fn on_sigalrm(_: libc::c_int) {}

/// After a deadline, sends SIGALRM to the thread that armed it every 50 ms until dropped. The
/// driver's run loop checks `signal_pending()` and returns INTERRUPTED, so a spinning guest
/// gives control back; the handler does nothing (no SA_RESTART, so a blocked call sees EINTR).
pub struct Alarm {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Alarm {
    /// Arms the alarm for the calling thread.
    pub fn at(deadline: Instant) -> io::Result<Alarm> {
        install_interrupt_handler()?;
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("smudge-alarm".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    let now = Instant::now();
                    if now >= deadline {
                        // SAFETY: the target thread is alive: it owns the Alarm, whose drop stops
                        // and joins this thread first.
                        unsafe { libc::pthread_kill(target, libc::SIGALRM) };
                        std::thread::sleep(Duration::from_millis(50));
                    } else {
                        std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
                    }
                }
            })?;
        Ok(Alarm {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::ReqError;

    #[test]
    fn the_page_cap_is_named_not_called_a_disk_quota() {
        let e = ReqError {
            op: Op::Run,
            err: io::Error::from_raw_os_error(libc::EDQUOT),
        };
        let text = e.to_string();
        assert!(text.contains("max_pages"), "{text}");
        assert!(!text.contains("quota"), "{text}");
        let e = ReqError {
            op: Op::Run,
            err: io::Error::from_raw_os_error(libc::ENOMEM),
        };
        assert!(!e.to_string().contains("max_pages"));
    }
}
