//! When a value's time is up.
//!
//! Reveal refuses an expired record at once (`reveal.rs`); what is here
//! makes everything else agree with it. Tokenize gives a deterministic value
//! whose token expired a new token, retiring the dead one, instead of handing
//! back a token that can reveal nothing; lookup does not report a dead token;
//! and the sweeper deletes what is left, page by page, never deleting an
//! index entry that has moved on to a newer token.

use super::{Error, Record, Vault, subjects::subject_index_key, tokenize::Indexed};
use crate::{
    store::{Batch, Store, Table},
    token::Token,
};

/// What a blind-index entry leads to.
enum Liveness {
    /// A record that has not expired (or a token the caller should hear
    /// about as it is: one that does not parse, or a record that does not
    /// decode, which reveal reports as data loss).
    Live,
    /// An expired record (its stored bytes), or none at all.
    Dead(Option<Vec<u8>>),
}

impl<S: Store> Vault<S> {
    /// The entries of `found` whose record is live, for lookup: a value
    /// whose token expired has no token.
    ///
    /// # Errors
    /// Storage failures.
    pub(super) async fn live_only(&self, found: Vec<Indexed>) -> Result<Vec<Indexed>, Error> {
        Ok(self
            .liveness(found)
            .await?
            .into_iter()
            .filter_map(|(entry, liveness)| matches!(liveness, Liveness::Live).then_some(entry))
            .collect())
    }

    /// The entries of `found` whose record is live, for tokenize. Each dead
    /// one is retired first (its index entry, record and subject-index
    /// entry deleted, under guards that none changed since they were read),
    /// so that its value goes on to get a new token under the usual
    /// absent-key guard: of concurrent requests for it, one creates the new
    /// token and the others get it. A retirement that lost a race changes
    /// nothing, and that guard then hands back whatever the index holds.
    ///
    /// # Errors
    /// Storage failures.
    pub(super) async fn live_retiring_dead(
        &self,
        found: Vec<Indexed>,
    ) -> Result<Vec<Indexed>, Error> {
        let mut batch = Batch::new();
        let mut live = Vec::with_capacity(found.len());
        for (entry, liveness) in self.liveness(found).await? {
            match (liveness, &entry.token) {
                (Liveness::Dead(record), Ok(token)) => retire(&mut batch, &entry, token, record),
                _ => live.push(entry),
            }
        }
        if !batch.is_empty() {
            let retired = batch.units().len();
            self.store.commit(batch).await?;
            tracing::debug!(retired, "expired deterministic tokens retired by tokenize");
        }
        Ok(live)
    }

    /// Reads the record behind each entry and says whether it is live.
    async fn liveness(&self, found: Vec<Indexed>) -> Result<Vec<(Indexed, Liveness)>, Error> {
        let keys = found
            .iter()
            .filter_map(|entry| entry.token.as_ref().ok())
            .map(|token| token.storage_key().to_vec())
            .collect();
        let mut records = self.store.get_many(Table::Records, keys).await?.into_iter();
        let now = self.now();
        Ok(found
            .into_iter()
            .map(|entry| {
                let liveness = match &entry.token {
                    Err(_) => Liveness::Live,
                    Ok(_) => match records.next().flatten() {
                        None => Liveness::Dead(None),
                        Some(bytes) => match Record::decode(&bytes) {
                            Ok(record) if record.expired(now) => Liveness::Dead(Some(bytes)),
                            _ => Liveness::Live,
                        },
                    },
                };
                (entry, liveness)
            })
            .collect())
    }

    /// Deletes expired records (with their index entries), a page at a time.
    /// Returns how many were deleted.
    ///
    /// Each record goes in its own guarded units: the record (and its
    /// subject-index entry) only if it is still the expired one that was
    /// read, its blind-index entry only if that still names its token (a
    /// tokenize may have given the value a new one since).
    ///
    /// # Errors
    /// Storage failures.
    pub async fn sweep_expired(&self) -> Result<u64, Error> {
        const PAGE: usize = 1000;
        let now = self.now();
        let mut from = Vec::new();
        let mut swept = 0;
        loop {
            let page = self
                .store
                .scan_from(Table::Records, from.clone(), PAGE)
                .await?;
            let Some((last, _)) = page.last() else { break };
            let mut next = last.clone();
            next.push(0);
            let mut batch = Batch::new();
            // Which unit of the batch deletes each record.
            let mut record_units = Vec::new();
            for (key, value) in &page {
                let Ok(record) = Record::decode(value) else {
                    continue;
                };
                if !record.expired(now) {
                    continue;
                }
                record_units.push(batch.units().len());
                let unit = batch.unit();
                unit.guard_unchanged(Table::Records, key.clone(), value.clone());
                unit.delete(Table::Records, key.clone());
                if let Some(subject) = record.subject_hash {
                    let mut index_key = subject.to_vec();
                    index_key.extend_from_slice(key);
                    unit.delete(Table::SubjectIndex, index_key);
                }
                if let Some(blind) = record.blind {
                    // The index entry holds the token, which is the
                    // record's key.
                    batch
                        .unit()
                        .guard_unchanged(Table::Index, blind.to_vec(), key.clone())
                        .delete(Table::Index, blind.to_vec());
                }
            }
            if !batch.is_empty() {
                let outcomes = self.store.commit(batch).await?;
                swept += record_units
                    .into_iter()
                    .filter(|&unit| outcomes.get(unit).is_some_and(Result::is_ok))
                    .count() as u64;
            }
            if page.len() < PAGE {
                break;
            }
            from = next;
        }
        Ok(swept)
    }
}

/// Adds the units that retire one dead entry to `batch`.
fn retire(batch: &mut Batch, entry: &Indexed, token: &Token, record: Option<Vec<u8>>) {
    let unit = batch.unit();
    unit.guard_unchanged(
        Table::Index,
        entry.key.to_vec(),
        token.storage_key().to_vec(),
    )
    .delete(Table::Index, entry.key.to_vec());
    if let Some(bytes) = record {
        let subject = Record::decode(&bytes).ok().and_then(|r| r.subject_hash);
        unit.guard_unchanged(Table::Records, token.storage_key().to_vec(), bytes)
            .delete(Table::Records, token.storage_key().to_vec());
        if let Some(subject) = subject {
            unit.delete(Table::SubjectIndex, subject_index_key(&subject, token));
        }
    }
}
