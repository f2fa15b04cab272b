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
    requests::{REQUEST_ID_IN_FLIGHT, Remember},
};
use crate::{
    audit::{AuditContext, AuditEvent, Outcome},
    authz::{Permit, act},
    layout::{self, ConsentState, KeyVersion},
    store::{Batch, Store, Table, Unit},
};

/// An erasure call to remember under the caller's request id: the receipt
/// it answers with, given how many tokens it erased.
struct RememberErasure<'a> {
    remember: Remember<'a, ErasureReceipt>,
    audit: &'a AuditContext,
    receipt: &'a (dyn Fn(u64) -> ErasureReceipt + Send + Sync),
}

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

/// What a write for a subject hears when the subject was erased while it
/// was being made (its erasure mark moved).
pub(super) const ERASED_MEANWHILE: &str =
    "the subject was erased meanwhile; nothing was written, retry";

/// A subject's erasure mark as read (`layout::subject_erased_key`): a
/// subject key or consent made now records its number, and its write
/// guards it unchanged, so that no erasure comes in between unnoticed.
pub(super) struct ErasureMark {
    key: Vec<u8>,
    stored: Option<Vec<u8>>,
}

impl ErasureMark {
    /// The number of the subject's newest erasure (0 for none).
    pub(super) fn number(&self) -> u64 {
        self.stored
            .as_deref()
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_be_bytes)
    }

    /// Adds to `unit` the guard that the mark is still as read.
    pub(super) fn guard(&self, unit: &mut Unit) {
        match &self.stored {
            Some(value) => unit.guard_unchanged(Table::Meta, self.key.clone(), value.clone()),
            None => unit.guard_absent(Table::Meta, self.key.clone()),
        };
    }
}

/// Which of a subject's things an erasure deletes.
#[derive(Debug, Clone, Copy)]
enum Cutoff {
    /// Everything: the erasure as it is made.
    All,
    /// What came before ledger entry `seq` (made at `erased_ms`): the
    /// erasure applied again after a restore, which keeps what the subject
    /// gave since (a key made later, and so its values; a consent).
    Before { seq: u64, erased_ms: u64 },
}

impl Cutoff {
    /// Whether a thing that recorded the erasure number `erased_through`
    /// when it was made (or, made by an earlier release, only its time
    /// `made_ms`) came before the erasure.
    fn covers(self, erased_through: Option<u64>, made_ms: u64) -> bool {
        match self {
            Cutoff::All => true,
            Cutoff::Before { seq, erased_ms } => match erased_through {
                Some(number) => number < seq,
                // The writer's clock: the one ordering older data has.
                None => made_ms <= erased_ms,
            },
        }
    }
}

/// Adds to `unit` the deletion of the subject `hash`'s value under `token`
/// (`record`, if it decodes), with its index, expiry and subject-index
/// entries, and notes them in `purge`.
fn delete_value(
    unit: &mut Unit,
    purge: &mut Vec<(Table, Vec<u8>)>,
    hash: &[u8; 32],
    token: &crate::token::Token,
    record: Option<&Record>,
) {
    if let Some(blind) = record.and_then(|r| r.blind) {
        unit.delete(Table::Index, blind.to_vec());
        purge.push((Table::Index, blind.to_vec()));
    }
    if let Some(expires_ms) = record.and_then(|r| r.expires_ms) {
        let key = layout::expiry_key(expires_ms, token.storage_key());
        unit.delete(Table::Expiry, key.clone());
        purge.push((Table::Expiry, key));
    }
    let index_key = layout::subject_index_key(hash, token.storage_key());
    unit.delete(Table::Records, token.storage_key().to_vec());
    unit.delete(Table::SubjectIndex, index_key.clone());
    purge.push((Table::Records, token.storage_key().to_vec()));
    purge.push((Table::SubjectIndex, index_key));
}

/// How many times an erasure reads the subject again when its key changed
/// under it before it gives up.
const MAX_RACES: usize = 8;

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
    pub(super) async fn recorded_ledger(&self) -> Result<Vec<LedgerEntry>, Error> {
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
    /// subject had when it was erased (a key made later stays, and so do
    /// its values, and consents given later), and records the entry.
    async fn reapply(&self, entry: &LedgerEntry) -> Result<u64, Error> {
        let cutoff = Cutoff::Before {
            seq: entry.seq,
            erased_ms: entry.erasure.erased_ms,
        };
        self.apply_erasure(entry.erasure.subject_hash, cutoff, Some(entry), None, None)
            .await
    }

    /// Erases a subject: records the erasure in the ledger, then deletes its
    /// key, records, index and consent entries in one write (with the audit
    /// event and the vault's copy of the ledger entry); then purges the
    /// bytes from the data files. Idempotent. With `remember`, the receipt
    /// is recorded with the write, under the caller's request id
    /// (`requests`).
    ///
    /// # Errors
    /// Ledger, storage or audit failures; a conflict if another call with
    /// the request id was written first.
    pub async fn erase_subject(
        &self,
        subject: Permit<act::SubjectErase, SubjectId>,
        audit: &AuditContext,
        remember: Option<Remember<'_, ErasureReceipt>>,
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
        // A call with the same id that erased while this one waited for
        // its turn: nothing more goes into the ledger for this one.
        if let Some(r) = &remember
            && !self.still_new(r.request).await?
        {
            return Err(Error::Conflict(REQUEST_ID_IN_FLIGHT));
        }
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
        let receipt = |tokens_erased| ErasureReceipt {
            subject_hash: data_encoding::HEXLOWER.encode(&hash),
            tokens_erased,
            erased_ms,
        };
        let remember = remember.map(|r| RememberErasure {
            remember: r,
            audit,
            receipt: &receipt,
        });
        let erased = self
            .apply_erasure(
                hash,
                Cutoff::All,
                entry.as_ref(),
                Some(event),
                remember.as_ref(),
            )
            .await?;
        drop(tail);
        Ok(receipt(erased))
    }

    /// Deletes what `cutoff` covers of the subject in one write, with the
    /// ledger `entry` and `event` if given, then purges it from the files.
    /// The write guards the subject's key as read: a key made meanwhile (a
    /// first value of the subject, through any replica) is read again and
    /// erased too.
    async fn apply_erasure(
        &self,
        hash: [u8; 32],
        cutoff: Cutoff,
        entry: Option<&LedgerEntry>,
        mut event: Option<AuditEvent>,
        mut remember: Option<&RememberErasure<'_>>,
    ) -> Result<u64, Error> {
        // Whether a call with the same id was written first: this erasure
        // is then applied without the record (its ledger entry is written,
        // and must not be left unapplied), and the caller told so.
        let mut lost_to_same_id = false;
        // The erasure's own request id, which it keeps (or the call with
        // the same id that won keeps).
        let own = remember.map(|r| r.remember.request);
        for _ in 0..MAX_RACES {
            let mut batch = Batch::new();
            let unit = batch.unit();
            let shredding = self.shred(hash, cutoff, entry, unit).await?;
            if let Some(event) = &mut event {
                event.items = u32::try_from(shredding.erased).unwrap_or(u32::MAX);
                self.append_event(unit, event);
            }
            let remembered = remember.map(|r| {
                let answer = (r.remember.answer)(&(r.receipt)(shredding.erased));
                self.remember(unit, r.remember.request, r.audit, answer, &[hash])
            });
            let outcome = match event {
                Some(_) => self
                    .store
                    .commit(batch)
                    .await
                    .map_err(Error::AuditUnavailable)?,
                None => self.store.commit(batch).await?,
            };
            if let (Some(Err(conflict)), Some(at)) = (outcome.first(), remembered)
                && at.lost_to(conflict)
            {
                lost_to_same_id = true;
                remember = None;
                continue;
            }
            if outcome.first().is_some_and(Result::is_err) {
                continue;
            }
            // The erasure is written: what follows cannot undo it, and a
            // failure of it is logged, not returned.
            let mut purge = shredding.purge;
            match self.sweep(hash, entry).await {
                Ok(swept) => purge.extend(swept),
                Err(e) => {
                    tracing::warn!(error = %e, "the sweep after an erasure failed; what a racing write left is swept at the subject's next erasure");
                }
            }
            // The request ids of calls that named the subject are forgotten
            // (a retry of one runs again): their records hold keyed hashes
            // of values, and tokens. This erasure's own is kept.
            match self.forget_requests_of(&hash, own).await {
                Ok(forgotten) => purge.extend(forgotten),
                Err(e) => {
                    tracing::warn!(error = %e, "forgetting the request ids of an erased subject's calls failed; they go at the end of limits.request_id_hours");
                }
            }
            if !purge.is_empty() {
                self.store.purge(purge).await?;
            }
            if lost_to_same_id {
                return Err(Error::Conflict(REQUEST_ID_IN_FLIGHT));
            }
            return Ok(shredding.erased);
        }
        Err(Error::Conflict(
            "the subject's key changed under the erasure again and again; it is recorded and is applied again at the next start, retry",
        ))
    }

    /// Adds to `unit` the deletion of what `cutoff` covers of a subject:
    /// its key, and with it every value under it (a value under a key
    /// that is gone is unreadable, whenever it was made); values of an
    /// earlier release under the vault's keys; consents. With the ledger
    /// `entry`, also the vault's copy of it and the subject's erasure mark.
    async fn shred(
        &self,
        hash: [u8; 32],
        cutoff: Cutoff,
        entry: Option<&LedgerEntry>,
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
        match &wrapped {
            Some(w) => unit.guard_unchanged(Table::Keys, label.clone(), w.clone()),
            None => unit.guard_absent(Table::Keys, label.clone()),
        };
        let mut purge = Vec::new();
        let key_goes = wrapped.as_deref().is_none_or(|w| {
            cutoff.covers(
                layout::wrapped_erased_through(w),
                layout::wrapped_created_ms(w),
            )
        });
        if key_goes && wrapped.is_some() {
            unit.delete(Table::Keys, label.clone());
            purge.push((Table::Keys, label));
        }
        let mut erased = 0;
        for (token, bytes) in tokens.iter().zip(records) {
            let record = bytes.as_deref().and_then(|b| Record::decode(b).ok());
            let goes = match &record {
                Some(r) if r.key_version == KeyVersion::Subject => key_goes,
                Some(r) => cutoff.covers(None, r.created_ms),
                // Undecodable: nothing to keep.
                None => true,
            };
            if !goes {
                continue;
            }
            if record.is_some() {
                erased += 1;
            }
            delete_value(unit, &mut purge, &hash, token, record.as_ref());
        }
        for (key, value) in consents {
            // A consent given after the erasure is the subject's new wish.
            let state = ConsentState::decode(Some(&value));
            if !cutoff.covers(state.erased_through, state.updated_ms) {
                continue;
            }
            unit.delete(Table::Consent, key.clone());
            purge.push((Table::Consent, key));
        }
        if let Some(entry) = entry {
            unit.put(
                Table::Meta,
                layout::erasure_ledger_entry_key(entry.seq),
                entry.encode(),
            );
            // Never back: an entry applied again after a later one; and
            // guarded, so that two erasures at once cannot set it back.
            let mark = self.erasure_marks(&[hash]).await?.remove(0);
            mark.guard(unit);
            if entry.seq > mark.number() {
                unit.put(Table::Meta, mark.key, entry.seq.to_be_bytes().to_vec());
            }
        }
        Ok(Shredding { erased, purge })
    }

    /// What a write racing the erasure left behind, deleted once the
    /// erasure is written: consents that recorded an erasure number before
    /// `entry`'s (written between the erasure's read and its write), and,
    /// while the subject has no key, its values under a subject key (a
    /// tokenize that loaded the key the erasure destroyed and wrote in
    /// between; one that writes later fails on the erasure mark instead).
    /// Each in a unit of its own, guarded as read: one changed meanwhile
    /// stays, the others go. Returns what to purge.
    async fn sweep(
        &self,
        hash: [u8; 32],
        entry: Option<&LedgerEntry>,
    ) -> Result<Vec<(Table, Vec<u8>)>, Error> {
        let mut batch = Batch::new();
        let mut planned = Vec::new();
        if let Some(entry) = entry {
            let cutoff = Cutoff::Before {
                seq: entry.seq,
                erased_ms: entry.erasure.erased_ms,
            };
            for (key, value) in self
                .store
                .scan_prefix(Table::Consent, hash.to_vec())
                .await?
            {
                let state = ConsentState::decode(Some(&value));
                if cutoff.covers(state.erased_through, state.updated_ms) {
                    let unit = batch.unit();
                    unit.guard_unchanged(Table::Consent, key.clone(), value);
                    unit.delete(Table::Consent, key.clone());
                    planned.push(vec![(Table::Consent, key)]);
                }
            }
        }
        // With a key, a value it does not open may be damaged, not left
        // behind: only values no key can open are swept.
        if self.subject_keys(&[hash]).await?.is_empty() {
            let (tokens, records) = self.subject_records(&hash).await?;
            for (token, bytes) in tokens.iter().zip(records) {
                let Some(bytes) = bytes else { continue };
                let Ok(record) = Record::decode(&bytes) else {
                    continue;
                };
                if record.key_version != KeyVersion::Subject || record.subject_hash != Some(hash) {
                    continue;
                }
                let unit = batch.unit();
                unit.guard_unchanged(Table::Records, token.storage_key().to_vec(), bytes);
                let mut purge = Vec::new();
                delete_value(unit, &mut purge, &hash, token, Some(&record));
                planned.push(purge);
            }
        }
        if planned.is_empty() {
            return Ok(Vec::new());
        }
        let outcomes = self.store.commit(batch).await?;
        Ok(planned
            .into_iter()
            .zip(outcomes)
            .filter(|(_, outcome)| outcome.is_ok())
            .flat_map(|(purge, _)| purge)
            .collect())
    }

    /// Whether any of the erasure `marks` of `subjects` (read earlier, in
    /// the same order) has moved since: one of them was erased meanwhile.
    pub(super) async fn marks_moved(
        &self,
        marks: &[ErasureMark],
        subjects: &[[u8; 32]],
    ) -> Result<bool, Error> {
        let now = self.erasure_marks(subjects).await?;
        Ok(marks
            .iter()
            .zip(&now)
            .any(|(then, now)| then.stored != now.stored))
    }

    /// The erasure marks of `subjects`, in order.
    pub(super) async fn erasure_marks(
        &self,
        subjects: &[[u8; 32]],
    ) -> Result<Vec<ErasureMark>, Error> {
        let keys: Vec<Vec<u8>> = subjects.iter().map(layout::subject_erased_key).collect();
        let stored = self.store.get_many(Table::Meta, keys.clone()).await?;
        Ok(keys
            .into_iter()
            .zip(stored)
            .map(|(key, stored)| ErasureMark { key, stored })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ItemError, ledger::Erasure, tests::fixture_with_clock};
    use super::*;
    use crate::authz::{IdentityPattern, Policy, PurposeSet, Rule};

    /// Erasure 1 of `hash`, made at `erased_ms` by the clock of the
    /// replica that made it.
    fn first_erasure(
        f: &super::super::tests::Fixture,
        hash: [u8; 32],
        erased_ms: u64,
    ) -> LedgerEntry {
        LedgerEntry::next(
            f.vault.keyring.ledger_key(),
            None,
            Erasure {
                subject_hash: hash,
                erased_ms,
            },
        )
    }

    /// Sets consent to `purpose` through the vault, as SetConsent does.
    async fn set_consent(f: &super::super::tests::Fixture, subject: &str, purpose: &str) {
        let policy = Policy::new(vec![Rule::new(
            IdentityPattern::new("spiffe://*").unwrap(),
            vec!["consent:write".parse().unwrap()],
            PurposeSet::Any,
        )]);
        let permit = policy
            .grants(&f.client)
            .permit_global(
                act::ConsentWrite,
                super::super::ConsentDecision {
                    subject: subject.parse().unwrap(),
                    purpose: purpose.parse().unwrap(),
                    granted: true,
                },
            )
            .unwrap();
        f.vault
            .set_consent(permit, &super::super::tests::ctx("SetConsent", 1))
            .await
            .unwrap();
    }

    async fn consents_kept(f: &super::super::tests::Fixture, hash: [u8; 32]) -> Vec<String> {
        f.vault
            .store
            .scan_prefix(Table::Consent, hash.to_vec())
            .await
            .unwrap()
            .iter()
            .filter_map(|(k, _)| layout::purpose_of_consent_key(k).map(str::to_owned))
            .collect()
    }

    /// Made before the erasure by a replica whose clock runs a minute
    /// ahead of the erasing one's: applied again, the erasure still takes
    /// the key, the value and the consent, by the erasure number they
    /// recorded (none), not by their times (later than the erasure's). By
    /// the clock, as before, all three stayed.
    #[tokio::test]
    async fn an_erasure_applied_again_takes_what_came_before_it_whatever_the_clocks() {
        let (f, time) = fixture_with_clock().await;
        let t0 = time.load(std::sync::atomic::Ordering::SeqCst);
        time.store(t0 + 60_000, std::sync::atomic::Ordering::SeqCst);
        let token = f
            .tokenize_for("cust-a", &[("email", "a@example.com", None)])
            .await
            .remove(0);
        set_consent(&f, "cust-a", "marketing").await;
        let hash = f.vault.subject_hash(&"cust-a".parse().unwrap());

        let entry = first_erasure(&f, hash, t0);
        assert_eq!(f.vault.reapply(&entry).await.unwrap(), 1);
        assert!(consents_kept(&f, hash).await.is_empty());
        assert!(matches!(
            f.reveal(std::slice::from_ref(&token), false).await[0],
            Err(ItemError::NotFound)
        ));
        let mark = f.vault.erasure_marks(&[hash]).await.unwrap().remove(0);
        assert_eq!(mark.number(), 1);
    }

    /// Given after the erasure, through a replica whose clock runs a
    /// minute behind the erasing one's: applied again (the ledger entry's
    /// copy in the data lost, as a restore of a later backup that lacked
    /// it), the erasure keeps the new key, its value and the consent, which
    /// recorded the erasure's number. By the clock, all three went.
    #[tokio::test]
    async fn an_erasure_applied_again_keeps_what_came_after_it_whatever_the_clocks() {
        let (f, time) = fixture_with_clock().await;
        let t0 = time.load(std::sync::atomic::Ordering::SeqCst);
        let hash = f.vault.subject_hash(&"cust-b".parse().unwrap());
        let entry = first_erasure(&f, hash, t0);
        f.tokenize_for("cust-b", &[("email", "old@example.com", None)])
            .await;
        f.vault.reapply(&entry).await.unwrap();
        let mut batch = Batch::new();
        batch.delete(Table::Meta, layout::erasure_ledger_entry_key(entry.seq));
        f.vault.store.commit(batch).await.unwrap();

        time.store(t0 - 60_000, std::sync::atomic::Ordering::SeqCst);
        let token = f
            .tokenize_for("cust-b", &[("email", "new@example.com", None)])
            .await
            .remove(0);
        set_consent(&f, "cust-b", "newsletter").await;

        assert_eq!(f.vault.reapply(&entry).await.unwrap(), 0);
        assert_eq!(consents_kept(&f, hash).await, ["newsletter"]);
        assert!(f.reveal(std::slice::from_ref(&token), false).await[0].is_ok());
    }

    /// Consents of an earlier release recorded no erasure number: their
    /// time still places them. Re-applying an erasure deletes what the
    /// subject had when it was erased, and keeps a consent given after it:
    /// the subject's newer wish.
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
                erased_through: None,
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

#[cfg(test)]
mod race_tests {
    use std::sync::Arc;

    use super::super::{
        ItemError, LedgerLocation, NewValue, SubjectId,
        tests::{Fixture, ctx, fixture, placeholder_vault},
    };
    use super::*;
    use crate::{
        authz::{IdentityPattern, Policy, PurposeSet, Rule},
        crypto::SecretValue,
    };

    /// Tokenizes of one subject racing its erasures: once all are done,
    /// every value the subject's index names reads back. Before the write
    /// guarded the subject's erasure mark, a tokenize that loaded the
    /// subject's key before an erasure and wrote after it left values
    /// under the destroyed key behind (and their index entries), which
    /// then read as not found.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tokenize_racing_an_erasure_leaves_nothing_unreadable_behind() {
        let mut f: Fixture = fixture().await;
        let ledger = tempfile::tempdir().unwrap();
        let vault = std::mem::replace(&mut f.vault, placeholder_vault().await);
        let (vault, _) = vault
            .with_ledger(
                LedgerLocation::File(ledger.path().join("erasures")),
                LedgerRollback::Refuse,
            )
            .await
            .unwrap();
        f.vault = vault;
        let f = Arc::new(f);
        let erasing = Policy::new(vec![Rule::new(
            IdentityPattern::new("spiffe://*").unwrap(),
            vec!["subject:erase".parse().unwrap()],
            PurposeSet::Any,
        )]);
        let mut tasks = Vec::new();
        for round in 0..200 {
            let shared = Arc::clone(&f);
            tasks.push(tokio::spawn(async move {
                let f = shared;
                let grants = f.policy.grants(&f.client);
                let permit = grants
                    .permit_tokenize(NewValue {
                        field_type: "email".parse().unwrap(),
                        value: SecretValue::new(format!("r{round}@example.com")),
                        subject: Some("cust-race".parse().unwrap()),
                        ttl_seconds: None,
                    })
                    .unwrap();
                // Stored, or refused as erased meanwhile: both are fine.
                let _ = f
                    .vault
                    .tokenize(
                        vec![permit],
                        |ft| grants.permit_field(act::Lookup, ft),
                        &ctx("Tokenize", 1),
                        None,
                    )
                    .await;
            }));
            if round % 10 == 0 {
                let permit = erasing
                    .grants(&f.client)
                    .permit_global(act::SubjectErase, "cust-race".parse::<SubjectId>().unwrap())
                    .unwrap();
                f.vault
                    .erase_subject(permit, &ctx("EraseSubject", 1), None)
                    .await
                    .unwrap();
            }
        }
        for task in tasks {
            task.await.unwrap();
        }
        let hash = f.vault.subject_hash(&"cust-race".parse().unwrap());
        let (tokens, _) = f.vault.subject_records(&hash).await.unwrap();
        let revealed = f.reveal(&tokens, false).await;
        let unreadable = revealed
            .iter()
            .filter(|r| matches!(r, Err(ItemError::NotFound | ItemError::DataLoss)))
            .count();
        assert_eq!(unreadable, 0, "of {} values left", tokens.len());
    }
}
