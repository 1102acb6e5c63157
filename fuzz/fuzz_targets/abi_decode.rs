//! libFuzzer entry point of the `abi_decode` target; the harness is `smudge_fuzz::abi_decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| smudge_fuzz::abi_decode::run(data));
