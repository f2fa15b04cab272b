//! When a value's time is up.
//!
//! Reveal refuses an expired record at once (`reveal.rs`); what is here
//! makes everything else agree with it. Tokenize gives a deterministic value
//! whose token expired a new token, retiring the dead one, instead of handing
//! back a token that can reveal nothing; lookup does not report a dead token;
//! and the sweeper deletes what is left, page by page, never deleting an
//! index entry that has moved on to a newer token.

use super::{Error, Record, Vault, tokenize::Indexed};
use crate::{
    layout::{self, EXPIRY_INDEXED, split_expiry_key},
    store::{Batch, Store, Table},
    token::Token,
};

/// Records a sweep reads (or expiry entries it visits) per page.
const SWEEP_PAGE: usize = 1000;

/// What a blind-index entry leads to.
enum Liveness {
    /// A record that has not expired (or a token the caller should hear
    /// about as it is: one that does not parse, or a record that does not
    /// decode, which reveal reports as data loss).
    Live,
    /// An expired record (its stored bytes, decoded), or none at all.
    Dead(Option<(Vec<u8>, Record)>),
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
    /// one is retired first (its index entry, and its record with the
    /// subject-index and expiry entries, deleted under guards that neither
    /// changed since it was read),
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
        let mut retired = 0;
        for (entry, liveness) in self.liveness(found).await? {
            match (liveness, &entry.token) {
                (Liveness::Dead(record), Ok(token)) => {
                    retire(&mut batch, &entry, token, record);
                    retired += 1;
                }
                _ => live.push(entry),
            }
        }
        if retired > 0 {
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
                            Ok(record) if record.expired(now) => {
                                Liveness::Dead(Some((bytes, record)))
                            }
                            _ => Liveness::Live,
                        },
                    },
                };
                (entry, liveness)
            })
            .collect())
    }

    /// Deletes expired records with everything that points at them: their
    /// subject-index, blind-index and expiry entries. Returns how many
    /// records were deleted.
    ///
    /// It reads the expiry table up to now, so its cost follows what is
    /// due, not the size of the vault. A vault made before that table gets
    /// it from one sweep that reads every record.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn sweep_expired(&self) -> Result<u64, Error> {
        let indexed = self
            .store
            .get_many(Table::Meta, vec![EXPIRY_INDEXED.to_vec()])
            .await?
            .pop()
            .flatten()
            .is_some();
        if indexed {
            self.sweep_due().await
        } else {
            self.sweep_all_and_index().await
        }
    }

    /// Sweeps the records the expiry table says are due, in time order.
    async fn sweep_due(&self) -> Result<u64, Error> {
        let now = self.now();
        let (mut from, mut swept) = (Vec::new(), 0);
        loop {
            let page = self.next_page(Table::Expiry, &mut from).await?;
            // Entries up to the first one not yet due; one that does not
            // parse (only damage makes one) is due, to be dropped.
            let due: Vec<_> = page
                .iter()
                .map(|(key, _)| (key, split_expiry_key(key)))
                .take_while(|(_, parsed)| parsed.is_none_or(|(time, _)| time <= now))
                .collect();
            if due.is_empty() {
                break;
            }
            let records = self
                .store
                .get_many(
                    Table::Records,
                    due.iter()
                        .map(|(_, parsed)| parsed.map_or(&[][..], |(_, token)| token).to_vec())
                        .collect(),
                )
                .await?;
            let mut batch = Batch::new();
            let mut record_units = Vec::new();
            for ((key, parsed), bytes) in due.iter().zip(records) {
                let record = bytes.and_then(|b| Some((Record::decode(&b).ok()?, b)));
                match (parsed, record) {
                    (Some((time, token)), Some((record, bytes)))
                        if record.expires_ms == Some(*time) && record.expired(now) =>
                    {
                        record_units.push(sweep_record(&mut batch, token, bytes, &record));
                    }
                    // The record went another way (deleted, erased) and left
                    // its entry behind; or it does not decode, which reveal
                    // reports as data loss, and the sweep leaves alone.
                    _ => {
                        batch.unit().delete(Table::Expiry, (*key).clone());
                    }
                }
            }
            swept += self.commit_sweep(batch, &record_units).await?;
            if due.len() < page.len() || page.len() < SWEEP_PAGE {
                break;
            }
        }
        Ok(swept)
    }

    /// Sweeps by reading every record, and gives each record that will
    /// expire its expiry entry; then marks the vault as indexed. Records
    /// tokenized meanwhile get their entries from tokenize itself.
    async fn sweep_all_and_index(&self) -> Result<u64, Error> {
        let now = self.now();
        let (mut from, mut swept) = (Vec::new(), 0);
        loop {
            let page = self.next_page(Table::Records, &mut from).await?;
            if page.is_empty() {
                break;
            }
            let full = page.len() == SWEEP_PAGE;
            let mut batch = Batch::new();
            let mut record_units = Vec::new();
            for (key, bytes) in page {
                let Ok(record) = Record::decode(&bytes) else {
                    continue;
                };
                match record.expires_ms {
                    Some(_) if record.expired(now) => {
                        record_units.push(sweep_record(&mut batch, &key, bytes, &record));
                    }
                    Some(expires_ms) => {
                        batch.unit().put(
                            Table::Expiry,
                            layout::expiry_key(expires_ms, &key),
                            Vec::new(),
                        );
                    }
                    None => {}
                }
            }
            swept += self.commit_sweep(batch, &record_units).await?;
            if !full {
                break;
            }
        }
        let mut batch = Batch::new();
        batch.put(Table::Meta, EXPIRY_INDEXED.to_vec(), Vec::new());
        self.store.commit(batch).await?;
        tracing::info!(
            "every record that expires is in the expiry table now; later sweeps read only what is due"
        );
        Ok(swept)
    }

    /// The next page of `table` from `from`, which moves past it.
    async fn next_page(
        &self,
        table: Table,
        from: &mut Vec<u8>,
    ) -> Result<crate::store::KeyValues, Error> {
        let page = self
            .store
            .scan_from(table, from.clone(), SWEEP_PAGE)
            .await?;
        if let Some((last, _)) = page.last() {
            *from = [last.as_slice(), &[0]].concat();
        }
        Ok(page)
    }

    /// Commits one page of a sweep; returns how many records it deleted.
    async fn commit_sweep(&self, batch: Batch, record_units: &[usize]) -> Result<u64, Error> {
        if batch.units().is_empty() {
            return Ok(0);
        }
        let outcomes = self.store.commit(batch).await?;
        Ok(record_units
            .iter()
            .filter(|&&unit| outcomes.get(unit).is_some_and(Result::is_ok))
            .count() as u64)
    }
}

/// Adds the units that retire one dead entry to `batch`: the index entry,
/// if it still names the dead token, and the record with what points at it,
/// if it is still the one that was read.
fn retire(batch: &mut Batch, entry: &Indexed, token: &Token, record: Option<(Vec<u8>, Record)>) {
    batch
        .unit()
        .guard_unchanged(
            Table::Index,
            entry.key.to_vec(),
            token.storage_key().to_vec(),
        )
        .delete(Table::Index, entry.key.to_vec());
    if let Some((bytes, record)) = record {
        forget_record(batch, token.storage_key(), bytes, &record);
    }
}

/// Adds a unit that deletes an expired record, its subject-index entry and
/// its expiry entry, if the record is still `bytes`.
fn forget_record(batch: &mut Batch, key: &[u8], bytes: Vec<u8>, record: &Record) {
    let unit = batch.unit();
    unit.guard_unchanged(Table::Records, key.to_vec(), bytes)
        .delete(Table::Records, key.to_vec());
    if let Some(subject) = record.subject_hash {
        unit.delete(
            Table::SubjectIndex,
            layout::subject_index_key(&subject, key),
        );
    }
    if let Some(expires_ms) = record.expires_ms {
        unit.delete(Table::Expiry, layout::expiry_key(expires_ms, key));
    }
}

/// Adds the units that sweep one expired record: [`forget_record`], and its
/// blind-index entry if that still names it (a tokenize may have given the
/// value a new token since). Returns the index of the record's unit.
fn sweep_record(batch: &mut Batch, key: &[u8], bytes: Vec<u8>, record: &Record) -> usize {
    let unit = batch.units().len();
    forget_record(batch, key, bytes, record);
    if let Some(blind) = record.blind {
        // The index entry holds the token, which is the record's key.
        batch
            .unit()
            .guard_unchanged(Table::Index, blind.to_vec(), key.to_vec())
            .delete(Table::Index, blind.to_vec());
    }
    unit
}
