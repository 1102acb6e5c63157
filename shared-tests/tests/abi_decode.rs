//! The user/kernel ABI decoder against arbitrary bytes (it must never panic and must refuse
//! everything the rules forbid) and against valid requests (they round-trip exactly).

use proptest::prelude::*;
use smudge_core::abi::*;
use smudge_core::dirty::Mode;

fn op_strategy() -> impl Strategy<Value = Op> {
    prop::sample::select(Op::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    /// Any bytes, any request: a typed answer, never a panic; and whatever is accepted obeys
    /// the documented limits.
    #[test]
    fn decoder_never_panics_and_enforces_limits(op in op_strategy(), bytes in prop::collection::vec(any::<u8>(), 0..700), version_ok in any::<bool>()) {
        let mut b = bytes;
        if version_ok && b.len() >= 4 {
            b[..4].copy_from_slice(&VERSION.to_le_bytes());
        }
        match decode(op, &b) {
            Err(_) => {}
            Ok(Request::Setup { mem_bytes, vcpus, page_limit, .. }) => {
                prop_assert!(mem_bytes % (2 << 20) == 0 && (MIN_MEM..=MAX_MEM).contains(&mem_bytes));
                prop_assert!((1..=MAX_VCPUS).contains(&vcpus));
                prop_assert!(page_limit <= mem_bytes / 4096);
            }
            Ok(Request::LoadElf { image, len }) => prop_assert!(image != 0 && len > 0 && len <= MAX_IMAGE && image.checked_add(len).is_some()),
            Ok(Request::Run { vcpu }) => prop_assert!(vcpu < MAX_VCPUS),
            Ok(Request::Mem { buf, len, .. }) => prop_assert!(buf != 0 && len > 0 && len <= MAX_COPY),
            Ok(Request::DirtyLog { bitmap, bitmap_len, .. }) => prop_assert!(bitmap != 0 && bitmap_len > 0),
            Ok(Request::GetRegs { vcpu }) => prop_assert!(vcpu < MAX_VCPUS),
            Ok(Request::SetRegs { vcpu, regs }) => {
                prop_assert!(vcpu < MAX_VCPUS);
                prop_assert!(regs.rflags & RFLAGS_MUST_BE_0 == 0 && regs.rflags & RFLAGS_MUST_BE_1 != 0);
                prop_assert!(is_canonical(regs.rip));
            }
            Ok(Request::AddSlot { gpa, size }) => {
                prop_assert!(gpa % 4096 == 0 && size % 4096 == 0 && size > 0 && size <= MAX_SLOT);
                prop_assert!(gpa.checked_add(size).is_some_and(|e| e <= GPA_LIMIT));
            }
            Ok(_) => {}
        }
    }

    /// A request shorter than its struct is refused as truncated (or for its version).
    #[test]
    fn short_buffers_are_refused(op in op_strategy(), cut in 0usize..64) {
        let mut b = vec![0u8; op.request_size()];
        b[..4].copy_from_slice(&VERSION.to_le_bytes());
        let n = cut.min(op.request_size().saturating_sub(1));
        if op.request_size() > 4 {
            prop_assert!(decode(op, &b[..n]).is_err());
        }
    }

    /// Valid setup requests round-trip through the wire encoding and the decoder.
    #[test]
    fn setup_round_trips(mode in 0u32..4, mib in 2u64..=2048, vcpus in 1u32..=MAX_VCPUS, limit in any::<u32>()) {
        let req = SetupReq { version: VERSION, mode, mem_bytes: mib * (2 << 20), vcpus, page_limit: limit };
        let mut b = vec![0u8; Op::Setup.buffer_size()];
        req.to_bytes(&mut b).unwrap();
        prop_assert_eq!(SetupReq::from_bytes(&b).unwrap(), req);
        let want_mode = [None, Some(Mode::AdScan), Some(Mode::Pml), Some(Mode::WriteProtect)][mode as usize];
        match decode(Op::Setup, &b).unwrap() {
            Request::Setup { mode: m, mem_bytes, vcpus: v, .. } => {
                prop_assert_eq!(m, want_mode);
                prop_assert_eq!(mem_bytes, req.mem_bytes);
                prop_assert_eq!(v, vcpus);
            }
            other => prop_assert!(false, "decoded as {other:?}"),
        }
    }
}

#[test]
fn ioctl_numbers_are_distinct_and_encode_their_sizes() {
    for (i, a) in Op::ALL.iter().enumerate() {
        // _IOWR('S', nr, size): dir 3 in 31:30, size in 29:16 (include/uapi/asm-generic/ioctl.h).
        let n = a.linux_ioctl();
        assert_eq!(n >> 30, 3);
        assert_eq!(((n >> 16) & 0x3fff) as usize, a.buffer_size());
        assert_eq!((n >> 8) & 0xff, u32::from(b'S'));
        assert_eq!(Op::from_linux_ioctl(n), Some(*a));
        assert_eq!(Op::from_windows_ioctl(a.windows_ioctl()), Some(*a));
        for b in &Op::ALL[i + 1..] {
            assert_ne!(a.linux_ioctl(), b.linux_ioctl());
            assert_ne!(a.windows_ioctl(), b.windows_ioctl());
        }
    }
    assert!(
        Op::ALL.iter().all(|o| o.buffer_size() <= 1024),
        "the shims copy requests through a 1 KiB buffer"
    );
}

#[test]
fn bad_fields_get_their_own_error() {
    let setup = |mode, mem, vcpus| {
        let mut b = vec![0u8; 64];
        SetupReq {
            version: VERSION,
            mode,
            mem_bytes: mem,
            vcpus,
            page_limit: 0,
        }
        .to_bytes(&mut b)
        .unwrap();
        decode(Op::Setup, &b)
    };
    assert_eq!(setup(4, 64 << 20, 1), Err(AbiError::BadMode));
    assert_eq!(setup(0, (64 << 20) + 4096, 1), Err(AbiError::BadMemSize));
    assert_eq!(setup(0, 2 << 20, 1), Err(AbiError::BadMemSize));
    assert_eq!(setup(0, 64 << 20, 0), Err(AbiError::BadVcpu));
    assert_eq!(setup(0, 64 << 20, MAX_VCPUS + 1), Err(AbiError::BadVcpu));
    let mut b = vec![0u8; 64];
    LoadElfReq {
        version: VERSION,
        reserved: 0,
        image: u64::MAX - 10,
        len: 100,
    }
    .to_bytes(&mut b)
    .unwrap();
    assert_eq!(decode(Op::LoadElf, &b), Err(AbiError::BadPointer));
    LoadElfReq {
        version: VERSION,
        reserved: 1,
        image: 0x1000,
        len: 100,
    }
    .to_bytes(&mut b)
    .unwrap();
    assert_eq!(decode(Op::LoadElf, &b), Err(AbiError::ReservedNonZero));
    LoadElfReq {
        version: VERSION,
        reserved: 0,
        image: 0x1000,
        len: MAX_IMAGE + 1,
    }
    .to_bytes(&mut b)
    .unwrap();
    assert_eq!(decode(Op::LoadElf, &b), Err(AbiError::BadLength));
    LoadElfReq {
        version: VERSION + 1,
        reserved: 0,
        image: 0x1000,
        len: 1,
    }
    .to_bytes(&mut b)
    .unwrap();
    assert_eq!(decode(Op::LoadElf, &b), Err(AbiError::BadVersion));
}
