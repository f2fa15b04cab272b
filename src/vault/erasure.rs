//! Erasure: crypto-shredding a data subject, and keeping it erased across
//! restores.
//!
//! An erasure is first appended (durably) to the erasure ledger, a file
//! outside the data directory or, for replicas on a shared database, a
//! table in another database (`ledger_sink`), then applied in one write: the subject's key,
//! records, index, expiry and consent entries go, with the audit event and
//! the vault's own copy of the ledger entry (`meta`,
//! `erasure-ledger/entry/<seq>`). Then the bytes are purged from the files.
//!
//! At open the ledger and the vault's copy are compared:
//!
//! - the ledger holds erasures the vault lacks (the data was restored from
//!   an older copy, or a crash came between the two writes): they are
//!   applied again;
//! - the vault recorded erasures the ledger lacks (the ledger was replaced
//!   by an older copy, or is missing): the vault refuses to start, unless
//!   the operator says the ledger was restored on purpose, in which case the
//!   missing entries are written back into it;
//! - the two disagree, or the ledger's chain does not verify (edited,
//!   damaged, another vault's): the vault refuses to start.
//!
//! What no local check can catch: the data and the ledger both restored to
//! the same earlier moment. Keep the ledger on storage that is not
//! snapshotted or restored with the data (see deploy/README.md).

use super::{
    Erasure, ErasureReceipt, Error, Record, SubjectId, Vault,
    ledger::{LedgerEntry, LedgerError, LedgerFile, verify_chain},
    ledger_sink::{LedgerLocation, LedgerSink},
};
use crate::{
    audit::{AuditContext, AuditEvent, Outcome},
    authz::Permit,
    layout::{self, ConsentState},
    store::{Batch, Store, Table, Unit},
};

/// What to do when the ledger holds fewer erasures than the vault recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LedgerRollback {
    /// Refuse to start (the default): the ledger was replaced or lost.
    #[default]
    Refuse,
    /// The operator restored the ledger on purpose: write the missing
    /// erasures back into it from the vault's record and start.
    Repair,
}

/// The ledger and its newest entry this process knows, which the next
/// erasure chains to.
pub(super) struct LedgerState {
    pub(super) sink: LedgerSink,
    tail: tokio::sync::Mutex<Option<LedgerEntry>>,
}

/// Where the entry numbered `seq` (from 1) is in a chain read in order.
fn position(seq: u64) -> usize {
    usize::try_from(seq.saturating_sub(1)).unwrap_or(usize::MAX)
}

/// What an erasure deletes, ready to go into a unit.
struct Shredding {
    /// Values erased (records that existed).
    erased: u64,
    /// Keys to purge from the files afterwards.
    purge: Vec<(Table, Vec<u8>)>,
}

impl<S: Store> Vault<S> {
    /// Opens the erasure ledger at `location` and reconciles it with the
    /// vault's own record of it (see the module doc). Returns how many
    /// tokens were erased again.
    ///
    /// # Errors
    /// [`Error::Ledger`] with one line saying what is wrong and what to do;
    /// storage failures.
    pub async fn with_ledger(
        mut self,
        location: LedgerLocation,
        rollback: LedgerRollback,
    ) -> Result<(Self, u64), Error> {
        let (sink, content) = LedgerSink::open(location).await?;
        let mut binding = match &content {
            LedgerFile::Chained(entries) => {
                self.check_ledger_binding(&sink, entries, rollback).await?
            }
            _ => self.check_ledger_binding(&sink, &[], rollback).await?,
        };
        let recorded = self.recorded_ledger().await?;
        let key = self.keyring.ledger_key();
        let place = sink.place();
        let set_aside = sink.set_aside();
        let refuse = |message: String| Error::from(LedgerError::at(&place, message));
        let found = match content {
            LedgerFile::Missing => {
                if recorded.is_empty() {
                    tracing::info!(ledger = %place, "created a new erasure ledger");
                }
                Vec::new()
            }
            LedgerFile::Chained(entries) => {
                verify_chain(key, &entries).map_err(|seq| {
                    refuse(format!(
                        "entry {seq} does not verify: it was edited or damaged, or belongs to another vault; restore it from a backup, or {set_aside} and start with --accept-restored-ledger to rebuild it from this vault's own record"
                    ))
                })?;
                entries
            }
            LedgerFile::Unchained(erasures) => {
                if !recorded.is_empty() {
                    return Err(refuse(format!(
                        "holds unchained entries, but this vault recorded {} chained ones: it is an older copy; restore the current ledger, or {set_aside} and start with --accept-restored-ledger",
                        recorded.len()
                    )));
                }
                let mut entries: Vec<LedgerEntry> = Vec::with_capacity(erasures.len());
                for erasure in erasures {
                    let next = LedgerEntry::next(key, entries.last(), erasure);
                    entries.push(next);
                }
                sink.rewrite(&entries)?;
                tracing::info!(ledger = %place, entries = entries.len(), "rewrote the erasure ledger of an earlier release in the chained form");
                entries
            }
        };
        // Compared by number: with replicas sharing a table, a later erasure
        // may be in the data while an earlier one (its replica killed in
        // between) is only in the ledger.
        if let Some(differs) = recorded
            .iter()
            .find(|r| found.get(position(r.seq)).is_some_and(|f| f != *r))
        {
            return Err(refuse(format!(
                "disagrees with this vault at erasure {}: it belongs to another vault or was rewritten; restore the right ledger, or {set_aside} and start with --accept-restored-ledger",
                differs.seq
            )));
        }
        let missing: Vec<LedgerEntry> = recorded
            .iter()
            .filter(|r| position(r.seq) >= found.len())
            .copied()
            .collect();
        let mut reapplied = 0;
        let tail = if !missing.is_empty() {
            if rollback == LedgerRollback::Refuse {
                return Err(refuse(format!(
                    "holds {} erasures but this vault recorded {}: it was replaced by an older copy or lost. If that was on purpose, start once with --accept-restored-ledger to write the missing erasures back into it",
                    found.len(),
                    found.len() + missing.len()
                )));
            }
            let contiguous = missing
                .iter()
                .zip(found.len() as u64 + 1..)
                .all(|(entry, seq)| entry.seq == seq);
            if !contiguous {
                return Err(refuse(
                    "is older than this vault's record of it, and that record has gaps (an erasure was only in the ledger): restore the ledger from a backup".to_owned(),
                ));
            }
            // Bound first: the entries go into a ledger this vault holds,
            // checked on append.
            if let Some(binding) = binding.take() {
                self.record_ledger_binding(&sink, binding).await?;
            }
            sink.append(&missing).await?;
            tracing::warn!(
                ledger = %place,
                written = missing.len(),
                "the erasure ledger was older than this vault's record of it; wrote the missing erasures back into it (--accept-restored-ledger)"
            );
            missing.last().copied()
        } else {
            let applied: std::collections::HashSet<u64> = recorded.iter().map(|r| r.seq).collect();
            for entry in found.iter().filter(|f| !applied.contains(&f.seq)) {
                reapplied += self.reapply(entry).await?;
            }
            if reapplied > 0 {
                tracing::warn!(
                    tokens = reapplied,
                    "re-applied the erasure ledger: erased data had come back (restored backup?)"
                );
            }
            found.last().copied()
        };
        if let Some(binding) = binding {
            self.record_ledger_binding(&sink, binding).await?;
        }
        self.ledger = Some(LedgerState {
            sink,
            tail: tokio::sync::Mutex::new(tail),
        });
        self.check_signed_head().await?;
        Ok((self, reapplied))
    }

    /// The newest erasure of a shared ledger table that the vault's
    /// database does not hold, if any: the database went back behind it (a
    /// restore, a lossy failover), or the erasure's write is still on its
    /// way or failed after its ledger entry was written. Replicas ask this
    /// every second: a replica that wrote nothing since the erasure has no
    /// other way to see that the database lost it. `None` for a file
    /// ledger (one process, which re-applies at open).
    ///
    /// # Errors
    /// If the ledger or the database cannot be read.
    pub async fn erasure_missing(&self) -> Result<Option<u64>, Error> {
        let Some(ledger) = &self.ledger else {
            return Ok(None);
        };
        let Some(newest) = ledger.sink.newest_shared().await? else {
            return Ok(None);
        };
        let held = self
            .store
            .get_many(Table::Meta, vec![layout::erasure_ledger_entry_key(newest)])
            .await?;
        Ok(held.first().is_some_and(Option::is_none).then_some(newest))
    }

    /// The vault's own copy of the ledger, in order.
    async fn recorded_ledger(&self) -> Result<Vec<LedgerEntry>, Error> {
        let stored = self
            .store
            .scan_prefix(Table::Meta, layout::ERASURE_LEDGER_ENTRY_PREFIX.to_vec())
            .await?;
        stored
            .iter()
            .map(|(_, value)| {
                LedgerEntry::decode(value).ok_or_else(|| {
                    Error::CorruptKey("a recorded erasure ledger entry is malformed".into())
                })
            })
            .collect()
    }

    /// Applies a ledger entry the data does not have yet: deletes what the
    /// subject had when it was erased (values and consents given later stay,
    /// and so does a key made later), and records the entry.
    async fn reapply(&self, entry: &LedgerEntry) -> Result<u64, Error> {
        let mut batch = Batch::new();
        let unit = batch.unit();
        let shredding = self
            .shred(entry.erasure.subject_hash, entry.erasure.erased_ms, unit)
            .await?;
        unit.put(
            Table::Meta,
            layout::erasure_ledger_entry_key(entry.seq),
            entry.encode(),
        );
        self.store.commit(batch).await?;
        if !shredding.purge.is_empty() {
            self.store.purge(shredding.purge).await?;
        }
        Ok(shredding.erased)
    }

    /// Erases a subject: records the erasure in the ledger, then deletes its
    /// key, records, index and consent entries in one write (with the audit
    /// event and the vault's copy of the ledger entry); then purges the
    /// bytes from the data files. Idempotent.
    ///
    /// # Errors
    /// Ledger, storage or audit failures.
    pub async fn erase_subject(
        &self,
        subject: Permit<SubjectId>,
        audit: &AuditContext,
    ) -> Result<ErasureReceipt, Error> {
        let subject_id = subject.into_item();
        let hash = self.subject_hash(&subject_id);
        let erased_ms = self.now();
        let mut event = audit.event(Outcome::Ok);
        event.subjects.push(self.audit_subject(&subject_id));
        let erasure = Erasure {
            subject_hash: hash,
            erased_ms,
        };
        // Erasures take turns: each chains to the one before, in the ledger
        // and in the vault's record alike.
        let mut tail = match &self.ledger {
            Some(ledger) => Some(ledger.tail.lock().await),
            None => None,
        };
        let entry = match (&self.ledger, tail.as_deref_mut()) {
            // In the ledger once recorded, whatever becomes of the write
            // below: the next erasure chains to it (and the next open
            // applies it if the write failed).
            (Some(ledger), Some(tail)) => Some(
                ledger
                    .sink
                    .record(self.keyring.ledger_key(), tail, erasure)
                    .await?,
            ),
            _ => None,
        };
        let erased = self.erase_now(hash, event, entry).await?;
        drop(tail);
        Ok(ErasureReceipt {
            subject_hash: data_encoding::HEXLOWER.encode(&hash),
            tokens_erased: erased,
            erased_ms,
        })
    }

    /// Deletes everything of the subject in one write with `event` and the
    /// ledger `entry`, then purges it from the files.
    async fn erase_now(
        &self,
        hash: [u8; 32],
        mut event: AuditEvent,
        entry: Option<LedgerEntry>,
    ) -> Result<u64, Error> {
        let mut batch = Batch::new();
        let unit = batch.unit();
        let shredding = self.shred(hash, u64::MAX, unit).await?;
        if let Some(entry) = entry {
            unit.put(
                Table::Meta,
                layout::erasure_ledger_entry_key(entry.seq),
                entry.encode(),
            );
        }
        event.items = u32::try_from(shredding.erased).unwrap_or(u32::MAX);
        self.append_event(unit, &event);
        self.store
            .commit(batch)
            .await
            .map_err(Error::AuditUnavailable)?;
        if !shredding.purge.is_empty() {
            self.store.purge(shredding.purge).await?;
        }
        Ok(shredding.erased)
    }

    /// Adds to `unit` the deletion of a subject's values created at or
    /// before `before_ms`, of its key if made by then, and of the consents
    /// it gave by then.
    async fn shred(
        &self,
        hash: [u8; 32],
        before_ms: u64,
        unit: &mut Unit,
    ) -> Result<Shredding, Error> {
        let (tokens, records) = self.subject_records(&hash).await?;
        let label = layout::subject_data_key_label(&hash);
        let wrapped = self
            .store
            .get_many(Table::Keys, vec![label.clone()])
            .await?
            .pop()
            .flatten();
        let consents = self
            .store
            .scan_prefix(Table::Consent, hash.to_vec())
            .await?;
        let mut purge = Vec::new();
        let mut erased = 0;
        for (token, bytes) in tokens.iter().zip(records) {
            let record = bytes.as_deref().and_then(|b| Record::decode(b).ok());
            if record.as_ref().is_some_and(|r| r.created_ms > before_ms) {
                continue;
            }
            if let Some(blind) = record.as_ref().and_then(|r| r.blind) {
                unit.delete(Table::Index, blind.to_vec());
                purge.push((Table::Index, blind.to_vec()));
            }
            if record.is_some() {
                erased += 1;
            }
            if let Some(expires_ms) = record.as_ref().and_then(|r| r.expires_ms) {
                let key = layout::expiry_key(expires_ms, token.storage_key());
                unit.delete(Table::Expiry, key.clone());
                purge.push((Table::Expiry, key));
            }
            let index_key = layout::subject_index_key(&hash, token.storage_key());
            unit.delete(Table::Records, token.storage_key().to_vec());
            unit.delete(Table::SubjectIndex, index_key.clone());
            purge.push((Table::Records, token.storage_key().to_vec()));
            purge.push((Table::SubjectIndex, index_key));
        }
        if wrapped
            .as_deref()
            .is_some_and(|w| layout::wrapped_created_ms(w) <= before_ms)
        {
            unit.delete(Table::Keys, label.clone());
            purge.push((Table::Keys, label));
        }
        for (key, value) in consents {
            // A consent given after the erasure is the subject's new wish.
            if ConsentState::decode(Some(&value)).updated_ms > before_ms {
                continue;
            }
            unit.delete(Table::Consent, key.clone());
            purge.push((Table::Consent, key));
        }
        Ok(Shredding { erased, purge })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ItemError, ledger::Erasure, tests::fixture_with_clock};
    use super::*;

    /// Re-applying an erasure (after a restore) deletes what the subject
    /// had when it was erased, and keeps a consent given after it: the
    /// subject's newer wish.
    #[tokio::test]
    async fn reapplying_an_erasure_keeps_a_consent_given_after_it() {
        let (f, time) = fixture_with_clock().await;
        let t0 = time.load(std::sync::atomic::Ordering::SeqCst);
        let token = f
            .tokenize_for("cust-c", &[("email", "c@example.com", None)])
            .await
            .remove(0);
        let hash = f.vault.subject_hash(&"cust-c".parse().unwrap());
        let consent = |granted: bool, updated_ms: u64| {
            ConsentState {
                granted,
                updated_ms,
            }
            .encode()
        };
        let mut batch = Batch::new();
        let unit = batch.unit();
        unit.put(
            Table::Consent,
            layout::consent_key(&hash, "marketing"),
            consent(true, t0),
        );
        unit.put(
            Table::Consent,
            layout::consent_key(&hash, "newsletter"),
            consent(true, t0 + 10_000),
        );
        f.vault.store.commit(batch).await.unwrap();

        let entry = LedgerEntry::next(
            f.vault.keyring.ledger_key(),
            None,
            Erasure {
                subject_hash: hash,
                erased_ms: t0 + 5_000,
            },
        );
        assert_eq!(f.vault.reapply(&entry).await.unwrap(), 1);

        let consents = f
            .vault
            .store
            .scan_prefix(Table::Consent, hash.to_vec())
            .await
            .unwrap();
        let kept: Vec<&str> = consents
            .iter()
            .filter_map(|(k, _)| layout::purpose_of_consent_key(k))
            .collect();
        assert_eq!(kept, ["newsletter"], "the consents kept");
        assert!(matches!(
            f.reveal(std::slice::from_ref(&token), false).await[0],
            Err(ItemError::NotFound)
        ));
    }
}
