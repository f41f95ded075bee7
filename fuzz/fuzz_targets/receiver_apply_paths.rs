#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| doppel_fuzz::receiver_apply_paths(data));
