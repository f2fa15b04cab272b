//! `tokenvault backup`: create an online backup through a running vault,
//! verify one offline, restore one for a stopped vault.

use std::{path::PathBuf, process::ExitCode};

use clap::Subcommand;

use super::{Connection, progress};
use crate::client;

#[derive(Debug, Subcommand)]
pub(super) enum BackupCommand {
    /// Ask a running vault to write a consistent online backup to DIR (a new
    /// directory on the server's filesystem). Needs scope admin:backup.
    Create {
        #[command(flatten)]
        conn: Connection,
        /// The backup directory, absolute, on the server.
        dir: PathBuf,
    },
    /// Check a backup offline: every record decodes, the audit chain verifies.
    Verify {
        /// The backup directory.
        dir: PathBuf,
        /// The auditor's copy of the audit public key (hex).
        #[arg(long)]
        public_key: Option<String>,
    },
    /// Copy a backup into a data directory for a stopped vault. The erasure
    /// ledger is re-applied when the vault opens, so erased subjects stay erased.
    Restore {
        /// The backup directory.
        dir: PathBuf,
        /// The data directory to create (must not exist or be empty).
        #[arg(long)]
        to: PathBuf,
    },
}

pub(super) async fn run(command: BackupCommand) -> Result<ExitCode, String> {
    use crate::{
        layout::AUDIT_PUBLIC_KEY,
        proto::v1::{CreateBackupRequest, admin_client::AdminClient},
        store::{RocksStore, Snapshot, Table},
    };
    match command {
        BackupCommand::Create { conn, dir } => {
            let channel = client::channel(&conn.addr, &conn.tls()?)
                .await
                .map_err(|e| e.to_string())?;
            let info = AdminClient::new(channel)
                .create_backup(CreateBackupRequest {
                    path: dir.display().to_string(),
                })
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            println!(
                "backup written to {} ({} bytes, audit sequence {})",
                info.path, info.bytes, info.audit_seq
            );
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Verify { dir, public_key } => {
            let store = RocksStore::open_read_only(&dir)
                .map_err(|e| format!("cannot open {}: {e}", dir.display()))?;
            let (records, bad) =
                crate::report::records_decode(&store).map_err(|e| e.to_string())?;
            let key = match public_key {
                Some(hex) => super::audit::parse_public_key(&hex)?,
                None => store
                    .get(Table::Keys, AUDIT_PUBLIC_KEY)
                    .map_err(|e| e.to_string())?
                    .and_then(|k| k.try_into().ok())
                    .ok_or("the backup has no audit public key")?,
            };
            let audit = crate::audit::verify(&store, &key, 1);
            match (&audit, bad) {
                (Ok(report), 0) => {
                    println!(
                        "ok: {records} records decode; audit events 1..{} verify",
                        report.last_seq
                    );
                    Ok(ExitCode::SUCCESS)
                }
                (Ok(_), bad) => {
                    println!("FAILED: {bad} of {records} records do not decode");
                    Ok(ExitCode::FAILURE)
                }
                (Err(failure), _) => {
                    println!("FAILED: {failure}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        BackupCommand::Restore { dir, to } => {
            if to.exists()
                && std::fs::read_dir(&to)
                    .map_err(|e| e.to_string())?
                    .next()
                    .is_some()
            {
                return Err(format!(
                    "{} is not empty; restore into a new or empty directory",
                    to.display()
                ));
            }
            RocksStore::open_read_only(&dir)
                .map_err(|e| format!("{} is not a tokenvault backup: {e}", dir.display()))?;
            std::fs::create_dir_all(&to).map_err(|e| e.to_string())?;
            let entries = std::fs::read_dir(&dir)
                .and_then(|entries| entries.collect::<Result<Vec<_>, _>>())
                .map_err(|e| e.to_string())?;
            let total: u64 = entries
                .iter()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum();
            let mut progress = progress::Progress::new("restore", "bytes", total);
            let (mut files, mut copied) = (0, 0);
            for entry in entries {
                copied += std::fs::copy(entry.path(), to.join(entry.file_name()))
                    .map_err(|e| e.to_string())?;
                files += 1;
                progress.set(copied);
            }
            progress.finish(copied);
            println!(
                "restored {files} files into {}; point data_dir at it and start the vault: the erasure ledger is re-applied when it opens",
                to.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
