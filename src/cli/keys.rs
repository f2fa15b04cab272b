//! `tokenvault keys`: rotate data, index and master keys through a running
//! vault, follow and hold the jobs that follow a rotation, and list key
//! versions offline.

use std::{io::IsTerminal, process::ExitCode, time::Duration};

use clap::{Args, Subcommand};
use tonic::transport::Channel;

use super::{Connection, audit::AuditSource};
use crate::{
    client,
    proto::v1::{
        self as pb, ListJobsRequest, Pkcs11Key, RotateIndexKeyRequest, RotateKeysRequest,
        RotateMasterKeyRequest, SetJobPausedRequest, admin_client::AdminClient,
    },
    vault::Job,
};

/// A key in a PKCS#11 token, as `[keys.pkcs11]` names it.
#[derive(Debug, Args)]
pub struct HsmKeyArgs {
    /// The HSM vendor's PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so).
    #[arg(long, requires_all = ["token_label", "key_label", "pin_file"])]
    pkcs11_module: Option<std::path::PathBuf>,
    /// The label of the token holding the key.
    #[arg(long)]
    token_label: Option<String>,
    /// The key's label (CKA_LABEL).
    #[arg(long)]
    key_label: Option<String>,
    /// A file holding the token's user PIN (mode 0600).
    #[arg(long)]
    pin_file: Option<std::path::PathBuf>,
}

impl HsmKeyArgs {
    fn setting(self) -> Result<crate::crypto::Pkcs11Setting, String> {
        match (
            self.pkcs11_module,
            self.token_label,
            self.key_label,
            self.pin_file,
        ) {
            (Some(module), Some(token_label), Some(key_label), Some(pin_file)) => {
                Ok(crate::crypto::Pkcs11Setting {
                    module,
                    token_label,
                    key_label,
                    pin_file,
                })
            }
            _ => Err(
                "name the HSM key with --pkcs11-module, --token-label, --key-label and --pin-file"
                    .into(),
            ),
        }
    }
}

#[derive(Debug, Subcommand)]
pub(super) enum KeysCommand {
    /// Make a new data-key version for new writes; the vault re-encrypts
    /// older records in the background. Needs scope admin:keys.
    Rotate {
        #[command(flatten)]
        conn: Connection,
        /// Follow the re-encryption until it finishes.
        #[arg(long)]
        wait: bool,
    },
    /// Make a new blind-index key for deterministic field types; the vault
    /// moves every index entry to it in the background (lookups keep
    /// working) and then deletes the old key. Needs scope admin:keys.
    RotateIndex {
        #[command(flatten)]
        conn: Connection,
        /// Follow the re-indexing until it finishes.
        #[arg(long)]
        wait: bool,
    },
    /// Re-wrap every key under a new master key (a file on the server, or
    /// a key in an HSM), without touching records. Then point
    /// keys.master_key_file or [keys.pkcs11] at it.
    RotateMaster {
        #[command(flatten)]
        conn: Connection,
        /// The new master key file, absolute path on the server.
        #[arg(
            long,
            conflicts_with = "pkcs11_module",
            required_unless_present = "pkcs11_module"
        )]
        new_key_file: Option<std::path::PathBuf>,
        /// Or a key in an HSM (paths on the server).
        #[command(flatten)]
        hsm: HsmKeyArgs,
    },
    /// Create a master key inside an HSM token: AES-256, generated in the
    /// token, sensitive and never extractable. Runs locally, against the
    /// PKCS#11 module on this machine.
    CreateHsmKey {
        #[command(flatten)]
        hsm: HsmKeyArgs,
    },
    /// Split a master key file into shares for dual control: any
    /// --threshold of the --shares written make the key, fewer say nothing
    /// about it. Runs locally. A vault with [keys.shares] then starts
    /// sealed until that many holders run `tokenvault unseal`.
    SplitMaster {
        /// The master key file to split (as keys.master_key_file).
        #[arg(long)]
        key_file: std::path::PathBuf,
        /// How many shares make the key.
        #[arg(long)]
        threshold: u8,
        /// How many shares to write.
        #[arg(long)]
        shares: u8,
        /// A directory to write share-1 … share-N into (mode 0600; existing
        /// files are never overwritten).
        #[arg(long)]
        out_dir: std::path::PathBuf,
    },
    /// Where the jobs that follow a rotation stand (reencrypt, reindex).
    Jobs {
        #[command(flatten)]
        conn: Connection,
        /// Follow them until none has work left (a progress bar on a
        /// terminal, a line every ten seconds otherwise).
        #[arg(long)]
        wait: bool,
    },
    /// Hold a job: it keeps its place, also across restarts, until resumed.
    Pause {
        #[command(flatten)]
        conn: Connection,
        /// reencrypt or reindex.
        job: Job,
    },
    /// Release a held job.
    Resume {
        #[command(flatten)]
        conn: Connection,
        /// reencrypt or reindex.
        job: Job,
    },
    /// Data-key versions, their creation times and how many records each
    /// encrypts. Never key bytes.
    List {
        #[command(flatten)]
        source: AuditSource,
    },
}

pub(super) async fn run(command: KeysCommand) -> Result<ExitCode, String> {
    match command {
        KeysCommand::Rotate { conn, wait } => {
            let mut admin = admin(&conn).await?;
            let response = admin
                .rotate_keys(RotateKeysRequest {})
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "data key version {} is active; older records are re-encrypted in the background",
                response.version
            );
            if wait {
                follow(&mut admin).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::RotateIndex { conn, wait } => {
            let mut admin = admin(&conn).await?;
            let response = admin
                .rotate_index_key(RotateIndexKeyRequest {})
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "blind-index key version {} is active; the index is rebuilt in the background and the old key deleted after",
                response.version
            );
            if wait {
                follow(&mut admin).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::RotateMaster {
            conn,
            new_key_file,
            hsm,
        } => {
            let (request, setting) = match new_key_file {
                Some(file) => (
                    RotateMasterKeyRequest {
                        new_key_file: file.display().to_string(),
                        new_pkcs11_key: None,
                    },
                    format!("{}; set keys.master_key_file to it", file.display()),
                ),
                None => {
                    let key = hsm.setting()?;
                    (
                        RotateMasterKeyRequest {
                            new_key_file: String::new(),
                            new_pkcs11_key: Some(Pkcs11Key {
                                module: key.module.display().to_string(),
                                token_label: key.token_label.clone(),
                                key_label: key.key_label.clone(),
                                pin_file: key.pin_file.display().to_string(),
                            }),
                        },
                        format!("{}; set [keys.pkcs11] to it", key.describe()),
                    )
                }
            };
            let response = admin(&conn)
                .await?
                .rotate_master_key(request)
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "re-wrapped {} keys under {setting} before the next restart, then retire the old key",
                response.keys_rewrapped,
            );
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::CreateHsmKey { hsm } => {
            let setting = hsm.setting()?;
            crate::crypto::create_hsm_key(&setting).map_err(|e| e.to_string())?;
            println!(
                "created {}: AES-256, sensitive, not extractable",
                setting.describe()
            );
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::SplitMaster {
            key_file,
            threshold,
            shares,
            out_dir,
        } => {
            let lines = crate::crypto::split_master_key(&key_file, threshold, shares)
                .map_err(|e| e.to_string())?;
            std::fs::create_dir_all(&out_dir)
                .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
            for (n, line) in lines.iter().enumerate() {
                let path = out_dir.join(format!("share-{}", n + 1));
                super::write_new_file(&path, &format!("{}\n", line.as_str()), 0o600)?;
            }
            let commitments = lines
                .iter()
                .map(|line| crate::crypto::share_commitment(line).map(|c| format!("\"{c}\"")))
                .collect::<Result<Vec<_>, _>>()?;
            println!(
                "wrote {shares} shares to {}: any {threshold} make the master key. Give each to one holder, then destroy {} and these copies.",
                out_dir.display(),
                key_file.display()
            );
            println!(
                "the vault's config (the commitments name these shares; they reveal nothing of the key):\n\n[keys.shares]\nthreshold = {threshold}\nsocket = \"/run/tokenvault/unseal.sock\"\ncommitments = [{}]",
                commitments.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::Jobs { conn, wait } => {
            let mut admin = admin(&conn).await?;
            if wait {
                follow(&mut admin).await?;
            } else {
                for job in list_jobs(&mut admin).await? {
                    println!("{}", describe(&job));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::Pause { conn, job } => set_paused(&conn, job, true).await,
        KeysCommand::Resume { conn, job } => set_paused(&conn, job, false).await,
        // A snapshot blocks: off the runtime's threads.
        KeysCommand::List { source } => tokio::task::spawn_blocking(move || list(&source))
            .await
            .map_err(|e| e.to_string())?,
    }
}

/// `keys list`: the key versions of a vault's snapshot and how many
/// records each encrypts.
fn list(source: &AuditSource) -> Result<ExitCode, String> {
    let store = super::audit::open(source)?;
    let usage = crate::report::data_key_usage(&store).map_err(|e| e.to_string())?;
    let active = usage.active();
    println!("version  created (UTC)                  records");
    for (version, (created_ms, count)) in &usage.versions {
        let created = created_at(*created_ms);
        let marker = if *version == active { "  (active)" } else { "" };
        println!("{version:>7}  {created:<30} {count}{marker}");
    }
    println!(
        "records under their data subject's own key: {}",
        usage.subject_keyed
    );
    let index_versions: Vec<String> = usage
        .index_versions
        .iter()
        .map(|(version, created_ms)| format!("{version} (created {})", created_at(*created_ms)))
        .collect();
    println!(
        "blind-index key versions (more than one while re-indexing): {}",
        index_versions.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

/// The creation time stored in a wrapped key (after its format byte).
fn created_at(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "?".into())
}

async fn set_paused(conn: &Connection, job: Job, paused: bool) -> Result<ExitCode, String> {
    let status = admin(conn)
        .await?
        .set_job_paused(SetJobPausedRequest {
            job: match job {
                Job::Reencrypt => pb::Job::Reencrypt,
                Job::Reindex => pb::Job::Reindex,
            } as i32,
            paused,
        })
        .await
        .map_err(self::status)?
        .into_inner();
    println!("{}", describe(&status));
    Ok(ExitCode::SUCCESS)
}

async fn admin(conn: &Connection) -> Result<AdminClient<Channel>, String> {
    let channel = client::channel(&conn.addr, &conn.tls()?)
        .await
        .map_err(|e| e.to_string())?;
    Ok(AdminClient::new(channel))
}

fn status(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

async fn list_jobs(admin: &mut AdminClient<Channel>) -> Result<Vec<pb::JobStatus>, String> {
    Ok(admin
        .list_jobs(ListJobsRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .jobs)
}

fn job_name(job: &pb::JobStatus) -> &'static str {
    match pb::Job::try_from(job.job) {
        Ok(pb::Job::Reencrypt) => "reencrypt",
        Ok(pb::Job::Reindex) => "reindex",
        _ => "unknown",
    }
}

/// One line on where a job stands.
fn describe(job: &pb::JobStatus) -> String {
    let state = match (job.pending, job.paused) {
        (false, false) => "idle".to_owned(),
        (false, true) => "idle, held (a job started later waits until resumed)".to_owned(),
        // No total (the count failed when the pass started, or the vault
        // was empty then): the count of those visited is all there is.
        (true, paused) if job.total == 0 => format!(
            "{} {} records (the total was not counted)",
            if paused { "held at" } else { "running:" },
            job.visited,
        ),
        (true, paused) => format!(
            "{} {}/{} records ({}%)",
            if paused { "held at" } else { "running:" },
            job.visited,
            job.total,
            percent(job)
        ),
    };
    format!("{:<10} {state}", job_name(job))
}

fn percent(job: &pb::JobStatus) -> u64 {
    super::progress::percent(job.visited, job.total)
}

/// Polls the jobs until none has work left: a bar redrawn in place on a
/// terminal, a line every ten seconds otherwise (logs, CI). A held job is
/// reported and not waited for.
async fn follow(admin: &mut AdminClient<Channel>) -> Result<(), String> {
    let terminal = std::io::stderr().is_terminal();
    let mut last_line = std::time::Instant::now();
    loop {
        let jobs = list_jobs(admin).await?;
        let running: Vec<&pb::JobStatus> = jobs.iter().filter(|j| j.pending && !j.paused).collect();
        if running.is_empty() {
            if terminal {
                eprintln!();
            }
            for job in jobs.iter().filter(|j| j.pending || j.paused) {
                eprintln!("{}", describe(job));
            }
            eprintln!("no key-rotation job is running");
            return Ok(());
        }
        if terminal {
            let bars: Vec<String> = running.iter().map(|j| bar(j)).collect();
            eprint!("\r{}\x1b[K", bars.join("  "));
        } else if last_line.elapsed() >= Duration::from_secs(10) {
            for job in &running {
                eprintln!("{}", describe(job));
            }
            last_line = std::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(if terminal { 500 } else { 2000 })).await;
    }
}

fn bar(job: &pb::JobStatus) -> String {
    if job.total == 0 {
        // No total to fill a bar against (PostgreSQL): the count alone.
        return format!("{} {} records visited", job_name(job), job.visited);
    }
    super::progress::bar(job_name(job), job.visited, job.total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(visited: u64, total: u64, pending: bool, paused: bool) -> pb::JobStatus {
        pb::JobStatus {
            job: pb::Job::Reindex as i32,
            pending,
            paused,
            visited,
            total,
        }
    }

    #[test]
    fn a_job_bar_names_the_job() {
        assert_eq!(
            bar(&job(50, 100, true, false)),
            "reindex [############............]  50% 50/100"
        );
        assert_eq!(bar(&job(50, 0, true, false)), "reindex 50 records visited");
    }

    #[test]
    fn descriptions_say_whether_a_job_runs_or_is_held() {
        assert_eq!(describe(&job(0, 0, false, false)), "reindex    idle");
        assert_eq!(
            describe(&job(10, 40, true, true)),
            "reindex    held at 10/40 records (25%)"
        );
        assert_eq!(
            describe(&job(10, 40, true, false)),
            "reindex    running: 10/40 records (25%)"
        );
        // No total: no 10/0, no percentage.
        assert_eq!(
            describe(&job(10, 0, true, false)),
            "reindex    running: 10 records (the total was not counted)"
        );
    }
}
