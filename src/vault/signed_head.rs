//! The newest audit head the vault signed, kept beside the erasure ledger,
//! so that no two heads are ever signed for one sequence number.
//!
//! A signed checkpoint says "event `seq` of this vault's chain hashes to
//! `head`". After a restore of the vault's data, or a failover to a
//! standby that lacked the last commits, the chain goes on from an older
//! head and hands out the numbers past it again, to other events. Were the
//! vault to sign one of them again, it would have signed two histories,
//! and whoever holds the first signature could not tell which is true. So
//! before it signs, the vault records the head in a witness that lives
//! where the erasure ledger does (outside what a restore of the data rolls
//! back), and it signs only a head numbered above every head recorded
//! there.
//!
//! At open the vault compares the witness with its chain. A chain that no
//! longer holds the signed head (it ends before it, or has another event
//! under its number) has lost events: the vault logs it and records a
//! `ChainRolledBack` event that names the head lost, once per loss.
//!
//! The witness of a file ledger is the file `<ledger>.signed-head`,
//! replaced atomically at each checkpoint:
//!
//! ```text
//! tokenvault-signed-head v1
//! <seq> <head, hex>
//! ```
//!
//! Replicas on a shared database keep it in the ledger table's schema row
//! (`LedgerTable::witness`).

use std::{
    fs::File,
    io::Write,
    path::{Path, PathBuf},
    sync::Mutex,
};

use super::{Error, Vault, ledger::LedgerError};
use crate::{
    audit::{AuditContext, CHAIN_ROLLBACK_METHOD, Outcome},
    layout,
    store::{Batch, Store, Table, chain, chain::Head},
};

/// The first line of the witness file.
const HEADER: &str = "tokenvault-signed-head v1";

/// The witness of a file ledger: `<ledger>.signed-head`.
pub(super) struct HeadWitness {
    path: PathBuf,
    recorded: Mutex<Option<Head>>,
}

impl HeadWitness {
    /// Opens the witness of the ledger file at `ledger`, reading the head
    /// it holds (none if the file does not exist yet).
    ///
    /// # Errors
    /// If the file cannot be read or is malformed.
    pub(super) fn open(ledger: &Path) -> Result<Self, LedgerError> {
        let mut name = ledger.file_name().unwrap_or_default().to_owned();
        name.push(".signed-head");
        let path = ledger.with_file_name(name);
        let recorded = match std::fs::read_to_string(&path) {
            Ok(text) => Some(parse(&text).ok_or_else(|| {
                LedgerError::new(
                    &path,
                    "is malformed: restore it from a backup of the ledger (it holds the newest audit head signed)",
                )
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(LedgerError::new(&path, e.to_string())),
        };
        Ok(Self {
            path,
            recorded: Mutex::new(recorded),
        })
    }

    /// The head recorded.
    pub(super) fn recorded(&self) -> Option<Head> {
        *self
            .recorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records `head`, durably, if it is numbered above the head recorded;
    /// returns whether it was.
    ///
    /// # Errors
    /// If the file cannot be replaced; the old one then stands.
    pub(super) fn witness(&self, head: Head) -> Result<bool, LedgerError> {
        let mut recorded = self
            .recorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if recorded.is_some_and(|r| r.seq >= head.seq) {
            return Ok(false);
        }
        let err = |e: std::io::Error| LedgerError::new(&self.path, e.to_string());
        let text = format!(
            "{HEADER}\n{} {}\n",
            head.seq,
            data_encoding::HEXLOWER.encode(&head.hash)
        );
        let mut temp = self.path.clone().into_os_string();
        temp.push(".new");
        let temp = PathBuf::from(temp);
        {
            let mut file = File::create(&temp).map_err(err)?;
            file.write_all(text.as_bytes()).map_err(err)?;
            file.sync_all().map_err(err)?;
        }
        std::fs::rename(&temp, &self.path).map_err(err)?;
        super::ledger::sync_dir(&self.path).map_err(err)?;
        *recorded = Some(head);
        Ok(true)
    }
}

fn parse(text: &str) -> Option<Head> {
    let mut lines = text.lines();
    if lines.next()? != HEADER {
        return None;
    }
    let (seq, hash) = lines.next()?.split_once(' ')?;
    let hash = data_encoding::HEXLOWER.decode(hash.as_bytes()).ok()?;
    Some(Head {
        seq: seq.parse().ok()?,
        hash: hash.try_into().ok()?,
    })
}

impl<S: Store> Vault<S> {
    /// Records `head` in the witness before it is signed; returns whether
    /// it may be signed (no head numbered as high was signed before). A
    /// vault without a ledger (tests) signs every head.
    pub(super) async fn witness_signing(&self, head: Head) -> Result<bool, Error> {
        match &self.ledger {
            Some(ledger) => Ok(ledger.sink.witness(head).await?),
            None => Ok(true),
        }
    }

    /// Compares the witness with the chain (see the module doc): a chain
    /// that lost the newest head signed is logged and recorded, once per
    /// loss. Returns the head lost, if it was.
    ///
    /// # Errors
    /// If the witness, the chain or the audit cannot be read or written.
    pub(super) async fn check_signed_head(&self) -> Result<Option<Head>, Error> {
        let Some(ledger) = &self.ledger else {
            return Ok(None);
        };
        // A witness behind the vault's own newest checkpoint (the first
        // start of this release, or a witness file moved away) catches up
        // with it first; after a restore the witness is the one ahead.
        // Only a checkpoint this vault signed over a head its chain holds:
        // the row is in the data a writer of the data directory could edit.
        let head = self.store.audit_head();
        let checked = match self.newest_checkpoint().await? {
            Some(cp) if cp.seq <= head.seq && cp.verifies(&self.audit_public_key()) => {
                let held = self
                    .store
                    .get_many(Table::Audit, vec![chain::key(cp.seq).to_vec()])
                    .await?
                    .pop()
                    .flatten();
                held.is_some_and(|value| chain::hash(cp.seq, &value) == cp.head)
                    .then_some(cp)
            }
            _ => None,
        };
        if let Some(newest) = checked {
            ledger
                .sink
                .witness(Head {
                    seq: newest.seq,
                    hash: newest.head,
                })
                .await?;
        }
        let Some(signed) = ledger.sink.signed_head().await? else {
            return Ok(None);
        };
        let chain_head = self.store.audit_head();
        let held = self
            .store
            .get_many(Table::Audit, vec![chain::key(signed.seq).to_vec()])
            .await?
            .pop()
            .flatten();
        let lost = match held {
            // Pruned by retention: the chain went on past it.
            None => chain_head.seq < signed.seq,
            Some(value) => chain::hash(signed.seq, &value) != signed.hash,
        };
        if !lost {
            return Ok(None);
        }
        let recorded = self
            .store
            .get_many(Table::Meta, vec![layout::AUDIT_ROLLBACK_RECORDED.to_vec()])
            .await?
            .pop()
            .flatten();
        if recorded.as_deref() == Some(signed.seq.to_be_bytes().as_slice()) {
            return Ok(Some(signed));
        }
        tracing::error!(
            signed_seq = signed.seq,
            chain_head = chain_head.seq,
            "the audit chain lost events this vault had signed: its database was restored, or failed over to a standby that lacked the last commits. No head is signed again for their numbers; recorded as a ChainRolledBack event"
        );
        let context = AuditContext {
            request_id: String::new(),
            identity: "-".into(),
            method: CHAIN_ROLLBACK_METHOD,
            purpose: None,
            items: 0,
            failed_items: 0,
        };
        let mut event = context.event(Outcome::Ok);
        event.lost_signed_head = Some(format!(
            "{}:{}",
            signed.seq,
            data_encoding::HEXLOWER.encode(&signed.hash)
        ));
        let mut batch = Batch::new();
        let unit = batch.unit();
        // Guarded as read: replicas opening together record it once (the
        // one that loses finds it recorded).
        match recorded {
            Some(value) => {
                unit.guard_unchanged(Table::Meta, layout::AUDIT_ROLLBACK_RECORDED.to_vec(), value)
            }
            None => unit.guard_absent(Table::Meta, layout::AUDIT_ROLLBACK_RECORDED.to_vec()),
        };
        unit.put(
            Table::Meta,
            layout::AUDIT_ROLLBACK_RECORDED.to_vec(),
            signed.seq.to_be_bytes().to_vec(),
        );
        self.append_event(unit, &event);
        self.store
            .commit(batch)
            .await
            .map_err(Error::AuditUnavailable)?;
        Ok(Some(signed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(seq: u64, byte: u8) -> Head {
        Head {
            seq,
            hash: [byte; 32],
        }
    }

    #[test]
    fn the_witness_takes_only_higher_numbers_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("erasures");
        let witness = HeadWitness::open(&ledger).unwrap();
        assert_eq!(witness.recorded(), None);
        assert!(witness.witness(head(5, 1)).unwrap());
        assert!(!witness.witness(head(5, 2)).unwrap(), "a second head for 5");
        assert!(!witness.witness(head(4, 3)).unwrap(), "a lower number");
        assert!(witness.witness(head(6, 4)).unwrap());
        let reopened = HeadWitness::open(&ledger).unwrap();
        assert_eq!(reopened.recorded(), Some(head(6, 4)));
        assert!(!reopened.witness(head(6, 5)).unwrap());
        assert!(dir.path().join("erasures.signed-head").exists());
    }

    /// A vault that signed checkpoints before it had a witness (an
    /// earlier release, or the file moved away) seeds it from its newest
    /// checkpoint at open: a restore after that still finds what was
    /// signed.
    #[tokio::test]
    async fn a_missing_witness_catches_up_with_the_newest_checkpoint() {
        use super::super::{LedgerLocation, erasure::LedgerRollback, tests};
        let mut f = tests::fixture().await;
        f.tokenize_for("cust-w", &[("email", "w@example.com", None)])
            .await;
        let signed = f.vault.checkpoint_audit().await.unwrap().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("erasures");
        let vault = std::mem::replace(&mut f.vault, tests::placeholder_vault().await);
        let (vault, _) = vault
            .with_ledger(LedgerLocation::File(ledger.clone()), LedgerRollback::Refuse)
            .await
            .unwrap();
        f.vault = vault;
        let recorded = HeadWitness::open(&ledger).unwrap().recorded().unwrap();
        assert_eq!(recorded.seq, signed);
        // Nothing was lost: no ChainRolledBack.
        assert_eq!(f.vault.check_signed_head().await.unwrap(), None);
    }

    #[test]
    fn a_damaged_witness_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("erasures");
        std::fs::write(
            dir.path().join("erasures.signed-head"),
            "tokenvault-signed-head v1\n5 zz\n",
        )
        .unwrap();
        let Err(e) = HeadWitness::open(&ledger) else {
            panic!("a damaged witness was read");
        };
        assert!(e.to_string().contains("malformed"), "{e}");
    }
}
