//! Online backups: a consistent copy of the store, with the record of its
//! own making, on an engine that makes them.

use super::{Error, Vault};
use crate::{
    audit::Outcome,
    authz::act,
    store::{Checkpoints, Store},
};

impl<S: Store> Vault<S> {
    /// Writes an online backup to the permitted path: the audit event goes
    /// first (so the backup contains the record of its own making), then a
    /// consistent checkpoint of the store.
    ///
    /// # Errors
    /// Storage or audit failures.
    pub async fn backup(
        &self,
        path: crate::authz::Permit<act::AdminBackup, std::path::PathBuf>,
        audit: &crate::audit::AuditContext,
    ) -> Result<Backup, Error> {
        let path = path.into_item();
        // An engine that makes no backups refuses before anything is
        // recorded: the trail never shows a backup that was not made.
        let engine = self.store.checkpoints()?;
        self.record(&audit.event(Outcome::Ok)).await?;
        let audit_seq = self.store.audit_head().seq;
        engine.checkpoint(path.clone()).await?;
        let bytes = dir_size(&path);
        Ok(Backup {
            path,
            audit_seq,
            bytes,
        })
    }
}

/// A backup written by [`Vault::backup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    /// Its directory.
    pub path: std::path::PathBuf,
    /// The audit sequence number it contains up to (its own event included).
    pub audit_seq: u64,
    /// Its size on disk.
    pub bytes: u64,
}

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
