//! Envelope encryption with AES-256-GCM-SIV.
//!
//! A master key (the key-encryption key, KEK) is read from a file and only
//! ever wraps data keys; data keys encrypt values. Every secret here lives in
//! a type that zeroizes on drop, has a `Debug` that prints no bytes, and no
//! `Clone` or `Serialize`. Bytes leave these types through one named method
//! each, whose callers say why.
//!
//! The compiler holds us to that: each of these fails to compile (with the
//! error code named), and `make test` runs them (`cargo test --doc`).
//!
//! ```compile_fail,E0277
//! fn needs<T: Clone>() {}
//! needs::<tokenvault::crypto::DataKey>();
//! ```
//! ```compile_fail,E0277
//! fn needs<T: serde::Serialize>() {}
//! needs::<tokenvault::crypto::DataKey>();
//! ```
//! ```compile_fail,E0277
//! fn needs<T: Clone>() {}
//! needs::<tokenvault::crypto::HashKey>();
//! ```
//! ```compile_fail,E0277
//! fn needs<T: serde::Serialize>() {}
//! needs::<tokenvault::crypto::HashKey>();
//! ```
//! ```compile_fail,E0277
//! fn needs<T: Clone>() {}
//! needs::<tokenvault::crypto::MasterKey>();
//! ```
//! ```compile_fail,E0277
//! fn needs<T: serde::Serialize>() {}
//! needs::<tokenvault::crypto::MasterKey>();
//! ```
//! ```compile_fail,E0277
//! fn needs<T: Clone>() {}
//! needs::<tokenvault::crypto::AuditSigningKey>();
//! ```
//! ```compile_fail,E0277
//! fn needs<T: serde::Serialize>() {}
//! needs::<tokenvault::crypto::AuditSigningKey>();
//! ```
//! ```compile_fail,E0277
//! fn needs<T: Clone>() {}
//! needs::<tokenvault::crypto::SecretValue>();
//! ```
//! ```compile_fail,E0277
//! fn needs<T: serde::Serialize>() {}
//! needs::<tokenvault::crypto::SecretValue>();
//! ```
//!
//! (The same checks with a type that has the trait compile, so the failure
//! is the trait's absence, not a typo:)
//!
//! ```
//! fn needs<T: Clone + serde::Serialize>() {}
//! needs::<String>();
//! fn debug<T: std::fmt::Debug>() {}
//! debug::<tokenvault::crypto::DataKey>();
//! ```

mod master;
mod pkcs11;
mod sealed;
mod secret;
mod shares;
mod sign;
#[cfg(any(test, feature = "testkit"))]
pub mod softhsm;
mod source;

use aes_gcm_siv::{
    Aes256GcmSiv, KeyInit, Nonce,
    aead::{Aead, Payload},
};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

pub(crate) use master::read_protected;
pub use master::{MasterKey, MasterKeyError};
pub use pkcs11::{Pkcs11Setting, create_key as create_hsm_key};
pub use sealed::{
    EXPORT_KEY_LEN, ExportOpener, ExportSealer, ExportStatement, export_keypair, subject_digest,
};
pub use secret::SecretValue;
pub use shares::{
    SharesSetting, commitment as share_commitment, send_share, split as split_master_key,
};
pub use sign::{AuditSigningKey, verify_signature};
pub use source::{
    EnvSource, FileSource, MasterKeySetting, MasterKeySource, Pkcs11Source, SharesSource,
};

/// Length of every symmetric key here: 256 bits.
pub const KEY_LEN: usize = 32;

/// Length of an AES-GCM-SIV nonce.
pub const NONCE_LEN: usize = 12;

/// What can go wrong in this module. No variant carries key or plaintext bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Authentication failed: the ciphertext, its nonce or its associated data
    /// (the record it was bound to) is not what was encrypted.
    #[error("ciphertext failed authentication")]
    Authentication,
    /// The operating system's random source failed.
    #[error("the operating system's random source failed")]
    Random(#[from] getrandom::Error),
    /// A wrapped key did not unwrap to the right length.
    #[error("wrapped key has the wrong length")]
    KeyLength,
    /// The HSM holding the master key failed (not a wrong key: the device,
    /// the session or the login), after one retry in a new session.
    #[error("the HSM holding the master key failed: {0}")]
    Hsm(String),
    /// A sealed export's recipient key is not an X25519 public key.
    #[error("the recipient public key is not a usable X25519 public key")]
    BadPublicKey,
}

/// A sealed value: the nonce and the ciphertext (which ends in the tag).
pub struct Sealed {
    /// The random nonce used for this value.
    pub nonce: [u8; NONCE_LEN],
    /// Ciphertext followed by the 16-byte authentication tag.
    pub ciphertext: Vec<u8>,
}

/// A 256-bit AES-GCM-SIV key and the cipher keyed with it.
///
/// Used both for data keys (which encrypt values) and, inside [`MasterKey`],
/// for the key that wraps them.
pub struct DataKey {
    /// Kept so the key can be wrapped again under a new master key.
    bytes: Zeroizing<[u8; KEY_LEN]>,
    /// The `aes` crate's `zeroize` feature clears the key schedule on drop.
    cipher: Aes256GcmSiv,
}

impl DataKey {
    /// A fresh random key.
    ///
    /// # Errors
    /// Fails if the OS random source fails.
    pub fn generate() -> Result<Self, Error> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        getrandom::fill(bytes.as_mut())?;
        Ok(Self::from_bytes(bytes))
    }

    fn from_bytes(bytes: Zeroizing<[u8; KEY_LEN]>) -> Self {
        let cipher = Aes256GcmSiv::new(bytes.as_ref().into());
        Self { bytes, cipher }
    }

    /// Encrypts `plaintext`, binding it to `aad`, under a fresh random nonce.
    ///
    /// # Errors
    /// Fails if the OS random source fails.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Sealed, Error> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)?;
        let ciphertext = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            // AES-GCM-SIV encryption only fails for inputs over 2^36 bytes,
            // far above any configured value limit; report it as an
            // authentication-class failure rather than panicking.
            .map_err(|_| Error::Authentication)?;
        Ok(Sealed { nonce, ciphertext })
    }

    /// Decrypts and authenticates; the plaintext is returned in a zeroizing
    /// buffer.
    ///
    /// # Errors
    /// [`Error::Authentication`] if anything was changed or `aad` differs.
    pub fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        self.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| Error::Authentication)
    }

    /// Wraps another key under this one, bound to `label`: how subject keys
    /// are wrapped by the subject KEK.
    ///
    /// # Errors
    /// If the random source fails.
    pub fn wrap_key(&self, key: &DataKey, label: &[u8]) -> Result<Sealed, Error> {
        self.wrap(key, label)
    }

    /// The inverse of [`DataKey::wrap_key`].
    ///
    /// # Errors
    /// [`Error::Authentication`] with the wrong key or label.
    pub fn unwrap_wrapped(&self, sealed: &Sealed, label: &[u8]) -> Result<DataKey, Error> {
        self.unwrap_key(sealed, label)
    }

    /// Seals `key` under this key: how data keys are wrapped by the master key.
    fn wrap(&self, key: &DataKey, aad: &[u8]) -> Result<Sealed, Error> {
        self.seal(key.bytes.as_ref(), aad)
    }

    /// The inverse of [`DataKey::wrap`].
    fn unwrap_key(&self, sealed: &Sealed, aad: &[u8]) -> Result<DataKey, Error> {
        let bytes = self.open(&sealed.nonce, &sealed.ciphertext, aad)?;
        let array: [u8; KEY_LEN] = bytes.as_slice().try_into().map_err(|_| Error::KeyLength)?;
        Ok(DataKey::from_bytes(Zeroizing::new(array)))
    }
}

/// [`HashKey::hasher`]'s state.
pub struct PartsHasher {
    mac: Hmac<Sha256>,
}

impl PartsHasher {
    /// Adds one part.
    pub fn part(&mut self, part: &[u8]) -> &mut Self {
        self.mac.update(&(part.len() as u64).to_be_bytes());
        self.mac.update(part);
        self
    }

    /// The hash of the parts added.
    pub fn finish(self) -> [u8; 32] {
        self.mac.finalize().into_bytes().into()
    }
}

impl std::fmt::Debug for PartsHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PartsHasher(<redacted>)")
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// A 256-bit HMAC-SHA256 key for keyed hashes (blind indexes, subject ids).
pub struct HashKey {
    bytes: Zeroizing<[u8; KEY_LEN]>,
}

impl HashKey {
    /// A fresh random key.
    ///
    /// # Errors
    /// Fails if the OS random source fails.
    pub fn generate() -> Result<Self, Error> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        getrandom::fill(bytes.as_mut())?;
        Ok(Self { bytes })
    }

    /// HMAC-SHA256 of `domain` and `data`. The domain separates the uses of
    /// one key so a hash made for one purpose never matches another.
    pub fn hash(&self, domain: &[u8], data: &[u8]) -> [u8; 32] {
        // HMAC accepts keys of any length, so this cannot fail for 32 bytes.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.bytes.as_ref())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(&(domain.len() as u64).to_be_bytes());
        mac.update(domain);
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    /// A keyed hash of `domain` and of parts fed one by one, each with its
    /// length: `["ab", "c"]` and `["a", "bc"]` hash apart.
    pub fn hasher(&self, domain: &[u8]) -> PartsHasher {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.bytes.as_ref())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(&(domain.len() as u64).to_be_bytes());
        mac.update(domain);
        PartsHasher { mac }
    }

    /// A key of these bytes, for tests that need the same key twice.
    #[cfg(test)]
    pub(crate) fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self {
            bytes: Zeroizing::new(bytes),
        }
    }

    /// The hash as lower-case hex, as audit events and exports show it.
    pub fn hash_hex(&self, domain: &[u8], data: &[u8]) -> String {
        data_encoding::HEXLOWER.encode(&self.hash(domain, data))
    }

    /// Uses these 256 bits as an AES-256-GCM-SIV key (for keys stored with
    /// the hash keys' machinery).
    pub(crate) fn into_data_key(self) -> DataKey {
        DataKey::from_bytes(self.bytes)
    }

    fn as_data_key(&self) -> DataKey {
        DataKey::from_bytes(Zeroizing::new(*self.bytes))
    }

    fn from_data_key(key: DataKey) -> Self {
        Self { bytes: key.bytes }
    }
}

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_open_round_trips() {
        let key = DataKey::generate().unwrap();
        let sealed = key.seal(b"ada@example.com", b"record-1").unwrap();
        let opened = key
            .open(&sealed.nonce, &sealed.ciphertext, b"record-1")
            .unwrap();
        assert_eq!(opened.as_slice(), b"ada@example.com");
    }

    #[test]
    fn other_associated_data_fails() {
        let key = DataKey::generate().unwrap();
        let sealed = key.seal(b"ada@example.com", b"record-1").unwrap();
        let err = key.open(&sealed.nonce, &sealed.ciphertext, b"record-2");
        assert!(matches!(err, Err(Error::Authentication)));
    }

    #[test]
    fn flipped_ciphertext_fails() {
        let key = DataKey::generate().unwrap();
        let mut sealed = key.seal(b"ada@example.com", b"r").unwrap();
        sealed.ciphertext[0] ^= 1;
        assert!(key.open(&sealed.nonce, &sealed.ciphertext, b"r").is_err());
    }

    #[test]
    fn same_value_twice_gives_different_ciphertexts() {
        let key = DataKey::generate().unwrap();
        let a = key.seal(b"same", b"r").unwrap();
        let b = key.seal(b"same", b"r").unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn keys_wrap_and_unwrap() {
        let kek = DataKey::generate().unwrap();
        let dek = DataKey::generate().unwrap();
        let wrapped = kek.wrap(&dek, b"dek-1").unwrap();
        let back = kek.unwrap_key(&wrapped, b"dek-1").unwrap();
        let sealed = dek.seal(b"v", b"a").unwrap();
        assert_eq!(
            back.open(&sealed.nonce, &sealed.ciphertext, b"a")
                .unwrap()
                .as_slice(),
            b"v"
        );
        assert!(kek.unwrap_key(&wrapped, b"dek-2").is_err());
    }

    #[test]
    fn hashes_are_keyed_and_domain_separated() {
        let k1 = HashKey::generate().unwrap();
        let k2 = HashKey::generate().unwrap();
        assert_eq!(k1.hash(b"subject", b"c1"), k1.hash(b"subject", b"c1"));
        assert_ne!(k1.hash(b"subject", b"c1"), k2.hash(b"subject", b"c1"));
        assert_ne!(k1.hash(b"subject", b"c1"), k1.hash(b"index", b"c1"));
    }

    #[test]
    fn debug_output_has_no_key_bytes() {
        assert_eq!(
            format!("{:?}", DataKey::generate().unwrap()),
            "DataKey(<redacted>)"
        );
        assert_eq!(
            format!("{:?}", HashKey::generate().unwrap()),
            "HashKey(<redacted>)"
        );
    }
}
