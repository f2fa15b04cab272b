//! Plaintext values are cleared before their memory goes back to the
//! allocator: in the generated messages that carry one, in `SecretValue`,
//! and along the whole request path of a Tokenize and a Detokenize through
//! the real service over a real RocksDB.
//!
//! This test binary's allocator looks into every block freed while a check
//! is armed and counts those that still hold the marker value. It is the
//! only test in this file, so nothing else frees memory meanwhile.

// The crate denies unsafe code; a global allocator cannot be written
// without it, and looking at memory as it is freed is the only way to see
// whether a value was cleared. Test-only, and nowhere else.
#![allow(
    unsafe_code,
    reason = "a watching allocator is the only way to see freed memory"
)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
};

use tokenvault::proto::v1::{
    LookupItem, RevealedValue, SubjectField, TokenizeItem, UpdateValueRequest,
};

const MARKER: &str = "card 4111-1111-1111-1111 of ada";

static ARMED: AtomicBool = AtomicBool::new(false);
static FREED_WITH_MARKER: AtomicUsize = AtomicUsize::new(0);

struct Watching;

// SAFETY: every call is passed to `System` unchanged; `dealloc` only reads
// the block it is handed, before handing it back.
unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ARMED.load(Ordering::SeqCst) && layout.size() >= MARKER.len() {
            // SAFETY: the caller owns `layout.size()` initialised or not
            // bytes at `ptr` until this call returns; reading them as bytes
            // is sound for any content.
            let block = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
            if block.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()) {
                FREED_WITH_MARKER.fetch_add(1, Ordering::SeqCst);
            }
        }
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Watching = Watching;

/// How many freed blocks held the marker while `f` ran.
fn freed_with_marker(f: impl FnOnce()) -> usize {
    FREED_WITH_MARKER.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    f();
    ARMED.store(false, Ordering::SeqCst);
    FREED_WITH_MARKER.load(Ordering::SeqCst)
}

/// Drops what it holds when called.
type Dropper = Box<dyn FnOnce()>;

/// A message made by `set` and a closure that drops it.
fn holding<M: Default + 'static>(set: impl FnOnce(&mut M)) -> Dropper {
    let mut message = M::default();
    set(&mut message);
    Box::new(move || drop(message))
}

fn marker() -> String {
    MARKER.to_owned()
}

#[test]
fn plaintext_is_cleared_before_its_memory_is_freed() {
    // The check itself can fail: a plain string keeps its bytes when freed.
    let plain = marker();
    assert_eq!(freed_with_marker(|| drop(plain)), 1);

    let messages: Vec<(&str, Dropper)> = vec![
        (
            "TokenizeItem",
            holding(|m: &mut TokenizeItem| m.value = marker()),
        ),
        (
            "LookupItem",
            holding(|m: &mut LookupItem| m.value = marker()),
        ),
        (
            "UpdateValueRequest",
            holding(|m: &mut UpdateValueRequest| m.value = marker()),
        ),
        (
            "RevealedValue",
            holding(|m: &mut RevealedValue| m.value = marker()),
        ),
        (
            "SubjectField",
            holding(|m: &mut SubjectField| m.value = marker()),
        ),
    ];
    for (name, drop_it) in messages {
        assert_eq!(
            freed_with_marker(drop_it),
            0,
            "{name} freed its value uncleared"
        );
    }

    let secret = tokenvault::crypto::SecretValue::new(marker());
    assert_eq!(
        freed_with_marker(|| drop(secret)),
        0,
        "SecretValue freed its value uncleared"
    );

    // The request path: validation, normalisation, the blind index,
    // encryption, the store's write; then reading, decrypting and the
    // response. Made before arming, so its own setup is not counted.
    let target = tokenvault::fuzzing::RequestTarget::new();
    let mut token = String::new();
    let freed = freed_with_marker(|| {
        token = target.tokenize_one("address", marker()).unwrap();
    });
    assert_eq!(freed, 0, "Tokenize freed the value uncleared");
    let mut revealed = false;
    let freed = freed_with_marker(|| revealed = target.reveal(&token));
    assert!(revealed, "the value did not come back");
    assert_eq!(freed, 0, "Detokenize freed the value uncleared");
}
