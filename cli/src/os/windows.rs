//! Windows: `\\.\Smudge` and `DeviceIoControl` with the codes of `abi::Op::windows_ioctl`
//! (METHOD_BUFFERED, FILE_WRITE_ACCESS).
//!
//! The handle is a `std::fs::File`: `OpenOptions` with read + write and the custom flag
//! FILE_FLAG_OVERLAPPED is `CreateFileW(path, GENERIC_READ | GENERIC_WRITE, FILE_SHARE_READ |
//! FILE_SHARE_WRITE | FILE_SHARE_DELETE, NULL, OPEN_EXISTING, FILE_FLAG_OVERLAPPED, NULL)`,
//! `File::try_clone` is `DuplicateHandle(.., DUPLICATE_SAME_ACCESS)` of that same handle, and drop
//! is `CloseHandle`. The handle is asynchronous because the I/O manager serialises every request
//! on a synchronous file object: RUNs of two vCPUs from two threads (`--vcpus N`) would take
//! turns instead of running at once. Each request still waits for its own completion (an event
//! per call, `GetOverlappedResult`). The four kernel32 functions are declared here: they do not
//! justify a dependency outside the team's list (windows-sys would bring hundreds of bindings
//! for signatures that have been stable since Windows NT 3.1).
//!
//! Interrupting a RUN: Windows has no signals, and smudge.sys neither sets a cancel routine nor
//! checks `Irp->Cancel`, so `CancelSynchronousIo` would only set a flag nobody reads. Instead
//! the driver bounds every RUN request to 50 ms (`windows-driver/src/budget.rs`, `USER_SLICE`)
//! and then returns INTERRUPTED. The tool's loops check their deadline and stop flag between
//! RUNs, so `Alarm` and `ThreadHandle::interrupt` need to do nothing: a timeout or a stop takes
//! effect within one slice.

use std::ffi::c_void;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::windows::fs::OpenOptionsExt;
use std::os::windows::io::AsRawHandle;
use std::time::Instant;

use anyhow::anyhow;
use smudge_core::abi::Op;

/// The name the driver links to `\Device\Smudge` (`\DosDevices\Smudge`).
pub const DEVICE_PATH: &str = r"\\.\Smudge";

/// winerror.h: what `DeviceIoControl` reports for the driver's STATUS_NOT_SUPPORTED
/// (0xC00000BB; RtlNtStatusToDosError maps it to ERROR_NOT_SUPPORTED).
const ERROR_NOT_SUPPORTED: i32 = 50;
/// winerror.h: an overlapped request is still in progress.
const ERROR_IO_PENDING: i32 = 997;
/// winbase.h: CreateFileW's flag for an asynchronous handle.
const FILE_FLAG_OVERLAPPED: u32 = 0x4000_0000;

/// minwinbase.h `OVERLAPPED` (x64: 32 bytes). The offsets are unused for a device control.
#[repr(C)]
struct Overlapped {
    internal: usize,
    internal_high: usize,
    offset: u32,
    offset_high: u32,
    event: *mut c_void,
}

#[link(name = "kernel32")]
extern "system" {
    /// ioapiset.h. Returns nonzero on success; on failure GetLastError holds the Win32 error
    /// the I/O manager derived from the request's NTSTATUS.
    fn DeviceIoControl(
        device: *mut c_void,
        io_control_code: u32,
        in_buffer: *const c_void,
        in_buffer_size: u32,
        out_buffer: *mut c_void,
        out_buffer_size: u32,
        bytes_returned: *mut u32,
        overlapped: *mut Overlapped,
    ) -> i32;
    /// synchapi.h: an unnamed event; null on failure.
    fn CreateEventW(
        attributes: *mut c_void,
        manual_reset: i32,
        initial_state: i32,
        name: *const u16,
    ) -> *mut c_void;
    /// ioapiset.h: waits (`wait` nonzero) for the overlapped request and gives its outcome.
    fn GetOverlappedResult(
        file: *mut c_void,
        overlapped: *mut Overlapped,
        bytes: *mut u32,
        wait: i32,
    ) -> i32;
    /// handleapi.h.
    fn CloseHandle(handle: *mut c_void) -> i32;
}

/// An event handle for one request, closed on drop.
struct Event(*mut c_void);

impl Event {
    fn new() -> io::Result<Event> {
        // SAFETY: no security attributes, no name: a fresh manual-reset event, initially clear.
        let h = unsafe { CreateEventW(std::ptr::null_mut(), 1, 0, std::ptr::null()) };
        if h.is_null() {
            return Err(io::Error::last_os_error());
        }
        Ok(Event(h))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the handle came from CreateEventW and is closed once, here.
        unsafe { CloseHandle(self.0) };
    }
}

/// One open of the device: one VM (the driver keeps it in the FILE_OBJECT of this open).
pub struct Device {
    file: File,
}

impl Device {
    /// Opens the device.
    pub fn open() -> anyhow::Result<Device> {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(FILE_FLAG_OVERLAPPED)
            .open(DEVICE_PATH)
        {
            Ok(file) => Ok(Device { file }),
            Err(e) => {
                let hint = match e.kind() {
                    io::ErrorKind::NotFound => " (is smudge.sys loaded?)",
                    io::ErrorKind::PermissionDenied => {
                        " (only SYSTEM and Administrators may open it: run from an elevated prompt)"
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
    /// at least `op.buffer_size()`; exactly that many bytes go in and may come back).
    pub fn ioctl(&self, op: Op, buf: &mut [u8]) -> io::Result<()> {
        let len = op.buffer_size();
        let Some(buf) = buf.get_mut(..len) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "ioctl buffer too short",
            ));
        };
        let len = u32::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ioctl buffer too long"))?;
        let ptr = buf.as_mut_ptr().cast::<c_void>();
        let event = Event::new()?;
        let mut ov = Overlapped {
            internal: 0,
            internal_high: 0,
            offset: 0,
            offset_high: 0,
            event: event.0,
        };
        let mut returned = 0u32;
        let handle = self.file.as_raw_handle();
        // SAFETY: the handle is open for the life of `self.file`; `ptr` addresses `len` bytes
        // that stay borrowed (and are not otherwise touched) until the request completes below,
        // as do `ov` and its event. METHOD_BUFFERED: the I/O manager copies `len` bytes in and at
        // most `len` bytes back into the same buffer, which is what an in/out pair naming one
        // buffer means. User pointers inside the request (image, bitmap) point into buffers the
        // caller keeps alive across the call.
        let ok = unsafe {
            DeviceIoControl(
                handle,
                op.windows_ioctl(),
                ptr.cast_const(),
                len,
                ptr,
                len,
                &mut returned,
                &mut ov,
            )
        };
        if ok != 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(ERROR_IO_PENDING) {
            return Err(e);
        }
        // SAFETY: `ov` is the OVERLAPPED of the pending request on `handle`; waiting (TRUE)
        // returns only once it completed, after which the buffer and `ov` may go.
        if unsafe { GetOverlappedResult(handle, &mut ov, &mut returned, 1) } == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A second handle on the same VM: `DuplicateHandle` of this handle, so both name the same
    /// FILE_OBJECT (a second `CreateFileW` would be a second, empty VM). RUN of another vCPU
    /// from another thread.
    pub fn try_clone(&self) -> anyhow::Result<Device> {
        let file = self
            .file
            .try_clone()
            .map_err(|e| anyhow!("cannot duplicate the VM handle: {}", std_message(&e)))?;
        Ok(Device { file })
    }
}

/// True when the driver refused a request as unsupported by the CPU: its STATUS_NOT_SUPPORTED
/// (`windows-driver/src/status.rs`, the Linux module's EOPNOTSUPP).
pub fn is_unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(ERROR_NOT_SUPPORTED)
}

/// True when the driver refused a page because all VMs together hold its cap: its
/// STATUS_WORKING_SET_QUOTA, which Windows reports as ERROR_WORKING_SET_QUOTA (1453).
pub fn is_host_page_cap(e: &io::Error) -> bool {
    e.raw_os_error() == Some(1453)
}

/// The error text without std's " (os error N)" suffix.
fn std_message(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The deadline guard. Nothing to arm: every RUN returns within the driver's 50 ms slice and
/// the run loops check the deadline between RUNs (see the module comment).
pub struct Alarm;

impl Alarm {
    /// Arms nothing; the caller's deadline check between RUNs enforces `_deadline`.
    pub fn at(_deadline: Instant) -> io::Result<Alarm> {
        Ok(Alarm)
    }
}

/// A vCPU thread. Nothing to send it: its RUN returns within 50 ms and the thread then sees the
/// stop flag (see the module comment).
#[derive(Clone, Copy)]
pub struct ThreadHandle;

impl ThreadHandle {
    /// The calling thread.
    pub fn current() -> ThreadHandle {
        ThreadHandle
    }
    /// Nothing to do: the pending RUN returns INTERRUPTED by itself within one slice.
    pub fn interrupt(&self) {}
}

/// Nothing to install: Windows has no signal to catch.
pub fn install_interrupt_handler() -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_supported_is_the_unsupported_error() {
        // winerror.h: ERROR_NOT_SUPPORTED 50; ERROR_INVALID_FUNCTION 1 is the code of an unknown
        // ioctl (STATUS_INVALID_DEVICE_REQUEST), ERROR_INVALID_PARAMETER 87 a malformed one.
        assert!(is_unsupported(&io::Error::from_raw_os_error(50)));
        assert!(!is_unsupported(&io::Error::from_raw_os_error(1)));
        assert!(!is_unsupported(&io::Error::from_raw_os_error(87)));
    }

    #[test]
    fn a_short_buffer_is_refused_before_the_call() {
        // The handle is never used: the length check comes first. Any open file will do.
        let file = File::open(std::env::current_exe().unwrap()).unwrap();
        let dev = Device { file };
        let mut buf = vec![0u8; Op::Run.buffer_size() - 1];
        let e = dev.ioctl(Op::Run, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
