//! `tokenvault audit`: verify, export and inspect the audit trail of a
//! stopped vault, a copy or a running one, offline.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand};

use crate::{
    config::{Config, EngineSetting},
    store::AnySnapshot,
};

#[derive(Debug, Subcommand)]
pub(super) enum AuditCommand {
    /// Verify the hash chain and the signed checkpoints; print the first bad
    /// sequence number if any. Works on a stopped vault, a copy or a running one.
    Verify {
        #[command(flatten)]
        source: AuditSource,
        /// Start at this sequence number.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// The auditor's copy of the checkpoint public key (hex), from
        /// `audit public-key`. Without it, the key stored in the vault is used,
        /// which proves less: whoever can rewrite the log can replace it.
        #[arg(long)]
        public_key: Option<String>,
    },
    /// Write events as JSON lines to stdout.
    Export {
        #[command(flatten)]
        source: AuditSource,
        /// Start at this sequence number.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Only events at or after this time (RFC 3339, e.g. 2026-11-01T00:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Only events of this caller identity.
        #[arg(long)]
        identity: Option<String>,
    },
    /// Print the public key that verifies checkpoints (hex).
    PublicKey {
        #[command(flatten)]
        source: AuditSource,
    },
}

/// Where the vault's data is.
#[derive(Debug, Args)]
pub(super) struct AuditSource {
    /// The vault's config file: its storage (data_dir, or the PostgreSQL
    /// database of storage.postgres) is read.
    #[arg(long, short, conflicts_with = "data_dir")]
    config: Option<PathBuf>,
    /// The vault's data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

pub(super) fn run(command: AuditCommand) -> Result<ExitCode, String> {
    use crate::{
        audit,
        layout::AUDIT_PUBLIC_KEY,
        store::{Snapshot, Table},
    };
    let source = match &command {
        AuditCommand::Verify { source, .. }
        | AuditCommand::Export { source, .. }
        | AuditCommand::PublicKey { source } => source,
    };
    let store = open(source)?;
    let stored_key = || -> Result<[u8; 32], String> {
        store
            .get(Table::Keys, AUDIT_PUBLIC_KEY)
            .map_err(|e| e.to_string())?
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| "this vault has no audit public key".to_owned())
    };
    match command {
        AuditCommand::PublicKey { .. } => {
            println!("{}", data_encoding::HEXLOWER.encode(&stored_key()?));
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify {
            from, public_key, ..
        } => {
            let key = match public_key {
                Some(hex) => parse_public_key(&hex)?,
                None => {
                    eprintln!(
                        "note: using the public key stored in the vault; pass --public-key to check against your own copy"
                    );
                    stored_key()?
                }
            };
            match audit::verify(&store, &key, from) {
                Ok(report) => {
                    println!(
                        "ok: events {}..{} ({} events), {} signed checkpoints verified, {} events after the last checkpoint",
                        report.first_seq,
                        report.last_seq,
                        report.events,
                        report.checkpoints,
                        report.unsigned_tail
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(failure) => {
                    println!("FAILED: {failure}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        AuditCommand::Export {
            from,
            since,
            identity,
            ..
        } => {
            let rfc3339 = &time::format_description::well_known::Rfc3339;
            let since = since
                .map(|s| {
                    time::OffsetDateTime::parse(&s, rfc3339).map_err(|e| format!("--since: {e}"))
                })
                .transpose()?;
            let keep = |event: &audit::AuditEvent| {
                let after = since.is_none_or(|since| {
                    time::OffsetDateTime::parse(&event.time, rfc3339).is_ok_and(|t| t >= since)
                });
                after && identity.as_ref().is_none_or(|id| &event.identity == id)
            };
            let mut out = std::io::stdout().lock();
            let written = audit::export(&store, from, keep, &mut out)?;
            eprintln!("{written} events exported");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// An auditor's copy of the audit public key, as `--public-key` gives it.
pub(super) fn parse_public_key(hex: &str) -> Result<[u8; 32], String> {
    data_encoding::HEXLOWER_PERMISSIVE
        .decode(hex.trim().as_bytes())
        .ok()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .ok_or_else(|| "--public-key must be 64 hex digits".to_owned())
}

/// The snapshot `source` names: a data directory, or the storage of a
/// config file, on whichever engine it says.
pub(super) fn open(source: &AuditSource) -> Result<AnySnapshot, String> {
    match (&source.data_dir, &source.config) {
        (Some(dir), _) => super::open_snapshot(dir, &EngineSetting::RocksDb),
        (None, config) => {
            let (data_dir, engine) =
                Config::storage_of(config.as_deref()).map_err(|e| e.to_string())?;
            super::open_snapshot(&data_dir, &engine)
        }
    }
}
