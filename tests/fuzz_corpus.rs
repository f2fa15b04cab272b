//! Replays the fuzz corpus (`fuzz/corpus/<target>/`) through the same target
//! bodies cargo-fuzz runs, on the stable toolchain, in every test run: the
//! seeds, and any input a fuzzing run found and someone checked in.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};

use tokenvault::fuzzing;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "no corpus for {target}");
    inputs
}

fn replay(target: &str, run: impl Fn(&[u8])) {
    for (path, bytes) in corpus(target) {
        // Name the input that breaks a promise.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&bytes)));
        assert!(outcome.is_ok(), "{} fails", path.display());
    }
}

#[test]
fn token_corpus() {
    replay("token", fuzzing::token);
}

#[test]
fn identity_corpus() {
    replay("identity", fuzzing::identity);
}

#[test]
fn config_corpus() {
    replay("config", fuzzing::config);
}

#[test]
fn request_corpus() {
    let target = fuzzing::RequestTarget::new();
    replay("request", |data| target.run(data));
}

/// The seeds reach past decoding: a seeded Tokenize really stores values
/// (so the fuzzer starts from inputs that exercise the vault).
#[test]
fn request_seeds_reach_the_vault() {
    let target = fuzzing::RequestTarget::new();
    let (_, tokenize) = corpus("request")
        .into_iter()
        .find(|(p, _)| p.ends_with("seed-tokenize"))
        .unwrap();
    assert_eq!(tokenize[0], fuzzing::request_selector("Tokenize").unwrap());
    assert_eq!(target.tokens_stored(), 0);
    target.run(&tokenize);
    assert_eq!(target.tokens_stored(), 4);
}
