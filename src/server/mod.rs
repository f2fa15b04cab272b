//! Wiring: opens the vault and serves it on the mTLS gRPC port, with health
//! on a separate plaintext port, until a shutdown signal drains it.
//!
//! This is the composition root: the one module above `store` that names
//! the RocksDB engine.

mod background;
mod metrics_http;
mod reload;
mod tls;

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Server;
use tonic_health::{
    ServingStatus,
    pb::health_server::{Health, HealthServer},
    server::HealthReporter,
};

pub use tls::{Connections, TlsConn, TlsError, TlsState, tls_state};

use crate::{
    api::{Admission, AdmissionLayer, ApiSettings, Limiter, RefusalLog, TokenVaultService},
    authz::SharedPolicy,
    config::{Config, DatabaseSecrets, DatabaseSetting, EngineSetting, LedgerSetting},
    crypto::{MasterKey, MasterKeyError, MasterKeySetting},
    metrics::{BlockLookups, Gauges, Metrics},
    proto,
    shared::Shared,
    store::{self, AnyStore, LedgerTable, PgStore, RocksStore, Store, StoreOptions},
    vault::{self, LedgerLocation, Vault},
};

/// The gRPC service name the health service reports on.
const SERVICE_NAME: &str = "tokenvault.v1.TokenVault";

/// How often a server on a shared database checks that it can reach it:
/// health says NOT_SERVING while it cannot.
const DATABASE_PROBE_EVERY: Duration = Duration::from_secs(1);

/// What the gRPC port's reflection describes: the vault's services and
/// health.
const GRPC_DESCRIPTORS: [&[u8]; 2] = [
    proto::FILE_DESCRIPTOR_SET,
    tonic_health::pb::FILE_DESCRIPTOR_SET,
];

/// How often an idle HTTP/2 connection is pinged, so a dead peer is noticed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Why the server could not start or stopped with an error. Each message is
/// one line saying what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The master key file is unusable.
    #[error(transparent)]
    MasterKey(#[from] MasterKeyError),
    /// TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The database could not be opened.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The vault could not be opened (e.g. wrong master key).
    #[error(transparent)]
    Vault(#[from] vault::Error),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({setting}): {source}")]
    Bind {
        /// The setting that names the address.
        setting: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// Reflection descriptors are broken (a build problem).
    #[error("server reflection setup failed: {0}")]
    Reflection(String),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Runs the vault with the master key `master` (loaded by the caller from
/// `config.master_key`) until `shutdown` resolves (calling `on_ready` with
/// the bound gRPC and health addresses once it serves), then drains
/// in-flight requests (up to `server.shutdown_grace_seconds`) and closes the
/// database.
///
/// # Errors
/// See [`ServeError`].
pub async fn run(
    config: Config,
    master: MasterKey,
    shutdown: impl Future<Output = ()> + Send,
    on_ready: impl FnOnce(SocketAddr, SocketAddr) + Send,
) -> Result<(), ServeError> {
    if let MasterKeySetting::Env(var) = &config.master_key {
        tracing::warn!(variable = %var, "the master key came from the environment: for development only");
    }
    // Check everything that can be wrong with the configuration before
    // touching the database or binding ports.
    let tls = tls_state(&config.tls, &config.trust_domains)?;
    // The plaintext health port comes up first so Kubernetes probes see
    // NOT_SERVING (not a refused connection) while the database opens.
    let (health, health_service) = tonic_health::server::health_reporter();
    let health_port = HealthPort::start(&config, &health, health_service.clone()).await?;

    let vault = Arc::new(open_vault(&config, master).await?);
    let app = App::build(config, vault, tls).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let running = app.spawn(&health, &stop_rx);

    set_status(&health, ServingStatus::Serving).await;
    tracing::info!(
        grpc.addr = %running.grpc_addr,
        health.addr = %health_port.addr,
        metrics.addr = %running.metrics_addr,
        data_dir = %running.config.data_dir.display(),
        durability = ?running.config.durability,
        master_key = %running.config.master_key_source().describe(),
        "serving"
    );
    on_ready(running.grpc_addr, health_port.addr);
    running
        .serve(health_service, &health, shutdown, &stop_tx, health_port)
        .await
}

/// The gRPC server over `services` (and health and reflection) on the
/// connections `conns` brings, until `drain` fires.
fn grpc_server(
    config: &Config,
    services: Services,
    health_service: HealthServer<impl Health>,
    conns: mpsc::Receiver<io::Result<TlsConn>>,
    drain: tokio::sync::oneshot::Receiver<()>,
) -> Result<impl Future<Output = Result<(), tonic::transport::Error>>, ServeError> {
    let (reflection_v1, reflection_v1alpha) = reflection(&GRPC_DESCRIPTORS)?;
    Ok(Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .max_concurrent_streams(config.connections.max_concurrent_streams)
        .timeout(config.connections.request_timeout)
        .max_connection_age(config.connections.max_connection_age)
        .max_connection_age_grace(config.shutdown_grace)
        .layer(services.admission)
        .add_service(services.tokenvault)
        .add_service(services.subjects)
        .add_service(services.admin)
        .add_service(services.audit)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(ReceiverStream::new(conns), async move {
            let _ = drain.await;
        }))
}

/// The plaintext health port, and what stops it: it outlives the drain,
/// so probes read NOT_SERVING (not a refused connection) while in-flight
/// requests finish.
struct HealthPort {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl HealthPort {
    /// Reports NOT_SERVING and serves `service` on `server.health_listen`.
    async fn start(
        config: &Config,
        health: &HealthReporter,
        service: HealthServer<impl Health>,
    ) -> Result<Self, ServeError> {
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        health
            .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
            .await;
        let listener = bind("server.health_listen", config.health_listen).await?;
        let addr = local_addr(&listener, "server.health_listen", config.health_listen)?;
        let (stop, stop_rx) = watch::channel(false);
        let task = serve_health(listener, service, stop_rx)?;
        Ok(Self { addr, stop, task })
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The gRPC services over one vault, and the layer that admits requests.
struct Services {
    tokenvault: proto::v1::token_vault_server::TokenVaultServer<TokenVaultService<AnyStore>>,
    subjects: proto::v1::subjects_server::SubjectsServer<TokenVaultService<AnyStore>>,
    admin: proto::v1::admin_server::AdminServer<TokenVaultService<AnyStore>>,
    audit: proto::v1::audit_server::AuditServer<TokenVaultService<AnyStore>>,
    admission: AdmissionLayer,
}

/// Everything built from the configuration, nothing spawned yet: the
/// vault, its services, and the bound listeners.
struct App {
    config: Config,
    vault: Arc<Vault<AnyStore>>,
    policy: Arc<SharedPolicy>,
    refusals: Arc<RefusalLog>,
    metrics: Arc<Metrics>,
    limiter: Arc<Shared<Limiter>>,
    services: Services,
    tls: TlsState,
    listener: TcpListener,
    grpc_addr: SocketAddr,
    metrics_listener: TcpListener,
    metrics_addr: SocketAddr,
}

impl App {
    /// Records the policy in force, builds the services and binds the
    /// gRPC and metrics ports.
    async fn build(
        config: Config,
        vault: Arc<Vault<AnyStore>>,
        tls: TlsState,
    ) -> Result<Self, ServeError> {
        let policy = Arc::new(SharedPolicy::new(config.policy.clone()));
        // The policy this process starts with goes into the trail before
        // any call it allows (reloads are recorded by a background loop).
        vault.record_policy_load(&policy.current().hash()).await?;
        let refusals = Arc::new(RefusalLog::default());
        let metrics = Arc::new(Metrics::default());
        let limiter = Arc::new(Shared::new(Limiter::new(config.identity_limits)));
        let services = Self::services(&config, &vault, &policy, &refusals, &metrics, &limiter);
        // Reflection is built again when the server is (its services'
        // types cannot be named to keep them): checked here, before
        // anything runs or is reported as serving.
        reflection(&GRPC_DESCRIPTORS)?;
        let metrics_listener = bind("server.metrics_listen", config.metrics_listen).await?;
        let metrics_addr = local_addr(
            &metrics_listener,
            "server.metrics_listen",
            config.metrics_listen,
        )?;
        let listener = bind("server.listen", config.listen).await?;
        let grpc_addr = local_addr(&listener, "server.listen", config.listen)?;
        Ok(Self {
            config,
            vault,
            policy,
            refusals,
            metrics,
            limiter,
            services,
            tls,
            listener,
            grpc_addr,
            metrics_listener,
            metrics_addr,
        })
    }

    fn services(
        config: &Config,
        vault: &Arc<Vault<AnyStore>>,
        policy: &Arc<SharedPolicy>,
        refusals: &Arc<RefusalLog>,
        metrics: &Arc<Metrics>,
        limiter: &Arc<Shared<Limiter>>,
    ) -> Services {
        let settings = ApiSettings {
            limits: config.limits,
            policy: Arc::clone(policy),
            refusals: Arc::clone(refusals),
            pkcs11_modules: config.pkcs11_modules.clone(),
        };
        let api = TokenVaultService::new(Arc::clone(vault), settings, Arc::clone(metrics));
        let admission = AdmissionLayer(Arc::new(Admission::new(
            Arc::clone(limiter),
            config.limits.max_concurrent_requests,
            config.limits.max_request_buffer_bytes,
            Arc::clone(refusals),
            Arc::clone(metrics),
        )));
        Services {
            admin: proto::v1::admin_server::AdminServer::new(api.clone()),
            audit: proto::v1::audit_server::AuditServer::new(api.clone()),
            subjects: proto::v1::subjects_server::SubjectsServer::new(api.clone())
                .max_decoding_message_size(config.limits.max_message_bytes),
            tokenvault: proto::v1::token_vault_server::TokenVaultServer::new(api)
                .max_decoding_message_size(config.limits.max_message_bytes),
            admission,
        }
    }

    /// Starts every loop: metrics, reloads, the TLS accept loop, the
    /// background jobs and (on a shared database) its watch.
    fn spawn(self, health: &HealthReporter, stop: &watch::Receiver<bool>) -> Running {
        let App {
            config,
            vault,
            policy,
            refusals,
            metrics,
            limiter,
            services,
            tls,
            listener,
            grpc_addr,
            metrics_listener,
            metrics_addr,
        } = self;
        let connections = Arc::new(Connections::default());
        let metrics_task = serve_metrics(
            metrics_listener,
            Arc::clone(&vault),
            Arc::clone(&metrics),
            Arc::clone(&connections),
            stop.clone(),
        );
        let (conn_tx, conn_rx) = mpsc::channel(128);
        let shared_tls = Arc::new(Shared::new(tls));
        let reloader = tokio::spawn(reload::watch_and_reload(
            config.clone(),
            reload::Reloadable {
                tls: Arc::clone(&shared_tls),
                policy: Arc::clone(&policy),
                limiter,
                connections: Arc::clone(&connections),
            },
            config.reload_poll,
            reload::listen_for_hangup(),
            stop.clone(),
        ));
        let accept_task = tokio::spawn(tls::accept_loop(
            listener,
            tls::AcceptSettings {
                tls: shared_tls,
                connections,
                handshake_timeout: config.handshake_timeout,
                max_connections: config.connections.max_connections,
            },
            conn_tx,
            stop.clone(),
        ));
        let background =
            background::Background::start(&vault, &metrics, &refusals, &policy, &config, stop);
        // A database found to have gone back in time stops the server (see
        // `watch_database`).
        let (fatal_tx, fatal_rx) = mpsc::channel::<store::Error>(1);
        let database_watch = watch_database(
            Arc::clone(&vault),
            health.clone(),
            stop.clone(),
            fatal_tx,
            erasure_grace(&config),
        );
        Running {
            grpc_addr,
            metrics_addr,
            config,
            vault,
            refusals,
            services,
            conn_rx,
            fatal_rx,
            tasks: vec![metrics_task, reloader],
            accept_task,
            background,
            database_watch,
        }
    }
}

/// A vault whose loops run, ready to serve gRPC on the accepted
/// connections.
struct Running {
    grpc_addr: SocketAddr,
    metrics_addr: SocketAddr,
    config: Config,
    vault: Arc<Vault<AnyStore>>,
    refusals: Arc<RefusalLog>,
    services: Services,
    conn_rx: mpsc::Receiver<io::Result<TlsConn>>,
    fatal_rx: mpsc::Receiver<store::Error>,
    /// Loops that end when `stop` changes.
    tasks: Vec<JoinHandle<()>>,
    accept_task: JoinHandle<()>,
    background: background::Background,
    database_watch: Option<JoinHandle<()>>,
}

impl Running {
    /// Serves gRPC until `shutdown` resolves, the server ends, or the
    /// database goes back in time; then drains in-flight requests (up to
    /// `server.shutdown_grace_seconds`), stops every loop and closes the
    /// database.
    async fn serve(
        self,
        health_service: HealthServer<impl Health>,
        health: &HealthReporter,
        shutdown: impl Future<Output = ()> + Send,
        stop: &watch::Sender<bool>,
        health_port: HealthPort,
    ) -> Result<(), ServeError> {
        let Running {
            config,
            vault,
            refusals,
            services,
            conn_rx,
            mut fatal_rx,
            tasks,
            accept_task,
            background,
            database_watch,
            ..
        } = self;
        let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
        // Boxed rather than pinned on the stack so it can be dropped (and
        // with it the services' handles on the vault) before the store
        // closes.
        let mut grpc = Box::pin(grpc_server(
            &config,
            services,
            health_service,
            conn_rx,
            drain_rx,
        )?);
        let served = tokio::select! {
            result = &mut grpc => Served::Ended(result),
            () = shutdown => Served::Asked,
            Some(fatal) = fatal_rx.recv() => Served::Fatal(fatal),
        };
        let result = match served {
            Served::Ended(result) => result.map_err(ServeError::from),
            Served::Asked | Served::Fatal(_) => {
                if let Served::Fatal(e) = &served {
                    tracing::error!(error = %e, "stopping: draining in-flight requests (each is refused)");
                } else {
                    tracing::info!("shutdown requested: draining in-flight requests");
                }
                set_status(health, ServingStatus::NotServing).await;
                let _ = stop.send(true);
                let _ = drain_tx.send(());
                let drained = match tokio::time::timeout(config.shutdown_grace, &mut grpc).await {
                    Ok(result) => result.map_err(ServeError::from),
                    Err(_) => {
                        tracing::warn!(grace = ?config.shutdown_grace, "drain deadline passed; closing remaining connections");
                        Ok(())
                    }
                };
                match served {
                    Served::Fatal(e) => drained.and(Err(ServeError::Store(e))),
                    _ => drained,
                }
            }
        };
        let _ = stop.send(true);
        accept_task.abort();
        health_port.stop().await;
        background.stop().await;
        if let Some(task) = database_watch {
            let _ = task.await;
        }
        for task in tasks {
            let _ = task.await;
        }
        drop(grpc);
        close(vault, &refusals).await;
        tracing::info!("stopped");
        result
    }
}

/// Serves the health service (and a reflection of it only, so that grpcurl
/// can probe this port without proto files) on the plaintext port until
/// `stop` changes.
fn serve_health(
    listener: TcpListener,
    service: HealthServer<impl Health>,
    mut stop: watch::Receiver<bool>,
) -> Result<JoinHandle<Result<(), tonic::transport::Error>>, ServeError> {
    let (reflection_v1, reflection_v1alpha) = reflection(&[tonic_health::pb::FILE_DESCRIPTOR_SET])?;
    Ok(tokio::spawn(
        Server::builder()
            .add_service(service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                let _ = stop.changed().await;
            }),
    ))
}

/// Opens the store on the configured engine (creating RocksDB's data
/// directory) and the vault on it, with the erasure ledger reconciled. The
/// master key is dropped once the keys are unwrapped.
async fn open_vault(config: &Config, master: MasterKey) -> Result<Vault<AnyStore>, ServeError> {
    let store = match &config.engine {
        EngineSetting::RocksDb => {
            let path = config.data_dir.clone();
            let options = StoreOptions {
                durability: config.durability,
                block_cache_bytes: config.block_cache_bytes,
            };
            let store = tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&path).map_err(|e| {
                    store::Error::Backend(format!("cannot create data_dir {}: {e}", path.display()))
                })?;
                RocksStore::open(&path, &options)
            })
            .await
            .map_err(|e| store::Error::Backend(e.to_string()))??;
            AnyStore::RocksDb(store)
        }
        EngineSetting::Postgres(database) => {
            warn_if_in_the_clear("storage.postgres", database);
            let secrets = database_secrets("storage.postgres", database)?;
            let store = PgStore::connect_with(
                &database.connection,
                secrets.password(),
                secrets.ca.as_deref(),
                database.bounds,
            )
            .await?;
            AnyStore::Postgres(Box::new(store))
        }
    };
    let ledger = match &config.erasure_ledger {
        LedgerSetting::File(path) => LedgerLocation::File(path.clone()),
        LedgerSetting::Database(database) => {
            let key = "subjects.erasure_ledger_database";
            warn_if_in_the_clear(key, database);
            let secrets = database_secrets(key, database)?;
            let table = LedgerTable::connect_with(
                &database.connection,
                secrets.password(),
                secrets.ca.as_deref(),
                database.bounds,
            )
            .await
            .map_err(|e| ServeError::Store(store::Error::Backend(format!("{key}: {e}"))))?;
            LedgerLocation::Table(Box::new(table))
        }
    };
    let (vault, _) = Vault::open(store, &master, config.field_types.clone())
        .await?
        .with_subject_limit(config.max_tokens_per_subject)
        .with_request_window(config.request_id_window)
        .with_ledger(ledger, config.ledger_rollback)
        .await?;
    Ok(vault)
}

/// How long an erasure in the ledger may be missing from the database
/// before its write is taken as lost: three call deadlines (its queue wait
/// and its transaction, with room).
fn erasure_grace(config: &Config) -> Duration {
    match &config.engine {
        EngineSetting::Postgres(database) => database.bounds.call * 3,
        EngineSetting::RocksDb => Duration::ZERO,
    }
}

/// Why the server stopped serving.
enum Served {
    /// The gRPC server ended by itself.
    Ended(Result<(), tonic::transport::Error>),
    /// A shutdown signal.
    Asked,
    /// The database can no longer be served from (it went back in time).
    Fatal(store::Error),
}

/// For a vault on a shared database: checks every second that the database
/// answers, and says NOT_SERVING on health while it does not (a load
/// balancer then sends callers to a replica that can serve them), SERVING
/// again once it does. The same check compares the database's audit head
/// with the one this process saw, and the erasure ledger's newest entry
/// with the database: a database gone back in time (a restore, a lossy
/// failover) is sent on `fatal`, and the server stops, so that a restart
/// re-applies the erasure ledger to it. Nothing to watch for the embedded
/// engine.
fn watch_database(
    vault: Arc<Vault<AnyStore>>,
    health: HealthReporter,
    mut stop: watch::Receiver<bool>,
    fatal: mpsc::Sender<store::Error>,
    erasure_grace: Duration,
) -> Option<JoinHandle<()>> {
    if !matches!(vault.store(), AnyStore::Postgres(_)) {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut serving = true;
        let mut erasures = ErasureWatch::new(erasure_grace);
        let mut ticker = tokio::time::interval(DATABASE_PROBE_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => return,
            }
            let checked = vault.store().check().await;
            // A drain has begun meanwhile: its NOT_SERVING stands.
            if *stop.borrow() {
                return;
            }
            let checked = match checked {
                Ok(()) => erasures.check(&vault).await,
                Err(e) => Err(e),
            };
            if let Err(e @ store::Error::Rewound(_)) = checked {
                set_status(&health, ServingStatus::NotServing).await;
                let _ = fatal.send(e).await;
                return;
            }
            let reachable = checked.is_ok();
            if reachable != serving {
                serving = reachable;
                if reachable {
                    tracing::info!("the database answers again: serving");
                    set_status(&health, ServingStatus::Serving).await;
                } else {
                    tracing::error!(
                        "the database does not answer: health says NOT_SERVING until it does"
                    );
                    set_status(&health, ServingStatus::NotServing).await;
                }
            }
        }
    }))
}

/// The newest erasure of the shared ledger that the database lacks, and
/// since when. A replica that has written nothing since an erasure cannot
/// see from the audit head that the database went back behind it; the
/// ledger, which a rollback of the database does not touch, says so. An
/// erasure is missing for a moment between its ledger entry and its write,
/// which waits in the commit queue and then takes at most the call
/// deadline; missing for longer than `grace`, its write is not coming.
struct ErasureWatch {
    grace: Duration,
    missing: Option<(u64, tokio::time::Instant)>,
}

impl ErasureWatch {
    fn new(grace: Duration) -> Self {
        Self {
            grace,
            missing: None,
        }
    }

    /// [`store::Error::Rewound`] once the same erasure has been missing for
    /// longer than the grace; a failed read of the ledger is the database
    /// being unreachable.
    async fn check(&mut self, vault: &Vault<AnyStore>) -> Result<(), store::Error> {
        let missing = match vault.erasure_missing().await {
            Ok(missing) => missing,
            Err(e) => {
                tracing::warn!(error = %e, "cannot compare the erasure ledger with the database");
                return Err(store::Error::Backend(
                    "the erasure ledger or the database cannot be read".into(),
                ));
            }
        };
        let since = match (missing, self.missing) {
            (Some(seq), Some((before, since))) if seq == before => since,
            (Some(_), _) => tokio::time::Instant::now(),
            (None, _) => {
                self.missing = None;
                return Ok(());
            }
        };
        self.missing = missing.map(|seq| (seq, since));
        match missing {
            Some(seq) if since.elapsed() > self.grace => {
                // Refused in the store first, so that nothing in flight
                // during the drain reveals what the ledger erased.
                let why = format!(
                    "it lacks erasure {seq}, which the erasure ledger holds (restored from a backup, or failed over to a standby that lacked the last commits, or the erasure's write failed); erased subjects may be back. Writes and reveals are refused; restart to re-apply the erasure ledger"
                );
                vault.store().refuse_writes(why.clone());
                Err(store::Error::Rewound(why))
            }
            _ => Ok(()),
        }
    }
}

/// Serves the metrics on their plaintext port until `stop` changes, reading
/// the gauges at each scrape.
fn serve_metrics(
    listener: TcpListener,
    vault: Arc<Vault<AnyStore>>,
    metrics: Arc<Metrics>,
    connections: Arc<Connections>,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let render = Arc::new(move || {
        let stats = vault.store().stats();
        metrics.render(&Gauges {
            tokens_stored: stats.records,
            audit_head: vault.store().audit_head().seq,
            pending_compaction_bytes: stats.pending_compaction_bytes,
            wal_bytes: stats.wal_bytes,
            open_connections: connections.len() as u64,
            fpt_crowded: vault.fpt_crowded(),
            reads_from_memory: stats.reads.memory,
            reads_from_files: stats.reads.files,
            block_cache: [
                ("data", stats.block_cache.data),
                ("index", stats.block_cache.index),
                ("filter", stats.block_cache.filter),
            ]
            .map(|(block, lookups)| BlockLookups {
                block,
                hits: lookups.hits,
                misses: lookups.misses,
            })
            .to_vec(),
            committed_batches: stats.commits.batches,
            commit_groups: stats.commits.groups,
            failed_commit_groups: stats.commits.failed_groups,
        })
    });
    tokio::spawn(metrics_http::serve(listener, render, stop))
}

/// The last writes of a run, once nothing serves: refusals counted since
/// the last flush, the final signed checkpoint, then the store's close,
/// which waits for the committer's last write.
async fn close(vault: Arc<Vault<AnyStore>>, refusals: &RefusalLog) {
    background::flush_refusals(&vault, refusals).await;
    match vault.checkpoint_audit().await {
        Ok(Some(seq)) => tracing::info!(audit.seq = seq, "signed the final audit checkpoint"),
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "cannot sign the final audit checkpoint"),
    }
    // Every request holding the vault has finished or been dropped.
    match Arc::try_unwrap(vault) {
        Ok(vault) => vault.into_store().close().await,
        Err(_) => {
            tracing::warn!("requests still hold the vault; the database closes when they finish")
        }
    }
}

/// Server reflection, both versions: grpcurl 1.8 and Python's reflection
/// client speak only v1alpha, newer tools v1.
fn reflection(
    descriptor_sets: &[&'static [u8]],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ServeError,
> {
    // Each version's builder adds its own descriptor; adding the other's
    // makes both list both, so a client of either version sees the truth.
    use tonic_reflection::pb::{
        v1::FILE_DESCRIPTOR_SET as V1, v1alpha::FILE_DESCRIPTOR_SET as V1ALPHA,
    };
    let builder = |other: &'static [u8]| {
        descriptor_sets
            .iter()
            .chain(std::iter::once(&other))
            .fold(tonic_reflection::server::Builder::configure(), |b, set| {
                b.register_encoded_file_descriptor_set(set)
            })
    };
    let err = |e: tonic_reflection::server::Error| ServeError::Reflection(e.to_string());
    Ok((
        builder(V1ALPHA).build_v1().map_err(err)?,
        builder(V1).build_v1alpha().map_err(err)?,
    ))
}

async fn set_status(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(SERVICE_NAME, status).await;
}

async fn bind(setting: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            setting,
            addr,
            source,
        })
}

fn local_addr(
    listener: &TcpListener,
    setting: &'static str,
    addr: SocketAddr,
) -> Result<SocketAddr, ServeError> {
    listener.local_addr().map_err(|source| ServeError::Bind {
        setting,
        addr,
        source,
    })
}

/// Says loudly that the database at `key` is reached over TCP without TLS
/// (`sslmode=disable`, which the configuration accepts only when written).
fn warn_if_in_the_clear(key: &str, database: &DatabaseSetting) {
    if store::postgres::in_the_clear(&database.connection, database.ca_file.is_some()) {
        tracing::warn!(
            setting = key,
            "the database is reached over TCP without TLS (sslmode=disable): the database, or anyone on the path, can change what the vault reads and its audit trail; set ca_file for production"
        );
    }
}

/// The password and the CA certificates a database setting (the table at
/// `key`) points to, each read from its file.
fn database_secrets(key: &str, database: &DatabaseSetting) -> Result<DatabaseSecrets, ServeError> {
    database
        .read_secrets(key)
        .map_err(|message| ServeError::Store(store::Error::Backend(message)))
}
