//! Rectification and deletion of single tokens: an update replaces the
//! value behind a token under a compare-and-set on the stored record (and
//! keeps the blind index right); a delete removes records and their
//! entries, then purges the bytes.

use std::collections::HashMap;

use super::{
    Blind, Error, ItemError, Record, Vault,
    audit::Parts,
    requests::{REQUEST_ID_IN_FLIGHT, Remember},
};
use crate::{
    audit::{AuditContext, Outcome},
    authz::{Denial, Permit, act},
    crypto::SecretValue,
    layout::{self, Binding, KeyVersion},
    store::{Batch, Conflict, FailedGuard, Store, Table, Unit},
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

impl<S: Store> Vault<S> {
    /// Replaces the value behind `token` (rectification). `authorize` is asked
    /// with the token's stored field type.
    ///
    /// With `remember`, a successful update is recorded with its write,
    /// under the caller's request id (`requests`).
    ///
    /// # Errors
    /// Item errors inside; storage or audit failures outside; a conflict if
    /// another call with the request id was written first.
    pub async fn update_value(
        &self,
        token: &Token,
        value: SecretValue,
        authorize: impl Fn(&FieldType) -> Result<Permit<act::Update, FieldType>, Denial>,
        audit: &AuditContext,
        remember: Option<Remember<'_, FieldType>>,
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
            event.subjects = update
                .record
                .subject_hash
                .iter()
                .map(|subject| self.audit_subject_hash(subject))
                .collect();
            let mut batch = Batch::new();
            let unit = batch.unit();
            if let Some(new) = &update.new_blind
                && update.record.blind != update.old_blind
            {
                // The new value must not be indexed for another token under
                // any index key still in use.
                for key in new.all().filter(|k| Some(**k) != update.old_blind) {
                    unit.guard_absent(Table::Index, key.to_vec());
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
            );
            self.append_event(unit, &event);
            let remembered = remember.as_ref().map(|r| {
                let subjects: Vec<_> = update.record.subject_hash.into_iter().collect();
                self.remember(unit, r.request, audit, (r.answer)(&field_type), &subjects)
            });
            let outcomes = self
                .store
                .commit(batch)
                .await
                .map_err(Error::AuditUnavailable)?;
            if let (Some(Err(conflict)), Some(at)) = (outcomes.first(), remembered)
                && at.lost_to(conflict)
            {
                return Err(Error::Conflict(REQUEST_ID_IN_FLIGHT));
            }
            // Another guard may fail first for a call with the same id
            // (its write indexed the new value): tell the truth.
            if let (Some(Err(_)), Some(r)) = (outcomes.first(), &remember)
                && !self.still_new(r.request).await?
            {
                return Err(Error::Conflict(REQUEST_ID_IN_FLIGHT));
            }
            match outcomes.first() {
                // Only the index entries are guarded absent: the new value
                // is another token's.
                Some(Err(Conflict {
                    guard: FailedGuard::Absent(_),
                    ..
                })) => {
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
        authorize: &impl Fn(&FieldType) -> Result<Permit<act::Update, FieldType>, Denial>,
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
            Some(hash) if old.key_version == KeyVersion::Subject => {
                self.subject_keys(&[hash]).await?
            }
            _ => HashMap::new(),
        };
        let (active_version, active_key) = self.keyring.active();
        let (key_version, key) = match old.subject_hash.and_then(|h| subject_keys.get(&h)) {
            Some(key) => (KeyVersion::Subject, key),
            None if old.key_version == KeyVersion::Subject => return Ok(Err(ItemError::NotFound)),
            None => (KeyVersion::Vault(active_version), &*active_key),
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
        authorize: impl Fn(&FieldType) -> Result<Permit<act::Delete, FieldType>, Denial>,
        audit: &AuditContext,
    ) -> Result<Vec<Result<(), ItemError>>, Error> {
        let records = self.stored_records(tokens).await?;
        let mut event = audit.event(Outcome::Ok);
        let mut batch = Batch::new();
        let unit = batch.unit();
        let mut purge = Vec::new();
        // Blind-index entries to delete if they still name the token: a
        // tokenize may have replaced an expired one meanwhile.
        let mut index_entries = Vec::new();
        let mut parts = Parts::default();
        let mut results = Vec::with_capacity(tokens.len());
        for (token, bytes) in tokens.iter().zip(records) {
            event.tokens.push(self.audit_token(token));
            let mut read = None;
            let result = (|| {
                let record = Record::decode(&bytes.ok_or(ItemError::NotFound)?)
                    .map_err(|_| ItemError::DataLoss)?;
                read = Some((record.subject_hash, record.field_type.to_string()));
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
                        layout::subject_index_key(&subject, token.storage_key()),
                    );
                }
                if let Some(expires_ms) = record.expires_ms {
                    unit.delete(
                        Table::Expiry,
                        layout::expiry_key(expires_ms, token.storage_key()),
                    );
                }
                Ok(())
            })();
            if let Some((subject, field_type)) = read {
                parts.item(subject, &field_type, None, result.is_err());
            }
            results.push(result);
        }
        event.field_types.sort();
        event.field_types.dedup();
        event.failed_items +=
            u32::try_from(results.iter().filter(|r| r.is_err()).count()).unwrap_or(u32::MAX);
        parts.finish(self, &mut event);
        self.append_event(unit, &event);
        for (blind, token) in index_entries {
            batch
                .unit()
                .guard_unchanged(Table::Index, blind.to_vec(), token.storage_key().to_vec())
                .delete(Table::Index, blind.to_vec());
        }
        // Too large for the engine to run beside other writers: refused,
        // nothing deleted.
        if let Some(max) = self.store.max_keys_per_request() {
            let keys = batch.units().iter().map(Unit::keys_touched).sum();
            if keys > max {
                return Err(Error::RequestTooLarge { keys, max });
            }
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
