#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| doppel_fuzz::namespace_events(data));
