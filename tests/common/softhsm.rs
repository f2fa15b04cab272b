//! The library's throwaway SoftHSM2 (`tokenvault::crypto::softhsm`), with
//! what only the tests need: keys made with the test binary, and keys
//! imported from known bytes.

use std::{ops::Deref, path::Path, process::Command};

pub use tokenvault::crypto::softhsm::PIN;
use tokenvault::crypto::softhsm::ThrowawayHsm;

pub struct SoftHsm(ThrowawayHsm);

impl Deref for SoftHsm {
    type Target = ThrowawayHsm;

    fn deref(&self) -> &ThrowawayHsm {
        &self.0
    }
}

impl SoftHsm {
    pub fn new() -> Self {
        Self(ThrowawayHsm::new())
    }

    /// Creates a master key the way an operator would:
    /// `tokenvault keys create-hsm-key`.
    pub fn create_key(&self, token: &str, key: &str, pin_file: &Path) {
        self.0.create_key(
            Path::new(env!("CARGO_BIN_EXE_tokenvault")),
            token,
            key,
            pin_file,
        );
    }

    /// Imports `bytes` as an AES key with softhsm2-util (which makes it
    /// sensitive and not extractable).
    pub fn import_key(&self, token: &str, key: &str, bytes: &[u8]) {
        let file = self.path().join(format!("{key}.bin"));
        std::fs::write(&file, bytes).unwrap();
        self.run(Command::new("softhsm2-util").args([
            "--import",
            file.to_str().unwrap(),
            "--aes",
            "--token",
            token,
            "--label",
            key,
            "--id",
            "0a",
            "--pin",
            PIN,
        ]));
    }
}
