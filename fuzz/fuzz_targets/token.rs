//! Arbitrary bytes through `tokenvault::fuzzing::token`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokenvault::fuzzing::token(data));
