//! A shared ledger table and the vault it belongs to, bound to each other.
//!
//! The ledger is what erases again the subjects a restored database brings
//! back, so a replica must never start on a ledger that is not its vault's:
//! on a new, empty one it would serve erased subjects, and its next
//! erasure would make that ledger disagree with every correctly configured
//! replica. A ledger table has an id of its own and names the vault it is
//! bound to; the vault records its own id and its ledger's. At open, before
//! anything is re-applied (`check`):
//!
//! - a ledger bound to another vault is refused;
//! - a ledger other than the one the vault recorded (a new or emptied
//!   database, a wrong `dbname`) is refused, unless the operator adopts it
//!   on purpose (`--accept-restored-ledger`), for a ledger lost for good;
//! - a vault with no id yet (its data from before ids, e.g. a restored
//!   backup) takes the id of a ledger whose entries verify under its own
//!   ledger key; an empty bound ledger needs the flag.
//!
//! Only once the ledger's contents were accepted is anything written
//! (`record`): the ledger bound first (so that of two vaults racing for
//! one new ledger the loser records nothing), then the ids in the vault.
//!
//! This guards against misconfiguration, not an attacker: whoever can
//! write the ledger's database can copy ids. What such a writer cannot do
//! is forge entries (they are MAC-chained under a key the master key
//! wraps) or remove them unnoticed (the vault keeps its own copy).
//! A ledger in the vault's own database is refused when it is opened
//! (`store::postgres::ledger`).

use super::{
    Error, Vault,
    erasure::LedgerRollback,
    keyring::create_once,
    ledger::{LedgerEntry, LedgerError, verify_chain},
    ledger_sink::LedgerSink,
};
use crate::{
    layout,
    store::{Batch, Store, Table},
};

/// What [`Vault::check_ledger_binding`] found, to be written by
/// [`Vault::record_ledger_binding`] once the ledger was accepted.
pub(super) struct Binding {
    /// This vault's id, as it is or is to be recorded.
    vault_id: Vec<u8>,
    /// The ledger's id.
    ledger_id: Vec<u8>,
    /// The vault has no id recorded yet.
    record_vault_id: bool,
    /// The vault records another ledger id, or none.
    record_ledger_id: bool,
    /// The ledger is bound to no vault yet.
    bind: bool,
}

impl<S: Store> Vault<S> {
    /// Checks that a ledger table holding `entries` is this vault's (see
    /// the module doc), writing nothing. `None` for a file ledger, which
    /// serves one process.
    ///
    /// # Errors
    /// [`Error::Ledger`] with one line naming the cause and what to do;
    /// storage failures.
    pub(super) async fn check_ledger_binding(
        &self,
        sink: &LedgerSink,
        entries: &[LedgerEntry],
        rollback: LedgerRollback,
    ) -> Result<Option<Binding>, Error> {
        let LedgerSink::Table(table) = sink else {
            return Ok(None);
        };
        let refuse = |message: String| Error::from(LedgerError::at(table.place(), message));
        let found = table.identity().await.map_err(|e| refuse(e.to_string()))?;
        let [ours, recorded] = self
            .meta([layout::VAULT_ID, layout::ERASURE_LEDGER_ID])
            .await?;
        let adopt = rollback == LedgerRollback::Repair;
        let record_vault_id = ours.is_none();
        let vault_id = match (&found.vault_id, ours) {
            (Some(theirs), Some(ours)) if *theirs != ours => {
                return Err(refuse(format!(
                    "belongs to another vault ({}; this vault is {}): subjects.erasure_ledger_database names another vault's ledger",
                    hex(theirs),
                    hex(&ours)
                )));
            }
            (_, Some(ours)) => ours,
            (Some(theirs), None) if self.store.audit_head().seq == 0 => {
                return Err(refuse(format!(
                    "belongs to another vault ({}; this vault is new): subjects.erasure_ledger_database names another vault's ledger",
                    hex(theirs)
                )));
            }
            (Some(theirs), None) => {
                // Data from before vault ids (a backup of an earlier
                // release, restored): the ledger's entries prove whose it
                // is; an empty one proves nothing.
                let proven =
                    !entries.is_empty() && verify_chain(self.keyring.ledger_key(), entries).is_ok();
                if !proven && !adopt {
                    return Err(refuse(format!(
                        "is bound to vault {}, and this vault has no id yet (its data predates vault ids: a restored backup?) and no erasure in the ledger proves it is that vault; if it is, start once with --accept-restored-ledger",
                        hex(theirs)
                    )));
                }
                theirs.clone()
            }
            (None, None) => random_id()?,
        };
        if let Some(recorded) = &recorded
            && *recorded != found.ledger_id
        {
            if !adopt {
                return Err(refuse(format!(
                    "is not this vault's ledger (it is ledger {}, this vault's is {}): a new or emptied database, or a wrong dbname; point subjects.erasure_ledger_database at this vault's ledger, or, if that ledger is lost for good, start once with --accept-restored-ledger to adopt this one and write this vault's erasures into it",
                    hex(&found.ledger_id),
                    hex(recorded)
                )));
            }
            tracing::warn!(
                ledger = %table.place(),
                "adopting another erasure ledger than the one this vault was bound to (--accept-restored-ledger)"
            );
        }
        Ok(Some(Binding {
            record_vault_id,
            record_ledger_id: recorded.as_ref() != Some(&found.ledger_id),
            bind: found.vault_id.is_none(),
            vault_id,
            ledger_id: found.ledger_id,
        }))
    }

    /// Writes `binding` once the ledger's contents were accepted: binds
    /// the ledger (a vault that loses the race for a new one is refused
    /// and records nothing), then records the ids in the vault.
    ///
    /// # Errors
    /// [`Error::Ledger`] if another vault bound the ledger first; storage
    /// failures.
    pub(super) async fn record_ledger_binding(
        &self,
        sink: &LedgerSink,
        binding: Binding,
    ) -> Result<(), Error> {
        let LedgerSink::Table(table) = sink else {
            return Ok(());
        };
        let refuse = |message: String| Error::from(LedgerError::at(table.place(), message));
        // Replicas of one new vault starting at once agree on its id
        // through the vault's database first (the first stored wins).
        let vault_id = if binding.record_vault_id {
            create_once(
                &self.store,
                Table::Meta,
                layout::VAULT_ID,
                binding.vault_id.clone(),
            )
            .await?
            .unwrap_or(binding.vault_id)
        } else {
            binding.vault_id
        };
        if binding.bind {
            let bound = table
                .bind(&vault_id)
                .await
                .map_err(|e| refuse(e.to_string()))?;
            if bound.vault_id.as_ref() != Some(&vault_id) {
                return Err(refuse(
                    "another vault bound it at the same moment: subjects.erasure_ledger_database names another vault's ledger".to_owned(),
                ));
            }
            tracing::info!(ledger = %table.place(), vault = %hex(&vault_id), "bound the erasure ledger to this vault");
        }
        if binding.record_ledger_id {
            let mut batch = Batch::new();
            batch.put(
                Table::Meta,
                layout::ERASURE_LEDGER_ID,
                binding.ledger_id.clone(),
            );
            self.store.commit(batch).await?;
        }
        table.expect(binding.ledger_id);
        Ok(())
    }

    /// The values under `keys` of the meta table.
    async fn meta<const N: usize>(&self, keys: [&[u8]; N]) -> Result<[Option<Vec<u8>>; N], Error> {
        let values = self
            .store
            .get_many(Table::Meta, keys.iter().map(|k| k.to_vec()).collect())
            .await?;
        let mut out: [Option<Vec<u8>>; N] = std::array::from_fn(|_| None);
        for (slot, value) in out.iter_mut().zip(values) {
            *slot = value;
        }
        Ok(out)
    }
}

/// A new random id.
fn random_id() -> Result<Vec<u8>, Error> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(crate::crypto::Error::from)?;
    Ok(id.to_vec())
}

fn hex(id: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(id)
}
