//! Where the erasure ledger is kept: a file beside one vault process, or a
//! table in a database of its own that vault replicas share.
//!
//! A file serves one process. Replicas on a shared database cannot each
//! keep one (each would hold only its own erasures, and refuse to start
//! once the database recorded another's), so they append to one table,
//! outside the database a restore rolls back. Its numbers make the chain
//! one sequence across replicas: two erasures at once both try the next
//! number, and the one that loses reads the winner's entry, checks it
//! chains, and chains to it (see [`LedgerSink::record`]).

use std::path::PathBuf;

use super::{
    ledger::{ErasureLedger, LedgerEntry, LedgerError, LedgerFile},
    signed_head::HeadWitness,
};
use crate::{
    crypto::HashKey,
    store::{Appended, LedgerTable, chain::Head},
};

/// Where the erasure ledger is, as configured.
pub enum LedgerLocation {
    /// A file: one vault process.
    File(PathBuf),
    /// A table in a database other than the vault's, shared by replicas
    /// (boxed: its connection makes it many times the size of a path).
    Table(Box<LedgerTable>),
}

/// How many times an erasure chains to entries other replicas wrote first
/// before it gives up (and the caller hears that it may retry).
const MAX_RACES: usize = 64;

/// The open ledger, with the witness of the newest audit head signed
/// (`vault/signed_head.rs`).
pub(super) enum LedgerSink {
    File(ErasureLedger, HeadWitness),
    Table(Box<LedgerTable>),
}

impl LedgerSink {
    /// Opens the ledger at `location` and reads what it holds.
    ///
    /// # Errors
    /// If it cannot be read, or an entry is malformed.
    pub(super) async fn open(location: LedgerLocation) -> Result<(Self, LedgerFile), LedgerError> {
        match location {
            LedgerLocation::File(path) => {
                let (file, content) = ErasureLedger::open(&path)?;
                let witness = HeadWitness::open(&path)?;
                Ok((Self::File(file, witness), content))
            }
            LedgerLocation::Table(table) => {
                let rows = table
                    .entries_after(0)
                    .await
                    .map_err(|e| LedgerError::at(table.place(), e.to_string()))?;
                let entries = decode_rows(&table, rows)?;
                Ok((Self::Table(table), LedgerFile::Chained(entries)))
            }
        }
    }

    /// Where it is, for messages.
    pub(super) fn place(&self) -> String {
        match self {
            Self::File(file, _) => file.path().display().to_string(),
            Self::Table(table) => table.place().to_owned(),
        }
    }

    /// What an operator does to start over from the vault's own record.
    pub(super) fn set_aside(&self) -> &'static str {
        match self {
            Self::File(..) => "move it away",
            Self::Table(_) => "empty its table (tokenvault_erasure_ledger)",
        }
    }

    /// Appends `entries`, which continue the chain from what this process
    /// last saw, durably.
    ///
    /// # Errors
    /// If the write fails, or (for a shared table) another replica wrote
    /// under their numbers first.
    pub(super) async fn append(&self, entries: &[LedgerEntry]) -> Result<(), LedgerError> {
        match self.try_append(entries).await? {
            Appended::Written => Ok(()),
            Appended::Taken => Err(self.error(
                "another replica wrote to it meanwhile; start again to reconcile".to_owned(),
            )),
        }
    }

    /// Records `erasure` as the entry after `tail`, and makes it the new
    /// tail. On a shared table another replica may have taken the next
    /// number: its entries are read, checked to chain to `tail`, and the
    /// erasure is chained after them.
    ///
    /// # Errors
    /// If the ledger cannot be written, or what another replica wrote does
    /// not verify.
    pub(super) async fn record(
        &self,
        key: &HashKey,
        tail: &mut Option<LedgerEntry>,
        erasure: super::Erasure,
    ) -> Result<LedgerEntry, LedgerError> {
        for _ in 0..MAX_RACES {
            let entry = LedgerEntry::next(key, tail.as_ref(), erasure);
            if self.try_append(&[entry]).await? == Appended::Written {
                *tail = Some(entry);
                return Ok(entry);
            }
            let Self::Table(table) = self else {
                return Err(self.error("a file ledger cannot be taken".to_owned()));
            };
            let after = tail.map_or(0, |t| t.seq);
            let rows = table
                .entries_after(after)
                .await
                .map_err(|e| self.error(e.to_string()))?;
            let newer = decode_rows(table, rows)?;
            let mut prev = *tail;
            for found in &newer {
                if *found != LedgerEntry::next(key, prev.as_ref(), found.erasure) {
                    return Err(self.error(format!(
                        "entry {} does not verify: it was edited, or written by another vault",
                        found.seq
                    )));
                }
                prev = Some(*found);
            }
            *tail = prev;
        }
        Err(self.error(format!(
            "{MAX_RACES} other erasures took the next number first; retry"
        )))
    }

    async fn try_append(&self, entries: &[LedgerEntry]) -> Result<Appended, LedgerError> {
        match self {
            Self::File(file, _) => file.append(entries).map(|()| Appended::Written),
            Self::Table(table) => {
                let rows: Vec<(u64, Vec<u8>)> =
                    entries.iter().map(|e| (e.seq, e.encode())).collect();
                table
                    .append(&rows)
                    .await
                    .map_err(|e| self.error(e.to_string()))
            }
        }
    }

    /// The number of the newest entry any replica wrote to a shared table;
    /// `None` for a file (one process: it knows its own) or an empty table.
    ///
    /// # Errors
    /// If the table cannot be read.
    pub(super) async fn newest_shared(&self) -> Result<Option<u64>, LedgerError> {
        match self {
            Self::File(..) => Ok(None),
            Self::Table(table) => table.newest().await.map_err(|e| self.error(e.to_string())),
        }
    }

    /// The newest audit head recorded as signed.
    ///
    /// # Errors
    /// If the table cannot be read, or holds a malformed head.
    pub(super) async fn signed_head(&self) -> Result<Option<Head>, LedgerError> {
        match self {
            Self::File(_, witness) => Ok(witness.recorded()),
            Self::Table(table) => {
                let Some((seq, hash)) = table
                    .signed_head()
                    .await
                    .map_err(|e| self.error(e.to_string()))?
                else {
                    return Ok(None);
                };
                let hash = hash
                    .try_into()
                    .map_err(|_| self.error("its signed head is malformed".to_owned()))?;
                Ok(Some(Head { seq, hash }))
            }
        }
    }

    /// Records `head`, durably, if no head numbered as high was recorded;
    /// returns whether it was (only then may it be signed).
    ///
    /// # Errors
    /// If the witness cannot be written.
    pub(super) async fn witness(&self, head: Head) -> Result<bool, LedgerError> {
        match self {
            Self::File(_, witness) => witness.witness(head),
            Self::Table(table) => table
                .witness(head.seq, &head.hash)
                .await
                .map_err(|e| self.error(e.to_string())),
        }
    }

    /// Replaces a file ledger of an earlier release with `entries`.
    pub(super) fn rewrite(&self, entries: &[LedgerEntry]) -> Result<(), LedgerError> {
        match self {
            Self::File(file, _) => file.rewrite(entries),
            Self::Table(_) => Err(self.error("a table is never rewritten".to_owned())),
        }
    }

    fn error(&self, message: String) -> LedgerError {
        LedgerError::at(&self.place(), message)
    }
}

/// The table's rows as entries, each holding the number it is stored under.
fn decode_rows(
    table: &LedgerTable,
    rows: Vec<(u64, Vec<u8>)>,
) -> Result<Vec<LedgerEntry>, LedgerError> {
    rows.into_iter()
        .map(|(seq, bytes)| {
            LedgerEntry::decode(&bytes)
                .filter(|entry| entry.seq == seq)
                .ok_or_else(|| LedgerError::at(table.place(), format!("entry {seq} is malformed")))
        })
        .collect()
}
