//! Host tests of the Windows side of the ABI (`smudge_core::abi::windows`): the ioctl codes
//! and lengths, the NTSTATUS mapping, the user-range rule, the device's DACL and the RUN policy.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod budget {
    use smudge_core::abi::windows::*;

    #[test]
    fn the_stay_is_far_below_the_dpc_watchdog_and_the_slice_holds_many_stays() {
        let (Some(stay), Some(slice)) = (POLICY.stay_ns, POLICY.slice_ns) else {
            panic!("Windows bounds both");
        };
        // The single-DPC watchdog limit is on the order of seconds; 1 ms is three orders below.
        assert!(stay * 1000 <= 1_000_000_000);
        assert!(slice >= 10 * stay);
    }

    #[test]
    fn waiters_spin_first_then_sleep() {
        assert_eq!(pause(0), Pause::Spin);
        assert_eq!(pause(SPIN_NS - 1), Pause::Spin);
        assert_eq!(pause(SPIN_NS), Pause::Sleep);
        // The spin lasts a couple of stays; the sleep is relative (negative) and one stay long
        // (100 ns units).
        let stay = POLICY.stay_ns.unwrap_or(0);
        assert!(SPIN_NS >= 2 * stay);
        assert!(SLEEP < 0 && (-SLEEP as u64) * 100 == stay);
    }
}

mod ioctl {
    use smudge_core::abi::windows::*;

    use smudge_core::abi::Op;

    #[test]
    fn core_codes_do_not_collide_with_the_version_query_and_are_buffered() {
        for op in Op::ALL {
            let code = op.windows_ioctl();
            assert_ne!(code, IOCTL_SMUDGE_GET_VERSION);
            assert_eq!(code & 3, METHOD_BUFFERED, "{op:?}");
            assert_eq!(code >> 16, FILE_DEVICE_UNKNOWN, "{op:?}");
            assert_eq!(Op::from_windows_ioctl(code), Some(op));
        }
        assert_eq!(Op::from_windows_ioctl(IOCTL_SMUDGE_GET_VERSION), None);
    }

    #[test]
    fn request_and_response_lengths_are_both_enforced() {
        // RunReq is two u32 (8 bytes); RunResp is the fields of abi.rs added up.
        let resp = 4 + 4 + 8 + 8 + 4 + 4 + 256 + smudge_core::abi::MESSAGE_LEN;
        assert_eq!(check_lengths(Op::Run, 8, resp), Ok(()));
        assert_eq!(
            check_lengths(Op::Run, 7, resp),
            Err(STATUS_INVALID_PARAMETER)
        );
        assert_eq!(
            check_lengths(Op::Run, 8, resp - 1),
            Err(STATUS_BUFFER_TOO_SMALL)
        );
        assert_eq!(check_lengths(Op::Run, 4096, 4096), Ok(()));
        assert_eq!(Op::Run.response_size(), resp);
        // Setup answers nothing: an empty output buffer is fine, a short input is not.
        assert_eq!(check_lengths(Op::Setup, 24, 0), Ok(()));
        assert_eq!(
            check_lengths(Op::Setup, 23, 0),
            Err(STATUS_INVALID_PARAMETER)
        );
        // Stats takes only the version word.
        assert_eq!(
            check_lengths(Op::Stats, 4, Op::Stats.response_size()),
            Ok(())
        );
        assert_eq!(
            check_lengths(Op::Stats, 0, Op::Stats.response_size()),
            Err(STATUS_INVALID_PARAMETER)
        );
    }

    #[test]
    fn ctl_code_matches_the_devioctl_h_formula() {
        // CTL_CODE(0x22, 0x800, METHOD_BUFFERED, FILE_READ_ACCESS), worked by hand:
        // 0x22 << 16 = 0x220000, 1 << 14 = 0x4000, 0x800 << 2 = 0x2000 -> 0x226000.
        assert_eq!(IOCTL_SMUDGE_GET_VERSION, 0x0022_6000);
        // The method and access fields decode back out of the code (devioctl.h's METHOD_FROM_CTL_CODE).
        assert_eq!(IOCTL_SMUDGE_GET_VERSION & 3, METHOD_BUFFERED);
        assert_eq!((IOCTL_SMUDGE_GET_VERSION >> 14) & 3, FILE_READ_ACCESS);
    }

    fn info() -> VersionInfo {
        VersionInfo {
            magic: MAGIC,
            abi_version: ABI_VERSION,
            driver_version: 0x000100,
            features: 0b0011,
            vmcs_revision: 0x2b,
            processors: 2,
        }
    }

    #[test]
    fn version_answer_layout() {
        let mut buf = [0xAAu8; 32];
        assert_eq!(
            dispatch(IOCTL_SMUDGE_GET_VERSION, 0, &mut buf, &info()),
            Ok(24)
        );
        assert_eq!(&buf[0..4], b"SMDG");
        assert_eq!(&buf[4..8], &[1, 0, 0, 0]);
        assert_eq!(&buf[12..16], &[3, 0, 0, 0]);
        assert_eq!(&buf[16..20], &[0x2b, 0, 0, 0]);
        assert_eq!(&buf[20..24], &[2, 0, 0, 0]);
        // Bytes past the answer are untouched.
        assert_eq!(&buf[24..], &[0xAA; 8]);
    }

    #[test]
    fn lengths_are_validated() {
        let mut short = [0u8; 23];
        assert_eq!(
            dispatch(IOCTL_SMUDGE_GET_VERSION, 0, &mut short, &info()),
            Err(STATUS_BUFFER_TOO_SMALL)
        );
        assert_eq!(short, [0u8; 23]);
        let mut buf = [0u8; 24];
        assert_eq!(
            dispatch(IOCTL_SMUDGE_GET_VERSION, 4, &mut buf, &info()),
            Err(STATUS_INVALID_PARAMETER)
        );
        assert_eq!(
            dispatch(IOCTL_SMUDGE_GET_VERSION, 0, &mut [], &info()),
            Err(STATUS_BUFFER_TOO_SMALL)
        );
    }

    #[test]
    fn unknown_codes_are_invalid_device_requests() {
        let mut buf = [0u8; 64];
        for code in [
            0,
            IOCTL_SMUDGE_GET_VERSION ^ 1,
            ctl_code(FILE_DEVICE_UNKNOWN, 0x801, 0, FILE_READ_ACCESS),
        ] {
            assert_eq!(
                dispatch(code, 0, &mut buf, &info()),
                Err(STATUS_INVALID_DEVICE_REQUEST)
            );
        }
    }
}

mod security {
    use smudge_core::abi::windows::*;

    /// Parses the binary SID back into its string form (MS-DTYP 2.4.2.1), independently of how
    /// the constants were written.
    fn sid_string(b: &[u8]) -> String {
        let auth = b[2..8].iter().fold(0u64, |a, &x| a << 8 | u64::from(x));
        let mut s = format!("S-{}-{auth}", b[0]);
        for i in 0..b[1] as usize {
            let o = 8 + 4 * i;
            let sub = u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
            s += &format!("-{sub}");
        }
        s
    }

    #[test]
    fn sids_are_the_well_known_ones() {
        assert_eq!(sid_string(&SID_LOCAL_SYSTEM), "S-1-5-18");
        assert_eq!(sid_string(&SID_ADMINISTRATORS), "S-1-5-32-544");
        assert_eq!(sid_len(&SID_LOCAL_SYSTEM), SID_LOCAL_SYSTEM.len());
        assert_eq!(sid_len(&SID_ADMINISTRATORS), SID_ADMINISTRATORS.len());
    }

    fn u16_at(b: &[u8], o: usize) -> usize {
        usize::from(u16::from_le_bytes([b[o], b[o + 1]]))
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }

    /// Reads the device's descriptor back as the kernel's SeCaptureSecurityDescriptor would
    /// (MS-DTYP 2.4.6 self-relative SECURITY_DESCRIPTOR, 2.4.5 ACL, 2.4.4.2 ACCESS_ALLOWED_ACE)
    /// and lists its DACL as (SID, mask) pairs.
    #[test]
    fn the_device_descriptor_allows_only_system_and_administrators() {
        let sd = &DEVICE_SECURITY.0;
        assert!(
            std::mem::align_of_val(&DEVICE_SECURITY) >= 4,
            "DWORD aligned"
        );
        assert_eq!(sd[0], 1, "SECURITY_DESCRIPTOR_REVISION");
        // SE_DACL_PRESENT (0x0004) and SE_SELF_RELATIVE (0x8000), nothing else: no
        // inheritance flags, not SE_DACL_DEFAULTED.
        assert_eq!(u16_at(sd, 2), 0x8004);
        let (owner, group, sacl, dacl) =
            (u32_at(sd, 4), u32_at(sd, 8), u32_at(sd, 12), u32_at(sd, 16));
        assert_eq!((owner, group, sacl), (0, 0, 0), "only the DACL is set");
        let acl = &sd[dacl as usize..];
        assert_eq!(dacl % 4, 0);
        assert_eq!((acl[0], acl[1]), (2, 0), "ACL_REVISION, Sbz1");
        assert_eq!(
            u16_at(acl, 2),
            acl.len(),
            "AclSize covers the ACEs and no more"
        );
        assert_eq!(u16_at(acl, 6), 0, "Sbz2");
        let mut aces = Vec::new();
        let mut o = 8;
        for _ in 0..u16_at(acl, 4) {
            let size = u16_at(acl, o + 2);
            assert_eq!(
                (acl[o], acl[o + 1]),
                (0, 0),
                "ACCESS_ALLOWED_ACE_TYPE, no flags"
            );
            assert_eq!(size % 4, 0, "ACEs are DWORD aligned");
            let sid = &acl[o + 8..o + size];
            assert_eq!(
                8 + 4 * usize::from(sid[1]),
                sid.len(),
                "AceSize fits the SID"
            );
            aces.push((sid_string(sid), u32_at(acl, o + 4)));
            o += size;
        }
        assert_eq!(o, acl.len(), "AceCount names every ACE");
        // FILE_ALL_ACCESS = STANDARD_RIGHTS_REQUIRED (0xF0000) | SYNCHRONIZE (0x100000) | 0x1FF.
        let all = 0xF_0000 | 0x10_0000 | 0x1FF;
        assert_eq!(
            aces,
            [
                ("S-1-5-18".to_string(), all),
                ("S-1-5-32-544".to_string(), all)
            ]
        );
    }
}

mod status {
    use smudge_core::abi::windows::*;

    use smudge_core::abi::AbiError;
    use smudge_core::vmx::admission::Refusal;
    use smudge_core::vmx::caps::{Reason, Unsupported};
    use smudge_core::vmx::root::VmxonFailure;

    #[test]
    fn every_failure_status_has_error_severity() {
        // ntstatus.h: bits 31:30 are the severity; 3 = error, 2 = warning (STATUS_DEVICE_BUSY is a
        // warning, which NT_SUCCESS still counts as failure: the value is negative).
        for s in [
            STATUS_DEVICE_BUSY,
            STATUS_INVALID_DEVICE_STATE,
            STATUS_REVISION_MISMATCH,
            STATUS_ACCESS_VIOLATION,
            STATUS_IO_DEVICE_ERROR,
            STATUS_QUOTA_EXCEEDED,
            STATUS_WORKING_SET_QUOTA,
            STATUS_OBJECT_NAME_COLLISION,
        ] {
            assert!(s < 0, "{s:#x} must fail NT_SUCCESS");
        }
        assert_eq!((STATUS_DEVICE_BUSY as u32) >> 30, 2);
    }

    #[test]
    fn refusals_map_to_what_sc_start_reports() {
        assert_eq!(
            from_refusal(Refusal::Core(Unsupported {
                reason: Reason::VmxAbsent
            })),
            STATUS_NOT_SUPPORTED
        );
        assert_eq!(
            from_refusal(Refusal::FeatureControlUnlocked),
            STATUS_DEVICE_CONFIGURATION_ERROR
        );
        assert_eq!(from_refusal(Refusal::VmxInUse), STATUS_RESOURCE_IN_USE);
        assert_eq!(
            from_refusal(Refusal::VmxHiddenByHypervisor),
            STATUS_RESOURCE_IN_USE
        );
        assert_eq!(
            from_refusal(Refusal::AsymmetricProcessors),
            STATUS_HV_FEATURE_UNAVAILABLE
        );
        assert_eq!(from_vmxon(None), STATUS_DEVICE_CONFIGURATION_ERROR);
        assert_eq!(
            from_vmxon(Some(VmxonFailure::InUse)),
            STATUS_RESOURCE_IN_USE
        );
    }

    #[test]
    fn abi_errors_map_like_the_linux_errnos() {
        // Linux: EFAULT for pointers, ENOTTY for unknown requests, EINVAL for the rest.
        assert_eq!(from_abi(AbiError::BadPointer), STATUS_ACCESS_VIOLATION);
        assert_eq!(
            from_abi(AbiError::UnknownRequest),
            STATUS_INVALID_DEVICE_REQUEST
        );
        assert_eq!(from_abi(AbiError::BadMemSize), STATUS_INVALID_PARAMETER);
        assert_eq!(
            from_fail(smudge_core::Error::OutOfMemory.into()),
            STATUS_INSUFFICIENT_RESOURCES
        );
        assert_eq!(
            from_fail(smudge_core::Error::Unsupported.into()),
            STATUS_NOT_SUPPORTED
        );
        assert_eq!(
            from_fail(smudge_core::Error::GpaOutOfRange.into()),
            STATUS_INVALID_PARAMETER
        );
    }
}

mod usercopy {
    use smudge_core::abi::windows::*;

    /// MmUserProbeAddress on x64 Windows (4-level paging): 0x7FFF_FFFF_0000, the 64 KiB below the
    /// end of the 128 TiB user space being a no-access guard region.
    const PROBE: u64 = 0x7FFF_FFFF_0000;

    #[test]
    fn user_ranges_end_at_the_probe_address() {
        assert!(user_range_ok(0x1000, 0x1000, PROBE));
        assert!(user_range_ok(PROBE - 8, 8, PROBE));
        assert!(!user_range_ok(PROBE - 8, 9, PROBE));
        assert!(!user_range_ok(PROBE, 1, PROBE));
    }

    #[test]
    fn kernel_null_empty_and_wrapping_ranges_are_refused() {
        assert!(!user_range_ok(0xFFFF_F800_0000_0000, 8, PROBE));
        assert!(!user_range_ok(0, 8, PROBE));
        assert!(!user_range_ok(0x1000, 0, PROBE));
        assert!(!user_range_ok(u64::MAX - 3, 8, u64::MAX));
    }
}

mod version {
    use smudge_core::abi::windows::*;
    use smudge_core::session::load::Loaded;
    use smudge_core::session::Driver;

    /// The version query of a loaded driver: the capabilities it loaded with, its processors and
    /// the Cargo version packed as major << 16 | minor << 8 | patch (a component above 255
    /// saturates).
    #[test]
    fn the_version_answer_follows_the_loaded_driver() {
        let caps = smudge_tests::fixtures::all_caps()
            .into_iter()
            .find(|(n, _)| n.contains("skylake_x"))
            .map(|(_, c)| c)
            .expect("fixture");
        let mode = caps.choose_mode(false).expect("mode");
        let loaded = Loaded {
            cpus: 3,
            driver: Driver {
                caps,
                mode,
                duties: smudge_core::spec::Duties::NONE,
                probe: false,
            },
        };
        let v = VersionInfo::of(&loaded, "1", "12", "300");
        assert_eq!(v.magic, u32::from_le_bytes(*b"SMDG"));
        assert_eq!(v.driver_version, 1 << 16 | 12 << 8 | 255);
        assert_eq!(v.processors, 3);
        assert_eq!(v.vmcs_revision, caps.revision_id());
        // bit 0 EPT A/D, 1 PML, 2 VPID, 3 unrestricted guest; the mode in bits 15:8.
        let bits = u32::from(caps.ept_ad())
            | u32::from(caps.pml()) << 1
            | u32::from(caps.vpid()) << 2
            | u32::from(caps.unrestricted_guest()) << 3
            | (mode as u32) << 8;
        assert_eq!(v.features, bits);
    }
}

/// IRP_MJ_DEVICE_CONTROL as smudge.sys hands it to the core (`device_control`), driven with
/// the session layer's model OS in its Windows personality.
mod device_control {
    use smudge_core::abi::windows::*;
    use smudge_core::abi::{self, Op, Wire};
    use smudge_core::session::load::Loaded;
    use smudge_core::session::{Fail, Session};
    use smudge_tests::session_model::{skylake, MockOs};

    const VERSION: [&str; 3] = ["1", "12", "255"];

    fn loaded() -> (Loaded, MockOs<true>) {
        let (driver, os) = skylake::<true>(2);
        (Loaded { cpus: 2, driver }, os)
    }

    fn setup_bytes() -> Vec<u8> {
        let mut b = vec![0u8; Op::Setup.buffer_size()];
        let r = abi::SetupReq {
            version: abi::VERSION,
            mode: 0,
            mem_bytes: 8 << 20,
            vcpus: 1,
            page_limit: 0,
        };
        r.to_bytes(&mut b).expect("fits");
        b
    }

    #[test]
    fn the_version_query_answers_from_the_loaded_driver() {
        let (l, os) = loaded();
        let mut buf = [0u8; 32];
        let code = (IOCTL_SMUDGE_GET_VERSION, 0, 32);
        let (status, n) = device_control(&os, Some(l), None, code, &mut buf, VERSION);
        assert_eq!((status, n), (STATUS_SUCCESS, VersionInfo::SIZE));
        let word = |i: usize| u32::from_le_bytes(buf[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(word(0), MAGIC);
        assert_eq!(word(1), ABI_VERSION);
        assert_eq!(word(2), 1 << 16 | 12 << 8 | 255);
        assert_eq!(word(4), l.driver.caps.revision_id());
        assert_eq!(word(5), 2, "the processors in VMX operation");
        // Input where none is taken, an output too small, and no system buffer at all.
        let mut b = [0u8; 32];
        let q = |i, o| (IOCTL_SMUDGE_GET_VERSION, i, o);
        let ask = |c, b: &mut [u8]| device_control(&os, Some(l), None, c, b, VERSION);
        assert_eq!(ask(q(4, 32), &mut b), (STATUS_INVALID_PARAMETER, 0));
        assert_eq!(ask(q(0, 23), &mut b), (STATUS_BUFFER_TOO_SMALL, 0));
        assert_eq!(ask(q(0, 24), &mut []), (STATUS_BUFFER_TOO_SMALL, 0));
    }

    #[test]
    fn nothing_is_answered_after_the_core_unloaded_or_for_another_method() {
        let (l, os) = loaded();
        let s = Session::<MockOs<true>>::new();
        let mut b = setup_bytes();
        let len = b.len();
        let setup = (Op::Setup.windows_ioctl(), len, len);
        let v = (IOCTL_SMUDGE_GET_VERSION, 0, 32);
        for code in [setup, v] {
            let r = device_control(&os, None, Some(&s), code, &mut b, VERSION);
            assert_eq!(r, (STATUS_INVALID_DEVICE_STATE, 0));
        }
        // METHOD_NEITHER (3) with the rest of the SETUP code.
        let neither = (Op::Setup.windows_ioctl() | 3, len, len);
        let r = device_control(&os, Some(l), Some(&s), neither, &mut b, VERSION);
        assert_eq!(r, (STATUS_INVALID_DEVICE_REQUEST, 0));
        let unknown = (
            ctl_code(FILE_DEVICE_UNKNOWN, 0x9ff, METHOD_BUFFERED, 0),
            0,
            0,
        );
        let r = device_control(&os, Some(l), Some(&s), unknown, &mut b, VERSION);
        assert_eq!(r, (STATUS_INVALID_DEVICE_REQUEST, 0));
    }

    #[test]
    fn vm_requests_reach_the_handles_session_with_checked_lengths() {
        let (l, os) = loaded();
        let mut s = Session::<MockOs<true>>::new();
        let mut b = setup_bytes();
        let len = b.len();
        let code = |i, o| (Op::Setup.windows_ioctl(), i, o);
        let ask = |s: Option<&Session<MockOs<true>>>, c, b: &mut [u8]| {
            device_control(&os, Some(l), s, c, b, VERSION)
        };
        // A handle without a session, a short request, no system buffer: nothing is set up.
        assert_eq!(
            ask(None, code(len, len), &mut b),
            (STATUS_INVALID_DEVICE_STATE, 0)
        );
        assert_eq!(
            ask(Some(&s), code(len - 1, len), &mut b),
            (STATUS_INVALID_PARAMETER, 0)
        );
        assert_eq!(
            ask(Some(&s), code(len, len), &mut []),
            (STATUS_INVALID_PARAMETER, 0)
        );
        assert_eq!(ask(Some(&s), code(len, len), &mut b), (STATUS_SUCCESS, 0));
        // The VM exists now: a second SETUP is refused with the session's own failure.
        let mut again = setup_bytes();
        let busy = ask(Some(&s), code(len, len), &mut again);
        assert_eq!(busy, (from_fail(Fail::Busy), 0));
        // STATS answers through the same buffer, as many bytes as its response.
        let n = Op::Stats.buffer_size();
        let mut st = vec![0u8; n];
        st[..4].copy_from_slice(&abi::VERSION.to_le_bytes());
        let stats = (Op::Stats.windows_ioctl(), Op::Stats.request_size(), n);
        let (status, got) = ask(Some(&s), stats, &mut st);
        assert_eq!((status, got), (STATUS_SUCCESS, Op::Stats.response_size()));
        let r = abi::StatsResp::from_bytes(&st).expect("stats");
        assert_eq!(r.vcpus, 1);
        assert!(r.vm_pages > 0);
        s.release(&os);
    }
}
