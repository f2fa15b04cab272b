//! Data subjects: per-subject keys (crypto-shredding), export,
//! rectification, deletion and consent. Erasure is in `erasure.rs`.

use std::collections::HashMap;

use super::{
    Blind, Error, ItemError, Record, SubjectId, Vault,
    keyring::SUBJECT_KEY_PREFIX_BYTES,
    record::{Binding, SUBJECT_KEY},
    retention::expiry_key,
};
use crate::{
    audit::{AuditContext, Outcome},
    authz::{Denial, Permit, Purpose},
    crypto::{DataKey, SecretValue},
    store::{Batch, Store, Table},
    token::{FieldType, Token},
};

/// How often an update is tried again when a concurrent write changed the
/// record between its read and its write.
const MAX_UPDATE_ATTEMPTS: usize = 8;

/// An update ready to write: the record as read, and its replacement.
struct PreparedUpdate {
    /// The stored bytes the update was prepared from; the write applies only
    /// if they are still there.
    stored_bytes: Vec<u8>,
    /// The old value's blind-index key, if indexed.
    old_blind: Option<[u8; 32]>,
    /// The new value's blind-index keys, for deterministic field types.
    new_blind: Option<Blind>,
    /// The replacement record.
    record: Record,
}

/// One value of a subject, for export.
#[derive(Debug)]
pub struct SubjectField {
    /// The token.
    pub token: Token,
    /// Its field type.
    pub field_type: FieldType,
    /// The value.
    pub value: SecretValue,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// Expiry, ms since the epoch.
    pub expires_ms: Option<u64>,
}

/// What an erasure did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasureReceipt {
    /// The subject's keyed hash, hex, as the ledger holds it.
    pub subject_hash: String,
    /// Tokens erased by this call.
    pub tokens_erased: u64,
    /// When, ms since the epoch.
    pub erased_ms: u64,
}

/// A subject's consent to one purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsentState {
    /// Whether consent is granted.
    pub granted: bool,
    /// When it was last set (0: never).
    pub updated_ms: u64,
}

/// The subject-index key of one of a subject's tokens, given the token's
/// storage key.
pub(super) fn subject_index_key(subject: &[u8; 32], token_key: &[u8]) -> Vec<u8> {
    [subject.as_slice(), token_key].concat()
}

pub(super) fn subject_key_label(subject: &[u8; 32]) -> Vec<u8> {
    let mut label = SUBJECT_KEY_PREFIX_BYTES.to_vec();
    label.extend_from_slice(data_encoding::HEXLOWER.encode(subject).as_bytes());
    label
}

pub(super) fn consent_key(subject: &[u8; 32], purpose: &str) -> Vec<u8> {
    let mut key = subject.to_vec();
    key.extend_from_slice(purpose.as_bytes());
    key
}

/// A stored consent decision (none, or a damaged one, is "not granted").
pub(super) fn decode_consent(value: Option<&[u8]>) -> ConsentState {
    match value {
        Some([flag, rest @ ..]) if rest.len() == 8 => ConsentState {
            granted: *flag == 1,
            updated_ms: rest.try_into().map_or(0, u64::from_be_bytes),
        },
        _ => ConsentState {
            granted: false,
            updated_ms: 0,
        },
    }
}

/// Created time of a wrapped key (see `keyring::encode_wrapped`).
pub(super) fn wrapped_created_ms(wrapped: &[u8]) -> u64 {
    wrapped
        .get(1..9)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

impl<S: Store> Vault<S> {
    /// The data keys of those `subjects` that have one (an erased subject
    /// has none).
    pub(super) async fn subject_keys(
        &self,
        subjects: &[[u8; 32]],
    ) -> Result<HashMap<[u8; 32], DataKey>, Error> {
        Ok(self.load_subject_keys(subjects).await?.0)
    }

    /// The data keys of `subjects`, making the missing ones (under a guard,
    /// so concurrent first writes agree on one key).
    pub(super) async fn subject_keys_or_create(
        &self,
        subjects: &[[u8; 32]],
    ) -> Result<HashMap<[u8; 32], DataKey>, Error> {
        let (mut keys, missing) = self.load_subject_keys(subjects).await?;
        if missing.is_empty() {
            return Ok(keys);
        }
        let mut batch = Batch::new();
        let mut created = Vec::new();
        for (subject, label) in &missing {
            let (key, wrapped) = self.keyring.new_subject_key(label)?;
            batch.unit().guard_absent(Table::Keys, label.clone()).put(
                Table::Keys,
                label.clone(),
                wrapped,
            );
            created.push((*subject, label, key));
        }
        let outcomes = self.store.commit(batch).await?;
        for ((subject, label, key), outcome) in created.into_iter().zip(outcomes) {
            let key = match outcome {
                Ok(()) => key,
                // Another request created it first: use theirs.
                Err(conflict) => self.keyring.open_subject_key(label, &conflict.existing)?,
            };
            keys.insert(subject, key);
        }
        Ok(keys)
    }

    /// The stored keys of `subjects`, and the subjects (with their key
    /// labels) that have none.
    async fn load_subject_keys(
        &self,
        subjects: &[[u8; 32]],
    ) -> Result<(HashMap<[u8; 32], DataKey>, Vec<([u8; 32], Vec<u8>)>), Error> {
        let mut keys = HashMap::new();
        let mut missing = Vec::new();
        if subjects.is_empty() {
            return Ok((keys, missing));
        }
        let labels: Vec<Vec<u8>> = subjects.iter().map(subject_key_label).collect();
        let stored = self.store.get_many(Table::Keys, labels.clone()).await?;
        for ((subject, label), wrapped) in subjects.iter().zip(labels).zip(stored) {
            match wrapped {
                Some(wrapped) => {
                    keys.insert(*subject, self.keyring.open_subject_key(&label, &wrapped)?);
                }
                None => missing.push((*subject, label)),
            }
        }
        Ok((keys, missing))
    }

    /// Every live value of a subject (right of access and portability).
    ///
    /// # Errors
    /// Storage failures; [`Error::AuditUnavailable`] if the event cannot be
    /// written (nothing is returned then).
    pub async fn export_subject(
        &self,
        subject: Permit<SubjectId>,
        audit: &AuditContext,
    ) -> Result<Vec<SubjectField>, Error> {
        let subject_id = subject.into_item();
        let hash = self.subject_hash(&subject_id);
        let mut event = audit.event(Outcome::Ok);
        event.subjects.push(self.audit_subject(&subject_id));
        let (tokens, records) = self.subject_records(&hash).await?;
        let keys = self.subject_keys(&[hash]).await?;
        let now = self.now();
        let mut fields = Vec::new();
        for (token, bytes) in tokens.into_iter().zip(records) {
            let Some(record) = bytes.and_then(|b| Record::decode(&b).ok()) else {
                continue;
            };
            if record.expired(now) {
                continue;
            }
            let Ok(value) = self.decrypt(&token, &record, keys.get(&hash)) else {
                continue;
            };
            event.field_types.push(record.field_type.to_string());
            event.tokens.push(self.audit_token(&token));
            fields.push(SubjectField {
                token,
                field_type: record.field_type,
                value,
                created_ms: record.created_ms,
                expires_ms: record.expires_ms,
            });
        }
        event.field_types.sort();
        event.field_types.dedup();
        event.items = u32::try_from(fields.len()).unwrap_or(u32::MAX);
        self.record(&event).await?;
        Ok(fields)
    }

    pub(super) async fn subject_tokens(&self, hash: &[u8; 32]) -> Result<Vec<Token>, Error> {
        let entries = self
            .store
            .scan_prefix(Table::SubjectIndex, hash.to_vec())
            .await?;
        Ok(entries
            .into_iter()
            .filter_map(|(key, _)| std::str::from_utf8(&key[32..]).ok()?.parse().ok())
            .collect())
    }

    /// A subject's tokens and their stored records (`None` where a record
    /// is gone), in the same order.
    pub(super) async fn subject_records(
        &self,
        hash: &[u8; 32],
    ) -> Result<(Vec<Token>, Vec<Option<Vec<u8>>>), Error> {
        let tokens = self.subject_tokens(hash).await?;
        let records = self
            .store
            .get_many(
                Table::Records,
                tokens.iter().map(|t| t.storage_key().to_vec()).collect(),
            )
            .await?;
        Ok((tokens, records))
    }

    /// Decrypts a record with the vault key it names, or its subject's key.
    pub(super) fn decrypt(
        &self,
        token: &Token,
        record: &Record,
        subject_key: Option<&DataKey>,
    ) -> Result<SecretValue, ItemError> {
        let vault_key;
        let key = if record.key_version == SUBJECT_KEY {
            // The subject's key is gone: the subject was erased.
            subject_key.ok_or(ItemError::NotFound)?
        } else {
            vault_key = self.keyring.data_key(record.key_version).ok_or_else(|| {
                tracing::error!(field_type = %record.field_type, key_version = record.key_version, "stored record names an unknown key version");
                ItemError::DataLoss
            })?;
            &*vault_key
        };
        // A record moved under a token of another field type (opaque tokens
        // name theirs) is not this token's.
        if token
            .field_type()
            .is_some_and(|ft| *ft != record.field_type)
        {
            tracing::error!(field_type = %record.field_type, "stored record's field type differs from its token's");
            return Err(ItemError::DataLoss);
        }
        let aad = record.aad(token);
        let plaintext = key.open(&record.nonce, &record.ciphertext, &aad).map_err(|_| {
            tracing::error!(field_type = %record.field_type, "stored record failed authentication (corrupted or moved)");
            ItemError::DataLoss
        })?;
        SecretValue::from_decrypted(plaintext).ok_or_else(|| {
            tracing::error!(field_type = %record.field_type, "decrypted value is not UTF-8");
            ItemError::DataLoss
        })
    }

    /// Records a subject's consent decision for a purpose.
    ///
    /// # Errors
    /// Storage or audit failures.
    pub async fn set_consent(
        &self,
        permit: Permit<(SubjectId, Purpose, bool)>,
        audit: &AuditContext,
    ) -> Result<ConsentState, Error> {
        let (subject, purpose, granted) = permit.into_item();
        let hash = self.subject_hash(&subject);
        let state = ConsentState {
            granted,
            updated_ms: self.now(),
        };
        let mut value = vec![u8::from(granted)];
        value.extend_from_slice(&state.updated_ms.to_be_bytes());
        let mut event = audit.event(Outcome::Ok);
        event.subjects.push(self.audit_subject(&subject));
        event.consent = Some(if granted {
            "granted".into()
        } else {
            "withdrawn".into()
        });
        let mut batch = Batch::new();
        batch
            .unit()
            .put(Table::Consent, consent_key(&hash, purpose.as_str()), value)
            .append_audit(event.encode());
        self.store
            .commit(batch)
            .await
            .map_err(Error::AuditUnavailable)?;
        Ok(state)
    }

    /// Reads a subject's consent decision for a purpose.
    ///
    /// # Errors
    /// Storage or audit failures.
    pub async fn get_consent(
        &self,
        permit: Permit<(SubjectId, Purpose)>,
        audit: &AuditContext,
    ) -> Result<ConsentState, Error> {
        let (subject, purpose) = permit.into_item();
        let hash = self.subject_hash(&subject);
        let state = self
            .consents(&[(hash, purpose.as_str().to_owned())])
            .await?
            .pop()
            .unwrap_or(ConsentState {
                granted: false,
                updated_ms: 0,
            });
        let mut event = audit.event(Outcome::Ok);
        event.subjects.push(self.audit_subject(&subject));
        self.record(&event).await?;
        Ok(state)
    }

    pub(super) async fn consents(
        &self,
        wanted: &[([u8; 32], String)],
    ) -> Result<Vec<ConsentState>, Error> {
        // Most detokenizes need no consent: skip the read (and its hop to the
        // blocking pool) entirely.
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let keys = wanted.iter().map(|(h, p)| consent_key(h, p)).collect();
        Ok(self
            .store
            .get_many(Table::Consent, keys)
            .await?
            .into_iter()
            .map(|v| decode_consent(v.as_deref()))
            .collect())
    }

    /// Replaces the value behind `token` (rectification). `authorize` is asked
    /// with the token's stored field type.
    ///
    /// # Errors
    /// Item errors inside; storage or audit failures outside.
    pub async fn update_value(
        &self,
        token: &Token,
        value: SecretValue,
        authorize: impl Fn(&FieldType) -> Result<Permit<FieldType>, Denial>,
        audit: &AuditContext,
    ) -> Result<Result<FieldType, ItemError>, Error> {
        let mut event = audit.event(Outcome::Ok);
        event.tokens.push(self.audit_token(token));
        // A background job (re-encryption, re-indexing) or another update
        // may change the record between its read and this write; the write
        // then does not apply, and the update starts over from a fresh read.
        for _ in 0..MAX_UPDATE_ATTEMPTS {
            let outcome = self.prepare_update(token, &value, &authorize).await?;
            let update = match outcome {
                Ok(update) => update,
                Err(e) => {
                    event.failed_items = 1;
                    self.record(&event).await?;
                    return Ok(Err(e));
                }
            };
            let field_type = update.record.field_type.clone();
            event.field_types = vec![field_type.to_string()];
            let mut batch = Batch::new();
            let unit = batch.unit();
            let mut index_guards = 0;
            if let Some(new) = &update.new_blind
                && update.record.blind != update.old_blind
            {
                // The new value must not be indexed for another token under
                // any index key still in use.
                for key in new.all().filter(|k| Some(**k) != update.old_blind) {
                    unit.guard_absent(Table::Index, key.to_vec());
                    index_guards += 1;
                }
                unit.put(
                    Table::Index,
                    new.active.to_vec(),
                    token.as_str().as_bytes().to_vec(),
                );
            }
            if let Some(old) = update
                .old_blind
                .filter(|old| update.record.blind != Some(*old))
            {
                unit.delete(Table::Index, old.to_vec());
            }
            unit.guard_unchanged(
                Table::Records,
                token.storage_key().to_vec(),
                update.stored_bytes,
            )
            .put(
                Table::Records,
                token.storage_key().to_vec(),
                update.record.encode(),
            )
            .append_audit(event.encode());
            let outcomes = self
                .store
                .commit(batch)
                .await
                .map_err(Error::AuditUnavailable)?;
            match outcomes.first() {
                Some(Err(conflict)) if conflict.guard < index_guards => {
                    event.failed_items = 1;
                    self.record(&event).await?;
                    return Ok(Err(ItemError::ValueTaken(field_type)));
                }
                Some(Err(_)) => {}
                _ => return Ok(Ok(field_type)),
            }
        }
        // Every attempt lost to a concurrent write and wrote nothing; the
        // call is still audited.
        event.outcome = Outcome::Aborted;
        event.failed_items = 1;
        self.record(&event).await?;
        Err(Error::Conflict(
            "the record kept changing under concurrent writes; the update was not applied",
        ))
    }

    async fn prepare_update(
        &self,
        token: &Token,
        value: &SecretValue,
        authorize: &impl Fn(&FieldType) -> Result<Permit<FieldType>, Denial>,
    ) -> Result<Result<PreparedUpdate, ItemError>, Error> {
        let Some(bytes) = self
            .store
            .get_many(Table::Records, vec![token.storage_key().to_vec()])
            .await?
            .pop()
            .flatten()
        else {
            return Ok(Err(ItemError::NotFound));
        };
        let Ok(old) = Record::decode(&bytes) else {
            return Ok(Err(ItemError::DataLoss));
        };
        if old.expired(self.now()) {
            return Ok(Err(ItemError::NotFound));
        }
        if let Err(denial) = authorize(&old.field_type) {
            return Ok(Err(ItemError::Denied(denial)));
        }
        let spec = match self.spec(&old.field_type) {
            Ok(spec) => spec,
            Err(e) => return Ok(Err(e)),
        };
        let normalized = match spec.normalize(value) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e.into())),
        };
        let subject_keys = match old.subject_hash {
            Some(hash) if old.key_version == SUBJECT_KEY => self.subject_keys(&[hash]).await?,
            _ => HashMap::new(),
        };
        let (active_version, active_key) = self.keyring.active();
        let (key_version, key) = match old.subject_hash.and_then(|h| subject_keys.get(&h)) {
            Some(key) => (SUBJECT_KEY, key),
            None if old.key_version == SUBJECT_KEY => return Ok(Err(ItemError::NotFound)),
            None => (active_version, &*active_key),
        };
        let new_blind = spec
            .deterministic
            .then(|| self.blind_index(&spec.name, old.subject_hash.as_ref(), &normalized));
        let old_blind = old.blind;
        let aad = Record::sealing_aad(
            token,
            key_version,
            old.subject_hash.as_ref(),
            &old.field_type,
            old.expires_ms,
        );
        let sealed = key.seal(normalized.expose().as_bytes(), &aad)?;
        let record = Record {
            binding: Binding::WithFieldTypeAndExpiry,
            key_version,
            nonce: sealed.nonce,
            blind: new_blind.as_ref().map(|b| b.active),
            ciphertext: sealed.ciphertext,
            ..old
        };
        Ok(Ok(PreparedUpdate {
            stored_bytes: bytes,
            old_blind,
            new_blind,
            record,
        }))
    }

    /// Deletes single tokens, with their index entries. One result per token.
    ///
    /// # Errors
    /// Storage or audit failures.
    pub async fn delete_tokens(
        &self,
        tokens: &[Token],
        authorize: impl Fn(&FieldType) -> Result<Permit<FieldType>, Denial>,
        audit: &AuditContext,
    ) -> Result<Vec<Result<(), ItemError>>, Error> {
        let records = self
            .store
            .get_many(
                Table::Records,
                tokens.iter().map(|t| t.storage_key().to_vec()).collect(),
            )
            .await?;
        let mut event = audit.event(Outcome::Ok);
        let mut batch = Batch::new();
        let unit = batch.unit();
        let mut purge = Vec::new();
        // Blind-index entries to delete if they still name the token: a
        // tokenize may have replaced an expired one meanwhile.
        let mut index_entries = Vec::new();
        let mut results = Vec::with_capacity(tokens.len());
        for (token, bytes) in tokens.iter().zip(records) {
            event.tokens.push(self.audit_token(token));
            let result = (|| {
                let record = Record::decode(&bytes.ok_or(ItemError::NotFound)?)
                    .map_err(|_| ItemError::DataLoss)?;
                authorize(&record.field_type).map_err(ItemError::Denied)?;
                event.field_types.push(record.field_type.to_string());
                unit.delete(Table::Records, token.storage_key().to_vec());
                purge.push((Table::Records, token.storage_key().to_vec()));
                if let Some(blind) = record.blind {
                    index_entries.push((blind, token));
                }
                if let Some(subject) = record.subject_hash {
                    unit.delete(
                        Table::SubjectIndex,
                        subject_index_key(&subject, token.storage_key()),
                    );
                }
                if let Some(expires_ms) = record.expires_ms {
                    unit.delete(Table::Expiry, expiry_key(expires_ms, token.storage_key()));
                }
                Ok(())
            })();
            results.push(result);
        }
        event.field_types.sort();
        event.field_types.dedup();
        event.failed_items +=
            u32::try_from(results.iter().filter(|r| r.is_err()).count()).unwrap_or(u32::MAX);
        unit.append_audit(event.encode());
        for (blind, token) in index_entries {
            batch
                .unit()
                .guard_unchanged(Table::Index, blind.to_vec(), token.storage_key().to_vec())
                .delete(Table::Index, blind.to_vec());
        }
        self.store
            .commit(batch)
            .await
            .map_err(Error::AuditUnavailable)?;
        if !purge.is_empty() {
            self.store.purge(purge).await?;
        }
        Ok(results)
    }
}
