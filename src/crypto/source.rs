//! Where the master key comes from. A file is the production default; an
//! environment variable is for development only. The trait is the seam for
//! KMS or HSM providers (unwrap through a remote service, or keep the key in
//! hardware), which this release does not ship.

use std::path::PathBuf;

use zeroize::Zeroizing;

use super::{MasterKey, MasterKeyError};

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

/// An environment variable holding 64 hex digits. For development only:
/// the environment is visible to anything that can read the process's
/// `/proc/<pid>/environ` or its launcher's configuration.
#[derive(Debug, Clone)]
pub struct EnvSource(pub String);

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
