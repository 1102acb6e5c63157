//! Windows: the DeviceIoControl backend is not written yet. This stub type-checks so that the
//! seam is fixed: `Device::ioctl` will send `abi::Op::windows_ioctl` codes (METHOD_BUFFERED) to
//! `\\.\smudge`, and `Alarm` will cancel the pending RUN (CancelSynchronousIo) at the deadline.

use std::io;
use std::time::Instant;

use smudge_core::abi::Op;

/// The device the Windows driver will create.
pub const DEVICE_PATH: &str = r"\\.\smudge";

/// One open of the device: one VM.
pub struct Device {
    _private: (),
}

impl Device {
    /// Not implemented on Windows yet.
    pub fn open() -> anyhow::Result<Device> {
        Err(anyhow::anyhow!(
            "cannot open {DEVICE_PATH}: the Windows backend (DeviceIoControl) is not implemented in this build"
        ))
    }

    /// Not implemented on Windows yet.
    pub fn ioctl(&self, op: Op, _buf: &mut [u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "DeviceIoControl {:#x} is not implemented in this build",
                op.windows_ioctl()
            ),
        ))
    }
}

/// True when the driver refused a request as unsupported by the CPU.
pub fn is_unsupported(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Unsupported
}

/// The deadline guard (a no-op until the backend exists).
pub struct Alarm;

impl Alarm {
    /// Arms nothing yet.
    pub fn at(_deadline: Instant) -> io::Result<Alarm> {
        Ok(Alarm)
    }
}

impl Device {
    /// Not implemented on Windows yet.
    pub fn try_clone(&self) -> anyhow::Result<Device> {
        Err(anyhow::anyhow!("the Windows backend is not implemented in this build"))
    }
}

/// A thread that can be interrupted (CancelSynchronousIo once the backend exists).
#[derive(Clone, Copy)]
pub struct ThreadHandle;

impl ThreadHandle {
    /// The calling thread.
    pub fn current() -> ThreadHandle {
        ThreadHandle
    }
    /// Nothing to interrupt yet.
    pub fn interrupt(&self) {}
}

/// Nothing to install yet.
pub fn install_interrupt_handler() -> io::Result<()> {
    Ok(())
}
