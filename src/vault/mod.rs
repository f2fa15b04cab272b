//! The vault: tokenize and detokenize, over any [`Store`].
//!
//! This is the domain core. It never sees tonic or prost types, takes only
//! [`Permit`]s (so every operation has passed `authz`), hands the store only
//! ciphertext, and returns plaintext only inside [`SecretValue`].

mod keyring;
mod record;

use std::{
    fmt,
    time::{SystemTime, UNIX_EPOCH},
};

pub use keyring::Keyring;
pub use record::{DecodeError, Record};

use crate::{
    authz::{Guarded, Permit},
    crypto::{self, MasterKey, SecretValue},
    store::{self, Batch, Store, Table},
    token::{FieldType, Token},
};

/// Longest subject id accepted, in bytes.
pub const MAX_SUBJECT_ID_BYTES: usize = 256;

/// A value to tokenize, already validated against its field type's limits.
pub struct NewValue {
    /// The field type.
    pub field_type: FieldType,
    /// The plaintext.
    pub value: SecretValue,
    /// The data subject it belongs to, if any.
    pub subject: Option<SubjectId>,
}

impl Guarded for NewValue {
    fn field_type(&self) -> &FieldType {
        &self.field_type
    }
}

impl Guarded for Token {
    fn field_type(&self) -> &FieldType {
        Token::field_type(self)
    }
}

/// The id of a data subject (e.g. a customer id). Stored only as a keyed
/// hash; `Debug` does not print it.
pub struct SubjectId(String);

/// Why a string is not a subject id. Carries no part of the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("subject_id must be 1 to {MAX_SUBJECT_ID_BYTES} bytes without control characters")]
pub struct SubjectIdError;

impl std::str::FromStr for SubjectId {
    type Err = SubjectIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > MAX_SUBJECT_ID_BYTES || s.chars().any(char::is_control) {
            return Err(SubjectIdError);
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Debug for SubjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SubjectId(<redacted>)")
    }
}

/// A value read back from the vault.
#[derive(Debug)]
pub struct Revealed {
    /// Its field type.
    pub field_type: FieldType,
    /// The plaintext.
    pub value: SecretValue,
}

/// Why one token of a batch was not revealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ItemError {
    /// No record under this token.
    #[error("token not found")]
    NotFound,
    /// The record exists but cannot be decoded or decrypted: corruption or
    /// tampering.
    #[error("the stored record for this token is corrupted and cannot be decrypted")]
    DataLoss,
}

/// A failure of a whole vault operation. Messages carry no value or key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] store::Error),
    /// The random source or a cipher failed.
    #[error(transparent)]
    Crypto(#[from] crypto::Error),
    /// A stored key does not unwrap under the configured master key.
    #[error(
        "the configured master key does not match this vault: key {0} does not unwrap (wrong master key file, or a data directory from another vault)"
    )]
    WrongMasterKey(String),
    /// The keys table is damaged.
    #[error("the key table is corrupted: {0}")]
    CorruptKey(String),
}

/// The vault over a store `S`.
pub struct Vault<S> {
    store: S,
    keyring: Keyring,
}

impl<S: Store> Vault<S> {
    /// Opens the vault: unwraps its keys with `master`, creating the first
    /// key generation in an empty store.
    ///
    /// # Errors
    /// [`Error::WrongMasterKey`] if `master` is not this vault's key;
    /// storage failures.
    pub async fn open(store: S, master: &MasterKey) -> Result<Self, Error> {
        let keyring = Keyring::open(&store, master).await?;
        Ok(Self { store, keyring })
    }

    /// The underlying store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Gives the store back, e.g. to close it at shutdown.
    pub fn into_store(self) -> S {
        self.store
    }

    /// Encrypts every value and stores them all in one atomic, durable write.
    /// Returns one token per item, in order.
    ///
    /// # Errors
    /// If the write fails, no item is stored.
    pub async fn tokenize(&self, items: Vec<Permit<NewValue>>) -> Result<Vec<Token>, Error> {
        let (key_version, key) = self.keyring.active();
        let created_ms = now_ms();
        let mut batch = Batch::new();
        let mut tokens = Vec::with_capacity(items.len());
        for permit in items {
            let item = permit.into_item();
            let token = Token::generate(&item.field_type).map_err(crypto::Error::from)?;
            let subject_hash = item
                .subject
                .as_ref()
                .map(|s| self.keyring.subject_key().hash(b"subject", s.0.as_bytes()));
            let aad = Record::aad(&token, key_version, subject_hash.as_ref());
            let sealed = key.seal(item.value.expose().as_bytes(), &aad)?;
            let record = Record {
                field_type: item.field_type,
                key_version,
                nonce: sealed.nonce,
                created_ms,
                subject_hash,
                ciphertext: sealed.ciphertext,
            };
            batch.put(Table::Records, token.storage_key(), record.encode());
            tokens.push(token);
        }
        self.store.commit(batch).await?;
        Ok(tokens)
    }

    /// Reads and decrypts the value behind each token; one result per token,
    /// in order. A missing or corrupted record fails only its own item.
    ///
    /// # Errors
    /// Storage failures fail the whole call.
    pub async fn detokenize(
        &self,
        tokens: Vec<Permit<Token>>,
    ) -> Result<Vec<Result<Revealed, ItemError>>, Error> {
        let keys = tokens
            .iter()
            .map(|t| t.item().storage_key().to_vec())
            .collect();
        let stored = self.store.get_many(Table::Records, keys).await?;
        Ok(tokens
            .iter()
            .zip(stored)
            .map(|(token, bytes)| self.reveal(token.item(), bytes))
            .collect())
    }

    fn reveal(&self, token: &Token, bytes: Option<Vec<u8>>) -> Result<Revealed, ItemError> {
        let bytes = bytes.ok_or(ItemError::NotFound)?;
        let record = Record::decode(&bytes).map_err(|e| {
            tracing::error!(field_type = %token.field_type(), error = %e, "stored record cannot be decoded");
            ItemError::DataLoss
        })?;
        let key = self.keyring.data_key(record.key_version).ok_or_else(|| {
            tracing::error!(field_type = %token.field_type(), key_version = record.key_version, "stored record names an unknown key version");
            ItemError::DataLoss
        })?;
        let aad = Record::aad(token, record.key_version, record.subject_hash.as_ref());
        let plaintext = key.open(&record.nonce, &record.ciphertext, &aad).map_err(|_| {
            tracing::error!(field_type = %token.field_type(), "stored record failed authentication (corrupted or moved)");
            ItemError::DataLoss
        })?;
        let value = SecretValue::from_decrypted(plaintext).ok_or_else(|| {
            tracing::error!(field_type = %token.field_type(), "decrypted value is not UTF-8");
            ItemError::DataLoss
        })?;
        Ok(Revealed {
            field_type: record.field_type,
            value,
        })
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
