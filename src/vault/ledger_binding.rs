//! A shared ledger table and the vault it belongs to, bound to each other.
//!
//! The ledger is what erases again the subjects a restored database brings
//! back, so a replica must never start on a ledger that is not its vault's:
//! on a new, empty one it would serve erased subjects, and its next
//! erasure would make that ledger disagree with every correctly configured
//! replica. A ledger table has an id of its own and names the vault it
//! belongs to; the vault records the id of its ledger. At open:
//!
//! - a ledger in a database that also holds a vault's tables is refused (a
//!   restore of that database rolls both back);
//! - a ledger bound to another vault is refused;
//! - a ledger other than the one the vault recorded (a new or emptied
//!   database, a wrong `dbname`) is refused, unless the operator adopts it
//!   on purpose (`--accept-restored-ledger`), for a ledger lost for good;
//! - otherwise the two are bound, once, both ways.

use super::{Error, Vault, erasure::LedgerRollback, ledger::LedgerError, ledger_sink::LedgerSink};
use crate::{
    layout,
    store::{Batch, Store, Table, postgres::ledger::LedgerIdentity},
};

impl<S: Store> Vault<S> {
    /// Checks that a ledger table is this vault's, and binds the two (see
    /// the module doc). A file ledger serves one process and is left alone.
    ///
    /// # Errors
    /// [`Error::Ledger`] with one line naming the cause and what to do;
    /// storage failures.
    pub(super) async fn bind_ledger(
        &self,
        sink: &LedgerSink,
        rollback: LedgerRollback,
    ) -> Result<(), Error> {
        let LedgerSink::Table(table) = sink else {
            return Ok(());
        };
        let refuse = |message: String| Error::from(LedgerError::at(table.place(), message));
        let unreadable = |e: crate::store::Error| refuse(e.to_string());
        if table.beside_a_vault().await.map_err(unreadable)? {
            return Err(refuse(
                "is in a database that also holds a vault's tables (tokenvault_kv): a restore of that database would roll the ledger back with the data it must erase again; give the ledger a database of its own, in a cluster backed up and restored separately".to_owned(),
            ));
        }
        let vault_id = self.create_once(layout::VAULT_ID, random_id()?).await?;
        let found = table.identity().await.map_err(unreadable)?;
        let another_vault = |found: &LedgerIdentity| {
            found
                .vault_id
                .as_ref()
                .filter(|theirs| **theirs != vault_id)
                .map(|theirs| {
                    refuse(format!(
                        "belongs to another vault ({}; this vault is {}): subjects.erasure_ledger_database names another vault's ledger",
                        hex(theirs),
                        hex(&vault_id)
                    ))
                })
        };
        if let Some(refused) = another_vault(&found) {
            return Err(refused);
        }
        let recorded = self
            .create_once(layout::ERASURE_LEDGER_ID, found.ledger_id.clone())
            .await?;
        if recorded != found.ledger_id {
            if rollback == LedgerRollback::Refuse {
                return Err(refuse(format!(
                    "is not this vault's ledger (it is ledger {}, this vault's is {}): a new or emptied database, or a wrong dbname; point subjects.erasure_ledger_database at this vault's ledger, or, if that ledger is lost for good, start once with --accept-restored-ledger to adopt this one and write this vault's erasures into it",
                    hex(&found.ledger_id),
                    hex(&recorded)
                )));
            }
            let mut batch = Batch::new();
            batch.put(
                Table::Meta,
                layout::ERASURE_LEDGER_ID,
                found.ledger_id.clone(),
            );
            self.store.commit(batch).await?;
            tracing::warn!(
                ledger = %table.place(),
                "adopted another erasure ledger than the one this vault was bound to (--accept-restored-ledger)"
            );
        }
        if found.vault_id.is_none() {
            let bound = table.bind(&vault_id).await.map_err(unreadable)?;
            if let Some(refused) = another_vault(&bound) {
                return Err(refused);
            }
            tracing::info!(ledger = %table.place(), vault = %hex(&vault_id), "bound the erasure ledger to this vault");
        }
        Ok(())
    }

    /// The value under `key` of the meta table, stored as `value` if there
    /// was none (replicas starting at once agree on the first stored).
    async fn create_once(&self, key: &[u8], value: Vec<u8>) -> Result<Vec<u8>, Error> {
        let mut batch = Batch::new();
        batch
            .unit()
            .guard_absent(Table::Meta, key)
            .put(Table::Meta, key, value.clone());
        Ok(match self.store.commit(batch).await?.pop() {
            Some(Err(conflict)) => conflict.existing,
            _ => value,
        })
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
