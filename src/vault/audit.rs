//! Recording audit events and signing checkpoints.

use super::{Error, SubjectId, Vault};
use crate::{
    audit::{AuditEvent, Checkpoint, Outcome, checkpoint_message},
    authz::act,
    layout::{self, SubjectHash},
    store::{Batch, Checkpoints, KeyValues, Store, Table, Unit, chain},
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
fn subject_prefixes(stored: &[u8]) -> Vec<Vec<u8>> {
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

impl<S: Store> Vault<S> {
    /// Writes an online backup to the permitted path: the audit event goes
    /// first (so the backup contains the record of its own making), then a
    /// consistent checkpoint of the store.
    ///
    /// # Errors
    /// Storage or audit failures.
    pub async fn backup(
        &self,
        path: crate::authz::Permit<act::AdminBackup, std::path::PathBuf>,
        audit: &crate::audit::AuditContext,
    ) -> Result<Backup, Error> {
        let path = path.into_item();
        // An engine that makes no backups refuses before anything is
        // recorded: the trail never shows a backup that was not made.
        let engine = self.store.checkpoints()?;
        self.record(&audit.event(Outcome::Ok)).await?;
        let audit_seq = self.store.audit_head().seq;
        engine.checkpoint(path.clone()).await?;
        let bytes = dir_size(&path);
        Ok(Backup {
            path,
            audit_seq,
            bytes,
        })
    }
}

/// A backup written by [`Vault::backup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    /// Its directory.
    pub path: std::path::PathBuf,
    /// The audit sequence number it contains up to (its own event included).
    pub audit_seq: u64,
    /// Its size on disk.
    pub bytes: u64,
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

/// One stored audit event, as the Audit service streams it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// Sequence number.
    pub seq: u64,
    /// Chain hash.
    pub hash: [u8; 32],
    /// The chain hash of the event before it, which it links to; `None`
    /// for an entry that is not in the chain format (sent all the same, so
    /// that a client checking the chain fails on it, not past it).
    pub prev: Option<[u8; 32]>,
    /// The event JSON, as chained.
    pub json: String,
    /// The caller identity recorded in it.
    pub identity: String,
    /// The signed checkpoint over it, if any.
    pub checkpoint: Option<Checkpoint>,
    /// On the first event of a page that starts at or before the first
    /// event kept: the signed prune marker, if events were pruned.
    pub pruned: Option<crate::audit::PruneMarker>,
    /// On the last event of a page: the newest checkpoint signed, so that
    /// a client can tell a trail that ends before it (its tail withheld).
    pub newest_checkpoint: Option<Checkpoint>,
}

/// Which audit events to read: up to `limit` from `from_seq` on, those of
/// `identity` only if given.
#[derive(Debug, Clone)]
pub struct EventsQuery {
    /// The first sequence number.
    pub from_seq: u64,
    /// Only this identity's events, if given.
    pub identity: Option<String>,
    /// The most events.
    pub limit: usize,
}

/// A processing report to make: the period, and the policy it reports
/// (the one in force).
#[derive(Debug, Clone)]
pub struct ReportQuery {
    /// The period.
    pub period: crate::report::Period,
    /// The policy.
    pub policy: std::sync::Arc<crate::authz::Policy>,
}

impl<S: Store> Vault<S> {
    /// Up to `limit` audit events from `from` on (those of `identity` only,
    /// if given). Reading the trail is audited too.
    ///
    /// # Errors
    /// Storage or audit failures.
    pub async fn audit_events(
        &self,
        permit: crate::authz::Permit<act::AuditRead, EventsQuery>,
        audit: &crate::audit::AuditContext,
    ) -> Result<Vec<StoredEvent>, Error> {
        let EventsQuery {
            from_seq: from,
            identity,
            limit,
        } = permit.into_item();
        let marker = self
            .store
            .get_many(Table::Meta, vec![layout::AUDIT_PRUNE_MARKER.to_vec()])
            .await?
            .pop()
            .flatten()
            .and_then(|value| crate::audit::PruneMarker::decode(&value));
        // A page that starts at or before the first event kept starts just
        // after the marker, with it: events under it may still be there
        // while a pruning is under way, or after one was cut short.
        let (from, mut pruned) = match marker {
            Some(marker) if from.max(1) <= marker.seq + 1 => (marker.seq + 1, Some(marker)),
            _ => (from.max(1), None),
        };
        let newest_checkpoint = self.newest_checkpoint().await?;
        let page = self
            .store
            .scan_from(Table::Audit, chain::key(from).to_vec(), limit)
            .await?;
        let last = page
            .last()
            .and_then(|(key, _)| chain::seq_of(key))
            .unwrap_or(from);
        // Checkpoints are sparse: at most one per event of the page.
        let mut checkpoints: std::collections::HashMap<u64, Checkpoint> = self
            .store
            .scan_from(Table::AuditCheckpoints, chain::key(from).to_vec(), limit)
            .await?
            .into_iter()
            .filter_map(|(key, value)| Checkpoint::decode(chain::seq_of(&key)?, &value))
            .filter(|cp| cp.seq <= last)
            .map(|cp| (cp.seq, cp))
            .collect();
        // Every entry goes out, one that does not decode too: dropped, it
        // would make a page short, which a client takes for the end.
        let mut events: Vec<StoredEvent> = page
            .into_iter()
            .filter_map(|(key, value)| {
                let seq = chain::seq_of(&key)?;
                let link = chain::decode(&value);
                let payload = link.map_or(value.as_slice(), |l| l.payload);
                Some(StoredEvent {
                    seq,
                    hash: chain::hash(seq, &value),
                    prev: link.map(|l| l.prev),
                    json: String::from_utf8_lossy(payload).into_owned(),
                    identity: AuditEvent::decode(payload)
                        .map(|e| e.identity)
                        .unwrap_or_default(),
                    checkpoint: checkpoints.remove(&seq),
                    pruned: pruned.take(),
                    newest_checkpoint: None,
                })
            })
            .filter(|e| identity.as_ref().is_none_or(|id| &e.identity == id))
            .collect();
        if let Some(last) = events.last_mut() {
            last.newest_checkpoint = newest_checkpoint;
        }
        self.record(&audit.event(Outcome::Ok)).await?;
        Ok(events)
    }
}

impl<S: Store> Vault<S> {
    /// Deletes audit events older than `retention`, but only up to a signed
    /// checkpoint, which is kept: it anchors the first remaining event, so
    /// the trail stays verifiable from there. Nothing newer than the last
    /// checkpoint is ever deleted. Returns how many events were deleted.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn prune_audit(&self, retention: std::time::Duration) -> Result<u64, Error> {
        let cutoff = self
            .now()
            .saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        let checkpoints = self
            .store
            .scan_prefix(Table::AuditCheckpoints, Vec::new())
            .await?;
        let anchor = checkpoints
            .iter()
            .filter_map(|(key, value)| Checkpoint::decode(chain::seq_of(key)?, value))
            .filter(|cp| cp.time_ms < cutoff)
            .map(|cp| cp.seq)
            .max();
        let Some(anchor) = anchor else { return Ok(0) };
        // First the signed statement that events up to the anchor go on
        // purpose: `audit verify` accepts missing events under it only.
        let anchor_head = checkpoints
            .iter()
            .filter_map(|(key, value)| Checkpoint::decode(chain::seq_of(key)?, value))
            .find(|cp| cp.seq == anchor)
            .map(|cp| cp.head)
            .ok_or_else(|| Error::CorruptKey("the anchoring checkpoint vanished".into()))?;
        let time_ms = self.now();
        let marker = crate::audit::PruneMarker {
            seq: anchor,
            head: anchor_head,
            time_ms,
            signature: self
                .keyring
                .audit_signer()
                .sign(&crate::audit::prune_message(anchor, &anchor_head, time_ms)),
        };
        let mut batch = Batch::new();
        batch.put(
            Table::Meta,
            crate::layout::AUDIT_PRUNE_MARKER.to_vec(),
            marker.encode(),
        );
        self.store.commit(batch).await?;
        let mut pruned = 0;
        loop {
            let page = self
                .store
                .scan_from(Table::Audit, Vec::new(), 10_000)
                .await?;
            let doomed: KeyValues = page
                .into_iter()
                .take_while(|(key, _)| chain::seq_of(key).is_some_and(|seq| seq <= anchor))
                .collect();
            if doomed.is_empty() {
                break;
            }
            let mut batch = Batch::new();
            for (key, value) in &doomed {
                // The event's index entries go with it.
                if let Some(seq) = chain::seq_of(key) {
                    for prefix in subject_prefixes(value) {
                        batch.delete(Table::AuditIndex, chain::index_key(&prefix, seq));
                    }
                }
                batch.delete(Table::Audit, key.clone());
            }
            pruned += doomed.len() as u64;
            self.store.commit(batch).await?;
        }
        let mut batch = Batch::new();
        for (key, _) in checkpoints {
            if chain::seq_of(&key).is_some_and(|seq| seq < anchor) {
                batch.delete(Table::AuditCheckpoints, key);
            }
        }
        if !batch.is_empty() {
            self.store.commit(batch).await?;
        }
        Ok(pruned)
    }
}

impl<S: Store> Vault<S> {
    /// The records of processing over `period`, with the policy the caller
    /// passes (the one in force). Reading the trail for it is audited.
    ///
    /// # Errors
    /// Storage or audit failures; [`Error::AuditDamaged`] if an audit
    /// entry does not decode.
    pub async fn processing_report(
        &self,
        permit: crate::authz::Permit<act::AuditRead, ReportQuery>,
        audit: &crate::audit::AuditContext,
    ) -> Result<crate::report::ProcessingReport, Error> {
        let ReportQuery { period, policy } = permit.into_item();
        let report = crate::report::online(&self.fields, &policy, &self.store, period, self.now())
            .await
            .map_err(Error::AuditDamaged)?;
        self.record(&audit.event(Outcome::Ok)).await?;
        Ok(report)
    }
}
