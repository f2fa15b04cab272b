//! The command line: `serve`, `config check`, `client`, `health`, `bench`,
//! `audit` (verify, export, public-key), `backup` (create, verify) and
//! `keys` (rotations and their jobs, in `keys.rs`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

mod audit;
mod backup;
mod keys;
mod logging;
mod progress;
mod report;
mod subjects;
mod terminal;

use clap::{Args, Parser, Subcommand};
use figment::providers::Serialized;
use tracing_subscriber::EnvFilter;

use crate::{
    client::{self, ClientTls},
    config::{Config, LogFormat},
    crypto::{EnvSource, MasterKeySetting},
    dev,
    proto::v1::{
        DetokenizeRequest, TokenizeItem, TokenizeRequest, detokenize_result, tokenize_result,
    },
    server,
};

/// A privacy data vault: tokenize personal data over mTLS gRPC.
#[derive(Debug, Parser)]
#[command(
    name = "tokenvault",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("TV_BUILD_COMMIT"), ")"),
    about
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the vault.
    Serve(ServeArgs),
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Call a running vault.
    Client(ClientArgs),
    /// Ask a vault's plaintext health port whether it serves (for exec probes).
    Health(HealthArgs),
    /// Measure throughput and latency over real mTLS gRPC (see BENCHMARKS.md;
    /// built with the `testkit` feature only).
    #[cfg(feature = "testkit")]
    Bench(crate::bench::BenchArgs),
    /// Check, export and inspect the audit trail, offline.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Online backups: create (through a running vault), verify, restore.
    #[command(subcommand)]
    Backup(backup::BackupCommand),
    /// Keys: rotate (through a running vault), list (offline), and the
    /// master key's custody (create one in an HSM, split one into shares).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// A data subject's sealed export, offline: a key pair to receive it,
    /// and opening it.
    #[command(subcommand)]
    Subjects(subjects::SubjectsCommand),
    /// Reports, offline: the records of processing.
    #[command(subcommand)]
    Report(report::ReportCommand),
    /// Give one master-key share to a vault that started sealed
    /// ([keys.shares]); each holder runs it once.
    Unseal(UnsealArgs),
    /// Create or upgrade the PostgreSQL schemas (the vault's database and
    /// the erasure ledger's) as their owner, and grant the app role what a
    /// running vault needs. The vault then runs as that role, with no right
    /// to change the schema or to empty the ledger.
    Migrate(MigrateArgs),
}

#[derive(Debug, Args)]
struct MigrateArgs {
    /// A config whose [storage.postgres] and
    /// [subjects.erasure_ledger_database] connections name the owner role
    /// (nothing else of the config is read).
    #[arg(long, short)]
    config: PathBuf,
    /// The role the vault's replicas connect as: granted reads and writes
    /// of the vault's tables, and reads and appends of the ledger.
    #[arg(long)]
    grant_to: Option<String>,
}

/// Migrates both databases of `args.config` (see [`Command::Migrate`]).
async fn migrate(args: MigrateArgs) -> Result<ExitCode, String> {
    use crate::config::{EngineSetting, LedgerSetting};
    let (engine, ledger) = Config::databases_of(&args.config).map_err(|e| e.to_string())?;
    let EngineSetting::Postgres(database) = &engine else {
        return Err(
            "storage.engine is not \"postgres\": an embedded RocksDB vault has no schema to migrate"
                .to_owned(),
        );
    };
    let grant_to = args.grant_to.as_deref();
    let secrets = database.read_secrets("storage.postgres")?;
    crate::store::postgres::migrate_database(
        &database.connection,
        secrets.password(),
        secrets.ca.as_deref(),
        database.bounds,
        grant_to,
    )
    .await
    .map_err(|e| format!("storage.postgres: {e}"))?;
    println!(
        "storage.postgres: schema at version {}",
        crate::store::postgres::SCHEMA_VERSION
    );
    if let LedgerSetting::Database(ledger) = &ledger {
        let key = "subjects.erasure_ledger_database";
        let secrets = ledger.read_secrets(key)?;
        let table = crate::store::LedgerTable::connect_with(
            &ledger.connection,
            secrets.password(),
            secrets.ca.as_deref(),
            ledger.bounds,
        )
        .await
        .map_err(|e| format!("{key}: {e}"))?;
        if let Some(role) = grant_to {
            table
                .grant_app_role(role)
                .await
                .map_err(|e| format!("{key}: {e}"))?;
        }
        println!("{key}: schema current");
    }
    if let Some(role) = grant_to {
        println!("granted {role} what a running vault needs");
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
struct UnsealArgs {
    /// The vault's unseal socket (keys.shares.socket).
    #[arg(long, required_unless_present = "print_commitment")]
    socket: Option<PathBuf>,
    /// Print the share's commitment (for keys.shares.commitments) instead
    /// of sending it anywhere.
    #[arg(long)]
    print_commitment: bool,
    /// Read the share from this file instead of the terminal (where it is
    /// not echoed) or standard input.
    #[arg(long)]
    share_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML config file. Without it: defaults and TOKENVAULT_* variables.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Development mode: create (once) and use a CA, certificates, a master
    /// key and a config in --dev-dir, and print grpcurl commands.
    #[arg(long, conflicts_with = "config")]
    dev: bool,
    /// The directory --dev uses.
    #[arg(long, default_value = "tokenvault-dev")]
    dev_dir: PathBuf,
    /// With --dev: create the dev directory (if missing) and exit without
    /// serving (scripts/two-replicas.sh uses its files).
    #[arg(long, requires = "dev")]
    prepare_only: bool,
    /// Override server.listen (use port 0 for any free port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Override server.health_listen.
    #[arg(long)]
    health_listen: Option<SocketAddr>,
    /// Override server.metrics_listen.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Override log.format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// The erasure ledger was replaced by an older copy on purpose: write the
    /// erasures this vault recorded but the ledger lacks back into it, and
    /// start. Without it the vault refuses to start on such a ledger.
    #[arg(long)]
    accept_restored_ledger: bool,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a config (with TOKENVAULT_* variables applied) and print the
    /// effective result.
    Check {
        /// The TOML file; without it, defaults and the environment.
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct ClientArgs {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    call: ClientCall,
}

/// How to reach a running vault.
#[derive(Debug, Args)]
struct Connection {
    /// The vault's mTLS address.
    #[arg(long, default_value = "localhost:50051")]
    addr: String,
    /// Use the certificates of a `serve --dev` directory.
    #[arg(long)]
    dev_dir: Option<PathBuf>,
    /// Which dev identity to use with --dev-dir: `support` or `checkout`.
    #[arg(long = "as", default_value = "support")]
    identity: String,
    /// CA bundle that signed the server certificate.
    #[arg(long, required_unless_present = "dev_dir")]
    ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, required_unless_present = "dev_dir")]
    cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, required_unless_present = "dev_dir")]
    key: Option<PathBuf>,
    /// Name the server certificate must carry.
    #[arg(long, default_value = "localhost")]
    server_name: String,
}

impl Connection {
    fn tls(&self) -> Result<ClientTls, String> {
        match (&self.dev_dir, &self.ca, &self.cert, &self.key) {
            (_, Some(ca), Some(cert), Some(key)) => Ok(ClientTls {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                server_name: self.server_name.clone(),
            }),
            (Some(dir), ..) => Ok(ClientTls::dev(dir, &self.identity)),
            _ => Err("give --dev-dir, or all of --ca, --cert and --key".into()),
        }
    }
}

#[derive(Debug, Subcommand)]
enum ClientCall {
    /// Tokenize values of one field type; prints one token per value.
    Tokenize {
        /// The field type, e.g. `email`.
        field_type: String,
        /// The values.
        #[arg(required = true)]
        values: Vec<String>,
        /// The data subject the values belong to.
        #[arg(long)]
        subject: Option<String>,
    },
    /// Detokenize tokens; prints one value per token.
    Detokenize {
        /// Why the values are needed.
        #[arg(long)]
        purpose: String,
        /// The tokens.
        #[arg(required = true)]
        tokens: Vec<String>,
        /// Ask for masked values even where plaintext is allowed.
        #[arg(long)]
        masked: bool,
    },
}

#[derive(Debug, Args)]
struct HealthArgs {
    /// The plaintext health address.
    #[arg(long, default_value = "127.0.0.1:50052")]
    addr: SocketAddr,
    /// The service to ask about; empty for the whole server.
    #[arg(long, default_value = "")]
    service: String,
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        // `serve` reads its configuration and master key before it starts
        // any thread (see `serve`), so it builds its runtime itself.
        Command::Serve(args) => serve(args),
        Command::Config(ConfigCommand::Check { file }) => config_check(file.as_deref()),
        Command::Audit(command) => audit::run(command),
        Command::Unseal(args) => unseal(&args),
        Command::Subjects(command) => subjects::run(command),
        Command::Report(command) => report::run(command),
        command => runtime().and_then(|runtime| match command {
            Command::Client(args) => runtime.block_on(client(args)),
            Command::Health(args) => runtime.block_on(health(args)),
            #[cfg(feature = "testkit")]
            Command::Bench(args) => runtime
                .block_on(crate::bench::run(args))
                .map(|_| ExitCode::SUCCESS),
            Command::Backup(command) => runtime.block_on(backup::run(command)),
            Command::Keys(command) => runtime.block_on(keys::run(command)),
            Command::Migrate(args) => runtime.block_on(migrate(args)),
            Command::Serve(_)
            | Command::Config(_)
            | Command::Audit(_)
            | Command::Unseal(_)
            | Command::Report(_)
            | Command::Subjects(_) => {
                unreachable!("handled above")
            }
        }),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The snapshot of a vault's storage on `engine` (RocksDB in `data_dir`,
/// or the PostgreSQL database of the setting) for the offline tools.
fn open_snapshot(
    data_dir: &std::path::Path,
    engine: &crate::config::EngineSetting,
) -> Result<crate::store::AnySnapshot, String> {
    use crate::{
        config::EngineSetting,
        store::{AnySnapshot, PgSnapshot, RocksStore},
    };
    match engine {
        EngineSetting::RocksDb => RocksStore::open_read_only(data_dir)
            .map(AnySnapshot::RocksDb)
            .map_err(|e| format!("cannot open {}: {e}", data_dir.display())),
        EngineSetting::Postgres(database) => {
            let key = "storage.postgres";
            let secrets = database.read_secrets(key)?;
            PgSnapshot::open(
                &database.connection,
                secrets.password(),
                secrets.ca.as_deref(),
                database.bounds,
            )
            .map(|snapshot| AnySnapshot::Postgres(Box::new(snapshot)))
            .map_err(|e| format!("cannot read the vault's database ({key}): {e}"))
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn serve(args: ServeArgs) -> Result<ExitCode, String> {
    let file = if args.dev {
        let file = dev::prepare(&args.dev_dir).map_err(|e| e.to_string())?;
        if args.prepare_only {
            println!("{}", file.display());
            return Ok(ExitCode::SUCCESS);
        }
        Some(file)
    } else {
        args.config.clone()
    };
    let mut figment = Config::figment(file.as_deref()).map_err(|e| e.to_string())?;
    if let Some(addr) = args.listen {
        figment = figment.merge(Serialized::default("server.listen", addr.to_string()));
    }
    if let Some(addr) = args.health_listen {
        figment = figment.merge(Serialized::default(
            "server.health_listen",
            addr.to_string(),
        ));
    }
    if let Some(addr) = args.metrics_listen {
        figment = figment.merge(Serialized::default(
            "server.metrics_listen",
            addr.to_string(),
        ));
    }
    if let Some(format) = args.log_format {
        figment = figment.merge(Serialized::default("log.format", format));
    }
    let mut config = Config::from_figment(&figment).map_err(|e| e.to_string())?;
    config.source_file = file.clone();
    if args.accept_restored_ledger {
        config.ledger_rollback = crate::vault::LedgerRollback::Repair;
    }
    // Still one thread: a master key from the environment is read and the
    // variable removed before anything else could read the environment.
    // Shares are collected later, once the log can say that the vault is
    // sealed and the process is hardened.
    let master = match &config.master_key {
        MasterKeySetting::Env(var) => Some(EnvSource(var.clone()).take()),
        MasterKeySetting::Shares(_) => None,
        setting => Some(setting.source().load()),
    }
    .transpose()
    .map_err(|e| e.to_string())?;
    let _log_guard = init_logging(config.log_format, &config.log_level)?;
    crate::hardening::harden(config.lock_memory).map_err(|e| e.to_string())?;
    let master = match master {
        Some(master) => master,
        None => config
            .master_key_source()
            .load()
            .map_err(|e| e.to_string())?,
    };

    let dev_dir = args.dev.then(|| args.dev_dir.display().to_string());
    let on_ready = move |grpc: SocketAddr, health: SocketAddr| {
        if let Some(dir) = &dev_dir {
            println!("{}", dev::banner(dir, grpc, health));
        }
    };
    runtime()?.block_on(async move {
        let shutdown = shutdown_signal()?;
        server::run(config, master, shutdown, on_ready)
            .await
            .map_err(|e| e.to_string())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn unseal(args: &UnsealArgs) -> Result<ExitCode, String> {
    let share = match &args.share_file {
        Some(file) => zeroize::Zeroizing::new(
            std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?,
        ),
        None => terminal::read_secret_line("master-key share: ")?,
    };
    if args.print_commitment {
        println!("{}", crate::crypto::share_commitment(&share)?);
        return Ok(ExitCode::SUCCESS);
    }
    let Some(socket) = &args.socket else {
        return Err("--socket is required".to_owned());
    };
    let answer = crate::crypto::send_share(socket, &share)?;
    println!("{answer}");
    Ok(ExitCode::SUCCESS)
}

/// Writes `text` to a new file with `mode`, refusing to replace one (a
/// key or share is never silently overwritten), and syncs it.
fn write_new_file(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(fail)?;
    file.write_all(text.as_bytes()).map_err(fail)?;
    file.sync_all().map_err(fail)
}

fn config_check(file: Option<&Path>) -> Result<ExitCode, String> {
    let config = Config::load(file).map_err(|e| e.to_string())?;
    print!("{}", config.to_toml().map_err(|e| e.to_string())?);
    eprintln!("config is valid");
    Ok(ExitCode::SUCCESS)
}

/// Logs go to stderr; stdout is kept for command output (the dev banner).
///
/// Lines go through a background writer thread that writes them in batches
/// (see [`logging`]), so a request never waits for a `write(2)` nor wakes a
/// thread. Keep the returned guard alive: dropping it writes the last lines.
fn init_logging(format: LogFormat, level: &str) -> Result<logging::Flush, String> {
    let filter =
        EnvFilter::try_new(level).map_err(|e| format!("invalid log.level {level:?}: {e}"))?;
    let (writer, guard) = logging::batching_stderr()?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    result.map_err(|e| format!("cannot initialise logging: {e}"))?;
    Ok(guard)
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed before this
/// returns, so a signal that arrives while the server is still starting is
/// not lost to the default action (exit without draining).
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot handle SIGINT: {e}"))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

async fn client(args: ClientArgs) -> Result<ExitCode, String> {
    let tls = args.conn.tls()?;
    let mut client = client::connect(&args.conn.addr, &tls)
        .await
        .map_err(|e| e.to_string())?;
    let mut failed = false;
    match args.call {
        ClientCall::Tokenize {
            field_type,
            values,
            subject,
        } => {
            let items = values
                .into_iter()
                .map(|value| TokenizeItem {
                    field_type: field_type.clone(),
                    value,
                    subject_id: subject.clone().unwrap_or_default(),
                    ttl_seconds: 0,
                })
                .collect();
            let response = client
                .tokenize(TokenizeRequest {
                    items,
                    ..Default::default()
                })
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
            for result in response.into_inner().results {
                match result.result {
                    Some(tokenize_result::Result::Token(token)) => println!("{token}"),
                    Some(tokenize_result::Result::Error(e)) => {
                        failed = true;
                        println!("error {:?}: {}", e.code(), e.message);
                    }
                    None => {
                        failed = true;
                        println!("error: empty result");
                    }
                }
            }
        }
        ClientCall::Detokenize {
            purpose,
            tokens,
            masked,
        } => {
            let response = client
                .detokenize(DetokenizeRequest {
                    tokens,
                    purpose,
                    masked,
                })
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
            for result in response.into_inner().results {
                match result.result {
                    Some(detokenize_result::Result::Value(v)) => println!("{}", v.value),
                    Some(detokenize_result::Result::Error(e)) => {
                        failed = true;
                        println!("error {:?}: {}", e.code(), e.message);
                    }
                    None => {
                        failed = true;
                        println!("error: empty result");
                    }
                }
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn health(args: HealthArgs) -> Result<ExitCode, String> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", args.addr))
        .map_err(|e| e.to_string())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", args.addr))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: args.service,
        })
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    let status = response.into_inner().status();
    println!("{}", status.as_str_name());
    Ok(if status == ServingStatus::Serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
