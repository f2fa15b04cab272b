//! The erasure ledger: an append-only file, outside the data directory, of
//! the subjects that were erased and when (keyed hashes only, never ids).
//!
//! Restoring an older backup or copy of the data directory brings back the
//! data of subjects erased since; the vault re-applies every ledger entry
//! when it opens, so they stay erased. Keep the ledger on storage that a
//! data-directory restore does not roll back, and back it up on its own.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    sync::Mutex,
};

/// One erasure: the subject's keyed hash and the time it was erased.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Erasure {
    /// HMAC-SHA256 of the subject id under the subject hash key.
    pub subject_hash: [u8; 32],
    /// Milliseconds since the Unix epoch.
    pub erased_ms: u64,
}

/// The ledger file.
pub struct ErasureLedger {
    path: PathBuf,
    file: Mutex<File>,
}

/// Why the ledger cannot be used. Names the file; never a subject.
#[derive(Debug, thiserror::Error)]
#[error("erasure ledger {path}: {message}")]
pub struct LedgerError {
    path: PathBuf,
    message: String,
}

impl ErasureLedger {
    /// Opens (creating) the ledger at `path` and reads its entries.
    ///
    /// # Errors
    /// If the file cannot be opened or a line is malformed.
    pub fn open(path: &Path) -> Result<(Self, Vec<Erasure>), LedgerError> {
        let err = |message: String| LedgerError {
            path: path.to_owned(),
            message,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(|e| err(e.to_string()))?;
        let mut entries = Vec::new();
        for (n, line) in BufReader::new(&file).lines().enumerate() {
            let line = line.map_err(|e| err(e.to_string()))?;
            if line.trim().is_empty() {
                continue;
            }
            let parsed = line.split_once(' ').and_then(|(hash, time)| {
                let hash = data_encoding::HEXLOWER.decode(hash.as_bytes()).ok()?;
                Some(Erasure {
                    subject_hash: hash.try_into().ok()?,
                    erased_ms: time.trim().parse().ok()?,
                })
            });
            entries.push(parsed.ok_or_else(|| err(format!("line {} is malformed", n + 1)))?);
        }
        Ok((
            Self {
                path: path.to_owned(),
                file: Mutex::new(file),
            },
            entries,
        ))
    }

    /// Appends an erasure and fsyncs, before the erasure itself is written:
    /// a crash in between leaves an entry that the next open applies.
    ///
    /// # Errors
    /// If the write or the sync fails.
    pub fn append(&self, erasure: Erasure) -> Result<(), LedgerError> {
        let line = format!(
            "{} {}\n",
            data_encoding::HEXLOWER.encode(&erasure.subject_hash),
            erasure.erased_ms
        );
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        file.write_all(line.as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(|e| LedgerError {
                path: self.path.clone(),
                message: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("erasures");
        let (ledger, entries) = ErasureLedger::open(&path).unwrap();
        assert!(entries.is_empty());
        let erasure = Erasure {
            subject_hash: [7; 32],
            erased_ms: 42,
        };
        ledger.append(erasure).unwrap();
        drop(ledger);
        let (_, entries) = ErasureLedger::open(&path).unwrap();
        assert_eq!(entries, vec![erasure]);
    }

    #[test]
    fn a_damaged_ledger_is_refused_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("erasures");
        std::fs::write(&path, "zz 1\n").unwrap();
        let err = ErasureLedger::open(&path).err().unwrap();
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
