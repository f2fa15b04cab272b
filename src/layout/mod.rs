//! The storage layout: every key the vault writes is built and parsed here
//! and nowhere else, one section per table, in the order of the table in
//! ARCHITECTURE.md ("Storage layout").
//!
//! These bytes are on the disk of every deployed vault and in every backup:
//! **never change one**. A new key gets a new name; the tests at the end of
//! this file pin each name and round-trip each encoder.
//!
//! Two things are not here because their owner writes them itself: the
//! `audit` table's keys (the entry's sequence number, big-endian:
//! [`crate::store::chain::key`]), which the store assigns inside its own
//! commit, and `audit_checkpoints` (the same encoding).

use crate::crypto::{NONCE_LEN, Sealed};

/// A keyed hash of a data subject's id, as records and the subject tables
/// hold it.
pub type SubjectHash = [u8; 32];

// --- records -------------------------------------------------------------
//
// Keyed by the token's storage key (`Token::storage_key`); the value is a
// [`Record`] (`record.rs`).

mod record;

pub use record::{Binding, DecodeError, Record};

/// Which key encrypted a record: stored as a `u32` in the record and bound
/// into its associated data, `0` for the subject's own key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyVersion {
    /// The record's subject's own data key (crypto-shredded on erasure).
    Subject,
    /// The vault's data key of this version (1 and up).
    Vault(u32),
}

impl KeyVersion {
    /// The number stored in the record.
    pub fn stored(self) -> u32 {
        match self {
            KeyVersion::Subject => 0,
            KeyVersion::Vault(version) => version,
        }
    }

    /// The key version a stored number names.
    pub fn from_stored(stored: u32) -> Self {
        match stored {
            0 => KeyVersion::Subject,
            version => KeyVersion::Vault(version),
        }
    }
}

impl std::fmt::Display for KeyVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyVersion::Subject => f.write_str("subject"),
            KeyVersion::Vault(version) => write!(f, "{version}"),
        }
    }
}

// --- keys ----------------------------------------------------------------

/// The keys the master key wraps, each stored under
/// `<prefix><version, 10 digits>` in the `keys` table. Families with a
/// single key use version 1 and read the newest label under their prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterWrapped {
    /// The vault's data keys, which encrypt values without a subject.
    DataKey,
    /// Hashes subject ids (HMAC) into [`SubjectHash`]es.
    SubjectIdHashKey,
    /// Hashes values of deterministic field types for the blind index.
    BlindIndexKey,
    /// Hashes tokens and subject ids in audit events.
    AuditHashKey,
    /// The seed of the Ed25519 key that signs audit checkpoints and sealed exports.
    AuditSigningKey,
    /// Wraps each subject's own data key ([`subject_data_key_label`]).
    SubjectKek,
    /// MACs the erasure ledger's entries into a chain.
    ErasureLedgerMacKey,
}

impl MasterWrapped {
    /// Every family, in the order a master-key rotation re-wraps them.
    pub const ALL: [MasterWrapped; 7] = [
        MasterWrapped::DataKey,
        MasterWrapped::SubjectIdHashKey,
        MasterWrapped::BlindIndexKey,
        MasterWrapped::AuditHashKey,
        MasterWrapped::AuditSigningKey,
        MasterWrapped::SubjectKek,
        MasterWrapped::ErasureLedgerMacKey,
    ];

    /// The label prefix on disk.
    pub fn prefix(self) -> &'static str {
        match self {
            MasterWrapped::DataKey => "dek/",
            MasterWrapped::SubjectIdHashKey => "subject-hash/",
            MasterWrapped::BlindIndexKey => "index-hash/",
            MasterWrapped::AuditHashKey => "audit-hash/",
            MasterWrapped::AuditSigningKey => "audit-signing/",
            MasterWrapped::SubjectKek => "subject-kek/",
            MasterWrapped::ErasureLedgerMacKey => "erasure-ledger-mac/",
        }
    }

    /// The label of `version`; also the associated data it is wrapped with.
    pub fn label(self, version: u32) -> Vec<u8> {
        format!("{}{version:010}", self.prefix()).into_bytes()
    }

    /// The version a label of this family names.
    pub fn version_of(self, label: &[u8]) -> Option<u32> {
        std::str::from_utf8(label)
            .ok()?
            .strip_prefix(self.prefix())?
            .parse()
            .ok()
    }
}

/// Where each subject's own data key is stored, wrapped by the subject KEK,
/// followed by the subject hash in lowercase hex.
const SUBJECT_DATA_KEY_PREFIX: &[u8] = b"subject-key/";

/// The label of a subject's own data key.
pub fn subject_data_key_label(subject: &SubjectHash) -> Vec<u8> {
    let mut label = SUBJECT_DATA_KEY_PREFIX.to_vec();
    label.extend_from_slice(data_encoding::HEXLOWER.encode(subject).as_bytes());
    label
}

/// The subject a subject data key label belongs to.
pub fn subject_of_data_key_label(label: &[u8]) -> Option<SubjectHash> {
    let hex = label.strip_prefix(SUBJECT_DATA_KEY_PREFIX)?;
    data_encoding::HEXLOWER.decode(hex).ok()?.try_into().ok()
}

/// The audit public key, stored in the clear so that offline verification
/// needs no secret.
pub const AUDIT_PUBLIC_KEY: &[u8] = b"audit-public-key";

const WRAPPED_FORMAT_V1: u8 = 1;

/// Format 1 with, after the creation time, the number of the subject's
/// newest erasure the vault held when the key was made: subject keys.
const WRAPPED_FORMAT_V2: u8 = 2;

/// The value of a wrapped key: format 1, created ms (big-endian), nonce,
/// ciphertext and tag.
pub fn encode_wrapped(sealed: &Sealed, created_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 8 + NONCE_LEN + sealed.ciphertext.len());
    out.push(WRAPPED_FORMAT_V1);
    out.extend_from_slice(&created_ms.to_be_bytes());
    out.extend_from_slice(&sealed.nonce);
    out.extend_from_slice(&sealed.ciphertext);
    out
}

/// The value of a wrapped subject key: format 2, created ms, then
/// `erased_through`, the number of the subject's newest erasure when it was
/// made (0 for none; see [`subject_erased_key`]), both big-endian, then as
/// format 1. An erasure applied again after a restore deletes the key only
/// if it was made before that erasure, decided by these numbers and not by
/// the clocks of the replicas that wrote them.
pub fn encode_wrapped_subject(sealed: &Sealed, created_ms: u64, erased_through: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 16 + NONCE_LEN + sealed.ciphertext.len());
    out.push(WRAPPED_FORMAT_V2);
    out.extend_from_slice(&created_ms.to_be_bytes());
    out.extend_from_slice(&erased_through.to_be_bytes());
    out.extend_from_slice(&sealed.nonce);
    out.extend_from_slice(&sealed.ciphertext);
    out
}

/// Where the nonce starts in a wrapped-key value of the format `bytes`
/// names.
fn wrapped_nonce_at(bytes: &[u8]) -> Option<usize> {
    match *bytes.first()? {
        WRAPPED_FORMAT_V1 => Some(1 + 8),
        WRAPPED_FORMAT_V2 => Some(1 + 16),
        _ => None,
    }
}

/// The sealed key in a wrapped-key value, if it is well formed.
pub fn decode_wrapped(bytes: &[u8]) -> Option<Sealed> {
    let at = wrapped_nonce_at(bytes)?;
    if bytes.len() < at + NONCE_LEN + 16 {
        return None;
    }
    Some(Sealed {
        nonce: bytes[at..at + NONCE_LEN].try_into().ok()?,
        ciphertext: bytes[at + NONCE_LEN..].to_vec(),
    })
}

/// The number of the subject's newest erasure when a wrapped subject key
/// was made; `None` for a key of an earlier release (format 1), which only
/// its creation time places.
pub fn wrapped_erased_through(bytes: &[u8]) -> Option<u64> {
    if bytes.first() != Some(&WRAPPED_FORMAT_V2) {
        return None;
    }
    bytes
        .get(9..17)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
}

/// When a wrapped key was created (0 if the value is malformed).
pub fn wrapped_created_ms(bytes: &[u8]) -> u64 {
    bytes
        .get(1..9)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

// --- blind_index ---------------------------------------------------------
//
// Keyed by the 32-byte HMAC the blind-index key makes of the field type,
// subject and normalised value (`vault::tokenize`); the value is the token.

// --- subject_index -------------------------------------------------------

/// The subject-index key of one of a subject's tokens: the subject hash,
/// then the token's storage key. The value is empty.
pub fn subject_index_key(subject: &SubjectHash, token: &[u8]) -> Vec<u8> {
    [subject.as_slice(), token].concat()
}

/// The token a subject-index key names (its subject is the scan prefix).
pub fn token_of_subject_index_key(key: &[u8]) -> Option<&[u8]> {
    key.get(32..).filter(|token| !token.is_empty())
}

// --- consent -------------------------------------------------------------

/// The consent key of a subject and purpose: the subject hash, then the
/// purpose's name.
pub fn consent_key(subject: &SubjectHash, purpose: &str) -> Vec<u8> {
    [subject.as_slice(), purpose.as_bytes()].concat()
}

/// The purpose a consent key names.
pub fn purpose_of_consent_key(key: &[u8]) -> Option<&str> {
    std::str::from_utf8(key.get(32..)?).ok()
}

/// A subject's consent to one purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsentState {
    /// Whether consent is granted.
    pub granted: bool,
    /// When it was last set (0: never).
    pub updated_ms: u64,
    /// The number of the subject's newest erasure when it was set (0 for
    /// none); `None` for a decision of an earlier release, which only its
    /// time places. See [`encode_wrapped_subject`].
    pub erased_through: Option<u64>,
}

impl ConsentState {
    /// "Not granted", never set.
    pub const NEVER: Self = Self {
        granted: false,
        updated_ms: 0,
        erased_through: None,
    };

    /// The stored value: 1 (granted) or 0, then the time and the erasure
    /// number, big-endian (a decision of an earlier release has no number).
    pub fn encode(self) -> Vec<u8> {
        let mut value = vec![u8::from(self.granted)];
        value.extend_from_slice(&self.updated_ms.to_be_bytes());
        if let Some(erased_through) = self.erased_through {
            value.extend_from_slice(&erased_through.to_be_bytes());
        }
        value
    }

    /// A stored decision; none, or a damaged one, is "not granted".
    pub fn decode(value: Option<&[u8]>) -> Self {
        let number = |bytes: &[u8]| bytes.try_into().map_or(0, u64::from_be_bytes);
        match value {
            Some([flag, rest @ ..]) if rest.len() == 8 || rest.len() == 16 => ConsentState {
                granted: *flag == 1,
                updated_ms: number(&rest[..8]),
                erased_through: (rest.len() == 16).then(|| number(&rest[8..])),
            },
            _ => Self::NEVER,
        }
    }
}

// --- expiry --------------------------------------------------------------

/// The expiry-table key of a record: its expiry (ms, big-endian, so keys
/// sort by time), then its token's storage key. The value is empty.
pub fn expiry_key(expires_ms: u64, token: &[u8]) -> Vec<u8> {
    [expires_ms.to_be_bytes().as_slice(), token].concat()
}

/// The expiry and the token of an expiry-table key.
pub fn split_expiry_key(key: &[u8]) -> Option<(u64, &[u8])> {
    let (time, token) = key.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*time), token))
}

// --- audit_index ---------------------------------------------------------
//
// Keyed by an index prefix, then the complement of the audit entry's
// sequence number (`store::chain::index_key`, which the store appends inside
// its commit); the value is empty.

/// The audit-index prefix of a subject's events: `s`, then the subject's
/// audit form (the 32-byte HMAC events name it by under the audit key).
pub fn audit_subject_prefix(audit_form: &[u8; 32]) -> Vec<u8> {
    let mut key = Vec::with_capacity(33);
    key.push(b's');
    key.extend_from_slice(audit_form);
    key
}

// --- meta ----------------------------------------------------------------

/// Present once every record with an expiry has its expiry-table entry (the
/// one-time back-fill of vaults made before that table existed).
pub const EXPIRY_INDEXED: &[u8] = b"expiry/indexed";

/// The signed prune marker of the audit trail (`audit::PruneMarker`).
pub const AUDIT_PRUNE_MARKER: &[u8] = b"audit/pruned-through";

/// The newest signed checkpoint: its sequence number (big-endian), then the
/// checkpoint as the `audit_checkpoints` table holds it. Written with each
/// checkpoint, so that a reader needs one get, not a scan, to find it.
pub const AUDIT_LAST_CHECKPOINT: &[u8] = b"audit/last-checkpoint";

/// The number (big-endian) of the newest signed head that this chain was
/// found to have lost, once its `ChainRolledBack` event is recorded: the
/// next open does not record the same loss again. A further restore
/// takes it away with the event, and the loss is recorded again.
pub const AUDIT_ROLLBACK_RECORDED: &[u8] = b"audit/rollback-recorded";

/// The prefix of the subjects' erasure marks.
pub const SUBJECT_ERASED_PREFIX: &[u8] = b"subject-erased/";

/// The key of a subject's erasure mark: the number (big-endian) of the
/// newest erasure ledger entry applied to the subject, written with it.
/// A subject key or a consent made later records the number it found
/// (guarded unchanged), so an erasure applied again after a restore tells
/// what came after it by number, not by clock.
pub fn subject_erased_key(subject: &SubjectHash) -> Vec<u8> {
    [SUBJECT_ERASED_PREFIX, subject.as_slice()].concat()
}

/// The prefix of remembered requests (`vault::requests`).
pub const REQUEST_PREFIX: &[u8] = b"request/";

/// The key of a remembered request: the prefix, then the keyed hash of
/// the caller's identity, the method and the caller's request id.
pub fn request_key(key: &[u8; 32]) -> Vec<u8> {
    [REQUEST_PREFIX, key.as_slice()].concat()
}

/// The prefix of the remembered requests' subject entries.
pub const REQUEST_SUBJECT_PREFIX: &[u8] = b"request-subject/";

/// The entry that ties a remembered request to a subject its call named:
/// the prefix, the subject's hash, then the request key's hash. What an
/// erasure finds the subject's requests by.
pub fn request_subject_key(subject: &SubjectHash, key: &[u8; 32]) -> Vec<u8> {
    [REQUEST_SUBJECT_PREFIX, subject.as_slice(), key.as_slice()].concat()
}

/// The prefix of a subject's [`request_subject_key`] entries.
pub fn request_subject_prefix(subject: &SubjectHash) -> Vec<u8> {
    [REQUEST_SUBJECT_PREFIX, subject.as_slice()].concat()
}

/// The request key's hash in a [`request_subject_key`].
pub fn request_of_subject_key(key: &[u8]) -> Option<[u8; 32]> {
    key.strip_prefix(REQUEST_SUBJECT_PREFIX)?
        .get(32..)?
        .try_into()
        .ok()
}

/// The prefix of the remembered requests' expiry entries, in time order.
pub const REQUEST_EXPIRY_PREFIX: &[u8] = b"request-expiry/";

/// The expiry entry of a remembered request: the prefix, when it expires
/// (ms since the epoch, big-endian), then its key's hash.
pub fn request_expiry_key(expires_ms: u64, key: &[u8; 32]) -> Vec<u8> {
    [
        REQUEST_EXPIRY_PREFIX,
        expires_ms.to_be_bytes().as_slice(),
        key.as_slice(),
    ]
    .concat()
}

/// The inverse of [`request_expiry_key`].
pub fn split_request_expiry_key(key: &[u8]) -> Option<(u64, [u8; 32])> {
    let rest = key.strip_prefix(REQUEST_EXPIRY_PREFIX)?;
    let (time, hash) = rest.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*time), hash.try_into().ok()?))
}

/// The first audit sequence number whose events are indexed by subject
/// (big-endian): events before it were written by a release that did not
/// index them, and a subject's access history says it starts there.
pub const AUDIT_SUBJECTS_INDEXED_FROM: &[u8] = b"audit/subjects-indexed-from";

/// This vault's id (16 random bytes), made when it was first opened with a
/// ledger table: what that ledger is bound to.
pub const VAULT_ID: &[u8] = b"vault-id";

/// The id of the erasure ledger table this vault is bound to (16 bytes, as
/// the ledger's `tokenvault_ledger_schema.ledger_id`).
pub const ERASURE_LEDGER_ID: &[u8] = b"erasure-ledger-id";

/// The prefix of the erasure ledger's entries as the vault recorded them.
pub const ERASURE_LEDGER_ENTRY_PREFIX: &[u8] = b"erasure-ledger/entry/";

/// The key of erasure ledger entry `seq`: the prefix, then `seq` big-endian.
pub fn erasure_ledger_entry_key(seq: u64) -> Vec<u8> {
    [ERASURE_LEDGER_ENTRY_PREFIX, seq.to_be_bytes().as_slice()].concat()
}

/// What a background job keeps in `meta`, under `<job>/<what>`, where the
/// job's name is its stored name (`vault::Job::name`), never renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEntry {
    /// The next record key to visit; present while the job is due.
    Cursor,
    /// Visited, total at start, raced (u64 each, big-endian).
    Progress,
    /// Present (empty) while an operator holds the job.
    Paused,
}

/// The `meta` key of one of a job's entries.
pub fn job_key(job: &str, entry: JobEntry) -> Vec<u8> {
    let entry = match entry {
        JobEntry::Cursor => "cursor",
        JobEntry::Progress => "progress",
        JobEntry::Paused => "paused",
    };
    format!("{job}/{entry}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUBJECT: SubjectHash = [0xab; 32];

    /// The names on disk, spelled out: a change here breaks every deployed
    /// vault, so this test must only ever grow.
    #[test]
    fn on_disk_names_never_change() {
        let labels: Vec<String> = MasterWrapped::ALL
            .iter()
            .map(|family| String::from_utf8(family.label(7)).unwrap())
            .collect();
        assert_eq!(
            labels,
            [
                "dek/0000000007",
                "subject-hash/0000000007",
                "index-hash/0000000007",
                "audit-hash/0000000007",
                "audit-signing/0000000007",
                "subject-kek/0000000007",
                "erasure-ledger-mac/0000000007",
            ]
        );
        assert_eq!(
            subject_data_key_label(&SUBJECT),
            [b"subject-key/".as_slice(), "ab".repeat(32).as_bytes()].concat()
        );
        assert_eq!(AUDIT_PUBLIC_KEY, b"audit-public-key");
        assert_eq!(KeyVersion::Subject.stored(), 0);
        assert_eq!(KeyVersion::Vault(3).stored(), 3);
        assert_eq!(
            subject_index_key(&SUBJECT, b"tok_x"),
            [[0xab; 32].as_slice(), b"tok_x"].concat()
        );
        assert_eq!(
            consent_key(&SUBJECT, "marketing"),
            [[0xab; 32].as_slice(), b"marketing"].concat()
        );
        assert_eq!(
            expiry_key(0x0102, b"tok_x"),
            [[0, 0, 0, 0, 0, 0, 1, 2].as_slice(), b"tok_x"].concat()
        );
        assert_eq!(EXPIRY_INDEXED, b"expiry/indexed");
        assert_eq!(AUDIT_PRUNE_MARKER, b"audit/pruned-through");
        assert_eq!(AUDIT_LAST_CHECKPOINT, b"audit/last-checkpoint");
        assert_eq!(AUDIT_SUBJECTS_INDEXED_FROM, b"audit/subjects-indexed-from");
        assert_eq!(VAULT_ID, b"vault-id");
        assert_eq!(ERASURE_LEDGER_ID, b"erasure-ledger-id");
        assert_eq!(AUDIT_ROLLBACK_RECORDED, b"audit/rollback-recorded");
        assert_eq!(
            audit_subject_prefix(&SUBJECT),
            [b"s".as_slice(), &[0xab; 32]].concat()
        );
        assert_eq!(
            erasure_ledger_entry_key(5),
            [
                b"erasure-ledger/entry/".as_slice(),
                &[0, 0, 0, 0, 0, 0, 0, 5]
            ]
            .concat()
        );
        let jobs: Vec<Vec<u8>> = [JobEntry::Cursor, JobEntry::Progress, JobEntry::Paused]
            .into_iter()
            .map(|entry| job_key("reencrypt", entry))
            .collect();
        assert_eq!(
            jobs,
            [
                b"reencrypt/cursor".to_vec(),
                b"reencrypt/progress".to_vec(),
                b"reencrypt/paused".to_vec()
            ]
        );
        assert_eq!(
            ConsentState {
                granted: true,
                updated_ms: 9,
                erased_through: None,
            }
            .encode(),
            [1, 0, 0, 0, 0, 0, 0, 0, 9]
        );
        assert_eq!(
            subject_erased_key(&[3; 32]),
            [b"subject-erased/".as_slice(), &[3; 32]].concat()
        );
    }

    #[test]
    fn every_key_round_trips() {
        for family in MasterWrapped::ALL {
            for version in [1, 42, u32::MAX] {
                assert_eq!(family.version_of(&family.label(version)), Some(version));
            }
            // A label of another family is not one of this family's.
            for other in MasterWrapped::ALL.into_iter().filter(|o| *o != family) {
                assert_eq!(family.version_of(&other.label(1)), None, "{family:?}");
            }
        }
        for stored in [0, 1, 9, u32::MAX] {
            assert_eq!(KeyVersion::from_stored(stored).stored(), stored);
        }
        assert_eq!(
            subject_of_data_key_label(&subject_data_key_label(&SUBJECT)),
            Some(SUBJECT)
        );
        assert_eq!(
            token_of_subject_index_key(&subject_index_key(&SUBJECT, b"tok_x")),
            Some(b"tok_x".as_slice())
        );
        assert_eq!(
            purpose_of_consent_key(&consent_key(&SUBJECT, "billing")),
            Some("billing")
        );
        assert_eq!(
            split_expiry_key(&expiry_key(u64::MAX - 1, b"tok_y")),
            Some((u64::MAX - 1, b"tok_y".as_slice()))
        );
        // Expiry keys sort by time whatever the token.
        assert!(expiry_key(1, b"zzz") < expiry_key(2, b"aaa"));
        let sealed = Sealed {
            nonce: [7; NONCE_LEN],
            ciphertext: vec![9; 48],
        };
        let wrapped = encode_wrapped(&sealed, 1234);
        let back = decode_wrapped(&wrapped).unwrap();
        assert_eq!(
            (back.nonce, &back.ciphertext),
            (sealed.nonce, &sealed.ciphertext)
        );
        assert_eq!(wrapped_created_ms(&wrapped), 1234);
        assert_eq!(wrapped_erased_through(&wrapped), None);
        assert!(decode_wrapped(&wrapped[..20]).is_none());
        let subject = encode_wrapped_subject(&sealed, 1234, 7);
        let back = decode_wrapped(&subject).unwrap();
        assert_eq!(
            (back.nonce, back.ciphertext),
            (sealed.nonce, sealed.ciphertext)
        );
        assert_eq!(wrapped_created_ms(&subject), 1234);
        assert_eq!(wrapped_erased_through(&subject), Some(7));
        assert!(decode_wrapped(&subject[..28]).is_none());
        for state in [
            (true, 5, None),
            (false, u64::MAX, Some(0)),
            (true, 1, Some(9)),
        ] {
            let state = ConsentState {
                granted: state.0,
                updated_ms: state.1,
                erased_through: state.2,
            };
            assert_eq!(ConsentState::decode(Some(&state.encode())), state);
        }
        assert!(!ConsentState::decode(Some(b"junk")).granted);
    }
}
