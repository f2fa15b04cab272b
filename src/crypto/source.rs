//! Where the master key comes from: a file (the default), a PKCS#11 token
//! (an HSM; the key never enters the process), shares entered by their
//! holders at start (dual control), or, for development only, an
//! environment variable. The trait is the seam for further providers (a
//! cloud KMS).

use std::path::PathBuf;

use zeroize::Zeroizing;

use super::{MasterKey, MasterKeyError, Pkcs11Setting, SharesSetting};

/// Where the configuration says the master key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeySetting {
    /// `keys.master_key_file`.
    File(PathBuf),
    /// `keys.master_key_env` (development only).
    Env(String),
    /// `[keys.pkcs11]`: a key inside an HSM.
    Pkcs11(Pkcs11Setting),
    /// `[keys.shares]`: K of N shares, entered at start.
    Shares(SharesSetting),
}

impl MasterKeySetting {
    /// The source that loads it.
    pub fn source(&self) -> Box<dyn MasterKeySource> {
        match self {
            MasterKeySetting::File(path) => Box::new(FileSource(path.clone())),
            MasterKeySetting::Env(var) => Box::new(EnvSource(var.clone())),
            MasterKeySetting::Pkcs11(setting) => Box::new(Pkcs11Source(setting.clone())),
            MasterKeySetting::Shares(setting) => Box::new(SharesSource(setting.clone())),
        }
    }
}

/// A source of the master key.
pub trait MasterKeySource: Send + Sync {
    /// Loads the key.
    ///
    /// # Errors
    /// Why the key cannot be had; the message says what to fix.
    fn load(&self) -> Result<MasterKey, MasterKeyError>;

    /// Where the key comes from, for logs (never the key).
    fn describe(&self) -> String;
}

/// A file holding 32 raw bytes or 64 hex digits, mode 0600 or stricter.
#[derive(Debug, Clone)]
pub struct FileSource(pub PathBuf);

impl MasterKeySource for FileSource {
    fn load(&self) -> Result<MasterKey, MasterKeyError> {
        MasterKey::load(&self.0)
    }

    fn describe(&self) -> String {
        format!("file {}", self.0.display())
    }
}

/// A non-extractable AES-256 key in a PKCS#11 token: wrapping and
/// unwrapping happen inside the token.
#[derive(Debug, Clone)]
pub struct Pkcs11Source(pub Pkcs11Setting);

impl MasterKeySource for Pkcs11Source {
    fn load(&self) -> Result<MasterKey, MasterKeyError> {
        MasterKey::from_hsm(&self.0)
    }

    fn describe(&self) -> String {
        self.0.describe()
    }
}

/// Shares of the key, entered by their holders at start
/// (`tokenvault unseal`): `load` waits, sealed, until enough arrive.
#[derive(Debug, Clone)]
pub struct SharesSource(pub SharesSetting);

impl MasterKeySource for SharesSource {
    fn load(&self) -> Result<MasterKey, MasterKeyError> {
        super::shares::unseal(&self.0)
    }

    fn describe(&self) -> String {
        self.0.describe()
    }
}

/// An environment variable holding 64 hex digits. For development only:
/// the environment is visible to anything that can read the process's
/// `/proc/<pid>/environ` or its launcher's configuration.
#[derive(Debug, Clone)]
pub struct EnvSource(pub String);

impl EnvSource {
    /// Loads the key and removes the variable from the process environment,
    /// so nothing started later (and no later read) sees it. The kernel's
    /// copy of the initial environment (`/proc/<pid>/environ`) still holds
    /// it, readable by the process's owner and root: one more reason this
    /// source is for development only.
    ///
    /// Call it before any thread is started (the server calls it before its
    /// runtime and its log writer exist).
    ///
    /// # Errors
    /// As [`MasterKeySource::load`].
    #[allow(unsafe_code)]
    pub fn take(&self) -> Result<MasterKey, MasterKeyError> {
        let key = self.load()?;
        if let Ok(name) = std::ffi::CString::new(self.0.as_str()) {
            // SAFETY: `getenv` and the write race with other threads reading
            // or writing the environment; the caller starts none before this
            // returns (see `cli::serve`, which calls this before building the
            // runtime and the logging thread). The pointer is to the
            // NUL-terminated value inside the environment block, writable
            // memory of this process, and `strlen` bytes of it are written.
            unsafe {
                let value = libc::getenv(name.as_ptr());
                if !value.is_null() {
                    // Overwrite the value where it lives: removing the
                    // variable only unlinks it, and /proc/<pid>/environ
                    // shows the original block.
                    std::ptr::write_bytes(value, b'0', libc::strlen(value));
                }
            }
        }
        // SAFETY: as above, no other thread exists yet.
        unsafe { std::env::remove_var(&self.0) };
        Ok(key)
    }
}

impl MasterKeySource for EnvSource {
    fn load(&self) -> Result<MasterKey, MasterKeyError> {
        let value = Zeroizing::new(std::env::var(&self.0).map_err(|_| MasterKeyError::Env {
            var: self.0.clone(),
            reason: "is not set (or not UTF-8)",
        })?);
        MasterKey::from_hex(value.as_bytes()).ok_or_else(|| MasterKeyError::Env {
            var: self.0.clone(),
            reason: "must hold 64 hex digits (256 bits)",
        })
    }

    fn describe(&self) -> String {
        format!("environment variable {} (development only)", self.0)
    }
}
