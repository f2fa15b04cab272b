//! Configuration: figment layers parsed into a validated [`Config`].
//!
//! Precedence, lowest first: built-in defaults, the TOML file, then
//! `TOKENVAULT_` environment variables (nested keys joined with `__`, e.g.
//! `TOKENVAULT_SERVER__LISTEN`). Unknown keys are errors, so a typo never
//! silently falls back to a default. Relative paths in the file are relative
//! to the file's directory.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
    value::magic::RelativePathBuf,
};

mod raw;

pub use raw::{
    EngineName, LogFormat, RawAudit, RawConfig, RawKeys, RawLimits, RawLog, RawPostgres, RawRule,
    RawSecurity, RawServer, RawStorage, RawSubjects, RawTls,
};

use crate::{
    api::{IdentityLimits, Limits},
    authz::{IdentityPattern, Policy, PurposeSet, Rule, Scope},
    fields::FieldRegistry,
    store::Durability,
};

/// The longest `limits.request_id_hours`: 30 days.
const MAX_REQUEST_ID_HOURS: u64 = 720;

/// The validated configuration. Holding one means every field is usable.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory of the RocksDB database.
    pub data_dir: PathBuf,
    /// Write durability.
    pub durability: Durability,
    /// The mTLS gRPC address.
    pub listen: SocketAddr,
    /// The plaintext health address.
    pub health_listen: SocketAddr,
    /// The plaintext metrics address.
    pub metrics_listen: SocketAddr,
    /// Per-identity limits.
    pub identity_limits: IdentityLimits,
    /// Connection and request bounds of the mTLS port.
    pub connections: ConnectionLimits,
    /// Graceful shutdown deadline.
    pub shutdown_grace: Duration,
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
    /// Certificate files.
    pub tls: TlsFiles,
    /// Where the master key is.
    pub master_key: crate::crypto::MasterKeySetting,
    /// The PKCS#11 modules a master-key rotation may load: the configured
    /// master key's and `keys.allowed_pkcs11_modules`.
    pub pkcs11_modules: Vec<PathBuf>,
    /// Request limits.
    pub limits: Limits,
    /// Block cache size in bytes.
    pub block_cache_bytes: usize,
    /// Which engine stores the vault, and how to reach it.
    pub engine: EngineSetting,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// How often the audit chain head is signed.
    pub audit_checkpoint_interval: Duration,
    /// How long audit events are kept; `None`: forever.
    pub audit_retention: Option<Duration>,
    /// How often refusal counts are written.
    pub audit_refusal_interval: Duration,
    /// Where the erasure ledger is.
    pub erasure_ledger: LedgerSetting,
    /// What to do when the ledger is older than the vault's record of it
    /// (set by `serve --accept-restored-ledger`, never by the file).
    pub ledger_rollback: crate::vault::LedgerRollback,
    /// How often expired values are purged.
    pub retention_sweep_interval: Duration,
    /// The most tokens one data subject may have.
    pub max_tokens_per_subject: usize,
    /// How long a caller's request id is remembered.
    pub request_id_window: Duration,
    /// Lock memory at start.
    pub lock_memory: bool,
    /// SPIFFE trust domains whose identities are accepted; empty for any.
    pub trust_domains: Vec<String>,
    /// Known field types and their settings.
    pub field_types: FieldRegistry,
    /// The access policy.
    pub policy: Policy,
    /// What the configuration was parsed from, for `config check`.
    pub raw: RawConfig,
    /// The file it was loaded from, if any: reloaded on SIGHUP or change.
    pub source_file: Option<PathBuf>,
    /// How often watched files are checked for changes.
    pub reload_poll: Duration,
}

/// Paths of the TLS material.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// Client CA bundle (PEM).
    pub client_ca: PathBuf,
    /// Certificate revocation lists (PEM).
    pub crls: Vec<PathBuf>,
}

/// What bounds the connections of the mTLS port.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections at once.
    pub max_connections: usize,
    /// Open requests per connection.
    pub max_concurrent_streams: u32,
    /// Deadline of one request.
    pub request_timeout: Duration,
    /// Age after which a connection is asked to go away.
    pub max_connection_age: Duration,
}

/// A configuration error; the message says which key and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment could not be parsed (syntax, unknown key, type).
    #[error("{0}")]
    Parse(#[from] Box<figment::Error>),
    /// A named config file does not exist.
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    /// A value parsed but is not acceptable.
    #[error("invalid config: {key}: {message}")]
    Invalid {
        /// The config key, e.g. `server.listen`.
        key: String,
        /// What is wrong and what is expected.
        message: String,
    },
}

/// A database to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseSetting {
    /// The connection string, without a password.
    pub connection: String,
    /// Where the password is, if the database wants one.
    pub password_file: Option<PathBuf>,
    /// The CA certificates for TLS to the database, if it is used.
    pub ca_file: Option<PathBuf>,
    /// How long calls, locks, silent transactions and the lease may last.
    pub bounds: crate::store::postgres::Bounds,
}

/// What a [`DatabaseSetting`]'s files hold.
pub struct DatabaseSecrets {
    /// The password, if the setting names a file for one.
    password: Option<zeroize::Zeroizing<String>>,
    /// The CA certificates (PEM) for TLS, if the setting names them.
    pub ca: Option<Vec<u8>>,
}

impl DatabaseSecrets {
    /// The password, if there is one.
    pub fn password(&self) -> Option<&str> {
        self.password.as_ref().map(|p| p.as_str())
    }
}

impl DatabaseSetting {
    /// Reads the password and the CA certificates this setting (the table
    /// at `key`) points to, each from its file.
    ///
    /// # Errors
    /// A file that cannot be read, or an empty password file, named with
    /// its key (never with what it holds).
    pub fn read_secrets(&self, key: &str) -> Result<DatabaseSecrets, String> {
        let bad = |setting: &str, path: &Path, message: String| {
            format!("{key}.{setting} {}: {message}", path.display())
        };
        let password = match &self.password_file {
            Some(path) => {
                // Read as the key and PIN files are: refused if group or
                // others may read it.
                let bytes = crate::crypto::read_protected(path, "the database password file")
                    .map_err(|e| format!("{key}.password_file: {e}"))?;
                let text = zeroize::Zeroizing::new(
                    std::str::from_utf8(&bytes)
                        .map_err(|_| bad("password_file", path, "is not UTF-8".into()))?
                        .to_owned(),
                );
                let password =
                    zeroize::Zeroizing::new(text.lines().next().unwrap_or_default().to_owned());
                if password.is_empty() {
                    return Err(bad("password_file", path, "is empty".into()));
                }
                Some(password)
            }
            None => None,
        };
        let ca = match &self.ca_file {
            Some(path) => {
                Some(std::fs::read(path).map_err(|e| bad("ca_file", path, e.to_string()))?)
            }
            None => None,
        };
        Ok(DatabaseSecrets { password, ca })
    }

    /// Checks `raw` (the table at `key`): see
    /// [`crate::store::postgres::check_connection`] and
    /// [`crate::store::postgres::Bounds::check`].
    fn parse(key: &str, raw: &RawPostgres) -> Result<Self, ConfigError> {
        crate::store::postgres::check_connection(key, &raw.connection, raw.ca_file.is_some())
            .map_err(|message| invalid(format!("{key}.connection"), message))?;
        let ms = |name: &str, value: u64| millis(&format!("{key}.{name}"), value);
        let bounds = crate::store::postgres::Bounds {
            call: ms("call_timeout_ms", raw.call_timeout_ms)?,
            lock: ms("lock_timeout_ms", raw.lock_timeout_ms)?,
            idle_in_transaction: ms(
                "idle_in_transaction_timeout_ms",
                raw.idle_in_transaction_timeout_ms,
            )?,
            lease: ms("lease_timeout_ms", raw.lease_timeout_ms)?,
            keepalive: ms("keepalive_ms", raw.keepalive_ms)?,
        };
        bounds
            .check(key)
            .map_err(|refused| invalid(refused.key, refused.message))?;
        Ok(Self {
            connection: raw.connection.clone(),
            password_file: raw.password_file.as_ref().map(RelativePathBuf::relative),
            ca_file: raw.ca_file.as_ref().map(RelativePathBuf::relative),
            bounds,
        })
    }
}

/// Which engine stores the vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineSetting {
    /// Embedded RocksDB in `data_dir`.
    RocksDb,
    /// A PostgreSQL database shared by the replicas.
    Postgres(DatabaseSetting),
}

fn engine_setting(raw: &RawStorage) -> Result<EngineSetting, ConfigError> {
    match (raw.engine, &raw.postgres) {
        (EngineName::RocksDb, None) => Ok(EngineSetting::RocksDb),
        (EngineName::RocksDb, Some(_)) => Err(invalid(
            "storage.postgres",
            "is set but storage.engine is \"rocksdb\"; set engine = \"postgres\" or remove it",
        )),
        (EngineName::Postgres, None) => Err(invalid(
            "storage.postgres.connection",
            "is required with engine = \"postgres\" (e.g. \"host=db.internal user=vault dbname=vault\")",
        )),
        (EngineName::Postgres, Some(pg)) => Ok(EngineSetting::Postgres(DatabaseSetting::parse(
            "storage.postgres",
            pg,
        )?)),
    }
}

/// Where the erasure ledger is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerSetting {
    /// A file outside `data_dir` (one vault process).
    File(PathBuf),
    /// A table in a database of its own, shared by replicas.
    Database(DatabaseSetting),
}

fn ledger_setting(
    raw: &RawSubjects,
    data_dir: &std::path::Path,
    engine: &EngineSetting,
) -> Result<LedgerSetting, ConfigError> {
    const FILE: &str = "subjects.erasure_ledger";
    const DATABASE: &str = "subjects.erasure_ledger_database";
    let setting = match (&raw.erasure_ledger, &raw.erasure_ledger_database) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                DATABASE,
                "and subjects.erasure_ledger are both set; keep one",
            ));
        }
        (None, None) => {
            return Err(invalid(
                FILE,
                "is required: the file where erasures are recorded, outside data_dir and best on a volume that is not restored with it (or [subjects.erasure_ledger_database] for replicas on a shared database)",
            ));
        }
        (Some(file), None) => {
            let path = file.relative();
            if path.starts_with(data_dir) {
                return Err(invalid(
                    FILE,
                    "must be outside data_dir: restoring the data directory must not roll the ledger back",
                ));
            }
            LedgerSetting::File(path)
        }
        (None, Some(database)) => {
            LedgerSetting::Database(DatabaseSetting::parse(DATABASE, database)?)
        }
    };
    match (engine, &setting) {
        (EngineSetting::Postgres(_), LedgerSetting::File(_)) => Err(invalid(
            FILE,
            "is a file, which serves one process: replicas on a shared database keep the ledger in [subjects.erasure_ledger_database], a database other than storage.postgres's",
        )),
        (EngineSetting::Postgres(storage), LedgerSetting::Database(ledger))
            if crate::store::postgres::same_database(&storage.connection, &ledger.connection) =>
        {
            Err(invalid(
                format!("{DATABASE}.connection"),
                "names the vault's own database: a restore of it would roll the ledger back with the data; use a database that is backed up and restored on its own",
            ))
        }
        _ => Ok(setting),
    }
}

/// One rule for every count, size and duration setting: a value below its
/// least is an error naming the key, never silently raised.
fn at_least<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    least: T,
) -> Result<T, ConfigError> {
    if value < least {
        return Err(invalid(key, format!("must be at least {least}")));
    }
    Ok(value)
}

/// A number of seconds, at least 1.
fn seconds(key: &str, value: u64) -> Result<Duration, ConfigError> {
    Ok(Duration::from_secs(at_least(key, value, 1)?))
}

/// A number of milliseconds, at least 1.
fn millis(key: &str, value: u64) -> Result<Duration, ConfigError> {
    Ok(Duration::from_millis(at_least(key, value, 1)?))
}

/// `[limits]`, checked: each at least its least, the request buffer able
/// to hold one message.
fn request_limits(raw: &RawLimits) -> Result<Limits, ConfigError> {
    let limits = Limits {
        max_items_per_request: at_least(
            "limits.max_items_per_request",
            raw.max_items_per_request,
            1,
        )?,
        max_value_bytes: at_least("limits.max_value_bytes", raw.max_value_bytes, 1)?,
        max_message_bytes: at_least("limits.max_message_bytes", raw.max_message_bytes, 1024)?,
        max_concurrent_requests: at_least(
            "limits.max_concurrent_requests",
            raw.max_concurrent_requests,
            1,
        )?,
        max_request_buffer_bytes: at_least(
            "limits.max_request_buffer_mib",
            raw.max_request_buffer_mib,
            1,
        )?
        .saturating_mul(1 << 20),
    };
    if limits.max_request_buffer_bytes < limits.max_message_bytes {
        return Err(invalid(
            "limits.max_request_buffer_mib",
            "must hold at least one message of limits.max_message_bytes",
        ));
    }
    Ok(limits)
}

/// `limits.request_id_hours`, 1 to 720.
fn request_id_window(hours: u64) -> Result<Duration, ConfigError> {
    if !(1..=MAX_REQUEST_ID_HOURS).contains(&hours) {
        return Err(invalid(
            "limits.request_id_hours",
            format!("must be from 1 to {MAX_REQUEST_ID_HOURS} (30 days)"),
        ));
    }
    Ok(Duration::from_secs(hours * 3600))
}

/// The connection limits of `[server]`, checked.
fn connection_limits(raw: &RawServer) -> Result<ConnectionLimits, ConfigError> {
    Ok(ConnectionLimits {
        max_connections: at_least("server.max_connections", raw.max_connections, 1)?,
        max_concurrent_streams: at_least(
            "server.max_concurrent_streams",
            raw.max_concurrent_streams,
            1,
        )?,
        request_timeout: seconds(
            "server.request_timeout_seconds",
            raw.request_timeout_seconds,
        )?,
        max_connection_age: seconds(
            "server.max_connection_age_seconds",
            raw.max_connection_age_seconds,
        )?,
    })
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Exactly one of `keys.master_key_file`, `keys.master_key_env`,
/// `[keys.pkcs11]` and `[keys.shares]`.
fn master_key_setting(keys: &raw::RawKeys) -> Result<crate::crypto::MasterKeySetting, ConfigError> {
    use crate::crypto::{MasterKeySetting, Pkcs11Setting, SharesSetting};
    let set = [
        keys.master_key_file.is_some(),
        keys.master_key_env.is_some(),
        keys.pkcs11.is_some(),
        keys.shares.is_some(),
    ];
    if set.iter().filter(|set| **set).count() > 1 {
        return Err(invalid(
            "keys",
            "set one of master_key_file, master_key_env, [keys.pkcs11] and [keys.shares]",
        ));
    }
    if let Some(var) = &keys.master_key_env {
        return Ok(MasterKeySetting::Env(var.clone()));
    }
    if let Some(shares) = &keys.shares {
        if shares.threshold < 2 {
            return Err(invalid(
                "keys.shares.threshold",
                "must be at least 2 (one share would be the key itself)",
            ));
        }
        let commitments = shares
            .commitments
            .iter()
            .map(|hex| {
                data_encoding::HEXLOWER_PERMISSIVE
                    .decode(hex.trim().as_bytes())
                    .ok()
                    .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid("keys.shares.commitments", "each must be 64 hex digits"))?;
        let distinct: std::collections::HashSet<_> = commitments.iter().collect();
        if distinct.len() != commitments.len() {
            return Err(invalid(
                "keys.shares.commitments",
                "lists a share twice (each names one share)",
            ));
        }
        if commitments.len() < usize::from(shares.threshold) {
            return Err(invalid(
                "keys.shares.commitments",
                format!(
                    "must list the commitment of every share ({} given, the threshold is {}): `tokenvault keys split-master` prints them; for shares split before this release, each holder runs `tokenvault unseal --print-commitment` (nothing is sent)",
                    commitments.len(),
                    shares.threshold
                ),
            ));
        }
        return Ok(MasterKeySetting::Shares(SharesSetting {
            threshold: shares.threshold,
            socket: shares.socket.relative(),
            commitments,
        }));
    }
    if let Some(pkcs11) = &keys.pkcs11 {
        for (key, value) in [
            ("keys.pkcs11.token_label", &pkcs11.token_label),
            ("keys.pkcs11.key_label", &pkcs11.key_label),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        return Ok(MasterKeySetting::Pkcs11(Pkcs11Setting {
            module: pkcs11.module.relative(),
            token_label: pkcs11.token_label.clone(),
            key_label: pkcs11.key_label.clone(),
            pin_file: pkcs11.pin_file.relative(),
        }));
    }
    keys.master_key_file
        .as_ref()
        .map(|file| MasterKeySetting::File(file.relative()))
        .ok_or_else(|| {
            invalid(
                "keys.master_key_file",
                "is required (or master_key_env, [keys.pkcs11] or [keys.shares])",
            )
        })
}

impl Config {
    /// Where the master key comes from.
    pub fn master_key_source(&self) -> Box<dyn crate::crypto::MasterKeySource> {
        self.master_key.source()
    }

    /// The standard layers: defaults, then `file` if given, then the
    /// `TOKENVAULT_` environment.
    ///
    /// # Errors
    /// If `file` is given but does not exist.
    pub fn figment(file: Option<&Path>) -> Result<Figment, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(RawConfig::default()));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError::MissingFile(file.to_owned()));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        Ok(figment.merge(Env::prefixed("TOKENVAULT_").split("__")))
    }

    /// Where the vault of `file` (and the environment) is stored: its
    /// `data_dir` and its engine, read without checking the rest of the
    /// configuration, which a tool reading a stopped vault's data does
    /// not need.
    ///
    /// # Errors
    /// See [`ConfigError`].
    pub fn storage_of(file: Option<&Path>) -> Result<(PathBuf, EngineSetting), ConfigError> {
        let raw: RawConfig = Self::figment(file)?.extract().map_err(Box::new)?;
        Ok((raw.data_dir.relative(), engine_setting(&raw.storage)?))
    }

    /// The vault's engine and its erasure ledger's place, as
    /// [`Config::storage_of`] reads them: all `tokenvault migrate` needs
    /// (its config names the databases and the owner, nothing else).
    ///
    /// # Errors
    /// See [`ConfigError`].
    pub fn databases_of(file: &Path) -> Result<(EngineSetting, LedgerSetting), ConfigError> {
        let raw: RawConfig = Self::figment(Some(file))?.extract().map_err(Box::new)?;
        let engine = engine_setting(&raw.storage)?;
        let ledger = ledger_setting(&raw.subjects, &raw.data_dir.relative(), &engine)?;
        Ok((engine, ledger))
    }

    /// Loads and validates the standard layers.
    ///
    /// # Errors
    /// See [`ConfigError`].
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config = Self::from_figment(&Self::figment(file)?)?;
        config.source_file = file.map(Path::to_owned);
        Ok(config)
    }

    /// Extracts and validates a configuration from any figment (tests build
    /// one from strings instead of touching the process environment).
    ///
    /// # Errors
    /// See [`ConfigError`].
    pub fn from_figment(figment: &Figment) -> Result<Self, ConfigError> {
        let raw: RawConfig = figment.extract().map_err(Box::new)?;
        Self::validate(raw)
    }

    fn validate(raw: RawConfig) -> Result<Self, ConfigError> {
        let addr = |key: &str, value: &str| {
            value
                .parse::<SocketAddr>()
                .map_err(|_| invalid(key, format!("{value:?} is not an IP:port socket address")))
        };
        let listen = addr("server.listen", &raw.server.listen)?;
        let health_listen = addr("server.health_listen", &raw.server.health_listen)?;
        let metrics_listen = addr("server.metrics_listen", &raw.server.metrics_listen)?;
        if raw.limits.per_identity_rate < 0.0 || !raw.limits.per_identity_rate.is_finite() {
            return Err(invalid(
                "limits.per_identity_rate",
                "must be 0 (unlimited) or a positive number",
            ));
        }
        let identity_limits = IdentityLimits {
            concurrency: raw.limits.per_identity_concurrency,
            rate: raw.limits.per_identity_rate,
            burst: raw
                .limits
                .per_identity_burst
                .unwrap_or(raw.limits.per_identity_rate),
        };
        let required = |key: &str, value: &Option<RelativePathBuf>| {
            value
                .as_ref()
                .map(RelativePathBuf::relative)
                .ok_or_else(|| invalid(key, "is required"))
        };
        let tls = TlsFiles {
            cert: required("tls.cert", &raw.tls.cert)?,
            key: required("tls.key", &raw.tls.key)?,
            client_ca: required("tls.client_ca", &raw.tls.client_ca)?,
            crls: raw
                .tls
                .crl_files
                .iter()
                .map(RelativePathBuf::relative)
                .collect(),
        };
        let master_key = master_key_setting(&raw.keys)?;
        let mut pkcs11_modules: Vec<PathBuf> = raw
            .keys
            .allowed_pkcs11_modules
            .iter()
            .map(RelativePathBuf::relative)
            .collect();
        if let crate::crypto::MasterKeySetting::Pkcs11(setting) = &master_key {
            pkcs11_modules.push(setting.module.clone());
        }

        let limits = request_limits(&raw.limits)?;
        let connections = connection_limits(&raw.server)?;

        let field_types = FieldRegistry::from_raw(&raw.field_types, limits.max_value_bytes)
            .map_err(|e| invalid(e.key, e.message))?;

        let policy = parse_policy(&raw.policy, &field_types)?;
        let policy = declare_purposes(policy, &raw, &field_types)?;
        let data_dir = raw.data_dir.relative();
        let engine = engine_setting(&raw.storage)?;
        let erasure_ledger = ledger_setting(&raw.subjects, &data_dir, &engine)?;
        for domain in &raw.tls.trust_domains {
            if !crate::token::is_hostname(domain) {
                return Err(invalid(
                    "tls.trust_domains",
                    format!("{domain:?} is not a trust domain name"),
                ));
            }
        }
        Ok(Self {
            data_dir,
            durability: raw.durability,
            listen,
            health_listen,
            metrics_listen,
            identity_limits,
            connections,
            shutdown_grace: seconds(
                "server.shutdown_grace_seconds",
                raw.server.shutdown_grace_seconds,
            )?,
            handshake_timeout: millis(
                "server.handshake_timeout_ms",
                raw.server.handshake_timeout_ms,
            )?,
            tls,
            master_key,
            pkcs11_modules,
            limits,
            block_cache_bytes: raw.storage.block_cache_mib << 20,
            engine,
            log_format: raw.log.format,
            log_level: raw.log.level.clone(),
            audit_checkpoint_interval: seconds(
                "audit.checkpoint_interval_seconds",
                raw.audit.checkpoint_interval_seconds,
            )?,
            audit_refusal_interval: seconds(
                "audit.refusal_interval_seconds",
                raw.audit.refusal_interval_seconds,
            )?,
            audit_retention: (raw.audit.retention_days > 0)
                .then(|| Duration::from_secs(u64::from(raw.audit.retention_days) * 86_400)),
            erasure_ledger,
            ledger_rollback: crate::vault::LedgerRollback::Refuse,
            retention_sweep_interval: seconds(
                "subjects.retention_sweep_interval_seconds",
                raw.subjects.retention_sweep_interval_seconds,
            )?,
            max_tokens_per_subject: at_least(
                "subjects.max_tokens_per_subject",
                raw.subjects.max_tokens_per_subject,
                1,
            )?,
            request_id_window: request_id_window(raw.limits.request_id_hours)?,
            lock_memory: raw.security.lock_memory,
            trust_domains: raw.tls.trust_domains.clone(),
            field_types,
            policy,
            reload_poll: seconds("server.reload_poll_seconds", raw.server.reload_poll_seconds)?,
            raw,
            source_file: None,
        })
    }

    /// The effective configuration as TOML, for `tokenvault config check`.
    /// It holds paths, never key material, so nothing needs redacting yet;
    /// keep it that way when adding inline secrets.
    ///
    /// # Errors
    /// If serialization fails.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        self.raw.to_toml()
    }
}

impl RawConfig {
    /// This configuration as TOML, with every path shown resolved (figment
    /// serializes its relative paths as an internal table otherwise).
    ///
    /// # Errors
    /// If serialization fails.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        let mut value = toml::Value::try_from(self)?;
        resolve_relative_paths(&mut value);
        toml::to_string_pretty(&value)
    }
}

/// Replaces figment's `RelativePathBuf` tables by the path they resolve to.
fn resolve_relative_paths(value: &mut toml::Value) {
    const PATH: &str = "___figment_relative_path";
    const BASE: &str = "___figment_relative_metadata_path";
    match value {
        toml::Value::Table(table) => {
            if let Some(toml::Value::String(path)) = table.get(PATH) {
                let path = Path::new(path);
                let resolved = match table.get(BASE) {
                    Some(toml::Value::String(base)) if path.is_relative() => Path::new(base)
                        .parent()
                        .map_or_else(|| path.to_owned(), |dir| dir.join(path)),
                    _ => path.to_owned(),
                };
                *value = toml::Value::String(resolved.display().to_string());
                return;
            }
            for (_, item) in table.iter_mut() {
                resolve_relative_paths(item);
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(resolve_relative_paths),
        _ => {}
    }
}

/// `[purposes.*]`, checked against the policy. Declarations are optional;
/// once there is one, every purpose the policy or a field type names must
/// be declared (a typo is an error, not an undocumented purpose), and a
/// purpose whose legal basis is consent may reveal only field types that
/// check the subject's consent for it.
fn declare_purposes(
    policy: Policy,
    raw: &RawConfig,
    field_types: &FieldRegistry,
) -> Result<Policy, ConfigError> {
    use crate::authz::{LegalBasis, Purpose, PurposeDeclaration};
    let mut declarations = std::collections::BTreeMap::new();
    for (name, declared) in &raw.purposes {
        let key = format!("purposes.{name}");
        let purpose: Purpose = name
            .parse()
            .map_err(|e: crate::authz::PurposeError| invalid(&key, e.to_string()))?;
        if declared.description.trim().is_empty() {
            return Err(invalid(
                format!("{key}.description"),
                "must say what the purpose is",
            ));
        }
        let legal_basis: LegalBasis = declared
            .legal_basis
            .parse()
            .map_err(|e: String| invalid(format!("{key}.legal_basis"), e))?;
        declarations.insert(
            purpose,
            PurposeDeclaration {
                description: declared.description.trim().to_owned(),
                legal_basis,
            },
        );
    }
    if declarations.is_empty() {
        return Ok(policy);
    }
    let declared = |purpose: &str| declarations.keys().any(|p| p.as_str() == purpose);
    for (i, rule) in raw.policy.iter().enumerate() {
        if let Some(missing) = rule.purposes.iter().find(|p| *p != "*" && !declared(p)) {
            return Err(invalid(
                format!("policy[{i}].purposes"),
                format!("purpose {missing} is not declared under [purposes]"),
            ));
        }
    }
    for spec in field_types.iter() {
        if let Some(missing) = spec.consent_purposes.iter().find(|p| !declared(p)) {
            return Err(invalid(
                format!("field_types.{}.consent_purposes", spec.name),
                format!("purpose {missing} is not declared under [purposes]"),
            ));
        }
    }
    let policy = policy.with_declarations(declarations);
    for spec in field_types.iter() {
        for reveal in policy.reveal_purposes(&spec.name) {
            if let (Some(purpose), Some(declaration)) = (&reveal.purpose, &reveal.declaration)
                && declaration.legal_basis == LegalBasis::Consent
                && !spec.consent_purposes.contains(purpose.as_str())
            {
                return Err(invalid(
                    format!("purposes.{purpose}.legal_basis"),
                    format!(
                        "is consent, but the policy lets it reveal {} without checking consent: add it to field_types.{}.consent_purposes",
                        spec.name, spec.name
                    ),
                ));
            }
        }
    }
    Ok(policy)
}

fn parse_policy(rules: &[RawRule], field_types: &FieldRegistry) -> Result<Policy, ConfigError> {
    let mut parsed = Vec::with_capacity(rules.len());
    for (i, rule) in rules.iter().enumerate() {
        let key = format!("policy[{i}]");
        let identity = IdentityPattern::new(&rule.identity)
            .map_err(|e| invalid(format!("{key}.identity"), e.to_string()))?;
        let mut scopes = Vec::new();
        for scope in &rule.scopes {
            let scope: Scope = scope.parse().map_err(|e: crate::authz::ScopeError| {
                invalid(format!("{key}.scopes"), e.to_string())
            })?;
            if let crate::authz::FieldSelector::One(ft) = scope.fields()
                && !field_types.contains(ft)
            {
                return Err(invalid(
                    format!("{key}.scopes"),
                    format!("scope {scope} names field type {ft}, which is not configured"),
                ));
            }
            scopes.push(scope);
        }
        let purposes = if rule.purposes.iter().any(|p| p == "*") {
            PurposeSet::Any
        } else {
            let mut set = std::collections::BTreeSet::new();
            for purpose in &rule.purposes {
                set.insert(purpose.parse().map_err(|e: crate::authz::PurposeError| {
                    invalid(format!("{key}.purposes"), format!("{purpose:?}: {e}"))
                })?);
            }
            PurposeSet::Only(set)
        };
        parsed.push(Rule::new(identity, scopes, purposes));
    }
    Ok(Policy::new(parsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        data_dir = "/tmp/tv"
        [tls]
        cert = "/etc/tv/server.pem"
        key = "/etc/tv/server.key"
        client_ca = "/etc/tv/ca.pem"
        [keys]
        master_key_file = "/etc/tv/master.key"
        [subjects]
        erasure_ledger = "/var/lib/tv-ledger/erasures"
    "#;

    fn parse(extra: &str) -> Result<Config, ConfigError> {
        let figment = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::string(MINIMAL))
            .merge(Toml::string(extra));
        Config::from_figment(&figment)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.listen, "0.0.0.0:50051".parse().unwrap());
        assert_eq!(config.durability, Durability::Sync);
        assert_eq!(config.limits.max_items_per_request, 1000);
        assert!(config.field_types.contains(&"email".parse().unwrap()));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = parse("[server]\nlisten_addr = \"x\"").unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn missing_tls_is_named() {
        let figment = Figment::from(Serialized::defaults(RawConfig::default()));
        let err = Config::from_figment(&figment).unwrap_err();
        assert_eq!(err.to_string(), "invalid config: tls.cert: is required");
    }

    /// One rule for every count, size and duration: zero (or below the
    /// least) is an error naming the key, never silently raised.
    #[test]
    fn every_setting_below_its_least_is_named() {
        for (section, key, least) in [
            ("limits", "max_items_per_request", 1),
            ("limits", "max_value_bytes", 1),
            ("limits", "max_message_bytes", 1024),
            ("limits", "max_concurrent_requests", 1),
            ("limits", "max_request_buffer_mib", 1),
            ("server", "max_connections", 1),
            ("server", "max_concurrent_streams", 1),
            ("server", "request_timeout_seconds", 1),
            ("server", "max_connection_age_seconds", 1),
            ("server", "shutdown_grace_seconds", 1),
            ("server", "reload_poll_seconds", 1),
            ("server", "handshake_timeout_ms", 1),
            ("audit", "checkpoint_interval_seconds", 1),
            ("audit", "refusal_interval_seconds", 1),
            ("subjects", "retention_sweep_interval_seconds", 1),
            ("subjects", "max_tokens_per_subject", 1),
        ] {
            let below = if least == 1 { 0 } else { least - 1 };
            let err = parse(&format!("[{section}]\n{key} = {below}")).unwrap_err();
            assert!(
                err.to_string()
                    .contains(&format!("{section}.{key}: must be at least {least}")),
                "{section}.{key}: {err}"
            );
        }
    }

    #[test]
    fn bad_addresses_and_limits_are_named() {
        let err = parse("[server]\nlisten = \"localhost\"").unwrap_err();
        assert!(err.to_string().contains("server.listen"), "{err}");
        let err = parse("[limits]\nmax_items_per_request = 0").unwrap_err();
        assert!(
            err.to_string().contains("limits.max_items_per_request"),
            "{err}"
        );
        for hours in [0, 721] {
            let err = parse(&format!("[limits]\nrequest_id_hours = {hours}")).unwrap_err();
            assert!(err.to_string().contains("limits.request_id_hours"), "{err}");
        }
        let config = parse("[limits]\nrequest_id_hours = 720").unwrap();
        assert_eq!(config.request_id_window.as_secs(), 720 * 3600);
        let err = parse("[field_types.email]\nmax_value_bytes = 99999").unwrap_err();
        assert!(
            err.to_string()
                .contains("field_types.email.max_value_bytes"),
            "{err}"
        );
    }

    #[test]
    fn policies_are_parsed_strictly() {
        let ok = parse(
            r#"[[policy]]
            identity = "spiffe://shop/*"
            scopes = ["tokenize:*", "detokenize:email"]
            purposes = ["support"]"#,
        );
        assert!(ok.is_ok());
        let typo =
            parse("[[policy]]\nidentity = \"cn:x\"\nscopes = [\"detokenise:email\"]").unwrap_err();
        assert!(typo.to_string().contains("policy[0].scopes"), "{typo}");
        let unknown =
            parse("[[policy]]\nidentity = \"cn:x\"\nscopes = [\"detokenize:iban\"]").unwrap_err();
        assert!(unknown.to_string().contains("not configured"), "{unknown}");
        let purpose =
            parse("[[policy]]\nidentity = \"cn:x\"\npurposes = [\"Bad Purpose\"]").unwrap_err();
        assert!(
            purpose.to_string().contains("policy[0].purposes"),
            "{purpose}"
        );
    }

    /// Replicas on a shared database keep one ledger, in a database of its
    /// own: a file (one per replica) or the vault's own database (restored
    /// with the data) is refused, and so is setting both kinds.
    #[test]
    fn replicas_keep_the_erasure_ledger_in_a_database_of_their_own() {
        let without_ledger = MINIMAL.replace(
            "[subjects]\n        erasure_ledger = \"/var/lib/tv-ledger/erasures\"",
            "",
        );
        let parse = |extra: &str| {
            let figment = Figment::from(Serialized::defaults(RawConfig::default()))
                .merge(Toml::string(&without_ledger))
                .merge(Toml::string(extra));
            Config::from_figment(&figment)
        };
        const STORAGE: &str = "[storage]\nengine = \"postgres\"\n[storage.postgres]\nconnection = \"host=db1,db2 user=vault dbname=vault target_session_attrs=read-write sslmode=disable\"\n";
        let ok = parse(&format!(
            "{STORAGE}[subjects.erasure_ledger_database]\nconnection = \"host=ledger-db user=vault dbname=vault sslmode=disable\"\npassword_file = \"/run/secrets/ledger\"\n"
        ))
        .unwrap();
        assert!(matches!(
            &ok.erasure_ledger,
            LedgerSetting::Database(db) if db.password_file.as_deref() == Some(std::path::Path::new("/run/secrets/ledger"))
        ));

        let file = parse(&format!("{STORAGE}[subjects]\nerasure_ledger = \"/l/e\"\n")).unwrap_err();
        assert!(
            file.to_string()
                .contains("subjects.erasure_ledger: is a file"),
            "{file}"
        );
        // The same database under another spelling of its hosts.
        let same = parse(&format!(
            "{STORAGE}[subjects.erasure_ledger_database]\nconnection = \"postgres://vault@db2:5432/vault?sslmode=disable\"\n"
        ))
        .unwrap_err();
        assert!(
            same.to_string().contains("names the vault's own database"),
            "{same}"
        );
        let both = parse(
            "[subjects]\nerasure_ledger = \"/l/e\"\n[subjects.erasure_ledger_database]\nconnection = \"host=l dbname=l\"\n",
        )
        .unwrap_err();
        assert!(both.to_string().contains("both set"), "{both}");
        let password = parse(
            "[subjects.erasure_ledger_database]\nconnection = \"host=l dbname=l password=hunter2\"\n",
        )
        .unwrap_err();
        assert!(
            password
                .to_string()
                .contains("subjects.erasure_ledger_database.connection"),
            "{password}"
        );
        assert!(!password.to_string().contains("hunter2"), "{password}");
    }

    /// The PostgreSQL bounds: README's defaults, each settable, zero
    /// refused, and bounds that do not nest refused with the key named.
    /// The database password file is read as the key and PIN files are:
    /// refused while group or others may read it, its first line used.
    #[test]
    fn a_database_password_file_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("password");
        std::fs::write(&path, "s3cret-pw\nignored\n").unwrap();
        let setting = DatabaseSetting {
            connection: "host=/run/postgresql dbname=vault".into(),
            password_file: Some(path.clone()),
            ca_file: None,
            bounds: crate::store::postgres::Bounds::default(),
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let Err(refused) = setting.read_secrets("storage.postgres") else {
            panic!("a 0644 password file was read");
        };
        assert!(
            refused.contains("storage.postgres.password_file") && refused.contains("chmod 600"),
            "{refused}"
        );
        assert!(!refused.contains("s3cret-pw"), "{refused}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let read = setting.read_secrets("storage.postgres").unwrap();
        assert_eq!(read.password(), Some("s3cret-pw"));
    }

    #[test]
    fn database_bounds_default_nest_and_are_checked() {
        let without_ledger = MINIMAL.replace(
            "[subjects]\n        erasure_ledger = \"/var/lib/tv-ledger/erasures\"",
            "",
        );
        let parse = |bounds: &str| {
            let figment = Figment::from(Serialized::defaults(RawConfig::default()))
                .merge(Toml::string(&without_ledger))
                .merge(Toml::string(&format!(
                    "[storage]\nengine = \"postgres\"\n[storage.postgres]\nconnection = \"host=db user=vault dbname=vault sslmode=disable\"\n{bounds}\
                     [subjects.erasure_ledger_database]\nconnection = \"host=ledger user=vault dbname=ledger sslmode=disable\"\n"
                )));
            Config::from_figment(&figment)
        };
        let storage_bounds = |config: &Config| match &config.engine {
            EngineSetting::Postgres(db) => db.bounds,
            EngineSetting::RocksDb => unreachable!("configured for postgres"),
        };
        let defaults = parse("").unwrap();
        assert_eq!(
            storage_bounds(&defaults),
            crate::store::postgres::Bounds {
                call: Duration::from_millis(5000),
                lock: Duration::from_millis(3000),
                idle_in_transaction: Duration::from_millis(1000),
                lease: Duration::from_millis(5000),
                keepalive: Duration::from_millis(5000),
            }
        );
        let set = parse("call_timeout_ms = 9000\nlock_timeout_ms = 8000\nidle_in_transaction_timeout_ms = 500\nlease_timeout_ms = 7000\nkeepalive_ms = 2000\n").unwrap();
        assert_eq!(storage_bounds(&set).call, Duration::from_millis(9000));
        assert_eq!(
            storage_bounds(&set).idle_in_transaction,
            Duration::from_millis(500)
        );
        let zero = parse("lease_timeout_ms = 0\n").unwrap_err().to_string();
        assert!(
            zero.contains("storage.postgres.lease_timeout_ms: must be at least 1"),
            "{zero}"
        );
        // Several hosts without asking for the one that takes writes.
        let figment = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::string(&without_ledger))
            .merge(Toml::string(
                "[storage]\nengine = \"postgres\"\n[storage.postgres]\nconnection = \"host=db1,db2 user=vault dbname=vault sslmode=disable\"\n\
                 [subjects.erasure_ledger_database]\nconnection = \"host=ledger user=vault dbname=ledger sslmode=disable\"\n",
            ));
        let hosts = Config::from_figment(&figment).unwrap_err().to_string();
        assert!(
            hosts.contains("storage.postgres.connection: names several hosts; add target_session_attrs=read-write"),
            "{hosts}"
        );
        let tangled = parse("lock_timeout_ms = 6000\n").unwrap_err().to_string();
        assert!(
            tangled.contains("storage.postgres.lock_timeout_ms: 6000 ms must be less than storage.postgres.call_timeout_ms"),
            "{tangled}"
        );
    }

    #[test]
    fn later_layers_override_earlier_ones() {
        // The same merge order as `Config::figment`, with a string standing in
        // for the environment layer (tests never mutate the process
        // environment).
        let config =
            parse("durability = \"buffered\"\n[server]\nlisten = \"127.0.0.1:7000\"").unwrap();
        assert_eq!(config.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(config.durability, Durability::Buffered);
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tv.toml");
        std::fs::write(
            &file,
            "data_dir = \"data\"\n[tls]\ncert = \"s.pem\"\nkey = \"s.key\"\nclient_ca = \"ca.pem\"\n[keys]\nmaster_key_file = \"m.key\"\n[subjects]\nerasure_ledger = \"ledger/erasures\"",
        )
        .unwrap();
        let figment = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::file_exact(&file));
        let config = Config::from_figment(&figment).unwrap();
        assert_eq!(config.data_dir, dir.path().join("data"));
        assert_eq!(
            config.erasure_ledger,
            LedgerSetting::File(dir.path().join("ledger/erasures"))
        );
        assert_eq!(config.tls.cert, dir.path().join("s.pem"));
        assert!(matches!(
            &config.master_key,
            crate::crypto::MasterKeySetting::File(path) if *path == dir.path().join("m.key")
        ));
    }

    #[test]
    fn printed_config_shows_resolved_paths_and_parses_again() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tv.toml");
        std::fs::write(&file, format!("{MINIMAL}\n[storage]\nblock_cache_mib = 8")).unwrap();
        std::fs::write(
            &file,
            std::fs::read_to_string(&file)
                .unwrap()
                .replace("/tmp/tv", "data"),
        )
        .unwrap();
        let figment = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::file_exact(&file));
        let printed = Config::from_figment(&figment).unwrap().to_toml().unwrap();
        assert!(!printed.contains("___figment"), "{printed}");
        let data_dir = dir.path().join("data");
        assert!(
            printed.contains(&format!("data_dir = \"{}\"", data_dir.display())),
            "{printed}"
        );
        let again =
            Figment::from(Serialized::defaults(RawConfig::default())).merge(Toml::string(&printed));
        assert_eq!(
            Config::from_figment(&again).unwrap().block_cache_bytes,
            8 << 20
        );
    }

    #[test]
    fn the_master_key_comes_from_one_of_a_file_an_environment_variable_or_a_token() {
        let env = "[keys]\nmaster_key_file = \"/etc/tv/master.key\"\nmaster_key_env = \"TV_KEY\"";
        let err = parse(env).unwrap_err();
        assert!(err.to_string().contains("set one of"), "{err}");
        let hsm = "[keys.pkcs11]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"vault\"\nkey_label = \"kek\"\npin_file = \"/run/secrets/pin\"";
        let err = parse(hsm).unwrap_err();
        assert!(err.to_string().contains("set one of"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tv.toml");
        let only_hsm = MINIMAL.replace("master_key_file = \"/etc/tv/master.key\"", "")
            + &hsm.replace("/run/secrets/pin", "pin");
        std::fs::write(&file, &only_hsm).unwrap();
        let figment = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::file_exact(&file));
        let config = Config::from_figment(&figment).unwrap();
        let crate::crypto::MasterKeySetting::Pkcs11(setting) = &config.master_key else {
            panic!("expected the PKCS#11 source, got {:?}", config.master_key);
        };
        assert_eq!(setting.pin_file, dir.path().join("pin"));
        assert_eq!(setting.key_label, "kek");
        assert!(
            config
                .pkcs11_modules
                .contains(&PathBuf::from("/usr/lib/softhsm/libsofthsm2.so")),
            "the configured module is allowed for rotation"
        );
        std::fs::write(
            &file,
            only_hsm.replace("key_label = \"kek\"", "key_label = \"  \""),
        )
        .unwrap();
        let figment = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::file_exact(&file));
        let err = Config::from_figment(&figment).unwrap_err();
        assert!(err.to_string().contains("keys.pkcs11.key_label"), "{err}");

        // Shares: a threshold of one would be the key itself.
        let shares = MINIMAL.replace("master_key_file = \"/etc/tv/master.key\"", "")
            + "[keys.shares]\nthreshold = 2\nsocket = \"unseal.sock\"\ncommitments = [\"aa\"]\n";
        // Commitments: 64 hex digits each, at least one per share needed.
        std::fs::write(&file, &shares).unwrap();
        let figment = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::file_exact(&file));
        let err = Config::from_figment(&figment).unwrap_err().to_string();
        assert!(
            err.contains("keys.shares.commitments") && err.contains("64 hex"),
            "{err}"
        );
        let one = "ab".repeat(32);
        let shares = shares.replace("[\"aa\"]", &format!("[\"{one}\"]"));
        std::fs::write(&file, &shares).unwrap();
        let figment = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::file_exact(&file));
        let err = Config::from_figment(&figment).unwrap_err().to_string();
        assert!(err.contains("--print-commitment"), "{err}");
        std::fs::write(
            &file,
            shares.replace(&format!("[\"{one}\"]"), &format!("[\"{one}\", \"{one}\"]")),
        )
        .unwrap();
        let figment = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::file_exact(&file));
        let err = Config::from_figment(&figment).unwrap_err().to_string();
        assert!(err.contains("lists a share twice"), "{err}");
        let shares = shares.replace(
            &format!("[\"{one}\"]"),
            &format!("[\"{one}\", \"{}\"]", "cd".repeat(32)),
        );
        std::fs::write(&file, &shares).unwrap();
        let figment = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::file_exact(&file));
        let config = Config::from_figment(&figment).unwrap();
        assert_eq!(
            config.master_key,
            crate::crypto::MasterKeySetting::Shares(crate::crypto::SharesSetting {
                threshold: 2,
                socket: dir.path().join("unseal.sock"),
                commitments: vec![[0xab; 32], [0xcd; 32]],
            })
        );
        std::fs::write(&file, shares.replace("threshold = 2", "threshold = 1")).unwrap();
        let figment = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::file_exact(&file));
        let err = Config::from_figment(&figment).unwrap_err();
        assert!(err.to_string().contains("keys.shares.threshold"), "{err}");

        let figment = Figment::from(Serialized::defaults(RawConfig::default())).merge(
            Toml::string(&MINIMAL.replace(
                "master_key_file = \"/etc/tv/master.key\"",
                "master_key_env = \"TV_KEY\"",
            )),
        );
        let config = Config::from_figment(&figment).unwrap();
        assert!(config.master_key_source().describe().contains("TV_KEY"));
    }

    #[test]
    fn purposes_are_declared_with_a_legal_basis_and_checked_against_the_policy() {
        let policy = "[[policy]]\nidentity = \"spiffe://shop/support\"\nscopes = [\"detokenize:email\"]\npurposes = [\"support\"]\n";
        let support = "[purposes.support]\ndescription = \"Answering the customer's questions\"\nlegal_basis = \"contract\"\n";
        // Without declarations the policy stands as before.
        assert!(parse(policy).is_ok());
        let config = parse(&format!("{policy}{support}")).unwrap();
        let email: crate::token::FieldType = "email".parse().unwrap();
        let why = config.policy.reveal_purposes(&email);
        assert_eq!(why.len(), 1);
        assert_eq!(
            why[0].declaration.as_ref().unwrap().legal_basis,
            crate::authz::LegalBasis::Contract
        );

        let refused = |extra: &str, key: &str| {
            let err = parse(extra).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        };
        // Once there is one declaration, an undeclared purpose is a typo.
        refused(
            &format!(
                "{policy}{support}[[policy]]\nidentity = \"cn:x\"\nscopes = [\"detokenize:phone\"]\npurposes = [\"suport\"]\n"
            ),
            "policy[1].purposes",
        );
        refused(
            &format!("{policy}{support}[field_types.email]\nconsent_purposes = [\"marketing\"]\n"),
            "field_types.email.consent_purposes",
        );
        refused(
            &format!(
                "{policy}[purposes.support]\ndescription = \"x\"\nlegal_basis = \"because\"\n"
            ),
            "purposes.support.legal_basis",
        );
        refused(
            &format!(
                "{policy}[purposes.support]\ndescription = \" \"\nlegal_basis = \"contract\"\n"
            ),
            "purposes.support.description",
        );
        // Consent as the basis, but the field type never asks for it.
        let consent = support.replace("contract", "consent");
        refused(
            &format!("{policy}{consent}"),
            "purposes.support.legal_basis",
        );
        assert!(
            parse(&format!(
                "{policy}{consent}[field_types.email]\nconsent_purposes = [\"support\"]\n"
            ))
            .is_ok()
        );
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/tv.toml"))).unwrap_err();
        assert!(matches!(err, ConfigError::MissingFile(_)));
    }
}
