//! Recording audit events and signing checkpoints.

use super::{Error, SubjectId, Vault};
use crate::{
    audit::{AuditEvent, Checkpoint, Outcome, checkpoint_message},
    layout::{self, SubjectHash},
    store::{Batch, Store, Table, Unit, chain},
    token::Token,
};

/// The audit-index prefixes of the subjects (audit forms, hex) an event
/// names.
fn index_prefixes(subjects: &[String]) -> Vec<Vec<u8>> {
    subjects
        .iter()
        .filter_map(|hex| data_encoding::HEXLOWER.decode(hex.as_bytes()).ok())
        .filter_map(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .map(|form| layout::audit_subject_prefix(&form))
        .collect()
}

/// The audit-index prefixes of a stored chain entry's event.
pub(super) fn subject_prefixes(stored: &[u8]) -> Vec<Vec<u8>> {
    chain::decode(stored)
        .and_then(|link| AuditEvent::decode(link.payload))
        .map(|event| index_prefixes(&event.subjects))
        .unwrap_or_default()
}

impl<S: Store> Vault<S> {
    /// Appends `event` to the audit chain in `unit`, indexed by every
    /// subject it names so that the subject's access history finds it (in
    /// the same write as the event and whatever else the unit holds).
    pub(super) fn append_event(&self, unit: &mut Unit, event: &AuditEvent) {
        if self.index_subjects {
            unit.append_audit_indexed(event.encode(), index_prefixes(&event.subjects));
        } else {
            unit.append_audit(event.encode());
        }
    }

    /// The audit form of a token: HMAC-SHA256 under the audit key, hex.
    pub fn audit_token(&self, token: &Token) -> String {
        self.keyring
            .audit_key()
            .hash_hex(b"audit/token", token.storage_key())
    }

    /// The audit form of a subject id.
    pub fn audit_subject(&self, subject: &SubjectId) -> String {
        self.audit_subject_hash(&self.subject_hash(subject))
    }

    /// The audit form of a subject, from the subject hash its records hold:
    /// so that a call that reads records (detokenize, update, delete) names
    /// their subjects as the calls that know the id do, and one subject's
    /// events share one form.
    pub(super) fn audit_subject_hash(&self, subject: &SubjectHash) -> String {
        self.keyring
            .audit_key()
            .hash_hex(b"audit/subject-hash", subject)
    }

    /// The public key auditors verify checkpoints with.
    pub fn audit_public_key(&self) -> [u8; 32] {
        self.keyring.audit_signer().public_key()
    }

    /// Signs a sealed export's statement with the audit key (its message
    /// has a domain of its own: it can never pass for a checkpoint).
    pub fn sign_export(&self, statement: &crate::crypto::ExportStatement<'_>) -> [u8; 64] {
        self.keyring.audit_signer().sign(&statement.message())
    }

    /// Appends `event` to the audit chain in a durable write of its own.
    ///
    /// # Errors
    /// [`Error::AuditUnavailable`]: the caller must then refuse the request
    /// (fail closed).
    pub async fn record(&self, event: &AuditEvent) -> Result<(), Error> {
        self.record_all(std::slice::from_ref(event)).await
    }

    /// Appends `events` to the audit chain in one durable write.
    ///
    /// # Errors
    /// [`Error::AuditUnavailable`].
    pub async fn record_all(&self, events: &[AuditEvent]) -> Result<(), Error> {
        let mut batch = Batch::new();
        for event in events {
            self.append_event(batch.unit(), event);
        }
        self.store
            .commit(batch)
            .await
            .map(drop)
            .map_err(Error::AuditUnavailable)
    }

    /// Records that this process put the policy hashing to `policy_hash` in
    /// force (`LoadPolicy`, identity `-`): the records of processing say
    /// which policy held when.
    ///
    /// # Errors
    /// [`Error::AuditUnavailable`].
    pub async fn record_policy_load(&self, policy_hash: &[u8; 32]) -> Result<(), Error> {
        let context = crate::audit::AuditContext {
            request_id: String::new(),
            identity: "-".into(),
            method: crate::audit::POLICY_LOAD_METHOD,
            purpose: None,
            items: 0,
            failed_items: 0,
        };
        let mut event = context.event(Outcome::Ok);
        event.policy_hash = Some(data_encoding::HEXLOWER.encode(policy_hash));
        self.record(&event).await
    }

    /// Signs the chain's head if it moved since the last checkpoint, and if
    /// no head numbered as high was ever signed (`vault/signed_head.rs`):
    /// it is recorded beside the erasure ledger first. Returns the sequence
    /// number signed.
    ///
    /// # Errors
    /// Storage or ledger failures.
    pub async fn checkpoint_audit(&self) -> Result<Option<u64>, Error> {
        let head = self.store.audit_head();
        let last = || {
            self.last_checkpoint
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if head.seq == 0 || head.seq <= *last() {
            return Ok(None);
        }
        if !self.witness_signing(head).await? {
            // Signed before (by another replica, or before a restore took
            // the chain back behind it): never a second head for a number.
            // Said at every checkpoint it holds up: until the chain passes
            // the number signed, its events are chained but not signed.
            tracing::warn!(
                seq = head.seq,
                "not signing the audit head: a head with this number or a higher one was signed before (by another replica, or before the database was restored); signing resumes once the chain passes it"
            );
            let mut last = last();
            *last = (*last).max(head.seq);
            return Ok(None);
        }
        let time_ms = self.now();
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
        batch.put(
            Table::Meta,
            layout::AUDIT_LAST_CHECKPOINT.to_vec(),
            [chain::key(head.seq).as_slice(), &checkpoint.encode()].concat(),
        );
        self.store.commit(batch).await?;
        *last() = head.seq;
        Ok(Some(head.seq))
    }
}

/// Each subject's part of a call, gathered item by item
/// ([`AuditEvent::parts`]).
#[derive(Debug, Default)]
pub(super) struct Parts(std::collections::BTreeMap<SubjectHash, crate::audit::SubjectPart>);

impl Parts {
    /// Counts an item of `subject` (none: no part) of `field_type`,
    /// revealed in `form` if it was, failed or not.
    pub(super) fn item(
        &mut self,
        subject: Option<SubjectHash>,
        field_type: &str,
        form: Option<&str>,
        failed: bool,
    ) {
        let Some(subject) = subject else { return };
        let part = self.0.entry(subject).or_default();
        part.items += 1;
        part.failed_items += u32::from(failed);
        part.field_types.push(field_type.to_owned());
        part.forms.extend(form.map(str::to_owned));
    }

    /// Names the subjects gathered in `event` and, unless the call was one
    /// subject's alone, gives it their parts in the same order. Call it
    /// once the event's totals are final.
    pub(super) fn finish<S: Store>(self, vault: &Vault<S>, event: &mut AuditEvent) {
        let mut parts: Vec<(String, crate::audit::SubjectPart)> = self
            .0
            .into_iter()
            .map(|(subject, mut part)| {
                part.field_types.sort();
                part.field_types.dedup();
                part.forms.sort();
                part.forms.dedup();
                (vault.audit_subject_hash(&subject), part)
            })
            .collect();
        parts.sort_by(|a, b| a.0.cmp(&b.0));
        let whole = |part: &crate::audit::SubjectPart| {
            part.items == event.items
                && part.failed_items == event.failed_items
                && part.field_types == event.field_types
                && part.forms == event.forms
        };
        let alone = matches!(parts.as_slice(), [(_, part)] if whole(part));
        event.subjects = parts.iter().map(|(form, _)| form.clone()).collect();
        event.parts = if alone {
            Vec::new()
        } else {
            parts.into_iter().map(|(_, part)| part).collect()
        };
    }
}

/// The newest signed checkpoint, as `meta` keeps it
/// (`layout::AUDIT_LAST_CHECKPOINT`: its number, then the checkpoint).
pub(super) fn decode_last_checkpoint(bytes: &[u8]) -> Option<Checkpoint> {
    let (key, checkpoint) = bytes.split_at_checked(8)?;
    Checkpoint::decode(chain::seq_of(key)?, checkpoint)
}

impl<S: Store> Vault<S> {
    /// The newest signed checkpoint, if one was signed (its signature not
    /// checked here).
    pub(super) async fn newest_checkpoint(&self) -> Result<Option<Checkpoint>, Error> {
        Ok(self
            .store
            .get_many(Table::Meta, vec![layout::AUDIT_LAST_CHECKPOINT.to_vec()])
            .await?
            .pop()
            .flatten()
            .and_then(|bytes| decode_last_checkpoint(&bytes)))
    }
}
