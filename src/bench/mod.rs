//! `tokenvault bench`: throughput and latency over real mTLS gRPC, next to
//! the ceilings measured in the same run (a no-op RPC on the same port, and
//! the vault's own store and crypto path without gRPC).
//!
//! Loopback only; every run is bounded in time and request count.

mod ceilings;
pub mod db_proxy;
mod load;
mod peer;
mod report;
mod server;
mod subject_index;
mod targets;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Args;
use hdrhistogram::Histogram;
use tonic::transport::Channel;

pub use load::Scenario;
use load::{LoadResult, LoadSpec};
use report::Machine;
pub use report::{Report, Row, WarmUp};
use server::{
    BenchKey, BenchServer, ProcStats, ServerSetup, memory_share_pct, proc_stats, reset_peak_rss,
    sum_stats,
};

use crate::{
    client::{self, ClientTls},
    store::{Durability, ReadTiers, postgres::cluster::ThrowawayCluster},
};

/// Requests in flight while the read pool is filled (small: the pool is
/// made before anything is measured, and should not itself crowd the disk).
const POOL_FILL_IN_FLIGHT: usize = 8;

/// Requests in flight during a preload of millions of tokens, enough to keep
/// the group committer's batches full on two cores.
const PRELOAD_IN_FLIGHT: usize = 16;

/// How many of the preload's tokens the read scenarios after it draw from
/// (a uniform sample: all of them up to this many).
const PRELOAD_SAMPLE: usize = 1_000_000;

/// `tokenvault bench` options.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Scenarios to run, comma separated: noop, tokenize, tokenize-batch,
    /// detokenize, detokenize-batch, mixed, or all.
    #[arg(long, default_value = "all")]
    pub scenarios: String,
    /// Engines to run the self-started vault on, comma separated: rocksdb
    /// (once per --durability) and postgres (on a throwaway PostgreSQL
    /// cluster, once per --replicas).
    #[arg(long, default_value = "rocksdb")]
    pub engine: String,
    /// Durability modes to run the embedded engine with: sync, buffered.
    #[arg(long, default_value = "sync,buffered")]
    pub durability: String,
    /// Where the embedded engine's vault keeps its master key, comma
    /// separated, one configuration each: file (a 32-byte file), hsm (an
    /// AES key in a throwaway SoftHSM2 token, named `sync+hsm` in the
    /// report).
    #[arg(long, default_value = "file")]
    pub master_key: String,
    /// For each embedded-engine configuration, also time how long the vault
    /// takes to open (start to serving, median of three restarts) with this
    /// many subject keys stored; 0 to skip.
    #[arg(long, default_value_t = 0)]
    pub open_subjects: usize,
    /// The embedded engine's block cache (`storage.block_cache_mib`), MiB:
    /// with more stored than it holds, reads go to the files (see the
    /// 10M-token rows of BENCHMARKS.md).
    #[arg(long, default_value_t = 256)]
    pub block_cache_mib: usize,
    /// With --engine postgres: how many vault replicas share the database,
    /// comma separated, one configuration each (the connections are spread
    /// over the replicas).
    #[arg(long, default_value = "1,2")]
    pub replicas: String,
    /// With --engine postgres: milliseconds added each way between every
    /// replica and the database, by a proxy the benchmark runs (a real
    /// network's round trip, which the audit head's lock is held across);
    /// 0 for a direct unix socket.
    #[arg(long, default_value_t = 0.0)]
    pub db_latency_ms: f64,
    /// Also measure what a team would build instead: `postgres`, a table
    /// with pgcrypto on a throwaway cluster, bare and with an audit row in
    /// each statement.
    #[arg(long, value_enum)]
    pub peer: Option<Peer>,
    /// Seconds per scenario.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Requests per scenario at most.
    #[arg(long, default_value_t = 10_000_000)]
    pub max_requests: u64,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,
    /// mTLS connections the requests share.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Items per request in the batch scenarios.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Tokens created before the read scenarios, which draw from them
    /// uniformly at random (after the preload: from these and a uniform
    /// sample of up to 1M of the preload's, in proportion).
    #[arg(long, default_value_t = 10_000)]
    pub pool: usize,
    /// After the first pass, store this many more tokens and run the
    /// scenarios again (10000000 for the 10M target; 0 to skip).
    #[arg(long, default_value_t = 1_000_000)]
    pub preload: usize,
    /// Skip the in-process ceiling.
    #[arg(long)]
    pub no_in_process: bool,
    /// Longest wait, in seconds, for the self-started server to settle
    /// (finish its flushes and compactions) before each scenario; 0 not to
    /// wait (smoke runs).
    #[arg(long, default_value_t = 300)]
    pub settle_limit: u64,
    /// Longest unmeasured warm-up, in seconds, after the preload and right
    /// before the first read scenario: uniform single reads until the share
    /// of reads the store answers from memory
    /// stops rising (the block cache's steady state under uniform reads,
    /// which a long-running vault is in), so the read scenarios do not
    /// measure a cache the preload left cold. 0 not to warm up.
    #[arg(long, default_value_t = 120)]
    pub warm_limit: u64,
    /// Seconds of a sustained mixed run (80 % detokenize, 20 % tokenize)
    /// after each pass's settled scenarios, with no settle wait before it:
    /// the flushes and compactions the load causes are on the clock (0 to
    /// skip).
    #[arg(long, default_value_t = 0.0)]
    pub sustained: f64,
    /// Benchmark a running server instead of starting one.
    #[arg(long, requires_all = ["ca", "cert", "key"])]
    pub target: Option<String>,
    /// With --target: CA of the server certificate.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// With --target: client certificate (needs tokenize:email, detokenize:email
    /// and the purpose `benchmark`).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// With --target: client key.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the report as Markdown here.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Measure nothing: print (and with --markdown write) the tables of a
    /// report saved earlier with --json, as BENCHMARKS.md shows them.
    #[arg(long, conflicts_with_all = ["target", "json"])]
    pub render: Option<PathBuf>,
}

/// A peer to measure beside the vault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// PostgreSQL with pgcrypto.
    Postgres,
}

/// An engine to run the self-started vault on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    RocksDb,
    Postgres,
}

/// The server side of one configuration: the vault processes and, on
/// PostgreSQL, the database's processes. Empty for `--target`.
#[derive(Clone, Copy)]
struct ServerSide<'a> {
    vaults: &'a [BenchServer],
    database: Option<&'a ThrowawayCluster>,
}

impl ServerSide<'_> {
    /// Every process whose CPU and memory count as the server's.
    fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.vaults.iter().map(BenchServer::pid).collect();
        if let Some(database) = self.database {
            pids.extend(database.server_pids());
        }
        pids
    }

    /// Their summed CPU and peak memory; `None` when nothing is measured.
    fn stats(&self) -> Option<ProcStats> {
        (!self.vaults.is_empty()).then(|| sum_stats(&self.pids()))
    }

    /// The vaults' point reads by where they were answered, summed; `None`
    /// when nothing is measured or a vault's metrics cannot be read.
    async fn store_reads(&self) -> Option<ReadTiers> {
        let mut sum = ReadTiers::default();
        for vault in self.vaults {
            let reads = vault.store_reads().await?;
            sum.memory += reads.memory;
            sum.files += reads.files;
        }
        (!self.vaults.is_empty()).then_some(sum)
    }
}

/// Runs the benchmark and prints the Markdown table.
///
/// # Errors
/// A description of what failed.
pub async fn run(args: BenchArgs) -> Result<Report, String> {
    if let Some(saved) = &args.render {
        let text =
            std::fs::read(saved).map_err(|e| format!("cannot read {}: {e}", saved.display()))?;
        let report: Report = serde_json::from_slice(&text)
            .map_err(|e| format!("{} is not a bench report: {e}", saved.display()))?;
        publish(&report, &args)?;
        return Ok(report);
    }
    let scenarios = parse_scenarios(&args.scenarios)?;
    let mut report = Report {
        opens: Vec::new(),
        subject_index_ratios: Vec::new(),
        db_round_trips: Vec::new(),
        warm_ups: Vec::new(),
        preload_peak_rss_mib: None,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine(),
        rows: Vec::new(),
        disk_bytes_per_token: None,
        settle_seconds: None,
        targets: Vec::new(),
    };
    if let Some(target) = &args.target {
        let tls = ClientTls {
            ca: args.ca.clone().unwrap_or_default(),
            cert: args.cert.clone().unwrap_or_default(),
            key: args.key.clone().unwrap_or_default(),
            server_name: "localhost".into(),
        };
        let channels = connect(target, &tls, args.connections).await?;
        let nothing = ServerSide {
            vaults: &[],
            database: None,
        };
        measure(&args, &scenarios, &channels, nothing, "target", &mut report).await?;
    } else {
        let mut cluster: Option<ThrowawayCluster> = None;
        let keys = parse_keys(&args.master_key)?;
        for engine in parse_engines(&args.engine)? {
            match engine {
                Engine::RocksDb => {
                    for durability in parse_durabilities(&args.durability)? {
                        for key in &keys {
                            let setup = ServerSetup::RocksDb {
                                durability,
                                block_cache_mib: args.block_cache_mib,
                            };
                            let name = format!("{}{}", durability_name(durability), key.suffix());
                            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
                            let tls = server::prepare(dir.path())?;
                            let server = BenchServer::start(dir.path(), &tls, &setup, key, 0)?;
                            run_configuration(
                                &args,
                                &scenarios,
                                vec![server],
                                None,
                                &name,
                                &mut report,
                            )
                            .await?;
                            if args.open_subjects > 0 {
                                let open = time_open(&setup, key, args.open_subjects).await?;
                                report.opens.push(report::OpenTime {
                                    configuration: name,
                                    subject_keys: args.open_subjects as u64,
                                    median_s: open,
                                });
                            }
                        }
                    }
                }
                Engine::Postgres => {
                    let cluster = cluster.get_or_insert_with(ThrowawayCluster::start);
                    for replicas in parse_replicas(&args.replicas)? {
                        let (vault_db, ledger_db) =
                            (format!("vault_{replicas}"), format!("ledger_{replicas}"));
                        cluster.create_database(&vault_db).await;
                        cluster.create_database(&ledger_db).await;
                        let (setup, proxy) =
                            postgres_setup(cluster, &vault_db, &ledger_db, args.db_latency_ms)
                                .await?;
                        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
                        let tls = server::prepare(dir.path())?;
                        let servers = (0..replicas)
                            .map(|n| {
                                BenchServer::start(dir.path(), &tls, &setup, &BenchKey::File, n)
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        let name = if args.db_latency_ms > 0.0 {
                            format!("postgres×{replicas}+{}ms", args.db_latency_ms)
                        } else {
                            format!("postgres×{replicas}")
                        };
                        if let Some(proxy) = &proxy {
                            report.db_round_trips.push(report::DbRoundTrip {
                                configuration: name.clone(),
                                direct_ms: cluster
                                    .median_round_trip(&cluster.conninfo(&vault_db), 200)
                                    .await?,
                                through_proxy_ms: cluster
                                    .median_round_trip(&proxy.conninfo(&vault_db, "bench"), 200)
                                    .await?,
                            });
                        }
                        run_configuration(
                            &args,
                            &scenarios,
                            servers,
                            Some(cluster),
                            &name,
                            &mut report,
                        )
                        .await?;
                    }
                }
            }
        }
        if args.peer == Some(Peer::Postgres) {
            let cluster = cluster.get_or_insert_with(ThrowawayCluster::start);
            peer::measure(&args, &scenarios, cluster, &mut report).await?;
        }
    }
    if !args.no_in_process {
        ceilings::in_process_ceiling(&args, &mut report).await?;
        ceilings::store_ceiling(&args, &mut report).await?;
        ceilings::device_ceiling(&args, &mut report).await?;
        subject_index::subject_index_cost(&args, &mut report).await?;
    }
    report.targets = targets::targets(&report, args.preload as u64);
    publish(&report, &args)?;
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(report)
}

/// How replicas reach the vault's and the ledger's databases: the
/// cluster's unix socket, or, with `latency_ms` each way, a proxy in front
/// of it (returned, to be kept for the run).
async fn postgres_setup(
    cluster: &ThrowawayCluster,
    vault_db: &str,
    ledger_db: &str,
    latency_ms: f64,
) -> Result<(ServerSetup, Option<db_proxy::DbProxy>), String> {
    if latency_ms <= 0.0 {
        let setup = ServerSetup::Postgres {
            connection: cluster.conninfo(vault_db),
            ledger: cluster.conninfo(ledger_db),
        };
        return Ok((setup, None));
    }
    if !latency_ms.is_finite() || latency_ms > 1000.0 {
        return Err(format!("--db-latency-ms takes 0 to 1000, not {latency_ms}"));
    }
    let proxy = db_proxy::DbProxy::start(cluster.socket_dir())
        .await
        .map_err(|e| format!("cannot start the latency proxy: {e}"))?;
    proxy.set_latency(Duration::from_secs_f64(latency_ms / 1000.0));
    let setup = ServerSetup::Postgres {
        connection: proxy.conninfo(vault_db, "tokenvault-bench"),
        ledger: proxy.conninfo(ledger_db, "tokenvault-bench"),
    };
    Ok((setup, Some(proxy)))
}

/// Prints the report's tables, and writes them to --markdown if given.
fn publish(report: &Report, args: &BenchArgs) -> Result<(), String> {
    let markdown = report.markdown();
    println!("{markdown}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, &markdown)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

fn parse_scenarios(list: &str) -> Result<Vec<Scenario>, String> {
    if list == "all" {
        return Ok(Scenario::ALL.to_vec());
    }
    list.split(',')
        .map(|name| {
            Scenario::from_name(name.trim()).ok_or_else(|| format!("unknown scenario {name:?}"))
        })
        .collect()
}

/// Connects to `servers` (the connections spread over them), measures,
/// and stops them.
async fn run_configuration(
    args: &BenchArgs,
    scenarios: &[Scenario],
    servers: Vec<BenchServer>,
    database: Option<&ThrowawayCluster>,
    name: &str,
    report: &mut Report,
) -> Result<(), String> {
    let mut channels = Vec::new();
    for n in 0..args.connections.max(servers.len()) {
        let server = &servers[n % servers.len()];
        channels.extend(connect(&server.addr.to_string(), &server.tls, 1).await?);
    }
    let side = ServerSide {
        vaults: &servers,
        database,
    };
    let result = measure(args, scenarios, &channels, side, name, report).await;
    for server in servers {
        server.stop();
    }
    result
}

fn parse_engines(list: &str) -> Result<Vec<Engine>, String> {
    list.split(',')
        .map(|e| match e.trim() {
            "rocksdb" => Ok(Engine::RocksDb),
            "postgres" => Ok(Engine::Postgres),
            other => Err(format!("unknown engine {other:?} (rocksdb, postgres)")),
        })
        .collect()
}

fn parse_keys(list: &str) -> Result<Vec<BenchKey>, String> {
    list.split(',')
        .map(|k| match k.trim() {
            "file" => Ok(BenchKey::File),
            "hsm" => BenchKey::hsm(),
            other => Err(format!("unknown master key source {other:?} (file, hsm)")),
        })
        .collect()
}

/// Seconds from starting a vault on `setup` and `key` to its serving, with
/// `subjects` subject keys stored (one value each): the median of three
/// restarts. The master key unwraps the keyring at open; the subject keys
/// are unwrapped by the keyring's subject key when a request needs them,
/// so their number should not matter.
async fn time_open(setup: &ServerSetup, key: &BenchKey, subjects: usize) -> Result<f64, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let tls = server::prepare(dir.path())?;
    let server = BenchServer::start(dir.path(), &tls, setup, key, 0)?;
    let channels = connect(&server.addr.to_string(), &tls, 2).await?;
    progress(&format!("open time: storing {subjects} subjects' values"));
    load::fill(
        &channels,
        subjects,
        POOL_FILL_IN_FLIGHT,
        load::Minted::Sampled(0),
        load::Subjects::OnePerValue,
        |_| {},
    )
    .await?;
    drop(channels);
    server.stop();
    let mut times = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let server = BenchServer::start(dir.path(), &tls, setup, key, 0)?;
        times.push(started.elapsed().as_secs_f64());
        server.stop();
    }
    times.sort_by(f64::total_cmp);
    Ok(times[1])
}

fn parse_replicas(list: &str) -> Result<Vec<usize>, String> {
    list.split(',')
        .map(|n| match n.trim().parse::<usize>() {
            Ok(n) if (1..=8).contains(&n) => Ok(n),
            _ => Err(format!("--replicas takes numbers from 1 to 8, not {n:?}")),
        })
        .collect()
}

fn parse_durabilities(list: &str) -> Result<Vec<Durability>, String> {
    list.split(',')
        .map(|d| match d.trim() {
            "sync" => Ok(Durability::Sync),
            "buffered" => Ok(Durability::Buffered),
            other => Err(format!("unknown durability {other:?}")),
        })
        .collect()
}

fn durability_name(d: Durability) -> &'static str {
    match d {
        Durability::Sync => "sync",
        Durability::Buffered => "buffered",
    }
}

/// Waits until the server side has used under 5 % of a core for two
/// seconds in a row (its flushes and compactions are done), at most `limit`
/// seconds. Returns the seconds waited.
async fn settle(side: ServerSide<'_>, limit: u64, say: bool) -> f64 {
    let started = Instant::now();
    let Some(mut last) = side.stats().map(|s| s.cpu_seconds) else {
        return 0.0;
    };
    let mut quiet = 0;
    while quiet < 2 && started.elapsed().as_secs() < limit {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = side.stats().map_or(last, |s| s.cpu_seconds);
        quiet = if now - last < 0.05 { quiet + 1 } else { 0 };
        last = now;
    }
    let waited = started.elapsed().as_secs_f64();
    if say {
        progress(&format!(
            "preload: waited {waited:.0}s for the server's compactions to finish"
        ));
    }
    waited
}

/// Reads uniformly from `pool` in unmeasured two-second rounds of single
/// detokenizes until the share of reads answered from memory rises by less
/// than a point in a round, or nearly all are (or `--warm-limit` passes):
/// how long it took and the last round's share. `None` where the store
/// does not count its reads. Single reads, because the store counts a
/// batch as one read, answered from memory only if every key was (at 10M
/// tokens batches read 0.4 % from memory while single reads read 26 %).
async fn warm_up(
    args: &BenchArgs,
    channels: &[Channel],
    pool: &Arc<Vec<String>>,
    side: ServerSide<'_>,
    configuration: &str,
) -> Option<WarmUp> {
    const ROUND: Duration = Duration::from_secs(2);
    let started = Instant::now();
    let mut spec = LoadSpec::closed_loop(Scenario::Detokenize, args);
    spec.duration = ROUND;
    spec.max_requests = u64::MAX;
    let mut last: Option<f64> = None;
    loop {
        let before = side.store_reads().await?;
        let _ = load::run(channels, &spec, Arc::clone(pool)).await;
        let share = memory_share_pct(before, side.store_reads().await?)?;
        progress(&format!(
            "warm-up: {share:.1} % of reads answered from memory"
        ));
        let done = share >= 99.5
            || last.is_some_and(|last| share - last < 1.0)
            || started.elapsed().as_secs() >= args.warm_limit;
        last = Some(share);
        if done {
            return Some(WarmUp {
                configuration: configuration.to_owned(),
                seconds: started.elapsed().as_secs_f64(),
                reads_from_memory_pct: share,
            });
        }
    }
}

async fn connect(addr: &str, tls: &ClientTls, connections: usize) -> Result<Vec<Channel>, String> {
    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        channels.push(
            client::channel(addr, tls)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(channels)
}

/// Runs every scenario (and the paced detokenize) once, then again after a
/// preload if one was asked for.
async fn measure(
    args: &BenchArgs,
    scenarios: &[Scenario],
    channels: &[Channel],
    side: ServerSide<'_>,
    durability: &str,
    report: &mut Report,
) -> Result<(), String> {
    let needs_pool = scenarios.iter().any(|s| s.reads()) || args.sustained > 0.0;
    let pool = if needs_pool {
        progress(&format!(
            "{durability}: creating {} tokens to read",
            args.pool
        ));
        Arc::new(
            load::fill(
                channels,
                args.pool,
                POOL_FILL_IN_FLIGHT,
                load::Minted::Kept,
                load::Subjects::None,
                |_| {},
            )
            .await?,
        )
    } else {
        Arc::new(Vec::new())
    };
    let mut pool = pool;
    let mut stored = pool.len() as u64;
    for pass in 0..2 {
        if pass == 1 {
            if args.preload == 0 {
                break;
            }
            let total = args.preload;
            let started = Instant::now();
            // The bulk load and its compactions count towards peak memory.
            for pid in side.pids() {
                reset_peak_rss(pid);
            }
            let sample = load::fill(
                channels,
                total,
                PRELOAD_IN_FLIGHT,
                load::Minted::Sampled(PRELOAD_SAMPLE),
                load::Subjects::None,
                move |done| {
                    if done % 100_000 < 1000 {
                        progress(&format!(
                            "preload: {done}/{total} tokens, {:.0}/s",
                            done as f64 / started.elapsed().as_secs_f64()
                        ));
                    }
                },
            )
            .await?;
            stored += total as u64;
            // Reads after the preload draw from everything stored: the
            // preload's uniform sample, and the first pool thinned to the
            // same rate, so neither is over-represented.
            let rate = sample.len() as f64 / total.max(1) as f64;
            let mut rng = load::seed(0);
            let mut everything: Vec<String> = pool
                .iter()
                .filter(|_| (load::draw(&mut rng, 1 << 20) as f64) < rate * f64::from(1 << 20))
                .cloned()
                .collect();
            everything.extend(sample);
            pool = Arc::new(everything);
            if let Some(stats) = side.stats() {
                report.preload_peak_rss_mib = Some(stats.peak_rss_bytes as f64 / (1 << 20) as f64);
            }
            if let Some(server) = side.vaults.first() {
                // Compacting millions of new tokens takes the same two
                // cores the second pass needs: measured during it, even the
                // no-op RPC halves. Scale is judged after it.
                report.settle_seconds = Some(settle(side, args.settle_limit, true).await);
                if side.database.is_none() {
                    report.disk_bytes_per_token =
                        Some(server::dir_size(&server.data_dir) as f64 / stored as f64);
                }
            }
        }
        // After the preload, the first read scenario starts on a warmed
        // cache: warmed right before it, since the tokenize scenarios
        // before it are compacted into new files, whose blocks are not
        // cached (warmed before them, the detokenize after a default
        // scenario order still read only 25.6 % from memory).
        let mut cold = pass == 1 && args.warm_limit > 0;
        let mut detokenize_max = None;
        for &scenario in scenarios {
            let spec = LoadSpec::closed_loop(scenario, args);
            // Each scenario starts on a settled server: the flushes and
            // compactions the previous one left behind would otherwise run
            // on the same two cores and be charged to this one.
            settle(side, args.settle_limit, false).await;
            if cold && scenario.reads() {
                cold = false;
                if let Some(warm) = warm_up(args, channels, &pool, side, durability).await {
                    report.warm_ups.push(warm);
                    settle(side, args.settle_limit, false).await;
                }
            }
            let mut row = run_one(
                scenario.name(),
                &spec,
                channels,
                &pool,
                side,
                durability,
                stored,
            )
            .await;
            row.preloaded = pass == 1;
            if scenario == Scenario::Detokenize {
                detokenize_max = Some(row.requests_per_s);
            }
            if matches!(
                scenario,
                Scenario::Tokenize | Scenario::TokenizeBatch | Scenario::Mixed
            ) {
                // Mixed tokenizes one request in five.
                stored += if scenario == Scenario::Mixed {
                    row.items / 5
                } else {
                    row.items
                };
            }
            report.rows.push(row);
        }
        if let Some(max) = detokenize_max {
            // Latency at half the maximum throughput: the operating point a
            // capacity plan should leave room for.
            let spec = LoadSpec {
                scenario: Scenario::Detokenize,
                batch: 1,
                in_flight: args.in_flight,
                duration: Duration::from_secs_f64(args.seconds),
                max_requests: args.max_requests,
                rate: Some(max / 2.0),
            };
            // Each scenario starts on a settled server: the flushes and
            // compactions the previous one left behind would otherwise run
            // on the same two cores and be charged to this one.
            settle(side, args.settle_limit, false).await;
            let mut row = run_one(
                "detokenize@50%",
                &spec,
                channels,
                &pool,
                side,
                durability,
                stored,
            )
            .await;
            row.preloaded = pass == 1;
            report.rows.push(row);
        }
        if args.sustained > 0.0 {
            // Straight after the last scenario, unsettled: what a vault
            // under steady traffic does, its background work included.
            let spec = LoadSpec {
                scenario: Scenario::Mixed,
                batch: 1,
                in_flight: args.in_flight,
                duration: Duration::from_secs_f64(args.sustained),
                max_requests: u64::MAX,
                rate: None,
            };
            let mut row = run_one(
                "mixed-sustained",
                &spec,
                channels,
                &pool,
                side,
                durability,
                stored,
            )
            .await;
            row.preloaded = pass == 1;
            // Mixed tokenizes one request in five.
            stored += row.items / 5;
            report.rows.push(row);
        }
    }
    Ok(())
}

async fn run_one(
    name: &str,
    spec: &LoadSpec,
    channels: &[Channel],
    pool: &Arc<Vec<String>>,
    side: ServerSide<'_>,
    durability: &str,
    stored: u64,
) -> Row {
    progress(&format!(
        "{durability}: {name} for {:.1}s with {} in flight",
        spec.duration.as_secs_f64(),
        spec.in_flight
    ));
    for pid in side.pids() {
        reset_peak_rss(pid);
    }
    let log_from: Vec<u64> = side.vaults.iter().map(BenchServer::log_position).collect();
    let reads_before = side.store_reads().await;
    let before = side.stats();
    let client_before = proc_stats(std::process::id()).cpu_seconds;
    let result = load::run(channels, spec, Arc::clone(pool)).await;
    let client_cpu_seconds = proc_stats(std::process::id()).cpu_seconds - client_before;
    let after = side.stats();
    let reads_after = side.store_reads().await;
    if !side.vaults.is_empty() {
        // The server's log thread writes within a few milliseconds.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every replica's handler times, in one histogram.
    let handler = side
        .vaults
        .iter()
        .zip(log_from)
        .filter_map(|(server, from)| server.handler_latencies(from, spec.scenario.methods()))
        .reduce(|mut all, one| {
            let _ = all.add(&one);
            all
        });
    let measured = Measured {
        server: before.zip(after),
        client_cpu_seconds: Some(client_cpu_seconds),
        handler: handler.as_ref(),
        store_reads: reads_before.zip(reads_after),
    };
    row(name, durability, stored, spec, &result, &measured)
}

/// What was measured beside the load itself.
#[derive(Default)]
pub(super) struct Measured<'a> {
    /// The server's CPU and memory before and after.
    server: Option<(ProcStats, ProcStats)>,
    /// CPU seconds this process (the load generator) used.
    client_cpu_seconds: Option<f64>,
    /// Time in the server's handler, from its request log.
    handler: Option<&'a Histogram<u64>>,
    /// The store's point reads by where they were answered, before and
    /// after.
    store_reads: Option<(ReadTiers, ReadTiers)>,
}

pub(super) fn row(
    name: &str,
    durability: &str,
    stored: u64,
    spec: &LoadSpec,
    result: &LoadResult,
    measured: &Measured<'_>,
) -> Row {
    let (stats, handler) = (measured.server, measured.handler);
    let per_1k_items = |seconds: f64| seconds / result.items as f64 * 1000.0;
    let secs = result.elapsed.as_secs_f64().max(1e-9);
    let quantile = |q: f64| result.latency_us.value_at_quantile(q) as f64 / 1000.0;
    let handler_quantile = |q: f64| handler.map(|h| h.value_at_quantile(q) as f64 / 1000.0);
    let reads_from_memory_pct = measured
        .store_reads
        .and_then(|(before, after)| memory_share_pct(before, after));
    Row {
        scenario: name.to_owned(),
        durability: durability.to_owned(),
        stored_tokens: stored,
        preloaded: false,
        in_flight: spec.in_flight,
        batch: spec.batch,
        requests: result.requests,
        items: result.items,
        errors: result.errors,
        requests_per_s: result.requests as f64 / secs,
        items_per_s: result.items as f64 / secs,
        p50_ms: quantile(0.5),
        p99_ms: quantile(0.99),
        p999_ms: quantile(0.999),
        handler_p50_ms: handler_quantile(0.5),
        handler_p99_ms: handler_quantile(0.99),
        server_cpu_s_per_1k_items: stats
            .filter(|_| result.items > 0)
            .map(|(b, a)| per_1k_items(a.cpu_seconds - b.cpu_seconds)),
        client_cpu_s_per_1k_items: measured
            .client_cpu_seconds
            .filter(|_| result.items > 0)
            .map(per_1k_items),
        server_peak_rss_mib: stats.map(|(_, a)| a.peak_rss_bytes as f64 / (1 << 20) as f64),
        reads_from_memory_pct,
    }
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    // The binary's own commit (see build.rs), not the current directory's.
    let commit = crate::BUILD_COMMIT.to_owned();
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        commit,
        date,
    }
}

/// One progress line on stderr.
pub(super) fn progress(message: &str) {
    eprintln!("bench: {message}");
}

#[cfg(test)]
mod tests {
    use super::ceilings::token_like_key;

    /// The store ceiling's keys must be as scattered as real tokens: all
    /// different, token-shaped, and in no order (a counter would put every
    /// key after the one before).
    #[test]
    fn token_like_keys_are_distinct_and_unordered() {
        let keys: Vec<Vec<u8>> = (1..=10_000).map(|n| token_like_key(7, n)).collect();
        let distinct: std::collections::HashSet<&Vec<u8>> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len());
        assert!(
            keys.iter()
                .all(|k| k.starts_with(b"tok_email_") && k.len() == 42)
        );
        let rising = keys.windows(2).filter(|w| w[1] > w[0]).count();
        assert!((4_000..6_000).contains(&rising), "{rising} of 9,999 rise");
        assert_ne!(token_like_key(7, 1), token_like_key(8, 1));
    }
}
