//! libFuzzer entry point of the `vm_ops` target; the harness is `smudge_fuzz::vm_ops`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| smudge_fuzz::vm_ops::run(data));
