//! Host tests of `smudge_windows::security` (the driver's OS-free half).

use crate::security::*;

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

#[test]
fn dacl_fits_both_aces() {
    // 8 + (8 + 12) + (8 + 16).
    assert_eq!(DACL_LEN, 52);
    // RtlCreateAcl wants a multiple of 4 (ACLs are DWORD aligned).
    assert_eq!(DACL_LEN % 4, 0);
}
