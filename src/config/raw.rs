//! The configuration as written: every table and key the file (or the
//! environment) may set, with its default. Validation into
//! [`super::Config`] is in `mod.rs`.

use std::{collections::BTreeMap, path::PathBuf};

use figment::value::magic::RelativePathBuf;
use serde::{Deserialize, Serialize};

use crate::{fields::RawFieldType, store::Durability};

/// The configuration exactly as figment produced it, before validation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Directory of the RocksDB database.
    pub data_dir: RelativePathBuf,
    /// `sync` (default) or `buffered`; see [`Durability`].
    pub durability: Durability,
    /// Listeners and timeouts.
    pub server: RawServer,
    /// Certificate files.
    pub tls: RawTls,
    /// Key files.
    pub keys: RawKeys,
    /// Request limits.
    pub limits: RawLimits,
    /// Storage tuning.
    pub storage: RawStorage,
    /// Logging.
    pub log: RawLog,
    /// The audit trail.
    pub audit: RawAudit,
    /// Data subjects: erasure ledger and retention.
    pub subjects: RawSubjects,
    /// Process hardening.
    pub security: RawSecurity,
    /// Field types the vault accepts, by name.
    pub field_types: BTreeMap<String, RawFieldType>,
    /// Access rules; default deny.
    pub policy: Vec<RawRule>,
    /// `[purposes.<name>]`: what each purpose is for and its legal basis.
    #[serde(default)]
    pub purposes: BTreeMap<String, RawPurpose>,
}

/// `[server]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Address of the mTLS gRPC port.
    pub listen: String,
    /// Address of the plaintext health port (for Kubernetes gRPC probes).
    pub health_listen: String,
    /// Address of the plaintext Prometheus metrics port (`GET /metrics`).
    pub metrics_listen: String,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_grace_seconds: u64,
    /// How long a client may take to finish the TLS handshake.
    pub handshake_timeout_ms: u64,
    /// How often certificate, CA, CRL and config files are checked for
    /// changes (they are also reloaded on SIGHUP).
    pub reload_poll_seconds: u64,
    /// Connections (handshaking or open) at once; past it a new connection
    /// is closed at once.
    pub max_connections: usize,
    /// Requests one HTTP/2 connection may have open at once.
    pub max_concurrent_streams: u32,
    /// The longest a request may run before it is answered
    /// `DEADLINE_EXCEEDED` (a client's shorter `grpc-timeout` wins).
    pub request_timeout_seconds: u64,
    /// A connection older than this is asked to go away (HTTP/2 GOAWAY) and
    /// the client reconnects, with a fresh handshake against the CRLs and
    /// certificates in force.
    pub max_connection_age_seconds: u64,
}

/// `[tls]`: PEM files. All three are required.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// The server certificate chain.
    pub cert: Option<RelativePathBuf>,
    /// The server private key.
    pub key: Option<RelativePathBuf>,
    /// The CA bundle client certificates must chain to.
    pub client_ca: Option<RelativePathBuf>,
    /// SPIFFE trust domains accepted in client identities (e.g.
    /// `["shop.example"]`); empty accepts any the CA signed.
    #[serde(default)]
    pub trust_domains: Vec<String>,
    /// PEM certificate revocation lists; a client certificate they revoke
    /// fails the handshake.
    #[serde(default)]
    pub crl_files: Vec<RelativePathBuf>,
}

/// `[keys]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeys {
    /// File holding the 256-bit master key (mode 0600 or stricter).
    pub master_key_file: Option<RelativePathBuf>,
    /// Development only: read the master key (64 hex digits) from this
    /// environment variable instead of a file. Warned at start.
    pub master_key_env: Option<String>,
    /// The master key inside an HSM, used through PKCS#11.
    pub pkcs11: Option<RawPkcs11>,
    /// The master key as K of N shares, entered by their holders at start
    /// (`tokenvault unseal`).
    pub shares: Option<RawShares>,
    /// PKCS#11 modules that `RotateMasterKey` may load to move the master
    /// key into a token (besides `pkcs11.module`). Loading a module runs its
    /// code in the vault, so a caller cannot name one that is not here.
    #[serde(default)]
    pub allowed_pkcs11_modules: Vec<RelativePathBuf>,
}

/// `[keys.shares]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShares {
    /// How many shares make the key (at least 2).
    pub threshold: u8,
    /// The unix socket the shares arrive on while the vault is sealed.
    pub socket: RelativePathBuf,
    /// The commitment of every share of the split (64 hex digits each), as
    /// `tokenvault keys split-master` prints them: no other share is taken.
    #[serde(default)]
    pub commitments: Vec<String>,
}

/// `[keys.pkcs11]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPkcs11 {
    /// The vendor's PKCS#11 module (a shared library).
    pub module: RelativePathBuf,
    /// The label of the token holding the key.
    pub token_label: String,
    /// The key's label (`CKA_LABEL`).
    pub key_label: String,
    /// File holding the token's user PIN (mode 0600 or stricter).
    pub pin_file: RelativePathBuf,
}

/// `[limits]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Most items (values or tokens) in one request.
    pub max_items_per_request: usize,
    /// Largest value, in bytes, unless a field type sets a smaller one.
    pub max_value_bytes: usize,
    /// Largest gRPC message the server decodes, in bytes.
    pub max_message_bytes: usize,
    /// Requests one client identity may have in flight (0: unlimited).
    pub per_identity_concurrency: usize,
    /// Requests per second one client identity may make (0: unlimited).
    pub per_identity_rate: f64,
    /// Requests one identity may make at once above its rate (default: the rate).
    pub per_identity_burst: Option<f64>,
    /// Requests in flight on the whole server, all identities together.
    pub max_concurrent_requests: usize,
    /// Request bytes received but not yet decoded, all requests together, in
    /// MiB; a request that would go over is refused. At least
    /// `max_message_bytes`.
    pub max_request_buffer_mib: usize,
    /// How long, in hours, a caller's `request_id` is remembered: the same
    /// request sent again within it gets the first answer. 1 to 720.
    pub request_id_hours: u64,
}

/// `[storage]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    /// `rocksdb` (the default: embedded, in `data_dir`) or `postgres`
    /// (replicas sharing one database; `[storage.postgres]`).
    #[serde(default)]
    pub engine: EngineName,
    /// RocksDB block cache size in MiB.
    pub block_cache_mib: usize,
    /// `[storage.postgres]`, for `engine = "postgres"`.
    #[serde(default)]
    pub postgres: Option<RawPostgres>,
}

/// A storage engine's name in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineName {
    /// Embedded RocksDB.
    #[default]
    RocksDb,
    /// PostgreSQL.
    Postgres,
}

/// `[storage.postgres]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    /// libpq-style (`host=db.internal user=vault dbname=vault`) or a URL,
    /// without a password.
    pub connection: String,
    /// A file holding the database password (never the config text).
    #[serde(default)]
    pub password_file: Option<RelativePathBuf>,
    /// CA certificates (PEM) the database server's certificate must chain
    /// to: with it, every connection uses TLS and checks the server's name.
    #[serde(default)]
    pub ca_file: Option<RelativePathBuf>,
    /// The client's deadline on one call, and the server's
    /// `statement_timeout`.
    #[serde(default = "default_call_timeout_ms")]
    pub call_timeout_ms: u64,
    /// How long a writer waits for another session's lock.
    #[serde(default = "default_lock_timeout_ms")]
    pub lock_timeout_ms: u64,
    /// How long the server keeps a transaction whose client went silent.
    #[serde(default = "default_idle_in_transaction_timeout_ms")]
    pub idle_in_transaction_timeout_ms: u64,
    /// How long the background-jobs lease outlives its last renewal.
    #[serde(default = "default_lease_timeout_ms")]
    pub lease_timeout_ms: u64,
    /// Idle time before TCP keepalives probe the peer.
    #[serde(default = "default_keepalive_ms")]
    pub keepalive_ms: u64,
}

// The defaults are `store::postgres::Bounds::default()`'s, in milliseconds.
fn default_call_timeout_ms() -> u64 {
    millis(crate::store::postgres::Bounds::default().call)
}
fn default_lock_timeout_ms() -> u64 {
    millis(crate::store::postgres::Bounds::default().lock)
}
fn default_idle_in_transaction_timeout_ms() -> u64 {
    millis(crate::store::postgres::Bounds::default().idle_in_transaction)
}
fn default_lease_timeout_ms() -> u64 {
    millis(crate::store::postgres::Bounds::default().lease)
}
fn default_keepalive_ms() -> u64 {
    millis(crate::store::postgres::Bounds::default().keepalive)
}
fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// `[log]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// `pretty` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `tokenvault=debug,info`.
    pub level: String,
}

/// `[audit]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// How often the chain head is signed, if it moved.
    pub checkpoint_interval_seconds: u64,
    /// Keep audit events this many days (0: forever). Events are pruned
    /// only up to a signed checkpoint, never past the last one.
    pub retention_days: u32,
    /// How often the counts of refused calls are written to the trail (one
    /// event per identity, method, outcome and purpose).
    pub refusal_interval_seconds: u64,
}

/// `[security]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecurity {
    /// Lock all memory (mlockall) so plaintext is never swapped to disk.
    /// Needs CAP_IPC_LOCK or a large enough RLIMIT_MEMLOCK.
    pub lock_memory: bool,
}

/// `[subjects]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSubjects {
    /// The erasure ledger file. Required, outside `data_dir`, and best on
    /// storage that is not snapshotted or restored with the data: a restore
    /// that rolls the ledger back with the data brings erased subjects back.
    pub erasure_ledger: Option<RelativePathBuf>,
    /// The erasure ledger in a database of its own (not the one the vault's
    /// data is in, and not restored with it), for replicas sharing a
    /// database: `[subjects.erasure_ledger_database]`, instead of
    /// `erasure_ledger`.
    #[serde(default)]
    pub erasure_ledger_database: Option<RawPostgres>,
    /// How often expired values are purged.
    pub retention_sweep_interval_seconds: u64,
    /// The most tokens one data subject may have; tokenizing more for that
    /// subject is refused (`RESOURCE_EXHAUSTED`). Bounds the cost of an
    /// export or an erasure.
    pub max_tokens_per_subject: usize,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// One `[purposes.<name>]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPurpose {
    /// What the purpose is, in words a data subject reads.
    pub description: String,
    /// consent, contract, legal_obligation, vital_interests, public_task or
    /// legitimate_interests (GDPR Art. 6(1)).
    pub legal_basis: String,
}

/// One `[[policy]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// Identity pattern: exact, or with `*` wildcards.
    pub identity: String,
    /// Scopes such as `tokenize:email` or `detokenize:*`.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Purposes the identity may state when detokenizing; `["*"]` for any.
    #[serde(default)]
    pub purposes: Vec<String>,
}

/// The field types every vault knows (named after their kinds), with their
/// default size limits.
const BUILTIN_FIELD_TYPES: [(&str, usize); 8] = [
    ("email", 320),
    ("phone", 64),
    ("name", 512),
    ("address", 1024),
    ("card_number", 64),
    ("date", 64),
    ("national_id", 128),
    ("text", 4096),
];

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/tokenvault").into(),
            durability: Durability::Sync,
            server: RawServer {
                listen: "0.0.0.0:50051".into(),
                health_listen: "0.0.0.0:50052".into(),
                metrics_listen: "0.0.0.0:9090".into(),
                shutdown_grace_seconds: 30,
                handshake_timeout_ms: 10_000,
                reload_poll_seconds: 10,
                max_connections: 4096,
                max_concurrent_streams: 128,
                request_timeout_seconds: 60,
                max_connection_age_seconds: 3600,
            },
            tls: RawTls::default(),
            keys: RawKeys::default(),
            limits: RawLimits {
                max_items_per_request: 1000,
                max_value_bytes: 4096,
                max_message_bytes: 4 << 20,
                per_identity_concurrency: 64,
                per_identity_rate: 0.0,
                per_identity_burst: None,
                max_concurrent_requests: 512,
                max_request_buffer_mib: 128,
                request_id_hours: 24,
            },
            storage: RawStorage {
                engine: EngineName::RocksDb,
                block_cache_mib: 64,
                postgres: None,
            },
            log: RawLog {
                format: LogFormat::Pretty,
                level: "info".into(),
            },
            audit: RawAudit {
                checkpoint_interval_seconds: 10,
                retention_days: 0,
                refusal_interval_seconds: 10,
            },
            subjects: RawSubjects {
                erasure_ledger: None,
                erasure_ledger_database: None,
                retention_sweep_interval_seconds: 300,
                max_tokens_per_subject: 10_000,
            },
            security: RawSecurity::default(),
            field_types: BUILTIN_FIELD_TYPES
                .iter()
                .map(|(name, max)| {
                    let settings = RawFieldType {
                        max_value_bytes: Some(*max),
                        ..RawFieldType::default()
                    };
                    ((*name).to_owned(), settings)
                })
                .collect(),
            policy: Vec::new(),
            purposes: BTreeMap::new(),
        }
    }
}
