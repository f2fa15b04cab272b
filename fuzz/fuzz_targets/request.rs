//! Arbitrary bytes decoded as a request message and passed to the real
//! service in-process (one vault per fuzzing process).
#![no_main]

use std::sync::OnceLock;

use tokenvault::fuzzing::RequestTarget;

static TARGET: OnceLock<RequestTarget> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| TARGET.get_or_init(RequestTarget::new).run(data));
