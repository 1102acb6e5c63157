//! Well-formed requests (encoded with the ABI's own `Wire` structs) on one open of the device,
//! and the raw path that sends any bytes under any request number.

use std::sync::atomic::{AtomicBool, Ordering};

use smudge_core::abi::{self, exit_kind, Op, RunResp, Wire};

use crate::sys;

/// The request buffer of `op` holding `req` (the ioctl's size field is `op.buffer_size()`).
pub fn encode<T: Wire>(op: Op, req: &T) -> Vec<u8> {
    let mut buf = vec![0u8; op.buffer_size()];
    let n = req.to_bytes(&mut buf).unwrap_or(0);
    assert!(
        n > 0 && n <= buf.len(),
        "{op:?}: request does not fit its buffer"
    );
    buf
}

/// The buffer of STATS and CAPS: the version alone.
pub fn version_only(op: Op, version: u32) -> Vec<u8> {
    let mut buf = vec![0u8; op.buffer_size()];
    buf[..4].copy_from_slice(&version.to_le_bytes());
    buf
}

/// A well-formed request of every kind, for the cases that break one thing at a time.
pub fn sample(op: Op, image: u64, bitmap: u64) -> Vec<u8> {
    let v = abi::VERSION;
    match op {
        Op::Setup => encode(
            op,
            &abi::SetupReq {
                version: v,
                mode: 0,
                mem_bytes: 4 << 20,
                vcpus: 1,
                page_limit: 0,
            },
        ),
        Op::LoadElf => encode(
            op,
            &abi::LoadElfReq {
                version: v,
                reserved: 0,
                image,
                len: 4096,
            },
        ),
        Op::Run => encode(
            op,
            &abi::RunReq {
                version: v,
                vcpu: 0,
            },
        ),
        Op::GetDirtyLog | Op::HarvestDirtyLog => encode(
            op,
            &abi::DirtyLogReq {
                version: v,
                slot: 0,
                bitmap,
                bitmap_len: 4096,
            },
        ),
        Op::ClearDirtyLog => encode(
            op,
            &abi::ClearDirtyLogReq {
                version: v,
                slot: 0,
                first_page: 0,
                num_pages: 64,
                mask: bitmap,
            },
        ),
        Op::Explain => encode(
            op,
            &abi::ExplainReq {
                version: v,
                gpa: 0x100000,
                ..Default::default()
            },
        ),
        Op::WriteGuest | Op::ReadGuest => encode(
            op,
            &abi::MemReq {
                version: v,
                reserved: 0,
                gpa: 0x200000,
                buf: bitmap,
                len: 64,
            },
        ),
        Op::Stats | Op::Caps => version_only(op, v),
        Op::AddSlot => encode(
            op,
            &abi::AddSlotReq {
                version: v,
                reserved: 0,
                gpa: 1 << 30,
                size: 1 << 20,
            },
        ),
        Op::CreateVcpu => encode(
            op,
            &abi::CreateVcpuReq {
                version: v,
                reserved: 0,
            },
        ),
        Op::SetMode => encode(
            op,
            &abi::SetModeReq {
                version: v,
                mode: 0,
            },
        ),
        Op::GetRegs => encode(
            op,
            &abi::VcpuReq {
                version: v,
                vcpu: 0,
            },
        ),
        Op::SetRegs => encode(
            op,
            &abi::SetRegsReq {
                version: v,
                vcpu: 0,
                regs: abi::Regs {
                    rflags: 0x2,
                    rip: 0x10_0000,
                    ..Default::default()
                },
            },
        ),
    }
}

/// One open of the device: one VM. Closed once, by [`Vm::close`] or on drop.
pub struct Vm {
    /// The descriptor.
    pub fd: i32,
    closed: AtomicBool,
}

impl Vm {
    /// Opens the device.
    pub fn open() -> Result<Vm, i32> {
        Ok(Vm {
            fd: sys::open_dev()?,
            closed: AtomicBool::new(false),
        })
    }

    /// Closes the descriptor now (other threads may still be inside an ioctl on it).
    pub fn close(&self) -> Result<(), i32> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        sys::close(self.fd)
    }

    /// Sends `buf` (in place: the response comes back in it).
    pub fn send(&self, op: Op, buf: &mut [u8]) -> Result<(), i32> {
        sys::ioctl(self.fd, op.linux_ioctl(), buf.as_mut_ptr() as u64)
    }

    /// Sends `buf` under the raw request number `cmd`.
    pub fn send_raw(&self, cmd: u32, buf: &mut [u8]) -> Result<(), i32> {
        sys::ioctl(self.fd, cmd, buf.as_mut_ptr() as u64)
    }

    /// SETUP.
    pub fn setup(&self, mem_bytes: u64, vcpus: u32, mode: u32, page_limit: u32) -> Result<(), i32> {
        let mut b = encode(
            Op::Setup,
            &abi::SetupReq {
                version: abi::VERSION,
                mode,
                mem_bytes,
                vcpus,
                page_limit,
            },
        );
        self.send(Op::Setup, &mut b)
    }

    /// LOAD_ELF of `image`; returns the entry point.
    pub fn load(&self, image: &[u8]) -> Result<u64, i32> {
        self.load_at(image.as_ptr() as u64, image.len() as u64)
    }

    /// LOAD_ELF of `len` bytes at `addr`.
    pub fn load_at(&self, addr: u64, len: u64) -> Result<u64, i32> {
        let mut b = encode(
            Op::LoadElf,
            &abi::LoadElfReq {
                version: abi::VERSION,
                reserved: 0,
                image: addr,
                len,
            },
        );
        self.send(Op::LoadElf, &mut b)?;
        Ok(abi::LoadElfResp::from_bytes(&b)
            .map(|r| r.entry)
            .unwrap_or(0))
    }

    /// RUN vCPU `vcpu` once.
    pub fn run(&self, vcpu: u32) -> Result<RunResp, i32> {
        let mut b = encode(
            Op::Run,
            &abi::RunReq {
                version: abi::VERSION,
                vcpu,
            },
        );
        self.send(Op::Run, &mut b)?;
        RunResp::from_bytes(&b).map_err(|_| libc::EPROTO)
    }

    /// GET_DIRTY_LOG (`harvest` = false) or HARVEST_DIRTY_LOG of slot 0 into `bitmap`.
    pub fn dirty_log(&self, harvest: bool, bitmap: &mut [u64]) -> Result<(), i32> {
        self.dirty_log_at(
            harvest,
            0,
            bitmap.as_mut_ptr() as u64,
            std::mem::size_of_val(bitmap) as u64,
        )
    }

    /// The same with every field chosen by the caller.
    pub fn dirty_log_at(
        &self,
        harvest: bool,
        slot: u32,
        bitmap: u64,
        bitmap_len: u64,
    ) -> Result<(), i32> {
        let op = if harvest {
            Op::HarvestDirtyLog
        } else {
            Op::GetDirtyLog
        };
        let mut b = encode(
            op,
            &abi::DirtyLogReq {
                version: abi::VERSION,
                slot,
                bitmap,
                bitmap_len,
            },
        );
        self.send(op, &mut b)
    }

    /// CLEAR_DIRTY_LOG.
    pub fn clear(&self, slot: u32, first_page: u64, num_pages: u64, mask: u64) -> Result<(), i32> {
        let mut b = encode(
            Op::ClearDirtyLog,
            &abi::ClearDirtyLogReq {
                version: abi::VERSION,
                slot,
                first_page,
                num_pages,
                mask,
            },
        );
        self.send(Op::ClearDirtyLog, &mut b)
    }

    /// EXPLAIN.
    pub fn explain(&self, gpa: u64) -> Result<abi::ExplainResp, i32> {
        let mut b = encode(
            Op::Explain,
            &abi::ExplainReq {
                version: abi::VERSION,
                gpa,
                ..Default::default()
            },
        );
        self.send(Op::Explain, &mut b)?;
        abi::ExplainResp::from_bytes(&b).map_err(|_| libc::EPROTO)
    }

    /// STATS.
    pub fn stats(&self) -> Result<abi::StatsResp, i32> {
        let mut b = version_only(Op::Stats, abi::VERSION);
        self.send(Op::Stats, &mut b)?;
        abi::StatsResp::from_bytes(&b).map_err(|_| libc::EPROTO)
    }

    /// READ_GUEST (`write` = false) or WRITE_GUEST of `len` bytes at user address `buf`.
    pub fn mem(&self, write: bool, gpa: u64, buf: u64, len: u64) -> Result<(), i32> {
        let op = if write { Op::WriteGuest } else { Op::ReadGuest };
        let mut b = encode(
            op,
            &abi::MemReq {
                version: abi::VERSION,
                reserved: 0,
                gpa,
                buf,
                len,
            },
        );
        self.send(op, &mut b)
    }

    /// ADD_SLOT; returns the slot index.
    pub fn add_slot(&self, gpa: u64, size: u64) -> Result<u32, i32> {
        let mut b = encode(
            Op::AddSlot,
            &abi::AddSlotReq {
                version: abi::VERSION,
                reserved: 0,
                gpa,
                size,
            },
        );
        self.send(Op::AddSlot, &mut b)?;
        abi::AddSlotResp::from_bytes(&b)
            .map(|r| r.slot)
            .map_err(|_| libc::EPROTO)
    }

    /// CREATE_VCPU; returns the vCPU index.
    pub fn create_vcpu(&self) -> Result<u32, i32> {
        let mut b = encode(
            Op::CreateVcpu,
            &abi::CreateVcpuReq {
                version: abi::VERSION,
                reserved: 0,
            },
        );
        self.send(Op::CreateVcpu, &mut b)?;
        abi::CreateVcpuResp::from_bytes(&b)
            .map(|r| r.vcpu)
            .map_err(|_| libc::EPROTO)
    }

    /// SET_MODE (0 auto, 1 ad, 2 pml, 3 wp).
    pub fn set_mode(&self, mode: u32) -> Result<(), i32> {
        let mut b = encode(
            Op::SetMode,
            &abi::SetModeReq {
                version: abi::VERSION,
                mode,
            },
        );
        self.send(Op::SetMode, &mut b)
    }

    /// GET_REGS.
    pub fn get_regs(&self, vcpu: u32) -> Result<abi::Regs, i32> {
        let mut b = encode(
            Op::GetRegs,
            &abi::VcpuReq {
                version: abi::VERSION,
                vcpu,
            },
        );
        self.send(Op::GetRegs, &mut b)?;
        abi::Regs::from_bytes(&b).map_err(|_| libc::EPROTO)
    }

    /// SET_REGS.
    pub fn set_regs(&self, vcpu: u32, regs: &abi::Regs) -> Result<(), i32> {
        let mut b = encode(
            Op::SetRegs,
            &abi::SetRegsReq {
                version: abi::VERSION,
                vcpu,
                regs: *regs,
            },
        );
        self.send(Op::SetRegs, &mut b)
    }

    /// Runs vCPU `vcpu` until an exit other than CONSOLE, INTERRUPTED or CHECKPOINT (harvesting
    /// at checkpoints, as the tool does); returns the last record and the console output.
    pub fn run_to_end(&self, vcpu: u32, mem_bytes: u64) -> Result<(RunResp, String), i32> {
        let mut console = Vec::new();
        let mut bitmap = vec![0u64; (mem_bytes / 4096).div_ceil(64) as usize];
        loop {
            let r = self.run(vcpu)?;
            let n = (r.console_len as usize).min(r.console.len());
            console.extend_from_slice(&r.console[..n]);
            match r.kind {
                exit_kind::CONSOLE | exit_kind::INTERRUPTED => {}
                exit_kind::CHECKPOINT => self.dirty_log(true, &mut bitmap)?,
                _ => return Ok((r, String::from_utf8_lossy(&console).into_owned())),
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// The NUL-terminated message of an ERROR record.
pub fn message(r: &RunResp) -> String {
    let end = r
        .message
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(r.message.len());
    String::from_utf8_lossy(&r.message[..end]).into_owned()
}

/// A short description of a run record.
pub fn describe(r: &RunResp) -> String {
    match r.kind {
        exit_kind::HLT => "hlt".into(),
        exit_kind::EXIT => format!("exit code {}", r.code),
        exit_kind::CHECKPOINT => "checkpoint".into(),
        exit_kind::CONSOLE => "console".into(),
        exit_kind::MMIO => format!("mmio at {:#x}", r.gpa),
        exit_kind::TRIPLE_FAULT => "triple fault".into(),
        exit_kind::INTERRUPTED => "interrupted".into(),
        exit_kind::ERROR => format!("error (exit reason {}): {}", r.reason, message(r)),
        k => format!("unknown kind {k}"),
    }
}
