//! Recording audit events and signing checkpoints.

use super::{Error, SubjectId, Vault, now_ms};
use crate::{
    audit::{AuditEvent, Checkpoint, checkpoint_message},
    store::{Batch, Store, Table, chain},
    token::Token,
};

impl<S: Store> Vault<S> {
    /// The audit form of a token: HMAC-SHA256 under the audit key, hex.
    pub fn audit_token(&self, token: &Token) -> String {
        self.keyring
            .audit_key()
            .hash_hex(b"audit/token", token.storage_key())
    }

    /// The audit form of a subject id.
    pub fn audit_subject(&self, subject: &SubjectId) -> String {
        self.keyring
            .audit_key()
            .hash_hex(b"audit/subject", subject.0.as_bytes())
    }

    /// The public key auditors verify checkpoints with.
    pub fn audit_public_key(&self) -> [u8; 32] {
        self.keyring.audit_signer().public_key()
    }

    /// Appends `event` to the audit chain in a durable write of its own.
    ///
    /// # Errors
    /// [`Error::AuditUnavailable`]: the caller must then refuse the request
    /// (fail closed).
    pub async fn record(&self, event: &AuditEvent) -> Result<(), Error> {
        let mut batch = Batch::new();
        batch.unit().append_audit(event.encode());
        self.store
            .commit(batch)
            .await
            .map(drop)
            .map_err(Error::AuditUnavailable)
    }

    /// Signs the chain's head if it moved since the last checkpoint.
    /// Returns the sequence number signed.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn checkpoint_audit(&self) -> Result<Option<u64>, Error> {
        let head = self.store.audit_head();
        {
            let last = self
                .last_checkpoint
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if head.seq == 0 || head.seq <= *last {
                return Ok(None);
            }
        }
        let time_ms = now_ms();
        let checkpoint = Checkpoint {
            seq: head.seq,
            head: head.hash,
            time_ms,
            signature: self
                .keyring
                .audit_signer()
                .sign(&checkpoint_message(head.seq, &head.hash, time_ms)),
        };
        let mut batch = Batch::new();
        batch.put(
            Table::AuditCheckpoints,
            chain::key(head.seq).to_vec(),
            checkpoint.encode(),
        );
        self.store.commit(batch).await?;
        *self
            .last_checkpoint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = head.seq;
        Ok(Some(head.seq))
    }
}

impl<S: Store> Vault<S> {
    /// Writes an online backup to the permitted path: the audit event goes
    /// first (so the backup contains the record of its own making), then a
    /// consistent checkpoint of the store.
    ///
    /// # Errors
    /// Storage or audit failures.
    pub async fn backup(
        &self,
        path: crate::authz::Permit<std::path::PathBuf>,
        audit: &crate::audit::AuditContext,
    ) -> Result<(std::path::PathBuf, u64, u64), Error> {
        let path = path.into_item();
        self.record(&audit.event("OK")).await?;
        let audit_seq = self.store.audit_head().seq;
        self.store.checkpoint(path.clone()).await?;
        let bytes = dir_size(&path);
        Ok((path, audit_seq, bytes))
    }
}

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
