//! A throwaway SoftHSM2: its own configuration and token directory in a
//! temporary directory, deleted when dropped, so that each test (and each
//! `tokenvault bench` run with `--master-key hsm`) initialises tokens that
//! nobody else sees. For the tests and the benchmark, which need a real
//! PKCS#11 module and must not depend on one set up by hand; SoftHSM2 comes
//! from the distribution (`scripts/install-deps.sh --test`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Where Debian and Ubuntu put the module (install-deps.sh probes the same
/// places).
const MODULES: [&str; 3] = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
];

/// The user PIN of every token made here.
pub const PIN: &str = "2468-user";

/// A SoftHSM2 configuration of its own.
pub struct ThrowawayHsm {
    dir: tempfile::TempDir,
    /// The PKCS#11 module.
    pub module: PathBuf,
}

impl ThrowawayHsm {
    /// A new, empty token directory and the configuration naming it.
    ///
    /// # Panics
    /// If SoftHSM2 is not installed, saying how to install it.
    pub fn new() -> Self {
        let module = MODULES
            .iter()
            .map(PathBuf::from)
            .find(|m| m.exists())
            .expect("SoftHSM2 is not installed: run scripts/install-deps.sh --test");
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )
        .unwrap();
        Self { dir, module }
    }

    /// Its directory, for files that should go with it.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// What a process needs in its environment to see these tokens.
    pub fn env(&self) -> (String, String) {
        (
            "SOFTHSM2_CONF".to_owned(),
            self.path().join("softhsm2.conf").display().to_string(),
        )
    }

    /// Initialises a token and writes its user PIN to a 0600 file.
    pub fn init_token(&self, label: &str) -> PathBuf {
        self.run(Command::new("softhsm2-util").args([
            "--init-token",
            "--free",
            "--label",
            label,
            "--so-pin",
            "1357-so",
            "--pin",
            PIN,
        ]));
        self.pin_file(&format!("{label}.pin"), PIN)
    }

    /// A PIN file with mode 0600.
    pub fn pin_file(&self, name: &str, pin: &str) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, format!("{pin}\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        path
    }

    /// Creates a master key the way an operator would, with `tokenvault`
    /// (the binary at `exe`) `keys create-hsm-key`.
    pub fn create_key(&self, exe: &Path, token: &str, key: &str, pin_file: &Path) {
        self.run(
            Command::new(exe)
                .args(["keys", "create-hsm-key"])
                .args(self.key_args(token, key, pin_file)),
        );
    }

    /// `--pkcs11-module … --token-label … --key-label … --pin-file …`.
    pub fn key_args(&self, token: &str, key: &str, pin_file: &Path) -> Vec<String> {
        vec![
            "--pkcs11-module".into(),
            self.module.display().to_string(),
            "--token-label".into(),
            token.into(),
            "--key-label".into(),
            key.into(),
            "--pin-file".into(),
            pin_file.display().to_string(),
        ]
    }

    /// The `[keys.pkcs11]` table naming a key.
    pub fn keys_toml(&self, token: &str, key: &str, pin_file: &Path) -> String {
        format!(
            "[keys.pkcs11]\nmodule = \"{}\"\ntoken_label = \"{token}\"\nkey_label = \"{key}\"\npin_file = \"{}\"\n",
            self.module.display(),
            pin_file.display()
        )
    }

    /// Runs `command` with this configuration; panics with its output if
    /// it fails.
    pub fn run(&self, command: &mut Command) {
        let (name, value) = self.env();
        let out = command.env(name, value).output().unwrap();
        assert!(
            out.status.success(),
            "{command:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Default for ThrowawayHsm {
    fn default() -> Self {
        Self::new()
    }
}
