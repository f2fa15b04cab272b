//! `tokenvault audit`: verify, export and inspect the audit trail of a
//! stopped vault, a copy or a running one, offline; verify a running one's
//! over the network too, as its Audit service streams it.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand};

use crate::{
    config::{Config, EngineSetting},
    store::AnySnapshot,
};

#[derive(Debug, Subcommand)]
pub(super) enum AuditCommand {
    /// Verify the hash chain and the signed checkpoints; print the first bad
    /// sequence number if any. Works on a stopped vault, a copy or a running
    /// one; with --addr, over the network, as the vault's Audit service
    /// streams the trail (needs scope audit:read and --public-key).
    Verify {
        #[command(flatten)]
        source: AuditSource,
        #[command(flatten)]
        remote: Remote,
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

/// A running vault whose trail `verify` reads over mTLS.
#[derive(Debug, Args)]
pub(super) struct Remote {
    /// A running vault's mTLS address: check its trail as its Audit service
    /// streams it. Every hash is computed here from the events, and every
    /// checkpoint checked with --public-key, so the vault is not trusted.
    #[arg(long, conflicts_with_all = ["config", "data_dir"], requires_all = ["public_key", "ca", "cert", "key"])]
    addr: Option<String>,
    /// With --addr: the CA bundle that signed the server certificate.
    #[arg(long, requires = "addr")]
    ca: Option<PathBuf>,
    /// With --addr: the client certificate (PEM), of an identity with
    /// audit:read.
    #[arg(long, requires = "addr")]
    cert: Option<PathBuf>,
    /// With --addr: the client private key (PEM).
    #[arg(long, requires = "addr")]
    key: Option<PathBuf>,
    /// With --addr: the name the server certificate must carry.
    #[arg(long, default_value = "localhost")]
    server_name: String,
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
    if let AuditCommand::Verify {
        remote:
            Remote {
                addr: Some(addr),
                ca: Some(ca),
                cert: Some(cert),
                key: Some(key),
                server_name,
            },
        from,
        public_key: Some(public_key),
        ..
    } = &command
    {
        let tls = crate::client::ClientTls {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
            server_name: server_name.clone(),
        };
        let public_key = parse_public_key(public_key)?;
        return super::runtime()?.block_on(verify_remote(addr, &tls, public_key, *from));
    }
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

/// Checks a running vault's trail page by page as its Audit service
/// streams it (`audit::StreamVerifier`), and says so as the offline check
/// does.
async fn verify_remote(
    addr: &str,
    tls: &crate::client::ClientTls,
    public_key: [u8; 32],
    from: u64,
) -> Result<ExitCode, String> {
    use crate::{
        audit::{Checkpoint, PruneMarker, StreamVerifier, StreamedEvent},
        proto::v1::{StreamEventsRequest, audit_client::AuditClient},
    };
    /// Events per page: the service's most.
    const PAGE: u32 = 10_000;
    let channel = crate::client::channel(addr, tls)
        .await
        .map_err(|e| e.to_string())?;
    let mut client = AuditClient::new(channel);
    let mut verifier = StreamVerifier::new(public_key, from);
    let mut next = from.max(1);
    let hex32 = |text: &str, what: &str| -> Result<[u8; 32], String> {
        data_encoding::HEXLOWER_PERMISSIVE
            .decode(text.as_bytes())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("the vault sent a malformed {what}"))
    };
    let hex64 = |text: &str| -> Result<[u8; 64], String> {
        data_encoding::HEXLOWER_PERMISSIVE
            .decode(text.as_bytes())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| "the vault sent a malformed signature".to_owned())
    };
    loop {
        let mut stream = client
            .stream_events(StreamEventsRequest {
                from_seq: next,
                identity: String::new(),
                limit: PAGE,
            })
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        let mut received = 0;
        while let Some(record) = stream
            .message()
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        {
            received += 1;
            let checkpoint = record
                .checkpoint
                .map(|cp| Ok::<_, String>((cp.time_ms, hex64(&cp.signature)?)))
                .transpose()?;
            let pruned = record
                .pruned
                .map(|marker| {
                    Ok::<_, String>(PruneMarker {
                        seq: marker.seq,
                        head: hex32(&marker.head, "prune marker")?,
                        time_ms: marker.time_ms,
                        signature: hex64(&marker.signature)?,
                    })
                })
                .transpose()?;
            let newest_checkpoint = record
                .newest_checkpoint
                .map(|cp| {
                    Ok::<_, String>(Checkpoint {
                        seq: cp.seq,
                        head: hex32(&cp.head, "checkpoint")?,
                        time_ms: cp.time_ms,
                        signature: hex64(&cp.signature)?,
                    })
                })
                .transpose()?;
            // An entry not in the chain format comes without a link.
            let checked = match hex32(&record.prev, "link") {
                Ok(prev) => verifier.event(StreamedEvent {
                    seq: record.seq,
                    prev,
                    payload: record.event_json.as_bytes(),
                    hash: hex32(&record.hash, "hash")?,
                    checkpoint,
                    pruned,
                    newest_checkpoint,
                }),
                Err(_) => Err(crate::audit::VerifyFailure {
                    seq: record.seq,
                    reason: "event is not in the chain format".to_owned(),
                }),
            };
            if let Err(failure) = checked {
                println!("FAILED: {failure}");
                return Ok(ExitCode::FAILURE);
            }
            next = record.seq + 1;
        }
        // A short page is the end (each page's own read is audited, so the
        // trail always has one more event).
        if received < PAGE {
            break;
        }
    }
    let report = match verifier.finish() {
        Ok(report) => report,
        Err(failure) => {
            println!("FAILED: {failure}");
            return Ok(ExitCode::FAILURE);
        }
    };
    println!(
        "ok: events {}..{} ({} events), {} signed checkpoints verified, {} events after the last checkpoint",
        report.first_seq, report.last_seq, report.events, report.checkpoints, report.unsigned_tail
    );
    Ok(ExitCode::SUCCESS)
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
