//! Key rotation: data keys (records move to the newest by re-encryption),
//! blind-index keys (entries move by re-indexing), and the master key
//! (re-wraps keys only).

use std::collections::HashMap;

use super::{Error, Record, Vault, jobs::Job};
use crate::{
    audit::{AuditContext, Outcome},
    authz::{Permit, act},
    layout::{Binding, KeyVersion},
    store::{Batch, FailedGuard, KeyValues, Store, Table},
    token::Token,
};

impl<S: Store> Vault<S> {
    /// Makes a new data-key version for new writes, and starts the job that
    /// re-encrypts older records under it. Old versions keep decrypting.
    ///
    /// # Errors
    /// Storage or audit failures; [`Error::Conflict`] if another rotation
    /// stored the same version first.
    pub async fn rotate_data_key(
        &self,
        permit: Permit<act::AdminKeys, ()>,
        audit: &AuditContext,
    ) -> Result<u32, Error> {
        permit.into_item();
        let _turn = self.jobs.lock().await;
        let (new, key) = self.keyring.new_data_key()?;
        let version = new.version;
        self.store_rotation(new, Job::Reencrypt, audit).await?;
        self.keyring.install_data_key(version, key);
        Ok(version)
    }

    /// Makes a new blind-index key version, and starts the job that moves
    /// every index entry to it; lookups and deterministic tokenization try
    /// the older keys too until the job retires them.
    ///
    /// # Errors
    /// As [`Vault::rotate_data_key`].
    pub async fn rotate_index_key(
        &self,
        permit: Permit<act::AdminKeys, ()>,
        audit: &AuditContext,
    ) -> Result<u32, Error> {
        permit.into_item();
        let _turn = self.jobs.lock().await;
        let (new, key) = self.keyring.new_index_key()?;
        let version = new.version;
        self.store_rotation(new, Job::Reindex, audit).await?;
        self.keyring.install_index_key(version, key);
        Ok(version)
    }

    /// Stores a new key, (re)starts its job and records the event, in one
    /// write.
    async fn store_rotation(
        &self,
        new: super::keyring::NewKey,
        job: Job,
        audit: &AuditContext,
    ) -> Result<(), Error> {
        let total = self.store.estimated_len(Table::Records).await;
        let mut batch = Batch::new();
        let unit = batch.unit();
        new.store(unit);
        self.keyring.guard_master(unit);
        self.start_job(unit, job, total);
        unit.append_audit(audit.event(Outcome::Ok).encode());
        let outcomes = self
            .store
            .commit(batch)
            .await
            .map_err(Error::AuditUnavailable)?;
        match outcomes.into_iter().next() {
            Some(Err(conflict)) => {
                self.record(&audit.event(Outcome::Aborted)).await?;
                Err(match conflict.guard {
                    FailedGuard::Unchanged(_) => Error::MasterKeyMoved,
                    FailedGuard::Absent(_) => {
                        // Another replica stored this version: load what
                        // it stored now (not at the next periodic
                        // refresh), so that a retry makes the next one;
                        // if that load fails, say why instead.
                        self.load_new_keys().await?;
                        Error::Conflict(
                            "another rotation of this key ran at the same time (through another replica); nothing was changed, retry",
                        )
                    }
                })
            }
            _ => Ok(()),
        }
    }

    /// Re-wraps every key under the master key that the permitted setting
    /// names (a key file read and checked like the configured one, or a key
    /// in an HSM checked as at start). Records are not touched.
    ///
    /// # Errors
    /// An unusable new key, storage or audit failures.
    pub async fn rotate_master_key(
        &self,
        permit: Permit<act::AdminKeys, crate::crypto::MasterKeySetting>,
        audit: &AuditContext,
    ) -> Result<usize, Error> {
        let setting = permit.into_item();
        // Loading a PKCS#11 module and logging in to a token block.
        let new = tokio::task::spawn_blocking(move || setting.source().load())
            .await
            .map_err(|_| Error::NewMasterKey("loading it panicked".into()))?
            .map_err(|e| Error::NewMasterKey(e.to_string()))?;
        // A data- or index-key rotation wraps its new key under the master
        // key in force: taking turns with them means no key is wrapped under
        // the old master key after the re-wrap has read the key table.
        let _turn = self.jobs.lock().await;
        let count = self.keyring.rotate_master(&self.store, new).await?;
        self.record(&audit.event(Outcome::Ok)).await?;
        Ok(count)
    }

    /// Adds to `batch` one unit per record of `records` not yet under the
    /// active data key, replacing it with its re-encryption if unchanged.
    /// Returns the record key of each unit.
    pub(super) fn reencrypt_units(
        &self,
        records: &KeyValues,
        batch: &mut Batch,
    ) -> Result<Vec<Vec<u8>>, Error> {
        let (active, key) = self.keyring.active();
        let mut keys = Vec::new();
        for (storage_key, bytes) in records {
            let Ok(record) = Record::decode(bytes) else {
                continue;
            };
            if matches!(record.key_version, KeyVersion::Subject)
                || record.key_version == KeyVersion::Vault(active)
            {
                continue;
            }
            let Some(token) = parse_token(storage_key) else {
                continue;
            };
            // A record that does not decrypt stays as it is (it answers
            // DATA_LOSS, and the log says so).
            let Ok(value) = self.decrypt(&token, &record, None) else {
                continue;
            };
            let aad = Record::sealing_aad(
                &token,
                KeyVersion::Vault(active),
                record.subject_hash.as_ref(),
                &record.field_type,
                record.expires_ms,
            );
            let sealed = key.seal(value.expose().as_bytes(), &aad)?;
            let updated = Record {
                binding: Binding::WithFieldTypeAndExpiry,
                key_version: KeyVersion::Vault(active),
                nonce: sealed.nonce,
                ciphertext: sealed.ciphertext,
                ..record
            };
            batch
                .unit()
                .guard_unchanged(Table::Records, storage_key.clone(), bytes.clone())
                .put(Table::Records, storage_key.clone(), updated.encode());
            keys.push(storage_key.clone());
        }
        Ok(keys)
    }

    /// Adds to `batch` one unit per indexed record of `records` whose index
    /// entry is not under the active index key: the entry moves to the
    /// active key and the record names it, if the record is unchanged.
    /// Returns the record key of each unit.
    pub(super) async fn reindex_units(
        &self,
        records: &KeyValues,
        batch: &mut Batch,
    ) -> Result<Vec<Vec<u8>>, Error> {
        let mut indexed = Vec::new();
        for (storage_key, bytes) in records {
            let Ok(record) = Record::decode(bytes) else {
                continue;
            };
            if record.blind.is_none() {
                continue;
            }
            let Some(token) = parse_token(storage_key) else {
                continue;
            };
            indexed.push((storage_key, bytes, record, token));
        }
        let mut subjects: Vec<[u8; 32]> = indexed
            .iter()
            .filter(|(_, _, r, _)| r.key_version == KeyVersion::Subject)
            .filter_map(|(_, _, r, _)| r.subject_hash)
            .collect();
        subjects.sort_unstable();
        subjects.dedup();
        let subject_keys = self.subject_keys(&subjects).await?;

        let mut moves = Vec::new();
        for (storage_key, bytes, record, token) in indexed {
            let subject_key = record.subject_hash.and_then(|h| subject_keys.get(&h));
            // Values that no longer decrypt (corrupted, or their subject
            // erased) keep their entry; it goes with the old key.
            let Ok(value) = self.decrypt(&token, &record, subject_key) else {
                continue;
            };
            let blind = self.blind_index(&record.field_type, record.subject_hash.as_ref(), &value);
            if record.blind == Some(blind.active) {
                continue;
            }
            moves.push((storage_key, bytes, record, token, blind.active));
        }
        // An entry already under the new key belongs to this token only if
        // an earlier attempt wrote it; another token's entry is left alone.
        let existing = self
            .store
            .get_many(Table::Index, moves.iter().map(|m| m.4.to_vec()).collect())
            .await?;
        let mut keys = Vec::new();
        let mut owners: HashMap<[u8; 32], &Token> = HashMap::new();
        for ((storage_key, bytes, record, token, new), existing) in moves.iter().zip(existing) {
            let token_bytes = token.as_str().as_bytes();
            match existing.as_deref() {
                Some(owner) if owner != token_bytes => {
                    tracing::warn!(
                        field_type = %record.field_type,
                        "two tokens hold one deterministic value; the older index entry is left to retire"
                    );
                    continue;
                }
                _ if owners.insert(*new, token).is_some() => continue,
                _ => {}
            }
            let unit = batch.unit();
            if existing.is_none() {
                unit.guard_absent(Table::Index, new.to_vec()).put(
                    Table::Index,
                    new.to_vec(),
                    token_bytes.to_vec(),
                );
            }
            unit.guard_unchanged(Table::Records, (*storage_key).clone(), (*bytes).clone());
            if let Some(old) = record.blind {
                unit.delete(Table::Index, old.to_vec());
            }
            let updated = Record {
                blind: Some(*new),
                ..record.clone()
            };
            unit.put(Table::Records, (*storage_key).clone(), updated.encode());
            keys.push((*storage_key).clone());
        }
        Ok(keys)
    }

    /// The keys records are encrypted with and how many records each
    /// encrypts (a full scan, for tests): every vault data-key version, and
    /// the subjects' own keys if any record uses one.
    ///
    /// # Errors
    /// Storage failures.
    #[cfg(test)]
    pub(super) async fn key_usage(&self) -> Result<Vec<(KeyVersion, u64)>, Error> {
        let mut counts: std::collections::BTreeMap<KeyVersion, u64> = self
            .keyring
            .versions()
            .into_iter()
            .map(|v| (KeyVersion::Vault(v), 0))
            .collect();
        let mut from = Vec::new();
        loop {
            let page = self
                .store
                .scan_from(Table::Records, from.clone(), 10_000)
                .await?;
            for (_, bytes) in &page {
                if let Ok(record) = Record::decode(bytes) {
                    *counts.entry(record.key_version).or_default() += 1;
                }
            }
            match page.last() {
                Some((last, _)) if page.len() == 10_000 => {
                    from = last.clone();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(counts.into_iter().collect())
    }
}

fn parse_token(storage_key: &[u8]) -> Option<Token> {
    std::str::from_utf8(storage_key).ok()?.parse().ok()
}
