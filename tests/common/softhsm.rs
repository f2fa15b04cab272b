//! A throwaway SoftHSM2: its own configuration and token directory in a
//! temporary directory, so each test initialises tokens nobody else sees.
//! SoftHSM2 comes from the distribution (`scripts/install-deps.sh --test`).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Where Debian and Ubuntu put the module (install-deps.sh probes the same).
const MODULES: [&str; 3] = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
];

/// The user PIN of every token the tests make.
pub const PIN: &str = "2468-user";

pub struct SoftHsm {
    pub dir: tempfile::TempDir,
    pub module: PathBuf,
}

impl SoftHsm {
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

    /// What a process needs in its environment to see these tokens.
    pub fn env(&self) -> (String, String) {
        (
            "SOFTHSM2_CONF".to_owned(),
            self.dir.path().join("softhsm2.conf").display().to_string(),
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
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("{pin}\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        path
    }

    /// Creates a master key the way an operator would:
    /// `tokenvault keys create-hsm-key`.
    pub fn create_key(&self, token: &str, key: &str, pin_file: &Path) {
        self.run(
            super::tokenvault_command()
                .args(["keys", "create-hsm-key"])
                .args(self.key_args(token, key, pin_file)),
        );
    }

    /// Imports `bytes` as an AES key with softhsm2-util (which makes it
    /// sensitive and not extractable).
    pub fn import_key(&self, token: &str, key: &str, bytes: &[u8]) {
        let file = self.dir.path().join(format!("{key}.bin"));
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

    /// The `[keys]` table body naming an HSM key.
    pub fn keys_toml(&self, token: &str, key: &str, pin_file: &Path) -> String {
        format!(
            "[keys.pkcs11]\nmodule = \"{}\"\ntoken_label = \"{token}\"\nkey_label = \"{key}\"\npin_file = \"{}\"\n",
            self.module.display(),
            pin_file.display()
        )
    }

    fn run(&self, command: &mut Command) {
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
