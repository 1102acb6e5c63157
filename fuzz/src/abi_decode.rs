//! Target `abi_decode`: the first byte picks the [`Op`], the rest is the request buffer.
//!
//! Checked on every input:
//! - [`decode`] returns (never panics), and its verdict equals the rules written in the ABI's
//!   documentation (field comments of each request struct), evaluated here on the raw fields;
//!   an accepted request carries exactly the raw fields.
//! - Every [`Wire`] type round-trips: `from_bytes(to_bytes(x)) == x` for `x` built from the fuzz
//!   bytes; the encoding is exactly `size_of::<T>()` bytes and equals the struct's in-memory
//!   `repr(C)` image (what the C side and the shims copy); short buffers give `Truncated`.
//! - The ioctl numbers: `from_linux_ioctl` / `from_windows_ioctl` invert the encoders, and the
//!   buffer size fits the 14 size bits of `_IOC` (include/uapi/asm-generic/ioctl.h).

use smudge_core::abi::*;
use smudge_core::dirty::Mode;

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// A user range as the ABI documents it: non-null, length 1..=max, no wrap.
fn user_range_ok(ptr: u64, len: u64, max: u64) -> bool {
    ptr != 0 && len != 0 && len <= max && ptr.checked_add(len).is_some()
}

/// The request the documentation says `buf` is, or `None` if it must be refused. Fields are read
/// at their `repr(C)` offsets with `offset_of!`, independently of the `Wire` code.
fn expected(op: Op, buf: &[u8]) -> Option<Request> {
    use core::mem::offset_of;
    if buf.len() < op.request_size() || le32(buf, 0) != VERSION {
        return None;
    }
    Some(match op {
        Op::Setup => {
            let mode = match le32(buf, offset_of!(SetupReq, mode)) {
                0 => None,
                1 => Some(Mode::AdScan),
                2 => Some(Mode::Pml),
                3 => Some(Mode::WriteProtect),
                _ => return None,
            };
            let mem = le64(buf, offset_of!(SetupReq, mem_bytes));
            let vcpus = le32(buf, offset_of!(SetupReq, vcpus));
            let limit = le32(buf, offset_of!(SetupReq, page_limit));
            if mem % (2 << 20) != 0
                || !(MIN_MEM..=MAX_MEM).contains(&mem)
                || !(1..=MAX_VCPUS).contains(&vcpus)
            {
                return None;
            }
            let pages = mem / 4096;
            let page_limit = if limit == 0 {
                pages
            } else {
                u64::from(limit).min(pages)
            };
            Request::Setup {
                mode,
                mem_bytes: mem,
                vcpus,
                page_limit,
            }
        }
        Op::LoadElf => {
            let image = le64(buf, offset_of!(LoadElfReq, image));
            let len = le64(buf, offset_of!(LoadElfReq, len));
            if le32(buf, offset_of!(LoadElfReq, reserved)) != 0
                || !user_range_ok(image, len, MAX_IMAGE)
            {
                return None;
            }
            Request::LoadElf { image, len }
        }
        Op::Run => {
            let vcpu = le32(buf, offset_of!(RunReq, vcpu));
            if vcpu >= MAX_VCPUS {
                return None;
            }
            Request::Run { vcpu }
        }
        Op::GetDirtyLog | Op::HarvestDirtyLog => {
            let bitmap = le64(buf, offset_of!(DirtyLogReq, bitmap));
            let bitmap_len = le64(buf, offset_of!(DirtyLogReq, bitmap_len));
            // The largest slot (64 GiB of 4 KiB pages) needs a 2 MiB bitmap.
            if !user_range_ok(bitmap, bitmap_len, 2 << 20) {
                return None;
            }
            Request::DirtyLog {
                slot: le32(buf, offset_of!(DirtyLogReq, slot)),
                bitmap,
                bitmap_len,
                harvest: op == Op::HarvestDirtyLog,
            }
        }
        Op::ClearDirtyLog => {
            let num_pages = le64(buf, offset_of!(ClearDirtyLogReq, num_pages));
            let mask = le64(buf, offset_of!(ClearDirtyLogReq, mask));
            // The mask holds num_pages bits in u64 words.
            if num_pages == 0
                || num_pages > (2 << 20) * 8
                || !user_range_ok(mask, num_pages.div_ceil(64) * 8, 2 << 20)
            {
                return None;
            }
            Request::ClearDirtyLog {
                slot: le32(buf, offset_of!(ClearDirtyLogReq, slot)),
                first_page: le64(buf, offset_of!(ClearDirtyLogReq, first_page)),
                num_pages,
                mask,
            }
        }
        Op::Stats => Request::Stats,
        Op::Caps => Request::Caps,
        Op::Explain => {
            if le32(buf, offset_of!(ExplainReq, reserved)) != 0 {
                return None;
            }
            // user_va is 0 or any user address: the driver looks it up in the caller's own tables.
            Request::Explain {
                gpa: le64(buf, offset_of!(ExplainReq, gpa)),
                user_va: le64(buf, offset_of!(ExplainReq, user_va)),
            }
        }
        Op::WriteGuest | Op::ReadGuest => {
            let ubuf = le64(buf, offset_of!(MemReq, buf));
            let len = le64(buf, offset_of!(MemReq, len));
            if le32(buf, offset_of!(MemReq, reserved)) != 0 || !user_range_ok(ubuf, len, MAX_COPY) {
                return None;
            }
            Request::Mem {
                gpa: le64(buf, offset_of!(MemReq, gpa)),
                buf: ubuf,
                len,
                write: op == Op::WriteGuest,
            }
        }
        Op::AddSlot => {
            let gpa = le64(buf, offset_of!(AddSlotReq, gpa));
            let size = le64(buf, offset_of!(AddSlotReq, size));
            // 4 KiB aligned, 4 KiB..=64 GiB, ending at or below 2^48.
            if le32(buf, offset_of!(AddSlotReq, reserved)) != 0
                || gpa % 4096 != 0
                || size % 4096 != 0
                || size == 0
                || size > 64 << 30
                || u128::from(gpa) + u128::from(size) > 1 << 48
            {
                return None;
            }
            Request::AddSlot { gpa, size }
        }
        Op::CreateVcpu => {
            if le32(buf, offset_of!(CreateVcpuReq, reserved)) != 0 {
                return None;
            }
            Request::CreateVcpu
        }
        Op::SetMode => Request::SetMode {
            mode: match le32(buf, offset_of!(SetModeReq, mode)) {
                0 => None,
                1 => Some(Mode::AdScan),
                2 => Some(Mode::Pml),
                3 => Some(Mode::WriteProtect),
                _ => return None,
            },
        },
        Op::GetRegs => {
            let vcpu = le32(buf, offset_of!(VcpuReq, vcpu));
            if vcpu >= MAX_VCPUS {
                return None;
            }
            Request::GetRegs { vcpu }
        }
        Op::SetRegs => {
            let vcpu = le32(buf, offset_of!(SetRegsReq, vcpu));
            let r = offset_of!(SetRegsReq, regs);
            let q = |field: usize| le64(buf, r + field);
            let regs = Regs {
                rax: q(offset_of!(Regs, rax)),
                rbx: q(offset_of!(Regs, rbx)),
                rcx: q(offset_of!(Regs, rcx)),
                rdx: q(offset_of!(Regs, rdx)),
                rsi: q(offset_of!(Regs, rsi)),
                rdi: q(offset_of!(Regs, rdi)),
                rsp: q(offset_of!(Regs, rsp)),
                rbp: q(offset_of!(Regs, rbp)),
                r8: q(offset_of!(Regs, r8)),
                r9: q(offset_of!(Regs, r9)),
                r10: q(offset_of!(Regs, r10)),
                r11: q(offset_of!(Regs, r11)),
                r12: q(offset_of!(Regs, r12)),
                r13: q(offset_of!(Regs, r13)),
                r14: q(offset_of!(Regs, r14)),
                r15: q(offset_of!(Regs, r15)),
                rip: q(offset_of!(Regs, rip)),
                rflags: q(offset_of!(Regs, rflags)),
            };
            // SDM 27.3.1.4: RFLAGS bit 1 set; 63:22, 17 (VM, IA-32e guest), 15, 5, 3 clear; RIP
            // canonical for 48-bit linear addresses (bits 63:47 all equal).
            let f = regs.rflags;
            let rflags_ok =
                f & 2 != 0 && f >> 22 == 0 && f & (1 << 17 | 1 << 15 | 1 << 5 | 1 << 3) == 0;
            let top = regs.rip >> 47;
            let rip_ok = top == 0 || top == 0x1_ffff;
            if vcpu >= MAX_VCPUS || !rflags_ok || !rip_ok {
                return None;
            }
            Request::SetRegs { vcpu, regs }
        }
    })
}

/// The round trip of one wire type on `buf`.
fn round_trip<T: Wire + PartialEq + core::fmt::Debug + Copy>(buf: &[u8]) {
    let size = core::mem::size_of::<T>();
    let Ok(x) = T::from_bytes(buf) else {
        assert!(buf.len() < size, "from_bytes refused a full-size buffer");
        assert_eq!(T::from_bytes(buf).err(), Some(AbiError::Truncated));
        return;
    };
    assert!(
        buf.len() >= size,
        "from_bytes accepted {} bytes for a {size}-byte struct",
        buf.len()
    );
    let mut out = vec![0u8; size + 8];
    let n = x
        .to_bytes(&mut out)
        .expect("to_bytes into a large enough buffer");
    assert_eq!(
        n, size,
        "encoding length differs from size_of (padding or a missing field)"
    );
    assert_eq!(
        &out[..n],
        &buf[..n],
        "encode(decode(bytes)) differs from the bytes"
    );
    assert_eq!(T::from_bytes(&out[..n]).expect("decode of an encoding"), x);
    // SAFETY: `x` is a plain-old-data `repr(C)` struct of integers and byte arrays; `n == size`
    // shows the fields cover every byte (no padding), so all `size` bytes are initialized.
    let image = unsafe { core::slice::from_raw_parts((&x as *const T).cast::<u8>(), size) };
    assert_eq!(
        &out[..n],
        image,
        "wire encoding is not the repr(C) image (little-endian host)"
    );
    assert_eq!(x.to_bytes(&mut out[..size - 1]), Err(AbiError::Truncated));
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&first, buf)) = data.split_first() else {
        return;
    };
    let op = Op::ALL[usize::from(first) % Op::ALL.len()];

    let got = decode(op, buf);
    let want = expected(op, buf);
    match (got, want) {
        (Ok(g), Some(w)) => assert_eq!(g, w, "{op:?}: decoded fields differ from the raw request"),
        (Err(_), None) => {}
        (g, w) => panic!("{op:?}: decode gave {g:?}, the documented rules say {w:?}"),
    }
    if buf.len() < 4 {
        assert_eq!(got, Err(AbiError::Truncated));
    }

    round_trip::<SetupReq>(buf);
    round_trip::<LoadElfReq>(buf);
    round_trip::<LoadElfResp>(buf);
    round_trip::<RunReq>(buf);
    round_trip::<RunResp>(buf);
    round_trip::<DirtyLogReq>(buf);
    round_trip::<ClearDirtyLogReq>(buf);
    round_trip::<StatsResp>(buf);
    round_trip::<ExplainReq>(buf);
    round_trip::<ExplainResp>(buf);
    round_trip::<MemReq>(buf);
    round_trip::<CapsResp>(buf);
    round_trip::<AddSlotReq>(buf);
    round_trip::<AddSlotResp>(buf);
    round_trip::<CreateVcpuReq>(buf);
    round_trip::<CreateVcpuResp>(buf);
    round_trip::<SetModeReq>(buf);
    round_trip::<Regs>(buf);
    round_trip::<SetRegsReq>(buf);

    // asm-generic/ioctl.h: 14 size bits, direction in 31:30, type in 15:8, number in 7:0.
    assert!(op.buffer_size() < 1 << 14);
    assert_eq!(Op::from_linux_ioctl(op.linux_ioctl()), Some(op));
    assert_eq!(Op::from_windows_ioctl(op.windows_ioctl()), Some(op));
    if buf.len() >= 4 {
        let cmd = le32(buf, 0);
        if let Some(o) = Op::from_linux_ioctl(cmd) {
            assert_eq!(o.linux_ioctl(), cmd);
        }
        if let Some(o) = Op::from_windows_ioctl(cmd) {
            assert_eq!(o.windows_ioctl(), cmd);
        }
    }
}
