//! The vault: tokenize, look up and reveal, over any [`Store`].
//!
//! This is the domain core. It never sees tonic or prost types, takes only
//! [`Permit`]s (so every operation has passed `authz`), hands the store only
//! ciphertext and keyed hashes, and returns plaintext only inside
//! [`SecretValue`].

mod audit;
mod backup;
mod consent;
mod erasure;
mod history;
mod jobs;
mod keyring;
mod ledger;
mod ledger_binding;
mod ledger_sink;
mod rectify;
mod requests;
mod retention;
mod reveal;
mod rotation;
mod signed_head;
mod subjects;
mod tokenize;
mod trail;

use std::{
    fmt,
    time::{SystemTime, UNIX_EPOCH},
};

pub use crate::layout::{DecodeError, Record};
pub use backup::Backup;
pub use consent::{ConsentDecision, ConsentQuery};
pub use erasure::LedgerRollback;
pub use history::{Coverage, HistoryEntry, HistoryPage, HistoryQuery};
pub use jobs::{Job, JobHold, JobStatus, JobStep};
pub use keyring::Keyring;
pub use ledger::{Erasure, ErasureLedger, LedgerEntry, LedgerError};
pub use ledger_sink::LedgerLocation;
pub use requests::{
    FirstAnswer, MAX_REQUEST_ID_LEN, NewRequest, Prior, Remember, RequestId, RequestIdError,
    RequestKey,
};
pub use reveal::Revealed;
pub use subjects::{ErasureReceipt, SubjectField};
pub use trail::{EventsQuery, ReportQuery, StoredEvent};

use crate::{
    authz::{Denial, Guarded, Lookupable, Tokenizable},
    crypto::{self, MasterKey, SecretValue},
    fields::{FieldRegistry, FieldSpec, ValidationError},
    store::{self, Store},
    token::FieldType,
};

/// Longest subject id accepted, in bytes.
pub const MAX_SUBJECT_ID_BYTES: usize = 256;

/// A value to tokenize, of a configured field type.
pub struct NewValue {
    /// The field type.
    pub field_type: FieldType,
    /// The plaintext, as the caller sent it (normalised by the vault).
    pub value: SecretValue,
    /// The data subject it belongs to, if any.
    pub subject: Option<SubjectId>,
    /// Seconds until it expires; `None` for the field type's retention.
    pub ttl_seconds: Option<u64>,
}

impl Guarded for NewValue {
    fn field_type(&self) -> &FieldType {
        &self.field_type
    }
}

impl Tokenizable for NewValue {}

/// A value whose existing token is wanted (deterministic field types only).
pub struct LookupValue {
    /// The field type.
    pub field_type: FieldType,
    /// The plaintext, as the caller sent it.
    pub value: SecretValue,
    /// The subject it was tokenized for, if any (deterministic tokens are
    /// per subject).
    pub subject: Option<SubjectId>,
}

impl Guarded for LookupValue {
    fn field_type(&self) -> &FieldType {
        &self.field_type
    }
}

impl Lookupable for LookupValue {}

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

/// Why one item of a batch failed. Messages never contain a value or token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemError {
    /// No record under this token (or no token for this value).
    #[error("token not found")]
    NotFound,
    /// The data subject already has the most tokens allowed.
    #[error(
        "the data subject already has {0} tokens, the most allowed (subjects.max_tokens_per_subject); nothing was stored for it"
    )]
    SubjectFull(usize),
    /// The record exists but cannot be decoded or decrypted: corruption or
    /// tampering.
    #[error("the stored record for this token is corrupted and cannot be decrypted")]
    DataLoss,
    /// The value broke its field type's rules.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The policy does not let the caller see this item.
    #[error("{0}")]
    Denied(Denial),
    /// The field type is not configured (any more).
    #[error("field type {0} is not configured")]
    UnknownFieldType(FieldType),
    /// Lookup on a field type that is not deterministic.
    #[error("field type {0} is not deterministic, so its values have no single token to look up")]
    NotDeterministic(FieldType),
    /// No free format-preserving token was found after several tries.
    #[error(
        "no free format-preserving token was found for field type {0}; the token space is nearly full"
    )]
    TokenSpaceExhausted(FieldType),
    /// The value cannot get a token in this field type's format.
    #[error("field type {0}: {1}")]
    Unformattable(FieldType, crate::fields::TokenError),
    /// The purpose needs the subject's consent, which is not recorded.
    #[error("the data subject has not consented to purpose {0}; nothing was revealed")]
    ConsentMissing(String),
    /// An update would give a deterministic value a second token.
    #[error("another token of field type {0} already holds this value")]
    ValueTaken(FieldType),
    /// A deterministic value already has a token, and handing it back (which
    /// tells the caller which token the value has) needs `lookup:`.
    #[error("the value already has a token; getting it back needs the lookup scope: {0}")]
    ExistingToken(Denial),
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
    /// The master key a rotation was asked to move to cannot be used (its
    /// file, token, PIN or key); the message says why and holds no secret.
    #[error("the new master key cannot be used: {0}")]
    NewMasterKey(String),
    /// Another replica moved the stored keys to a new master key since this
    /// process started: it wraps nothing more under the one it holds.
    #[error(
        "the master key was rotated through another replica since this process started: nothing was changed; restart it with the new keys.master_key_file (or keys.pkcs11 key)"
    )]
    MasterKeyMoved,
    /// The audit event could not be written, so the request was refused.
    #[error("the audit log cannot be written: {0}")]
    AuditUnavailable(store::Error),
    /// The erasure ledger cannot be read or written.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The request's one write would touch more keys than the engine takes
    /// in one unit without holding up every other writer.
    #[error(
        "this request would touch {keys} storage keys; this engine takes at most {max} in one request without holding up every other writer: send fewer items per request"
    )]
    RequestTooLarge {
        /// The keys it would touch.
        keys: usize,
        /// The engine's bound.
        max: usize,
    },
    /// A concurrent change won; nothing was changed and the caller may retry.
    #[error("{0}")]
    Conflict(&'static str),
    /// The caller's request id was used with another request within the
    /// window (`limits.request_id_hours`).
    #[error(
        "this request_id was already used with a different request (within limits.request_id_hours); send a new request with a new request_id"
    )]
    RequestIdReused,
    /// The audit trail or its index was changed behind the vault's back;
    /// the message names the event (by sequence number only).
    #[error("the audit trail is damaged: {0}")]
    AuditDamaged(String),
}

/// The vault over a store `S`.
pub struct Vault<S> {
    store: S,
    keyring: Keyring,
    fields: FieldRegistry,
    /// The audit sequence number last signed by this process.
    last_checkpoint: std::sync::Mutex<u64>,
    /// Where erasures are recorded outside the data directory.
    ledger: Option<erasure::LedgerState>,
    /// The time, in ms since the epoch; replaceable so tests can move it.
    clock: Clock,
    /// Held by key rotations and background job steps, which take turns.
    jobs: tokio::sync::Mutex<()>,
    /// Format-preserving values that needed several draws (a bucket of the
    /// token space filling up); exported as a metric.
    fpt_crowded: std::sync::atomic::AtomicU64,
    /// When that was last logged, ms since the epoch.
    fpt_crowded_logged: std::sync::atomic::AtomicU64,
    /// The most tokens one subject may have.
    max_tokens_per_subject: usize,
    /// How long a call's request id is remembered, in ms.
    request_window_ms: u64,
    /// Whether audit events are indexed by subject (always, but for the
    /// benchmark's baseline).
    index_subjects: bool,
}

/// [`Vault::with_subject_limit`]'s default (`subjects.max_tokens_per_subject`).
pub const DEFAULT_MAX_TOKENS_PER_SUBJECT: usize = 10_000;

/// [`Vault::with_request_window`]'s default (`limits.request_id_hours`).
pub const DEFAULT_REQUEST_WINDOW: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A source of the current time in milliseconds since the Unix epoch.
pub type Clock = std::sync::Arc<dyn Fn() -> u64 + Send + Sync>;

impl<S: Store> Vault<S> {
    /// Opens the vault: unwraps its keys with `master`, creating any key the
    /// store lacks (all of them in an empty store).
    ///
    /// # Errors
    /// [`Error::WrongMasterKey`] if `master` is not this vault's key;
    /// storage failures.
    pub async fn open(store: S, master: &MasterKey, fields: FieldRegistry) -> Result<Self, Error> {
        let keyring = Keyring::open(&store, master).await?;
        let vault = Self {
            store,
            keyring,
            fields,
            last_checkpoint: std::sync::Mutex::new(0),
            ledger: None,
            clock: std::sync::Arc::new(now_ms),
            jobs: tokio::sync::Mutex::new(()),
            fpt_crowded: std::sync::atomic::AtomicU64::new(0),
            fpt_crowded_logged: std::sync::atomic::AtomicU64::new(0),
            max_tokens_per_subject: DEFAULT_MAX_TOKENS_PER_SUBJECT,
            request_window_ms: DEFAULT_REQUEST_WINDOW.as_millis() as u64,
            index_subjects: true,
        };
        // A re-index that finished just before a stop may not have retired
        // the older index keys yet (a rotation stores its key and its job in
        // one write, so no job means nothing is left under them).
        if !vault.job_status(Job::Reindex).await?.pending {
            vault.keyring.retire_index_keys(&vault.store).await?;
        }
        vault.mark_subject_index_start().await?;
        Ok(vault)
    }

    /// Uses `clock` for expiry decisions (tests move time without waiting).
    #[must_use]
    #[cfg(any(test, feature = "testkit"))]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The same vault without the subject index of the audit trail: the
    /// benchmark's baseline for what the index costs. Access histories are
    /// then refused; the server never does this.
    #[must_use]
    #[cfg(feature = "testkit")]
    pub fn without_subject_index(mut self) -> Self {
        self.index_subjects = false;
        self
    }

    /// Refuses tokenizing for a subject that already has `max` tokens.
    #[must_use]
    pub fn with_subject_limit(mut self, max: usize) -> Self {
        self.max_tokens_per_subject = max.max(1);
        self
    }

    /// Remembers a call's request id, and answers the same request sent
    /// again with the first answer, for `window`.
    #[must_use]
    pub fn with_request_window(mut self, window: std::time::Duration) -> Self {
        self.request_window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        self
    }

    fn now(&self) -> u64 {
        (self.clock)()
    }

    /// The underlying store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Gives the store back, e.g. to close it at shutdown.
    pub fn into_store(self) -> S {
        self.store
    }

    /// The configured field types.
    pub fn fields(&self) -> &FieldRegistry {
        &self.fields
    }

    /// How many format-preserving values needed several draws since start:
    /// a rising count means a bucket of the token space is filling up.
    pub fn fpt_crowded(&self) -> u64 {
        self.fpt_crowded.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn subject_hash(&self, subject: &SubjectId) -> [u8; 32] {
        self.keyring
            .subject_key()
            .hash(b"subject", subject.0.as_bytes())
    }

    fn spec(&self, field_type: &FieldType) -> Result<&FieldSpec, ItemError> {
        self.fields
            .get(field_type)
            .ok_or_else(|| ItemError::UnknownFieldType(field_type.clone()))
    }

    /// The blind-index keys of a normalised value: keyed hashes, so the
    /// index reveals nothing without the index key. A subject's values are
    /// indexed per subject, so erasing one subject never takes away
    /// another's token. While an index-key rotation is re-indexing, the
    /// value also has a key under each older index key.
    fn blind_index(
        &self,
        field_type: &FieldType,
        subject: Option<&[u8; 32]>,
        normalized: &SecretValue,
    ) -> Blind {
        let keyring::IndexKeys {
            version,
            active,
            older,
        } = self.keyring.index_keys();
        let mut data = Vec::with_capacity(field_type.as_str().len() + 34 + normalized.len());
        data.extend_from_slice(field_type.as_str().as_bytes());
        data.push(0);
        match subject {
            Some(hash) => {
                data.push(1);
                data.extend_from_slice(hash);
            }
            None => data.push(0),
        }
        data.extend_from_slice(normalized.expose().as_bytes());
        let blind = Blind {
            version,
            active: active.hash(BLIND_INDEX_DOMAIN, &data),
            older: older
                .iter()
                .map(|k| k.hash(BLIND_INDEX_DOMAIN, &data))
                .collect(),
        };
        zeroize::Zeroize::zeroize(&mut data);
        blind
    }
}

/// Separates blind-index hashes from every other use of a hash key.
const BLIND_INDEX_DOMAIN: &[u8] = b"blind-index/v1";

/// A value's blind-index keys: under the active index key, and under older
/// keys still being re-indexed (usually none).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Blind {
    /// The version of the index key [`Blind::active`] is hashed under.
    version: u32,
    /// Where the value is indexed from now on.
    active: [u8; 32],
    /// Where it may still be indexed, newest first.
    older: Vec<[u8; 32]>,
}

impl Blind {
    /// Every key, the active one first.
    fn all(&self) -> impl Iterator<Item = &[u8; 32]> {
        std::iter::once(&self.active).chain(&self.older)
    }

    /// How many keys [`Blind::all`] yields.
    fn len(&self) -> usize {
        1 + self.older.len()
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod history_tests;
#[cfg(test)]
mod requests_tests;
#[cfg(test)]
mod retention_tests;
#[cfg(test)]
mod rotation_tests;
#[cfg(test)]
mod tests;
