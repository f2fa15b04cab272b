//! Data-key rotation and the background re-encryption that moves records to
//! the newest key version, page by page, resumable after a restart.

use super::{Error, Record, Vault, record::SUBJECT_KEY};
use crate::{
    audit::AuditContext,
    authz::Permit,
    store::{Batch, Store, Table},
    token::Token,
};

/// Where the re-encryption job keeps its place; present while one is due.
const CURSOR: &[u8] = b"reencrypt/cursor";

/// Progress of one re-encryption step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReencryptStep {
    /// Records moved to the active key in this step.
    pub moved: u64,
    /// Records skipped because a request changed them meanwhile (they were
    /// written under the active key anyway).
    pub raced: u64,
    /// Whether the job has finished (or there was none).
    pub finished: bool,
    /// Whether there was a job to step.
    pub ran: bool,
}

impl<S: Store> Vault<S> {
    /// Makes a new data-key version for new writes, and starts the job that
    /// re-encrypts older records under it. Old versions keep decrypting.
    ///
    /// # Errors
    /// Storage or audit failures.
    pub async fn rotate_data_key(
        &self,
        permit: Permit<()>,
        audit: &AuditContext,
    ) -> Result<u32, Error> {
        permit.into_item();
        let version = self.keyring.rotate(&self.store).await?;
        let mut batch = Batch::new();
        batch
            .unit()
            .put(Table::Meta, CURSOR.to_vec(), Vec::new())
            .append_audit(audit.event("OK").encode());
        self.store
            .commit(batch)
            .await
            .map_err(Error::AuditUnavailable)?;
        Ok(version)
    }

    /// Re-wraps every key under the master key in `new_key_file` (read and
    /// checked like the configured one). Records are not touched.
    ///
    /// # Errors
    /// An unusable key file, storage or audit failures.
    pub async fn rotate_master_key(
        &self,
        permit: Permit<std::path::PathBuf>,
        audit: &AuditContext,
    ) -> Result<usize, Error> {
        let path = permit.into_item();
        let new =
            crate::crypto::MasterKey::load(&path).map_err(|e| Error::CorruptKey(e.to_string()))?;
        let count = self.keyring.rotate_master(&self.store, new).await?;
        self.record(&audit.event("OK")).await?;
        Ok(count)
    }

    /// Re-encrypts up to `page` records under the active key, from where the
    /// job left off (a restart resumes there). Each record is replaced only
    /// if nobody changed it since it was read, so the job never overwrites a
    /// concurrent update, and it never holds the write path longer than one
    /// group commit.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn reencrypt_step(&self, page: usize) -> Result<ReencryptStep, Error> {
        let Some(cursor) = self
            .store
            .get_many(Table::Meta, vec![CURSOR.to_vec()])
            .await?
            .pop()
            .flatten()
        else {
            return Ok(ReencryptStep {
                moved: 0,
                raced: 0,
                finished: true,
                ran: false,
            });
        };
        let (active, key) = self.keyring.active();
        let records = self.store.scan_from(Table::Records, cursor, page).await?;
        let mut batch = Batch::new();
        let mut moved = 0;
        for (storage_key, bytes) in &records {
            let Ok(record) = Record::decode(bytes) else {
                continue;
            };
            if record.key_version == active || record.key_version == SUBJECT_KEY {
                continue;
            }
            let Some(token) = std::str::from_utf8(storage_key)
                .ok()
                .and_then(|t| t.parse::<Token>().ok())
            else {
                continue;
            };
            // A record that does not decrypt stays as it is (it answers
            // DATA_LOSS, and the log says so).
            let Ok(value) = self.decrypt(&token, &record, None) else {
                continue;
            };
            let aad = Record::aad(&token, active, record.subject_hash.as_ref());
            let sealed = key.seal(value.expose().as_bytes(), &aad)?;
            let updated = Record {
                key_version: active,
                nonce: sealed.nonce,
                ciphertext: sealed.ciphertext,
                ..record
            };
            batch
                .unit()
                .guard_unchanged(Table::Records, storage_key.clone(), bytes.clone())
                .put(Table::Records, storage_key.clone(), updated.encode());
            moved += 1;
        }
        let finished = records.len() < page;
        let cursor_unit = batch.unit();
        match records.last() {
            Some((last, _)) if !finished => {
                let mut next = last.clone();
                next.push(0);
                cursor_unit.put(Table::Meta, CURSOR.to_vec(), next);
            }
            _ => {
                cursor_unit.delete(Table::Meta, CURSOR.to_vec());
            }
        }
        let outcomes = self.store.commit(batch).await?;
        let raced = outcomes.iter().filter(|o| o.is_err()).count() as u64;
        Ok(ReencryptStep {
            moved: moved - raced,
            raced,
            finished,
            ran: true,
        })
    }

    /// The data-key versions and how many records each encrypts (a full
    /// scan: for `keys list` and tests). Version 0 counts records under their
    /// subject's own key.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn key_usage(&self) -> Result<Vec<(u32, u64)>, Error> {
        let mut counts: std::collections::BTreeMap<u32, u64> = self
            .keyring
            .versions()
            .into_iter()
            .map(|v| (v, 0))
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
