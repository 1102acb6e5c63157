//! libFuzzer entry point of the `ept_ops` target; the harness is `smudge_fuzz::ept_ops`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| smudge_fuzz::ept_ops::run(data));
