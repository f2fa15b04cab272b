//! Arbitrary bytes through `tokenvault::fuzzing::identity`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokenvault::fuzzing::identity(data));
