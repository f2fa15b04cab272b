//! Data subjects: per-subject keys (crypto-shredding) and export. Consent
//! is in `consent.rs`, rectification and deletion of tokens in `records.rs`,
//! erasure in `erasure.rs`.

use std::collections::HashMap;

use super::{
    Error, Record, SubjectId, Vault,
    erasure::{ERASED_MEANWHILE, ErasureMark},
};
use crate::{
    audit::{AuditContext, Outcome},
    authz::{Permit, act},
    crypto::{DataKey, SecretValue},
    layout,
    store::{Batch, FailedGuard, Store, Table},
    token::{FieldType, Token},
};

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
    /// so concurrent first writes agree on one key). `marks` are the
    /// subjects' erasure marks, in the same order, read before their keys:
    /// a new key records its subject's and guards it unchanged.
    pub(super) async fn subject_keys_or_create(
        &self,
        subjects: &[[u8; 32]],
        marks: &[ErasureMark],
    ) -> Result<HashMap<[u8; 32], DataKey>, Error> {
        let (mut keys, missing) = self.load_subject_keys(subjects).await?;
        if missing.is_empty() {
            return Ok(keys);
        }
        let mark_of: HashMap<&[u8; 32], &ErasureMark> = subjects.iter().zip(marks).collect();
        let mut batch = Batch::new();
        let mut created = Vec::new();
        for (subject, label) in &missing {
            let mark = mark_of[subject];
            let (wrapped, key) = self.keyring.new_subject_key(label, mark.number())?;
            let unit = batch.unit();
            // First, so that its failure is `Absent(0)`.
            unit.guard_absent(Table::Keys, label.clone())
                .put(Table::Keys, label.clone(), wrapped);
            mark.guard(unit);
            created.push((*subject, label, key));
        }
        let outcomes = self.store.commit(batch).await?;
        for ((subject, label, key), outcome) in created.into_iter().zip(outcomes) {
            let key = match outcome {
                Ok(()) => key,
                // Another request created it first: use theirs.
                Err(conflict) if conflict.guard == FailedGuard::Absent(0) => {
                    self.keyring.open_subject_key(label, &conflict.existing)?
                }
                // The subject's erasure mark moved: it was erased meanwhile.
                Err(_) => return Err(Error::Conflict(ERASED_MEANWHILE)),
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
        let labels: Vec<Vec<u8>> = subjects
            .iter()
            .map(layout::subject_data_key_label)
            .collect();
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
        subject: Permit<act::SubjectExport, SubjectId>,
        audit: &AuditContext,
    ) -> Result<Vec<SubjectField>, Error> {
        let subject_id = subject.into_item();
        let hash = self.subject_hash(&subject_id);
        let mut event = audit.event(Outcome::Ok);
        event.subjects.push(self.audit_subject(&subject_id));
        let (tokens, records) = self.subject_records(&hash).await?;
        let keys = self.subject_keys(&[hash]).await?;
        let now = self.now();
        // Records that do not decode are left out, as ones that expired.
        let records: Vec<(Token, Record)> = tokens
            .into_iter()
            .zip(records)
            .filter_map(|(token, bytes)| Some((token, Record::decode(&bytes?).ok()?)))
            .collect();
        if records.iter().any(|(_, r)| self.lacks_key(r)) {
            self.refresh_keys().await;
        }
        let mut fields = Vec::new();
        for (token, record) in records {
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
        if !fields.is_empty() {
            event
                .forms
                .push(crate::authz::RevealForm::Plain.name().to_owned());
        }
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
            .filter_map(|(key, _)| {
                std::str::from_utf8(layout::token_of_subject_index_key(&key)?)
                    .ok()?
                    .parse()
                    .ok()
            })
            .collect())
    }

    /// A subject's tokens and their stored records (`None` where a record
    /// is gone), in the same order.
    pub(super) async fn subject_records(
        &self,
        hash: &[u8; 32],
    ) -> Result<(Vec<Token>, Vec<Option<Vec<u8>>>), Error> {
        let tokens = self.subject_tokens(hash).await?;
        let records = self.stored_records(&tokens).await?;
        Ok((tokens, records))
    }

    /// The stored bytes of each token's record, in order (`None`: no record).
    pub(super) async fn stored_records(
        &self,
        tokens: &[Token],
    ) -> Result<Vec<Option<Vec<u8>>>, Error> {
        let keys = tokens.iter().map(|t| t.storage_key().to_vec()).collect();
        Ok(self.store.get_many(Table::Records, keys).await?)
    }
}
