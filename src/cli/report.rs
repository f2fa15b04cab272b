//! `tokenvault report processing`: the records of processing of a stopped
//! vault, a copy or a backup, offline (a running vault answers the same
//! through `Admin/ProcessingReport`).

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand};

use crate::{
    config::{Config, EngineSetting},
    report::{self, Format, Period},
};

#[derive(Debug, Subcommand)]
pub(super) enum ReportCommand {
    /// The records of processing (GDPR Art. 30): field types and values
    /// held, the policy's identities and purposes, and from the audit trail
    /// reveals, refusals, rights served, consent changes, key rotations and
    /// policy loads.
    Processing(ProcessingArgs),
}

#[derive(Debug, Args)]
pub(super) struct ProcessingArgs {
    /// The vault's config file: its field types, policy and purposes, and
    /// its storage (data_dir, or the PostgreSQL database of
    /// storage.postgres) unless --data-dir names a RocksDB directory.
    #[arg(long, short)]
    config: PathBuf,
    /// A data directory to read instead of the config's (a copy, a backup).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Only audit events at or after this time (RFC 3339).
    #[arg(long)]
    since: Option<String>,
    /// Only audit events at or before this time (RFC 3339).
    #[arg(long)]
    until: Option<String>,
    /// The form: md, json or html.
    #[arg(long, default_value = "md", value_parser = parse_format)]
    format: Format,
    /// Write it here instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_format(name: &str) -> Result<Format, String> {
    Format::from_name(name).ok_or_else(|| format!("{name:?} is not md, json or html"))
}

fn bound(name: &'static str, text: Option<String>) -> Result<Option<String>, String> {
    report::check_bound(name, text).map_err(|e| e.to_string())
}

pub(super) fn run(command: ReportCommand) -> Result<ExitCode, String> {
    let ReportCommand::Processing(args) = command;
    let config = Config::load(Some(&args.config)).map_err(|e| e.to_string())?;
    let period = Period {
        since: bound("--since", args.since)?,
        until: bound("--until", args.until)?,
    };
    // A directory named on the command line is a RocksDB copy or backup,
    // whatever engine the config's vault runs on.
    let store = match &args.data_dir {
        Some(dir) => super::open_snapshot(dir, &EngineSetting::RocksDb)?,
        None => super::open_snapshot(&config.data_dir, &config.engine)?,
    };
    let report = report::offline(
        &config.field_types,
        &config.policy,
        &store,
        period,
        crate::vault::now_ms(),
    )?;
    let (text, _) = args.format.render(&report);
    match args.out {
        Some(path) => std::fs::write(&path, text)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?,
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}
