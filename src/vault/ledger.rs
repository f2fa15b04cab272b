//! The erasure ledger: an append-only file, outside the data directory, of
//! the subjects that were erased and when (keyed hashes only, never ids).
//!
//! Restoring an older backup or copy of the data directory brings back the
//! data of subjects erased since; the vault re-applies every ledger entry
//! that its data does not have yet when it opens, so they stay erased (see
//! `vault/erasure.rs` for how the ledger and the vault's own record of it
//! are reconciled).
//!
//! Each entry is chained to the one before by an HMAC under a key from the
//! keyring (`erasure-ledger-mac/`), so an entry that was deleted, changed,
//! reordered or copied from another vault's ledger is found when the file
//! is read. The file:
//!
//! ```text
//! tokenvault-erasure-ledger v2
//! <seq> <subject hash, hex> <erased ms> <mac, hex>
//! ```
//!
//! A ledger written by an earlier release (lines `<subject hash> <erased ms>`,
//! no header, no MACs) is read as [`LedgerFile::Unchained`]; the vault
//! rewrites it in the chained form once.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    sync::Mutex,
};

use crate::crypto::HashKey;

/// The first line of a chained ledger.
const HEADER: &str = "tokenvault-erasure-ledger v2";

/// Separates ledger MACs from every other use of their key.
const MAC_DOMAIN: &[u8] = b"erasure-ledger/v2";

/// What entry 1 chains to.
const GENESIS: [u8; 32] = [0; 32];

/// One erasure: the subject's keyed hash and the time it was erased.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Erasure {
    /// HMAC-SHA256 of the subject id under the subject hash key.
    pub subject_hash: [u8; 32],
    /// Milliseconds since the Unix epoch.
    pub erased_ms: u64,
}

/// An erasure in its place in the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerEntry {
    /// Its position, from 1.
    pub seq: u64,
    /// What was erased.
    pub erasure: Erasure,
    /// HMAC over the previous entry's MAC, `seq` and the erasure.
    pub mac: [u8; 32],
}

impl LedgerEntry {
    /// The entry that follows `prev` (`None`: the first) for `erasure`.
    pub fn next(key: &HashKey, prev: Option<&LedgerEntry>, erasure: Erasure) -> Self {
        let seq = prev.map_or(1, |p| p.seq + 1);
        let prev_mac = prev.map_or(GENESIS, |p| p.mac);
        Self {
            seq,
            erasure,
            mac: mac(key, &prev_mac, seq, &erasure),
        }
    }

    /// The stored form (also what the vault keeps of it in its own data).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 32 + 8 + 32);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.erasure.subject_hash);
        out.extend_from_slice(&self.erasure.erased_ms.to_be_bytes());
        out.extend_from_slice(&self.mac);
        out
    }

    /// Parses [`LedgerEntry::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 80 {
            return None;
        }
        Some(Self {
            seq: u64::from_be_bytes(bytes[..8].try_into().ok()?),
            erasure: Erasure {
                subject_hash: bytes[8..40].try_into().ok()?,
                erased_ms: u64::from_be_bytes(bytes[40..48].try_into().ok()?),
            },
            mac: bytes[48..80].try_into().ok()?,
        })
    }

    fn line(&self) -> String {
        format!(
            "{} {} {} {}\n",
            self.seq,
            data_encoding::HEXLOWER.encode(&self.erasure.subject_hash),
            self.erasure.erased_ms,
            data_encoding::HEXLOWER.encode(&self.mac)
        )
    }
}

fn mac(key: &HashKey, prev: &[u8; 32], seq: u64, erasure: &Erasure) -> [u8; 32] {
    let mut data = Vec::with_capacity(32 + 8 + 32 + 8);
    data.extend_from_slice(prev);
    data.extend_from_slice(&seq.to_be_bytes());
    data.extend_from_slice(&erasure.subject_hash);
    data.extend_from_slice(&erasure.erased_ms.to_be_bytes());
    key.hash(MAC_DOMAIN, &data)
}

/// Checks that `entries` form one chain from the first entry under `key`.
///
/// # Errors
/// The position of the first entry that does not verify.
pub fn verify_chain(key: &HashKey, entries: &[LedgerEntry]) -> Result<(), u64> {
    let mut prev: Option<&LedgerEntry> = None;
    for entry in entries {
        let expected = LedgerEntry::next(key, prev, entry.erasure);
        if *entry != expected {
            return Err(prev.map_or(1, |p| p.seq + 1));
        }
        prev = Some(entry);
    }
    Ok(())
}

/// What a ledger file held when it was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerFile {
    /// There was no file (one was created, empty).
    Missing,
    /// A chained ledger (its chain not yet verified: that needs the key).
    Chained(Vec<LedgerEntry>),
    /// A ledger from an earlier release: erasures without MACs.
    Unchained(Vec<Erasure>),
}

/// The ledger file, open for appending.
pub struct ErasureLedger {
    path: PathBuf,
    file: Mutex<File>,
}

/// Why the ledger cannot be used. Names the file or database; never a
/// subject.
#[derive(Debug, thiserror::Error)]
#[error("erasure ledger {place}: {message}")]
pub struct LedgerError {
    place: String,
    message: String,
}

impl LedgerError {
    /// An error about the ledger file at `path`.
    pub fn new(path: &Path, message: impl Into<String>) -> Self {
        Self::at(&path.display().to_string(), message)
    }

    /// An error about the ledger at `place` (a file or a database).
    pub fn at(place: &str, message: impl Into<String>) -> Self {
        Self {
            place: place.to_owned(),
            message: message.into(),
        }
    }
}

impl ErasureLedger {
    /// Opens (creating) the ledger at `path` and reads what it holds.
    ///
    /// # Errors
    /// If the file cannot be opened or a line is malformed.
    pub fn open(path: &Path) -> Result<(Self, LedgerFile), LedgerError> {
        let err = |message: String| LedgerError::new(path, message);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let existed = path.exists();
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(|e| err(e.to_string()))?;
        let mut lines = Vec::new();
        for line in BufReader::new(&file).lines() {
            lines.push(line.map_err(|e| err(e.to_string()))?);
        }
        let content = if !existed {
            // A new file: make its directory entry durable too.
            sync_dir(path).map_err(|e| err(e.to_string()))?;
            LedgerFile::Missing
        } else if lines.is_empty() {
            // Created by an earlier start, no erasure yet (the header comes
            // with the first entry).
            LedgerFile::Chained(Vec::new())
        } else if lines.first().map(String::as_str) == Some(HEADER) {
            LedgerFile::Chained(parse_chained(&lines[1..]).map_err(err)?)
        } else {
            LedgerFile::Unchained(parse_unchained(&lines).map_err(err)?)
        };
        let ledger = Self {
            path: path.to_owned(),
            file: Mutex::new(file),
        };
        Ok((ledger, content))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends entries and fsyncs, before the erasure itself is written: a
    /// crash in between leaves an entry that the next open applies.
    ///
    /// # Errors
    /// If the write or the sync fails.
    pub fn append(&self, entries: &[LedgerEntry]) -> Result<(), LedgerError> {
        let mut text = String::new();
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let err = |e: std::io::Error| LedgerError::new(&self.path, e.to_string());
        let length = file.metadata().map_err(err)?.len();
        if length == 0 {
            text.push_str(HEADER);
            text.push('\n');
        }
        for entry in entries {
            text.push_str(&entry.line());
        }
        let appended = file
            .write_all(text.as_bytes())
            .and_then(|()| file.sync_data());
        if let Err(e) = appended {
            // What did reach the file must not count as recorded: an entry
            // in the ledger is applied at the next open, and the caller is
            // told that nothing was erased. (Best effort: the disk is
            // failing.)
            let _ = file.set_len(length);
            return Err(err(e));
        }
        Ok(())
    }

    /// Replaces the whole file with `entries` in the chained form (once, for
    /// a ledger of an earlier release), atomically: a temporary file, fsync,
    /// rename, fsync of the directory.
    ///
    /// # Errors
    /// If any step fails; the old file is then still in place.
    pub fn rewrite(&self, entries: &[LedgerEntry]) -> Result<(), LedgerError> {
        let err = |e: std::io::Error| LedgerError::new(&self.path, e.to_string());
        let mut text = format!("{HEADER}\n");
        for entry in entries {
            text.push_str(&entry.line());
        }
        let temp = self.path.with_extension("rewrite");
        {
            let mut file = File::create(&temp).map_err(err)?;
            file.write_all(text.as_bytes()).map_err(err)?;
            file.sync_all().map_err(err)?;
        }
        std::fs::rename(&temp, &self.path).map_err(err)?;
        sync_dir(&self.path).map_err(err)?;
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&self.path)
            .map_err(err)?;
        *self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = file;
        Ok(())
    }
}

pub(super) fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

fn hex32(text: &str) -> Option<[u8; 32]> {
    data_encoding::HEXLOWER
        .decode(text.as_bytes())
        .ok()?
        .try_into()
        .ok()
}

fn parse_chained(lines: &[String]) -> Result<Vec<LedgerEntry>, String> {
    let mut entries = Vec::with_capacity(lines.len());
    for (n, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(' ').collect();
        let parsed = match fields.as_slice() {
            [seq, hash, time, mac] => (|| {
                Some(LedgerEntry {
                    seq: seq.parse().ok()?,
                    erasure: Erasure {
                        subject_hash: hex32(hash)?,
                        erased_ms: time.parse().ok()?,
                    },
                    mac: hex32(mac)?,
                })
            })(),
            _ => None,
        };
        entries.push(parsed.ok_or_else(|| format!("line {} is malformed", n + 2))?);
    }
    Ok(entries)
}

fn parse_unchained(lines: &[String]) -> Result<Vec<Erasure>, String> {
    let mut entries = Vec::with_capacity(lines.len());
    for (n, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = line.split_once(' ').and_then(|(hash, time)| {
            Some(Erasure {
                subject_hash: hex32(hash)?,
                erased_ms: time.trim().parse().ok()?,
            })
        });
        entries.push(parsed.ok_or_else(|| format!("line {} is malformed", n + 1))?);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> HashKey {
        HashKey::from_bytes([7; 32])
    }

    fn chain(n: u8) -> Vec<LedgerEntry> {
        let key = key();
        let mut entries: Vec<LedgerEntry> = Vec::new();
        for i in 0..n {
            let next = LedgerEntry::next(
                &key,
                entries.last(),
                Erasure {
                    subject_hash: [i; 32],
                    erased_ms: 1000 + u64::from(i),
                },
            );
            entries.push(next);
        }
        entries
    }

    #[test]
    fn entries_survive_reopening_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("erasures");
        let (ledger, content) = ErasureLedger::open(&path).unwrap();
        assert_eq!(content, LedgerFile::Missing);
        let entries = chain(3);
        ledger.append(&entries[..1]).unwrap();
        ledger.append(&entries[1..]).unwrap();
        drop(ledger);
        let (_, content) = ErasureLedger::open(&path).unwrap();
        assert_eq!(content, LedgerFile::Chained(entries.clone()));
        assert_eq!(verify_chain(&key(), &entries), Ok(()));
        for entry in &entries {
            assert_eq!(LedgerEntry::decode(&entry.encode()), Some(*entry));
        }
    }

    /// A deleted, changed or reordered entry, or another key, breaks the
    /// chain at the first entry that does not follow.
    #[test]
    fn any_edit_breaks_the_chain() {
        let entries = chain(4);
        let mut deleted = entries.clone();
        deleted.remove(1);
        assert_eq!(verify_chain(&key(), &deleted), Err(2));
        let mut changed = entries.clone();
        changed[2].erasure.erased_ms += 1;
        assert_eq!(verify_chain(&key(), &changed), Err(3));
        let mut swapped = entries.clone();
        swapped.swap(0, 1);
        assert_eq!(verify_chain(&key(), &swapped), Err(1));
        assert_eq!(
            verify_chain(&HashKey::from_bytes([8; 32]), &entries),
            Err(1)
        );
    }

    #[test]
    fn a_damaged_line_is_refused_by_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("erasures");
        std::fs::write(&path, format!("{HEADER}\n1 zz 1 zz\n")).unwrap();
        let err = ErasureLedger::open(&path).err().unwrap();
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn an_earlier_releases_ledger_is_read_and_rewritten_chained() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("erasures");
        std::fs::write(&path, format!("{} 42\n", "ab".repeat(32))).unwrap();
        let (ledger, content) = ErasureLedger::open(&path).unwrap();
        let old = Erasure {
            subject_hash: [0xab; 32],
            erased_ms: 42,
        };
        assert_eq!(content, LedgerFile::Unchained(vec![old]));
        let entries = vec![LedgerEntry::next(&key(), None, old)];
        ledger.rewrite(&entries).unwrap();
        drop(ledger);
        let (_, content) = ErasureLedger::open(&path).unwrap();
        match content {
            LedgerFile::Chained(found) => assert_eq!(found[0], entries[0]),
            other => panic!("{other:?}"),
        }
    }
}
