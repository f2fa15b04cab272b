//! The master key (KEK), used only to wrap other keys: loaded from a file
//! (or, for development, the environment), or kept inside an HSM and used
//! through PKCS#11.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use zeroize::Zeroizing;

use super::{
    DataKey, Error, HashKey, KEY_LEN, Sealed,
    pkcs11::{HsmKek, Pkcs11Setting},
};

/// The key-encryption key. It never encrypts a value directly.
pub struct MasterKey {
    kek: Kek,
}

/// Where the wrapping happens.
enum Kek {
    /// In this process, with the key's bytes in zeroizing memory.
    Local(Box<DataKey>),
    /// Inside a token; the process never holds the key.
    Hsm(Arc<HsmKek>),
}

/// Why the master key file cannot be used. Each message says what to fix and
/// none contains key bytes.
#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    /// The file does not exist or cannot be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file it is (the master key file, a PIN file).
        what: &'static str,
        /// The configured path.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Group or others may read or write the file.
    #[error(
        "{what} {path} is accessible by group or others (mode {mode:04o}); run `chmod 600 {path}`"
    )]
    TooOpen {
        /// Which file it is (the master key file, a PIN file).
        what: &'static str,
        /// The configured path.
        path: PathBuf,
        /// The file's permission bits.
        mode: u32,
    },
    /// The content is neither 32 raw bytes nor 64 hex digits.
    #[error(
        "master key file {path} must hold 32 random bytes, raw or as 64 hex digits (it holds {len} bytes); generate one with `head -c 32 /dev/urandom | xxd -p -c 64`"
    )]
    WrongLength {
        /// The configured path.
        path: PathBuf,
        /// How many bytes the file holds.
        len: usize,
    },
    /// Writing a new key file failed.
    #[error("cannot create master key file {path}: {source}")]
    Create {
        /// The path being written.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The random source failed while generating a key.
    #[error(transparent)]
    Crypto(#[from] Error),
    /// The PKCS#11 module, token, PIN or key is unusable.
    #[error("PKCS#11 master key: {0}")]
    Pkcs11(String),
    /// Splitting the key into shares, or collecting them, failed.
    #[error("master key shares: {0}")]
    Shares(String),
    /// The environment variable source is unusable.
    #[error("master key environment variable {var} {reason}")]
    Env {
        /// The variable's name.
        var: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl MasterKey {
    /// Reads the key from `path`, refusing a file that group or others can
    /// access or that does not hold exactly 256 bits.
    ///
    /// Who may read the file: see `read_protected`.
    ///
    /// # Errors
    /// See [`MasterKeyError`].
    pub fn load(path: &Path) -> Result<Self, MasterKeyError> {
        let raw = read_protected(path, "master key file")?;
        let bytes = decode_key(&raw).ok_or_else(|| MasterKeyError::WrongLength {
            path: path.to_owned(),
            len: raw.len(),
        })?;
        Ok(Self::local(bytes))
    }

    /// The key in the token that `setting` names (see [`super::pkcs11`]).
    ///
    /// # Errors
    /// The module, token, PIN or key is unusable; the message says which.
    pub fn from_hsm(setting: &Pkcs11Setting) -> Result<Self, MasterKeyError> {
        Ok(Self {
            kek: Kek::Hsm(Arc::new(HsmKek::open(setting)?)),
        })
    }

    /// A key held in memory, from its bytes (a file's, or shares combined).
    pub(super) fn local(bytes: Zeroizing<[u8; KEY_LEN]>) -> Self {
        Self {
            kek: Kek::Local(Box::new(DataKey::from_bytes(bytes))),
        }
    }

    /// The key's bytes when this process holds them (not for a key in an
    /// HSM): for splitting it into shares.
    pub(super) fn local_bytes(&self) -> Option<&[u8; KEY_LEN]> {
        match &self.kek {
            Kek::Local(key) => Some(&key.bytes),
            Kek::Hsm(_) => None,
        }
    }

    /// Writes a new random key as hex to `path` with mode 0600, failing if the
    /// file already exists (a master key is never silently replaced).
    ///
    /// # Errors
    /// See [`MasterKeyError`].
    pub fn create_file(path: &Path) -> Result<(), MasterKeyError> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        getrandom::fill(bytes.as_mut()).map_err(Error::from)?;
        let hex = Zeroizing::new(data_encoding::HEXLOWER.encode(bytes.as_ref()) + "\n");
        let create_err = |source| MasterKeyError::Create {
            path: path.to_owned(),
            source,
        };
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(create_err)?;
        file.write_all(hex.as_bytes()).map_err(create_err)?;
        file.sync_all().map_err(create_err)
    }

    /// A key from 64 hex digits (surrounding whitespace allowed).
    pub(crate) fn from_hex(text: &[u8]) -> Option<Self> {
        let text = text.trim_ascii();
        if text.len() != KEY_LEN * 2 {
            return None;
        }
        decode_key(text).map(Self::local)
    }

    /// A second handle on the same key, for the keyring to wrap new data
    /// keys at rotation. Both copies zeroize on drop (an HSM's key is
    /// shared, and stays in the token).
    pub(crate) fn duplicate(&self) -> Self {
        let kek = match &self.kek {
            Kek::Local(key) => {
                Kek::Local(Box::new(DataKey::from_bytes(Zeroizing::new(*key.bytes))))
            }
            Kek::Hsm(hsm) => Kek::Hsm(Arc::clone(hsm)),
        };
        Self { kek }
    }

    /// Where the key is, for logs (never the key).
    pub fn describe(&self) -> String {
        match &self.kek {
            Kek::Local(_) => "a key held in memory (file or environment)".to_owned(),
            Kek::Hsm(hsm) => hsm.describe(),
        }
    }

    fn wrap(&self, key: &DataKey, label: &[u8]) -> Result<Sealed, Error> {
        match &self.kek {
            Kek::Local(kek) => kek.wrap(key, label),
            Kek::Hsm(hsm) => hsm.wrap(&key.bytes, label),
        }
    }

    fn unwrap_key(&self, sealed: &Sealed, label: &[u8]) -> Result<DataKey, Error> {
        match &self.kek {
            Kek::Local(kek) => kek.unwrap_key(sealed, label),
            Kek::Hsm(hsm) => hsm.unwrap(sealed, label).map(DataKey::from_bytes),
        }
    }

    /// Wraps a data key. `label` names the key (e.g. `dek/1`) and is bound as
    /// associated data, so a wrapped key moved to another name won't unwrap.
    ///
    /// # Errors
    /// Fails if the random source fails.
    pub fn wrap_data_key(&self, key: &DataKey, label: &[u8]) -> Result<Sealed, Error> {
        self.wrap(key, label)
    }

    /// Unwraps a data key stored under `label`.
    ///
    /// # Errors
    /// [`Error::Authentication`] with the wrong master key or label.
    pub fn unwrap_data_key(&self, sealed: &Sealed, label: &[u8]) -> Result<DataKey, Error> {
        self.unwrap_key(sealed, label)
    }

    /// Wraps a keyed-hash key, like [`MasterKey::wrap_data_key`].
    ///
    /// # Errors
    /// Fails if the random source fails.
    pub fn wrap_hash_key(&self, key: &HashKey, label: &[u8]) -> Result<Sealed, Error> {
        self.wrap(&key.as_data_key(), label)
    }

    /// Unwraps a keyed-hash key.
    ///
    /// # Errors
    /// [`Error::Authentication`] with the wrong master key or label.
    pub fn unwrap_hash_key(&self, sealed: &Sealed, label: &[u8]) -> Result<HashKey, Error> {
        self.unwrap_key(sealed, label).map(HashKey::from_data_key)
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// The bytes of a secret file (a master key, an HSM PIN) that only the
/// owner may read.
///
/// One exception: read access for the file's group is accepted when that
/// group is the vault process's own effective group. Kubernetes makes every
/// mounted Secret file group-readable (0440) for the pod's `fsGroup`, which
/// exists for exactly this process; a warning says so.
pub(crate) fn read_protected(
    path: &Path,
    what: &'static str,
) -> Result<Zeroizing<Vec<u8>>, MasterKeyError> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt};
    let read_err = |source| MasterKeyError::Read {
        what,
        path: path.to_owned(),
        source,
    };
    // One handle for the checks and the read (no swap in between), opened
    // without blocking (a FIFO put in its place must not hang the start).
    // Symbolic links are followed: Kubernetes mounts Secrets through them.
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(read_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let mode = meta.permissions().mode() & 0o777;
    let own_group = meta.gid() == rustix::process::getegid().as_raw();
    if !permissions_acceptable(mode, own_group) {
        return Err(MasterKeyError::TooOpen {
            what,
            path: path.to_owned(),
            mode,
        });
    }
    if mode & 0o040 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{mode:04o}"), "{what} is readable by the vault's own group (Kubernetes fsGroup); nobody else may read it");
    }
    // A key, a PIN or a password: a few bytes. More is not such a file.
    let mut bytes = Zeroizing::new(Vec::new());
    std::io::Read::by_ref(&mut file)
        .take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(read_err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("longer than {MAX_SECRET_FILE} bytes"),
        )));
    }
    Ok(bytes)
}

/// The longest secret file read (a key, a PIN, a password).
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Others: nothing. Group: nothing, or read only when it is the process's own
/// group. Owner: anything.
fn permissions_acceptable(mode: u32, own_group: bool) -> bool {
    let others = mode & 0o007;
    let group = mode & 0o070;
    others == 0 && (group == 0 || (group == 0o040 && own_group))
}

/// 32 raw bytes, or 64 hex digits with optional surrounding whitespace.
fn decode_key(raw: &[u8]) -> Option<Zeroizing<[u8; KEY_LEN]>> {
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    if raw.len() == KEY_LEN {
        out.copy_from_slice(raw);
        return Some(out);
    }
    let text = raw.trim_ascii();
    if text.len() != KEY_LEN * 2 {
        return None;
    }
    let decoded = Zeroizing::new(data_encoding::HEXLOWER_PERMISSIVE.decode(text).ok()?);
    out.copy_from_slice(&decoded);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, content: &[u8], mode: u32) {
        fs::write(path, content).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn created_key_loads_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        MasterKey::create_file(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        MasterKey::load(&path).unwrap();
        // Never overwritten.
        assert!(MasterKey::create_file(&path).is_err());
    }

    #[test]
    fn raw_and_hex_keys_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        write(&raw, &[7u8; 32], 0o600);
        MasterKey::load(&raw).unwrap();
        let hex = dir.path().join("hex");
        write(&hex, format!("{}\n", "ab".repeat(32)).as_bytes(), 0o400);
        MasterKey::load(&hex).unwrap();
    }

    #[test]
    fn open_permissions_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write(&path, &[7u8; 32], 0o644);
        let err = MasterKey::load(&path).unwrap_err();
        assert!(matches!(err, MasterKeyError::TooOpen { mode: 0o644, .. }));
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn only_the_owner_and_at_most_our_own_group_may_read() {
        for (mode, own_group, ok) in [
            (0o600, false, true),
            (0o400, false, true),
            (0o440, true, true),
            (0o440, false, false),
            (0o640, true, true),
            (0o660, true, false),
            (0o604, true, false),
            (0o644, true, false),
            (0o444, true, false),
        ] {
            assert_eq!(
                permissions_acceptable(mode, own_group),
                ok,
                "{mode:o} own_group={own_group}"
            );
        }
    }

    #[test]
    fn wrong_length_is_refused_without_echoing_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write(&path, b"deadbeefdeadbeef", 0o600);
        let err = MasterKey::load(&path).unwrap_err();
        assert!(matches!(err, MasterKeyError::WrongLength { len: 16, .. }));
        assert!(!err.to_string().contains("deadbeef"));
    }

    /// A FIFO, a directory or a huge file in a secret file's place is
    /// refused at once, named by what it was to be: never read forever, never
    /// waited on.
    #[test]
    fn only_a_small_regular_file_is_read_as_a_secret() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        fs::set_permissions(&fifo, fs::Permissions::from_mode(0o600)).unwrap();
        // In a thread of its own: a read that waits on the FIFO fails the
        // test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(read_protected(&path, "PIN file").map(|_| ()));
        });
        let err = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the read waited on a FIFO")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("PIN file") && err.contains("not a regular file"),
            "{err}"
        );
        let sub = dir.path().join("dir");
        fs::create_dir(&sub).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o700)).unwrap();
        let err = read_protected(&sub, "master key file")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let big = dir.path().join("big");
        fs::write(&big, vec![b'a'; 70_000]).unwrap();
        fs::set_permissions(&big, fs::Permissions::from_mode(0o600)).unwrap();
        let err = read_protected(&big, "the database password file")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the database password file") && err.contains("longer than"),
            "{err}"
        );
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = MasterKey::load(Path::new("/nonexistent/master.key")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/master.key"));
    }

    #[test]
    fn a_key_wrapped_under_one_master_does_not_unwrap_under_another() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        MasterKey::create_file(&a).unwrap();
        MasterKey::create_file(&b).unwrap();
        let (a, b) = (MasterKey::load(&a).unwrap(), MasterKey::load(&b).unwrap());
        let dek = DataKey::generate().unwrap();
        let wrapped = a.wrap_data_key(&dek, b"dek/1").unwrap();
        assert!(a.unwrap_data_key(&wrapped, b"dek/1").is_ok());
        assert!(b.unwrap_data_key(&wrapped, b"dek/1").is_err());
    }
}
