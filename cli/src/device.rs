//! Typed requests to the driver: each encodes its `abi` struct with [`Wire`], sends it through
//! the OS seam and decodes the response. [`Vmm`] is the interface the commands use, so the
//! command logic runs in tests against a scripted fake.

use std::io;

use smudge_core::abi::{self, Op, Wire};

/// A failed request: which one, and the OS error.
#[derive(Debug)]
pub struct ReqError {
    /// The request.
    pub op: Op,
    /// What the OS said.
    pub err: io::Error,
}

impl std::fmt::Display for ReqError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if crate::os::is_host_page_cap(&self.err) {
            // The OS's text for this code ("Disk quota exceeded") would mislead.
            return write!(
                f,
                "{:?} request failed: {}",
                self.op,
                smudge_core::error::HOST_PAGE_CAP_MESSAGE
            );
        }
        write!(f, "{:?} request failed: {}", self.op, self.err)
    }
}

impl std::error::Error for ReqError {}

/// Result of one request.
pub type ReqResult<T> = Result<T, ReqError>;

/// The driver's requests, as the commands use them.
pub trait Vmm {
    /// SETUP: RAM, dirty mode, vCPUs.
    fn setup(&mut self, req: &abi::SetupReq) -> ReqResult<()>;
    /// LOAD_ELF: returns the entry point.
    fn load_elf(&mut self, image: &[u8]) -> ReqResult<u64>;
    /// RUN a vCPU until it exits to user space.
    fn run(&mut self, vcpu: u32) -> ReqResult<abi::RunResp>;
    /// GET_DIRTY_LOG (`harvest` = false) or HARVEST_DIRTY_LOG of `slot` into `bitmap`.
    fn dirty_log(&mut self, slot: u32, harvest: bool, bitmap: &mut [u64]) -> ReqResult<()>;
    /// STATS.
    fn stats(&mut self) -> ReqResult<abi::StatsResp>;
    /// EXPLAIN one guest-physical address.
    fn explain(&mut self, gpa: u64, user_va: u64) -> ReqResult<abi::ExplainResp>;
    /// Maps guest RAM read-only into this process (mmap of the VM's descriptor); returns the
    /// address of GPA 0, or None where the OS backend cannot.
    fn map_guest(&mut self, _len: u64) -> Option<u64> {
        None
    }
    /// CAPS.
    fn caps(&mut self) -> ReqResult<abi::CapsResp>;
}

/// A buffer of the size the ioctl number encodes.
fn buffer(op: Op) -> Vec<u8> {
    vec![0u8; op.buffer_size()]
}

fn encode<T: Wire>(op: Op, req: &T) -> ReqResult<Vec<u8>> {
    let mut buf = buffer(op);
    req.to_bytes(&mut buf).map_err(|e| ReqError {
        op,
        err: io::Error::new(io::ErrorKind::InvalidInput, e.message()),
    })?;
    Ok(buf)
}

fn decode<T: Wire>(op: Op, buf: &[u8]) -> ReqResult<T> {
    T::from_bytes(buf).map_err(|e| ReqError {
        op,
        err: io::Error::new(io::ErrorKind::InvalidData, e.message()),
    })
}

impl crate::os::Device {
    fn send(&self, op: Op, buf: &mut [u8]) -> ReqResult<()> {
        self.ioctl(op, buf).map_err(|err| ReqError { op, err })
    }
}

impl Vmm for crate::os::Device {
    fn setup(&mut self, req: &abi::SetupReq) -> ReqResult<()> {
        let mut buf = encode(Op::Setup, req)?;
        self.send(Op::Setup, &mut buf)
    }

    fn load_elf(&mut self, image: &[u8]) -> ReqResult<u64> {
        let req = abi::LoadElfReq {
            version: abi::VERSION,
            reserved: 0,
            image: image.as_ptr() as u64,
            len: image.len() as u64,
        };
        let mut buf = encode(Op::LoadElf, &req)?;
        self.send(Op::LoadElf, &mut buf)?;
        Ok(decode::<abi::LoadElfResp>(Op::LoadElf, &buf)?.entry)
    }

    fn run(&mut self, vcpu: u32) -> ReqResult<abi::RunResp> {
        let mut buf = encode(
            Op::Run,
            &abi::RunReq {
                version: abi::VERSION,
                vcpu,
            },
        )?;
        match self.send(Op::Run, &mut buf) {
            Ok(()) => decode(Op::Run, &buf),
            // A signal that arrived before the driver could report it: same as INTERRUPTED.
            Err(e) if e.err.kind() == io::ErrorKind::Interrupted => Ok(abi::RunResp {
                kind: abi::exit_kind::INTERRUPTED,
                ..abi::RunResp::default()
            }),
            Err(e) => Err(e),
        }
    }

    fn dirty_log(&mut self, slot: u32, harvest: bool, bitmap: &mut [u64]) -> ReqResult<()> {
        let op = if harvest {
            Op::HarvestDirtyLog
        } else {
            Op::GetDirtyLog
        };
        let req = abi::DirtyLogReq {
            version: abi::VERSION,
            slot,
            bitmap: bitmap.as_mut_ptr() as u64,
            bitmap_len: std::mem::size_of_val(bitmap) as u64,
        };
        let mut buf = encode(op, &req)?;
        self.send(op, &mut buf)
    }

    fn stats(&mut self) -> ReqResult<abi::StatsResp> {
        let mut buf = encode(Op::Stats, &VersionOnly(abi::VERSION))?;
        self.send(Op::Stats, &mut buf)?;
        decode(Op::Stats, &buf)
    }

    fn map_guest(&mut self, len: u64) -> Option<u64> {
        #[cfg(target_os = "linux")]
        {
            self.map_ro(len)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = len;
            None
        }
    }

    fn explain(&mut self, gpa: u64, user_va: u64) -> ReqResult<abi::ExplainResp> {
        let mut buf = encode(
            Op::Explain,
            &abi::ExplainReq {
                version: abi::VERSION,
                reserved: 0,
                gpa,
                user_va,
            },
        )?;
        self.send(Op::Explain, &mut buf)?;
        decode(Op::Explain, &buf)
    }

    fn caps(&mut self) -> ReqResult<abi::CapsResp> {
        let mut buf = encode(Op::Caps, &VersionOnly(abi::VERSION))?;
        self.send(Op::Caps, &mut buf)?;
        decode(Op::Caps, &buf)
    }
}

/// The request of STATS and CAPS: just the ABI version.
pub struct VersionOnly(pub u32);

impl Wire for VersionOnly {
    fn to_bytes(&self, buf: &mut [u8]) -> Result<usize, abi::AbiError> {
        abi::Writer::new(buf).u32(&self.0).map(|_| 4)
    }
    fn from_bytes(buf: &[u8]) -> Result<Self, abi::AbiError> {
        abi::Reader::new(buf).u32().map(VersionOnly)
    }
}
