//! Arbitrary bytes through `tokenvault::fuzzing::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokenvault::fuzzing::config(data));
