//! The PostgreSQL engine behind [`Store`], for vault replicas that share one
//! (replicated) database instead of each owning a RocksDB directory.
//!
//! One table holds every [`Table`]'s keys and values (`tokenvault_kv`, keyed
//! by table name and key, so keys sort byte-wise as in RocksDB). Writes go
//! through a few committer tasks per process ([`COMMITTERS`]), each taking
//! the batches waiting in the shared queue into one transaction, as the
//! RocksDB committer takes them into one write. A transaction first locks
//! every key its units guard or write (advisory locks, in one order), so
//! guards are checked against everything committed before by any
//! committer of any replica, while transactions on different keys run at
//! once; it locks the single row of the audit chain's head
//! (`tokenvault_audit_head`) last, to append its events, so the events of
//! all replicas form one hash chain in commit order (see `group`). Commits
//! are synchronous (`synchronous_commit = on`): an acknowledged write is
//! on the primary's disk, and on a synchronous standby's if the cluster
//! has one.
//!
//! Chosen with `storage.engine = "postgres"`. A lost connection is made
//! again by the next call that needs it, so a vault follows a failover to
//! whichever host of its setting takes writes. Every call has a deadline
//! and every session the server's timeouts ([`Bounds`]), so a replica that
//! stops mid-transaction holds the others up for a bounded time. With a CA
//! configured every connection is TLS (rustls), the server's certificate
//! checked against that CA and the host name.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, GenericClient, NoTls, config::SslMode};

pub use self::{
    bounds::{Bounds, BoundsError},
    snapshot::PgSnapshot,
};
use self::{
    history::History,
    reads::{Read, Reads},
};
use super::{
    Batch, Error, KeyValues, Store, StoreStats, Table, UnitOutcomes,
    chain::{self, Head},
    commit::{COMMIT_QUEUE_DEPTH, Commit, Committed, MAX_GROUP_BATCHES},
};

/// The schema version this binary creates and understands.
///
/// Version 2 has the tables of version 1; what changed is how writers
/// take turns (key locks, then the head, instead of the head first). A
/// writer of version 1 does not take the key locks, so it must not write
/// beside one of version 2: the version row makes a release that knows
/// only version 1 refuse to start on a database a newer one has used.
pub const SCHEMA_VERSION: i32 = 2;

/// How many committer tasks (each with its own connection and one
/// transaction at a time) a process runs. Two transactions overlap their
/// statements and wait for the head only to append their events and
/// commit. On the 2-core machine of BENCHMARKS.md two beat one by a fifth
/// to a third on tokenize-batch, and four lost to two on every scenario
/// (smaller groups, more transactions, on cores already full).
pub const COMMITTERS: usize = 2;

/// How many key locks a committer gathers into one transaction before it
/// stops taking queued batches (one batch larger than this still goes,
/// alone, and past `group::MAX_KEY_LOCKS` it locks out the other writers
/// instead of its keys). PostgreSQL's lock table holds about
/// `max_locks_per_transaction × max_connections` locks (6,400 by default,
/// about 12,000 in practice), shared by every session: each replica holds
/// at most [`COMMITTERS`] groups' worth at a time.
const MAX_GROUP_LOCKS: usize = 1024;

/// Taken (transaction-scoped) while the schema is created or migrated, so
/// replicas starting together do it once. Any constant; never change it.
const SCHEMA_LOCK: i64 = 0x746f_6b65_6e76_6c74;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokenvault_schema (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version integer NOT NULL
);
CREATE TABLE IF NOT EXISTS tokenvault_kv (
    tbl text NOT NULL,
    key bytea NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (tbl, key)
);
CREATE TABLE IF NOT EXISTS tokenvault_audit_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    seq bigint NOT NULL,
    hash bytea NOT NULL
);
";

/// Why a vault on PostgreSQL makes no backups of its own.
pub const BACKED_UP_BY_POSTGRES: &str = "a vault on PostgreSQL is backed up with PostgreSQL's own tools (pg_basebackup, point-in-time recovery), not by the vault";

/// How long one attempt to reach the database may take, unless the
/// connection setting says otherwise: a request waits at most this long
/// for an unreachable database before it is answered `UNAVAILABLE`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A store on a PostgreSQL database.
pub struct PgStore {
    reads: Reads,
    queue: mpsc::Sender<Commit>,
    /// The newest head this process has seen, and whether the database
    /// fell behind it.
    history: Arc<History>,
    committers: Vec<tokio::task::JoinHandle<()>>,
    /// What the committers have committed, for the metrics.
    committed: Arc<Committed>,
    /// Whether this replica runs the background jobs.
    lease: Arc<lease::Lease>,
    /// Renews the lease, or tries to take it, until the store is dropped.
    _renewal: lease::Renewal,
}

impl PgStore {
    /// Connects with `config` (a libpq-style connection string or URL),
    /// creates the schema if the database has none, and refuses a schema
    /// newer than this binary's.
    ///
    /// # Errors
    /// If the database cannot be reached, or its schema is unusable.
    pub async fn connect(config: &str) -> Result<Self, Error> {
        Self::connect_with(config, None, None, Bounds::default()).await
    }

    /// [`PgStore::connect`] with the password read from its file, TLS to
    /// the database verified against the CA certificates (PEM) in `ca`, if
    /// given (the server's certificate must chain to one of them and name
    /// the host connected to), and `bounds` on every call and session.
    ///
    /// # Errors
    /// If the database cannot be reached, or its schema is unusable.
    pub async fn connect_with(
        config: &str,
        password: Option<&str>,
        ca: Option<&[u8]>,
        bounds: Bounds,
    ) -> Result<Self, Error> {
        let target = Target::new(config, password, ca, bounds)?;
        let mut client = connect_committer(&target).await?;
        target.bounded_store(migrate(&mut client)).await?;
        let history = Arc::new(History::starting_at(
            target.bounded_store(read_head(&*client)).await?,
        ));
        let mut committers = vec![Committer {
            statements: target
                .bounded_store(group::GroupStatements::prepare(&client))
                .await?,
            client,
        }];
        while committers.len() < COMMITTERS {
            committers.push(Committer::connect(&target).await?);
        }
        let reads = Reads::connect(&target).await?;
        let lease = Arc::new(lease::Lease::new(target.clone()));
        let renewal = lease::Renewal::start(Arc::clone(&lease), target.bounds.lease_renewal());
        let (queue, rx) = mpsc::channel(COMMIT_QUEUE_DEPTH);
        let rx = Arc::new(tokio::sync::Mutex::new(Queue { rx, carried: None }));
        let committed = Arc::new(Committed::default());
        let committers = committers
            .into_iter()
            .map(|committer| {
                let shared = Shared {
                    queue: Arc::clone(&rx),
                    history: Arc::clone(&history),
                    committed: Arc::clone(&committed),
                };
                tokio::spawn(run_committer(committer, target.clone(), shared))
            })
            .collect();
        Ok(Self {
            reads,
            queue,
            history,
            committers,
            committed,
            lease,
            _renewal: renewal,
        })
    }

    /// Checks that the database answers now (reconnecting if the
    /// connection was lost), and that it has not gone back behind the
    /// audit head this process saw ([`History`]).
    ///
    /// # Errors
    /// [`Error::Rewound`] once the database was found behind, for good;
    /// the error of a database that does not answer.
    pub async fn check_history(&self) -> Result<(), Error> {
        if let Some(rewound) = self.history.rewound() {
            return Err(rewound);
        }
        let seen = self.history.seen();
        let key = chain::key(seen.seq);
        let rows = self
            .reads
            .query(Read::HeadAndEntry, &[&Table::Audit.name(), &&key[..]])
            .await?;
        let row = rows.first().ok_or_else(|| corrupt("no audit head row"))?;
        let found = check_head_and_entry(&self.history, seen, row)?;
        // In step: the head found is the new mark (other replicas moved it).
        self.history.advance(found);
        Ok(())
    }

    /// Refuses every write from now on, for `why`: the database went back
    /// behind something this process knows by other means (the erasure
    /// ledger).
    pub fn refuse_writes(&self, why: String) {
        self.history.rewind(why);
    }

    /// The engine's numbers for the metrics: the commits (the database's
    /// own monitoring has the rest).
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            commits: self.committed.counts(),
            ..StoreStats::default()
        }
    }

    /// Stops taking writes and waits for the committers' last transactions.
    pub async fn close(self) {
        drop(self.queue);
        for committer in self.committers {
            let _ = committer.await;
        }
    }
}

/// Checks a connection setting (`storage.postgres.connection`, or another
/// table's `connection` key, named by `table`): it parses, names a host,
/// holds no password (that goes in a file), asks for TLS only if a CA to
/// verify the server with is configured (`with_ca`), and with several
/// hosts asks for the one that takes writes. The message never quotes the
/// setting.
///
/// # Errors
/// What is wrong with it.
pub fn check_connection(table: &str, connection: &str, with_ca: bool) -> Result<(), String> {
    let config = parse(connection)?;
    if config.get_ssl_mode() == SslMode::Require && !with_ca {
        return Err(format!(
            "asks for sslmode=require; set {table}.ca_file to the CA the database server's certificate chains to"
        ));
    }
    if config.get_password().is_some() {
        return Err(format!(
            "holds a password; put it in {table}.password_file instead"
        ));
    }
    if config.get_hosts().is_empty() {
        return Err("names no host (host=... or postgres://host/...)".into());
    }
    // Over TCP without TLS, the database or anyone on the path could change
    // what guards read, the audit head and the ledger's entries: only on an
    // explicit sslmode=disable (logged at start: `in_the_clear`).
    if !with_ca && over_tcp(&config) && config.get_ssl_mode() != SslMode::Disable {
        return Err(format!(
            "reaches the database over TCP without TLS; set {table}.ca_file to the CA the database server's certificate chains to, or add sslmode=disable to run in the clear (only where nothing else is on the path: the database, or anyone between, could change what the vault reads and its audit trail)"
        ));
    }
    // With several hosts, a connection may otherwise land on a standby:
    // reads there lag (an erased value still readable), and the audit
    // head behind this process's would stop it as a database gone back.
    if config.get_hosts().len() > 1
        && config.get_target_session_attrs()
            != tokio_postgres::config::TargetSessionAttrs::ReadWrite
    {
        return Err(
            "names several hosts; add target_session_attrs=read-write so that every connection goes to the one that takes writes".into(),
        );
    }
    Ok(())
}

/// Whether `connection` (checked by [`check_connection`]) reaches a
/// database over TCP with TLS turned off on purpose (`sslmode=disable`):
/// what the server warns about at start.
pub fn in_the_clear(connection: &str, with_ca: bool) -> bool {
    // A CA configured makes every connection TLS, whatever sslmode says.
    !with_ca
        && parse(connection)
            .is_ok_and(|config| over_tcp(&config) && config.get_ssl_mode() == SslMode::Disable)
}

/// Whether any connection would go over TCP: a host that is not a socket
/// directory, or any `hostaddr` (which the client uses before the host).
fn over_tcp(config: &tokio_postgres::Config) -> bool {
    !config.get_hostaddrs().is_empty()
        || config
            .get_hosts()
            .iter()
            .any(|host| matches!(host, tokio_postgres::config::Host::Tcp(_)))
}

/// Whether two connection settings name the same database: a host and
/// port in common and the same database name. Both must parse.
pub fn same_database(a: &str, b: &str) -> bool {
    let (Ok(a), Ok(b)) = (parse(a), parse(b)) else {
        return false;
    };
    let endpoints = |c: &tokio_postgres::Config| -> Vec<(tokio_postgres::config::Host, u16)> {
        let ports = c.get_ports();
        c.get_hosts()
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let port = match ports {
                    [] => 5432,
                    [one] => *one,
                    many => many.get(i).copied().unwrap_or(5432),
                };
                (host.clone(), port)
            })
            .collect()
    };
    let dbname = |c: &tokio_postgres::Config| {
        c.get_dbname()
            .or(c.get_user())
            .unwrap_or_default()
            .to_owned()
    };
    let theirs = endpoints(&b);
    dbname(&a) == dbname(&b) && endpoints(&a).iter().any(|e| theirs.contains(e))
}

fn parse(connection: &str) -> Result<tokio_postgres::Config, String> {
    connection.parse().map_err(|_| {
        "is not a libpq connection string (host=... user=... dbname=...) or a postgres:// URL"
            .to_owned()
    })
}

/// A committer's connection: commits wait for the disk (and for a
/// synchronous standby, where the cluster has one).
///
/// Values over about 2 kB (the audit event of a large batch: a token HMAC
/// per item) are compressed as they are stored; PostgreSQL's default,
/// pglz, took 4 % of all CPU time under tokenize-batch (BENCHMARKS.md), so
/// the connection asks for LZ4 where the server was built with it, and
/// keeps the default where it was not.
async fn connect_committer(target: &Target) -> Result<Session, Error> {
    let client = target.connect().await?;
    target
        .bounded(client.batch_execute("SET synchronous_commit TO on"))
        .await?;
    if let Err(e) = target
        .bounded(client.batch_execute("SET default_toast_compression TO lz4"))
        .await
    {
        tracing::info!(error = %e, "PostgreSQL cannot compress with LZ4; large values use its default");
    }
    Ok(client)
}

/// The committer's connection and its prepared statements.
struct Committer {
    client: Session,
    statements: group::GroupStatements,
}

impl Committer {
    async fn connect(target: &Target) -> Result<Self, Error> {
        let client = connect_committer(target).await?;
        let statements = target
            .bounded_store(group::GroupStatements::prepare(&client))
            .await?;
        Ok(Self { client, statements })
    }
}

/// A session with default bounds, for the throwaway cluster's own setup.
#[cfg(any(test, feature = "testkit"))]
async fn connect(connection: &str) -> Result<Session, Error> {
    Target::new(connection, None, None, Bounds::default())?
        .connect()
        .await
}

/// Where and how to connect: the parsed setting, TLS when a CA is
/// configured, and the bounds every session and call keeps.
#[derive(Clone)]
struct Target {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    bounds: Bounds,
}

impl Target {
    /// The setting `connection` with the password and, if `ca` is given,
    /// TLS verified against it; the default connect timeout unless the
    /// setting has one, and TCP keepalives after `bounds.keepalive` idle.
    fn new(
        connection: &str,
        password: Option<&str>,
        ca: Option<&[u8]>,
        bounds: Bounds,
    ) -> Result<Self, Error> {
        let mut config = parse(connection).map_err(Error::Backend)?;
        if let Some(password) = password {
            config.password(password);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT.min(bounds.call));
        }
        // A peer that vanished is noticed by the kernel while a call waits
        // (unacknowledged data: `tcp_user_timeout`) and while the
        // connection idles (keepalives).
        config
            .keepalives(true)
            .keepalives_idle(bounds.keepalive)
            .keepalives_interval(bounds::KEEPALIVE_INTERVAL)
            .keepalives_retries(bounds::KEEPALIVE_PROBES)
            .tcp_user_timeout(bounds.call);
        let tls = match ca {
            Some(pem) => {
                config.ssl_mode(SslMode::Require);
                Some(rustls_connector(pem)?)
            }
            None => None,
        };
        Ok(Self {
            config,
            tls,
            bounds,
        })
    }

    /// A new session, with the server's side of the bounds set on it,
    /// within the call deadline: the connect timeout covers reaching the
    /// host, not a proxy or balancer in between that accepts the
    /// connection and then says nothing.
    async fn connect(&self) -> Result<Session, Error> {
        self.bounded_store(self.connect_unbounded()).await
    }

    async fn connect_unbounded(&self) -> Result<Session, Error> {
        let (client, driver) = match &self.tls {
            None => {
                let (client, connection) = self.config.connect(NoTls).await.map_err(classify)?;
                (client, tokio::spawn(watch_connection(connection)))
            }
            Some(tls) => {
                let (client, connection) =
                    self.config.connect(tls.clone()).await.map_err(classify)?;
                (client, tokio::spawn(watch_connection(connection)))
            }
        };
        let session = Session { client, driver };
        session
            .batch_execute(&self.bounds.session_sql())
            .await
            .map_err(classify)?;
        Ok(session)
    }

    /// `call`, given up after the call deadline (its connection must then
    /// be dropped: it may still deliver the late answer).
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, Error> {
        self.bounded_store(async { call.await.map_err(classify) })
            .await
    }

    /// [`Target::bounded`] for a call that reports a storage error.
    async fn bounded_store<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.bounds.call, call).await {
            Ok(answer) => answer,
            Err(_) => Err(self.no_answer()),
        }
    }

    /// The error of a call past its deadline.
    fn no_answer(&self) -> Error {
        Error::Backend(format!(
            "PostgreSQL did not answer within {} ms (call_timeout_ms)",
            self.bounds.call.as_millis()
        ))
    }
}

/// A connection to the database: the client, and the task that drives its
/// socket, which ends with it. Dropping a session closes its socket at
/// once, even one whose peer no longer answers (a client alone would keep
/// its driver waiting on that socket).
pub(super) struct Session {
    client: Client,
    driver: tokio::task::JoinHandle<()>,
}

impl std::ops::Deref for Session {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Drives a connection until it ends, logging why it did.
async fn watch_connection<F>(connection: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>>,
{
    if let Err(e) = connection.await {
        tracing::error!(error = %classify(e), "connection to PostgreSQL lost");
    }
}

/// A TLS connector that trusts only the CA certificates in `pem`.
fn rustls_connector(pem: &[u8]) -> Result<tokio_postgres_rustls::MakeRustlsConnect, Error> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| Error::Backend(format!("storage.postgres.ca_file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| Error::Backend(format!("storage.postgres.ca_file: {e}")))?;
    }
    if roots.is_empty() {
        return Err(Error::Backend(
            "storage.postgres.ca_file holds no certificate".into(),
        ));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Backend(format!("TLS to PostgreSQL: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Creates the schema, or checks the one there.
async fn migrate(client: &mut Client) -> Result<(), Error> {
    let tx = client.transaction().await.map_err(classify)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await
        .map_err(classify)?;
    // At this binary's version already: nothing is created or altered, so
    // a role with no right to (the least-privilege app role) runs the vault.
    if schema_version(&tx, "tokenvault_schema").await? == Some(SCHEMA_VERSION) {
        return tx.commit().await.map_err(classify);
    }
    tx.batch_execute(SCHEMA).await.map_err(unprivileged)?;
    let stored: Option<i32> = tx
        .query_opt("SELECT version FROM tokenvault_schema", &[])
        .await
        .map_err(classify)?
        .map(|row| row.get(0));
    match stored {
        None => {
            tx.execute(
                "INSERT INTO tokenvault_schema (version) VALUES ($1)",
                &[&SCHEMA_VERSION],
            )
            .await
            .map_err(classify)?;
            tx.execute(
                "INSERT INTO tokenvault_audit_head (seq, hash) VALUES (0, $1)",
                &[&chain::GENESIS.as_slice()],
            )
            .await
            .map_err(classify)?;
            tracing::info!(version = SCHEMA_VERSION, "created the database schema");
        }
        Some(version) if version > SCHEMA_VERSION => {
            return Err(Error::Backend(format!(
                "the database schema is version {version}, newer than this tokenvault's ({SCHEMA_VERSION}); run a release that knows it"
            )));
        }
        Some(version) if version < SCHEMA_VERSION => {
            // Version 1 to 2: the same tables; the row tells releases that
            // know only version 1 that writers here take key locks.
            tx.execute(
                "UPDATE tokenvault_schema SET version = $1",
                &[&SCHEMA_VERSION],
            )
            .await
            .map_err(classify)?;
            tracing::info!(
                from = version,
                to = SCHEMA_VERSION,
                "migrated the database schema"
            );
        }
        Some(_) => {}
    }
    tx.commit().await.map_err(classify)
}

async fn read_head(client: &impl GenericClient) -> Result<Head, Error> {
    let row = client
        .query_one("SELECT seq, hash FROM tokenvault_audit_head", &[])
        .await
        .map_err(classify)?;
    head_of(&row)
}

/// Checks a row of [`reads::HEAD_AND_ENTRY`], read for the head `seen`,
/// against `history`; the head the database holds.
fn check_head_and_entry(
    history: &History,
    seen: Head,
    row: &tokio_postgres::Row,
) -> Result<Head, Error> {
    let entry: Option<Vec<u8>> = row.get(2);
    let found = head_of(row)?;
    history.check(seen, found, entry.as_deref())?;
    Ok(found)
}

fn head_of(row: &tokio_postgres::Row) -> Result<Head, Error> {
    let seq: i64 = row.get(0);
    let hash: Vec<u8> = row.get(1);
    Ok(Head {
        seq: u64::try_from(seq).map_err(|_| corrupt("a negative audit sequence number"))?,
        hash: hash
            .try_into()
            .map_err(|_| corrupt("an audit head hash of the wrong length"))?,
    })
}

fn corrupt(what: &str) -> Error {
    Error::Corruption(format!("the database holds {what}"))
}

/// The version the schema row of `table` holds, if the table exists: read
/// without creating anything, so a role without DDL rights can ask.
pub(super) async fn schema_version(
    client: &impl GenericClient,
    table: &str,
) -> Result<Option<i32>, Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .map_err(classify)?
        .get(0);
    if !exists {
        return Ok(None);
    }
    Ok(client
        .query_opt(&format!("SELECT version FROM {table}"), &[])
        .await
        .map_err(classify)?
        .map(|row| row.get(0)))
}

/// A schema change refused for want of privileges says what to do.
pub(super) fn unprivileged(e: tokio_postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db) if db.code() == &tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE => {
            Error::Backend(format!(
                "PostgreSQL refused to create or upgrade the schema as this role ({}): run `tokenvault migrate --config <a config whose connections name the owner role> --grant-to <this role>` once, then start the vault",
                db.message()
            ))
        }
        _ => classify(e),
    }
}

/// Gives `role` what a running vault needs of its database and nothing
/// more: reads and writes of the key-value table and the audit head, and
/// reads of the schema row. No DDL, and nothing of what the owner keeps.
///
/// # Errors
/// If `role` is not a plain role name, or the grants are refused.
async fn grant_app_role(client: &Client, role: &str) -> Result<(), Error> {
    let role = quoted_role(role)?;
    client
        .batch_execute(&format!(
            "GRANT SELECT ON tokenvault_schema TO {role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON tokenvault_kv TO {role};
             GRANT SELECT, UPDATE ON tokenvault_audit_head TO {role};"
        ))
        .await
        .map_err(classify)
}

/// `role` as an SQL identifier, if it is a plain role name (lower-case
/// letters, digits and underscores, not starting with a digit), and not
/// one that stands for more than one role: `public` (every role, quoted or
/// not), `none`, or PostgreSQL's own `pg_*` roles.
pub(super) fn quoted_role(role: &str) -> Result<String, Error> {
    let plain = role.len() <= 63
        && role.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && role
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !plain {
        return Err(Error::Backend(format!(
            "{role:?} is not a plain role name (lower-case letters, digits and underscores)"
        )));
    }
    if matches!(
        role,
        "public" | "none" | "current_user" | "session_user" | "current_role"
    ) || role.starts_with("pg_")
    {
        return Err(Error::Backend(format!(
            "{role:?} is not a role of the vault's own: name the role its replicas connect as"
        )));
    }
    Ok(format!("\"{role}\""))
}

/// Creates or upgrades the vault's schema in the database `config` names
/// (connected as its owner), without starting a store, and, if `grant_to`
/// names a role, gives that role what a running vault needs
/// ([`grant_app_role`]). `tokenvault migrate` runs it.
///
/// # Errors
/// If the database cannot be reached, holds a newer schema, or refuses.
pub async fn migrate_database(
    config: &str,
    password: Option<&str>,
    ca: Option<&[u8]>,
    bounds: Bounds,
    grant_to: Option<&str>,
) -> Result<(), Error> {
    let target = Target::new(config, password, ca, bounds)?;
    let mut client = target.connect().await?;
    target.bounded_store(migrate(&mut client)).await?;
    if let Some(role) = grant_to {
        target.bounded_store(grant_app_role(&client, role)).await?;
    }
    Ok(())
}

/// A PostgreSQL error as a storage error: its SQLSTATE and message, never
/// its detail (which can quote a row).
fn classify(e: tokio_postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db) if db.code() == &tokio_postgres::error::SqlState::DISK_FULL => {
            Error::NoSpace(format!("PostgreSQL: {}", db.message()))
        }
        Some(db) => Error::Backend(format!("PostgreSQL {}: {}", db.code().code(), db.message())),
        None if e.is_closed() => Error::Backend("the connection to PostgreSQL is closed".into()),
        None => Error::Backend(format!("PostgreSQL: {e}")),
    }
}

/// A committer task: one transaction per group of queued batches, taken
/// from the queue it shares with the process's other committers. When its
/// connection is lost, or a transaction passes the call deadline (its
/// connection is then dropped: a late answer must not be taken for the
/// next group's), it connects again before the next group (one attempt per
/// group, bounded by the connect timeout); a group that finds the database
/// unreachable fails at once, and nothing of it was written.
async fn run_committer(committer: Committer, target: Target, shared: Shared) {
    let Shared {
        queue,
        history,
        committed,
    } = shared;
    let mut connected = Some(committer);
    while let Some(group) = next_group(&queue).await {
        if let Some(rewound) = history.rewound() {
            for commit in group {
                let _ = commit.done.send(Err(rewound.duplicate()));
            }
            continue;
        }
        let mut committer = match connected.take() {
            Some(committer) if !committer.client.is_closed() => committer,
            _ => match Committer::connect(&target).await {
                Ok(reconnected) => {
                    tracing::warn!("reconnected to PostgreSQL for writes");
                    reconnected
                }
                Err(e) => {
                    tracing::warn!(error = %e, batches = group.len(), "PostgreSQL is unreachable; writes refused");
                    for commit in group {
                        let _ = commit.done.send(Err(Error::Backend(
                            "the database is unreachable; nothing was written".into(),
                        )));
                    }
                    continue;
                }
            },
        };
        let batches = group.iter().map(|commit| commit.batch.units());
        let commit_sent = AtomicBool::new(false);
        let written = tokio::time::timeout(
            target.bounds.call,
            group::write_group(
                &mut committer.client,
                &committer.statements,
                &history,
                batches,
                &commit_sent,
            ),
        )
        .await;
        // A transaction that failed on a live connection was rolled back,
        // and the connection serves the next group; one that found it
        // lost, or passed the deadline, drops it.
        let (written, reusable) = match written {
            Ok(written) => (written, !committer.client.is_closed()),
            Err(_) => (Err(target.no_answer()), false),
        };
        // Lost after its COMMIT went out, the outcome is unknown; callers
        // are told so (a request id then gives a retry the first answer).
        let written = match written {
            Err(Error::Backend(detail)) if !reusable && commit_sent.load(Ordering::SeqCst) => {
                Err(Error::Indeterminate(detail))
            }
            other => other,
        };
        match written {
            Ok((outcomes, new_head)) => {
                connected = Some(committer);
                // Before any caller hears of its write, as RocksDB's does.
                if let Some(new_head) = new_head {
                    history.advance(new_head);
                }
                committed.group(group.len());
                for (commit, outcome) in group.into_iter().zip(outcomes) {
                    let _ = commit.done.send(Ok(outcome));
                }
            }
            Err(e) => {
                committed.failed();
                tracing::error!(error = %e, batches = group.len(), "PostgreSQL transaction failed");
                if reusable {
                    connected = Some(committer);
                }
                // Each caller hears the same kind of failure (a full disk
                // stays RESOURCE_EXHAUSTED, not UNAVAILABLE).
                for commit in group {
                    let _ = commit.done.send(Err(e.duplicate()));
                }
            }
        }
    }
}

/// What a process's committers share.
struct Shared {
    /// The batches waiting, taken by one committer at a time.
    queue: Arc<tokio::sync::Mutex<Queue>>,
    /// The newest head seen, and whether the database fell behind it.
    history: Arc<History>,
    committed: Arc<Committed>,
}

/// Waits for a queued batch and takes it with those queued behind it, up
/// to [`MAX_GROUP_BATCHES`] batches or [`MAX_GROUP_LOCKS`] key locks;
/// `None` once the store is closed and the queue drained. One committer
/// waits on the queue at a time, so the others are writing meanwhile.
async fn next_group(queue: &tokio::sync::Mutex<Queue>) -> Option<Vec<Commit>> {
    let mut queue = queue.lock().await;
    let first = match queue.carried.take() {
        Some(carried) => carried,
        None => queue.rx.recv().await?,
    };
    let mut locks = group::locks_asked(first.batch.units());
    let mut group = vec![first];
    while group.len() < MAX_GROUP_BATCHES && locks < MAX_GROUP_LOCKS {
        match queue.rx.try_recv() {
            // A batch that would take the group past the key locks a
            // transaction holds beside others waits for the next group:
            // two batches that each fit never make one that runs alone.
            Ok(next) if locks + group::locks_asked(next.batch.units()) > group::MAX_KEY_LOCKS => {
                queue.carried = Some(next);
                break;
            }
            Ok(next) => {
                locks += group::locks_asked(next.batch.units());
                group.push(next);
            }
            Err(_) => break,
        }
    }
    Some(group)
}

/// The batches waiting for the committers, and one a group left for the
/// next (it would have taken that group past its key locks).
struct Queue {
    rx: mpsc::Receiver<Commit>,
    carried: Option<Commit>,
}

/// The smallest key greater than every key that starts with `prefix`, if
/// there is one (none for an empty prefix or one of only 0xff bytes).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

fn key_values(rows: Vec<tokio_postgres::Row>) -> KeyValues {
    rows.into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

impl Store for PgStore {
    async fn get_many(
        &self,
        table: Table,
        keys: Vec<Vec<u8>>,
    ) -> Result<Vec<Option<Vec<u8>>>, Error> {
        let rows = self
            .reads
            .query(Read::GetMany, &[&table.name(), &keys])
            .await?;
        let found: HashMap<Vec<u8>, Vec<u8>> = rows
            .into_iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        // A key asked for twice is answered twice.
        Ok(keys.iter().map(|key| found.get(key).cloned()).collect())
    }

    async fn scan_prefix(&self, table: Table, prefix: Vec<u8>) -> Result<KeyValues, Error> {
        let rows = match prefix_end(&prefix) {
            Some(end) => {
                self.reads
                    .query(Read::ScanRange, &[&table.name(), &prefix, &end])
                    .await
            }
            None => {
                self.reads
                    .query(Read::ScanOpen, &[&table.name(), &prefix])
                    .await
            }
        }?;
        Ok(key_values(rows))
    }

    async fn commit(&self, batch: Batch) -> Result<UnitOutcomes, Error> {
        let (done, outcome) = oneshot::channel();
        self.queue
            .send(Commit { batch, done })
            .await
            .map_err(|_| Error::Closed)?;
        outcome.await.map_err(|_| Error::Closed)?
    }

    fn audit_head(&self) -> Head {
        self.history.seen()
    }

    async fn scan_from(
        &self,
        table: Table,
        from: Vec<u8>,
        limit: usize,
    ) -> Result<KeyValues, Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .reads
            .query(Read::ScanFrom, &[&table.name(), &from, &limit])
            .await?;
        Ok(key_values(rows))
    }

    fn checkpoints(&self) -> Result<&impl super::Checkpoints, Error> {
        Err::<&super::NoCheckpoints, _>(Error::Unsupported(BACKED_UP_BY_POSTGRES))
    }

    async fn estimated_len(&self, table: Table) -> u64 {
        // Asked when a job starts (a rotation, or another pass).
        match self.reads.count(table.name()).await {
            Ok(count) => count,
            Err(e) => {
                tracing::warn!(error = %e, table = table.name(), "could not count a table for a job's progress; its total shows as unknown");
                0
            }
        }
    }

    async fn purge(&self, _keys: Vec<(Table, Vec<u8>)>) -> Result<(), Error> {
        // A deleted row leaves the table at the next vacuum, on the
        // database's own schedule; PostgreSQL never overwrites its bytes
        // (free space in a page, WAL, archives, backups keep them until
        // reused): SECURITY.md, "Shredding on PostgreSQL".
        Ok(())
    }
    fn max_keys_per_request(&self) -> Option<usize> {
        Some(group::MAX_KEY_LOCKS)
    }

    async fn leads_background_jobs(&self) -> bool {
        self.lease.held().await
    }
}

mod bounds;
#[cfg(any(test, feature = "testkit"))]
pub mod cluster;
mod group;
mod history;
mod lease;
pub mod ledger;
mod reads;
mod snapshot;
#[cfg(test)]
mod tests;
