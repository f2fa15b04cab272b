//! The vault under test: a `tokenvault serve` child process in a temporary
//! directory, so its CPU time and memory are measured apart from the load
//! generator's.

use std::{
    io::{BufRead, BufReader, Seek, SeekFrom},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use hdrhistogram::Histogram;

use crate::{
    client::ClientTls,
    crypto::{MasterKey, softhsm::ThrowawayHsm},
    metrics::STORE_READS,
    pki::{Ca, ClientSpec},
    store::{Durability, ReadTiers},
};

/// The identity the load generator presents.
pub const BENCH_CLIENT: &str = "spiffe://bench.tokenvault.local/load";

/// The purpose the load generator states.
pub const BENCH_PURPOSE: &str = "benchmark";

/// A running server child.
pub struct BenchServer {
    child: Child,
    /// Its mTLS address.
    pub addr: SocketAddr,
    /// Its plaintext metrics address.
    metrics_addr: SocketAddr,
    /// The client files to reach it.
    pub tls: ClientTls,
    /// Where RocksDB keeps its files.
    pub data_dir: PathBuf,
    /// The server's log, as it wrote it.
    log_path: PathBuf,
}

/// Creates certificates, a master key and writes a config into `dir`.
///
/// # Errors
/// A description of what failed.
pub fn prepare(dir: &Path) -> Result<ClientTls, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let ca = Ca::new("tokenvault bench CA").map_err(|e| err(&e))?;
    let server = ca
        .issue_server(&["localhost"], &["127.0.0.1".parse().map_err(|e| err(&e))?])
        .map_err(|e| err(&e))?;
    let client = ca
        .issue_client(&ClientSpec::spiffe(BENCH_CLIENT))
        .map_err(|e| err(&e))?;
    let write =
        |name: &str, content: &str| std::fs::write(dir.join(name), content).map_err(|e| err(&e));
    write("ca.pem", &ca.cert_pem())?;
    write("server.pem", &server.cert_pem)?;
    write("server.key", &server.key_pem)?;
    write("client.pem", &client.cert_pem)?;
    write("client.key", &client.key_pem)?;
    let master = dir.join("master.key");
    if !master.exists() {
        MasterKey::create_file(&master).map_err(|e| err(&e))?;
    }
    Ok(ClientTls {
        ca: dir.join("ca.pem"),
        cert: dir.join("client.pem"),
        key: dir.join("client.key"),
        server_name: "localhost".into(),
    })
}

/// What the vault under test stores its data in.
#[derive(Debug, Clone)]
pub enum ServerSetup {
    /// RocksDB in the server's directory.
    RocksDb {
        /// Whether acknowledged writes are fsync'd.
        durability: Durability,
        /// `storage.block_cache_mib`.
        block_cache_mib: usize,
    },
    /// A PostgreSQL database (`connection`), with the erasure ledger in
    /// another (`ledger`).
    Postgres {
        /// The vault's database.
        connection: String,
        /// The erasure ledger's database.
        ledger: String,
    },
}

/// Where the vault under test keeps its master key.
pub enum BenchKey {
    /// A 32-byte file in the server's directory.
    File,
    /// A non-extractable AES key in a throwaway SoftHSM2 token.
    Hsm {
        /// The token's configuration and files.
        hsm: ThrowawayHsm,
        /// Its PIN file.
        pin: PathBuf,
    },
}

impl BenchKey {
    /// A token with a master key made by `tokenvault keys create-hsm-key`.
    ///
    /// # Errors
    /// If this binary's path is unknown.
    pub fn hsm() -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let hsm = ThrowawayHsm::new();
        let pin = hsm.init_token("bench");
        hsm.create_key(&exe, "bench", "master", &pin);
        Ok(Self::Hsm { hsm, pin })
    }

    /// The configuration's `[keys]` tables.
    fn keys_toml(&self) -> String {
        match self {
            Self::File => "[keys]\nmaster_key_file = \"master.key\"\n".to_owned(),
            Self::Hsm { hsm, pin } => hsm.keys_toml("bench", "master", pin),
        }
    }

    /// Where the configuration's master key is, as a suffix of its name in
    /// the report: nothing for a file, `+hsm` for the token.
    pub fn suffix(&self) -> &'static str {
        match self {
            Self::File => "",
            Self::Hsm { .. } => "+hsm",
        }
    }
}

impl BenchServer {
    /// Starts `tokenvault serve` number `n` in `dir` (replicas share the
    /// directory's certificates and master key) on `setup`, and waits until
    /// it serves.
    ///
    /// # Errors
    /// If it cannot start or does not report serving within a minute.
    pub fn start(
        dir: &Path,
        tls: &ClientTls,
        setup: &ServerSetup,
        key: &BenchKey,
        n: usize,
    ) -> Result<Self, String> {
        let storage = match setup {
            ServerSetup::RocksDb {
                durability,
                block_cache_mib,
            } => {
                let durability = match durability {
                    Durability::Sync => "sync",
                    Durability::Buffered => "buffered",
                };
                format!(
                    "durability = \"{durability}\"\n[subjects]\nerasure_ledger = \"ledger/erasures\"\n[storage]\nblock_cache_mib = {block_cache_mib}\n"
                )
            }
            ServerSetup::Postgres { connection, ledger } => format!(
                "[subjects.erasure_ledger_database]\nconnection = \"{ledger}\"\n[storage]\nengine = \"postgres\"\n[storage.postgres]\nconnection = \"{connection}\"\n"
            ),
        };
        let config = format!(
            r#"data_dir = "data"
{storage}
[server]
listen = "127.0.0.1:0"
health_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
[tls]
cert = "server.pem"
key = "server.key"
client_ca = "ca.pem"
{keys}
[log]
format = "json"
level = "info"
[[policy]]
identity = "{BENCH_CLIENT}"
scopes = ["tokenize:*", "detokenize:*"]
purposes = ["{BENCH_PURPOSE}"]
"#,
            keys = key.keys_toml()
        );
        let config_path = dir.join(format!("tokenvault-{n}.toml"));
        std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        // The server writes its log to a file itself, as it would for a log
        // collector: formatting and writing it is part of the measured
        // cost, and the load generator, which shares the machine, spends
        // nothing on it. The file is read for the address at start and for
        // the handler latencies after each scenario.
        let log_path = dir.join(format!("server-{n}.log"));
        let log_file = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
        let mut command = Command::new(exe);
        command
            .args(["serve", "--config"])
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log_file);
        if let BenchKey::Hsm { hsm, .. } = key {
            let (name, value) = hsm.env();
            command.env(name, value);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start the server: {e}"))?;
        let addrs = wait_for_serving(&log_path, &mut child, Duration::from_secs(60));
        match addrs {
            Ok((addr, metrics_addr)) => Ok(Self {
                child,
                addr,
                metrics_addr,
                tls: tls.clone(),
                data_dir: dir.join("data"),
                log_path,
            }),
            Err(e) => {
                // Not left running behind the failed bench.
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How much of its log the server has written so far: where the lines
    /// of the next scenario start.
    pub fn log_position(&self) -> u64 {
        std::fs::metadata(&self.log_path).map_or(0, |m| m.len())
    }

    /// The latencies the server logged for `methods` from `from` on, in
    /// microseconds: each request's time in its handler (authorisation,
    /// the vault, the audit commit), without the network, TLS, HTTP/2 or
    /// the load generator. `None` if it logged none. Lines reach the file a
    /// few milliseconds after their request: call this a little after the
    /// last answer.
    pub fn handler_latencies(&self, from: u64, methods: &[&str]) -> Option<Histogram<u64>> {
        let mut file = std::fs::File::open(&self.log_path).ok()?;
        file.seek(SeekFrom::Start(from)).ok()?;
        let mut latencies = super::load::new_histogram();
        for line in BufReader::new(file).lines() {
            let Ok(line) = line else { break };
            let Ok(entry) = serde_json::from_str::<RequestLine>(&line) else {
                continue;
            };
            if entry.message == "request"
                && let (Some(method), Some(micros)) = (entry.method, entry.latency_us)
                && methods.contains(&method.as_str())
            {
                super::load::record_micros(&mut latencies, micros);
            }
        }
        (!latencies.is_empty()).then_some(latencies)
    }

    /// The store's point reads by where they were answered, from the
    /// metrics port; `None` if it cannot be scraped.
    pub async fn store_reads(&self) -> Option<ReadTiers> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.metrics_addr)
            .await
            .ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
            .await
            .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let (_, body) = response.split_once("\r\n\r\n")?;
        parse_reads(body)
    }

    /// SIGTERM and wait.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// A vault's point reads by where its store answered them, from the
/// Prometheus text of its metrics port.
///
/// Not RocksDB's block cache counters: those count compactions' lookups
/// too (an empty vault whose reads all came from memtables showed 0 % data
/// block hits), and a read the memory tier cannot finish twice.
fn parse_reads(text: &str) -> Option<ReadTiers> {
    let sample = |tier: &str| -> Option<u64> {
        let wanted = format!("{STORE_READS}{{tier=\"{tier}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&wanted))
            .and_then(|value| value.trim().parse().ok())
    };
    Some(ReadTiers {
        memory: sample("memory")?,
        files: sample("files")?,
    })
}

/// Between `before` and `after`, the share of point reads answered from
/// memory (memtables and block cache), in percent: the hit ratio of reads
/// in the block cache. `None` where there were none (no reads, or an
/// engine that does not count them).
pub fn memory_share_pct(before: ReadTiers, after: ReadTiers) -> Option<f64> {
    let memory = after.memory.saturating_sub(before.memory);
    let files = after.files.saturating_sub(before.files);
    (memory + files > 0).then(|| 100.0 * memory as f64 / (memory + files) as f64)
}

/// The gRPC and metrics addresses from the server's "serving" log line,
/// once it is there.
fn wait_for_serving(
    log_path: &Path,
    child: &mut Child,
    limit: Duration,
) -> Result<(SocketAddr, SocketAddr), String> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        let serving = log.lines().find_map(|line| {
            let event: serde_json::Value = serde_json::from_str(line).ok()?;
            (event["message"] == "serving").then(|| {
                let addr = |field: &str| {
                    let addr = event[field].as_str().unwrap_or_default();
                    addr.parse::<SocketAddr>()
                        .map_err(|e| format!("bad {field} {addr}: {e}"))
                };
                Ok((addr("grpc.addr")?, addr("metrics.addr")?))
            })
        });
        if let Some(addrs) = serving {
            return addrs;
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the server exited ({status}) before serving: see {}",
                log_path.display()
            ));
        }
        if std::time::Instant::now() > deadline {
            return Err("the server did not start within a minute".to_owned());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CPU time and memory of a process, from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    /// User plus system CPU seconds so far.
    pub cpu_seconds: f64,
    /// Peak resident set size since the last [`reset_peak_rss`], bytes.
    pub peak_rss_bytes: u64,
}

/// The fields of a request's log line the bench reads.
#[derive(serde::Deserialize)]
struct RequestLine {
    message: String,
    method: Option<String>,
    latency_us: Option<u64>,
}

/// Reads the stats of `pid`; zeros if they cannot be read.
pub fn proc_stats(pid: u32) -> ProcStats {
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let cpu_seconds = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the parenthesised command name; utime and stime
            // are the 14th and 15th fields of the whole line.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    ProcStats {
        cpu_seconds,
        peak_rss_bytes: kib("VmHWM:"),
    }
}

/// The summed CPU and peak memory of `pids`.
pub fn sum_stats(pids: &[u32]) -> ProcStats {
    pids.iter()
        .map(|&pid| proc_stats(pid))
        .fold(ProcStats::default(), |sum, one| ProcStats {
            cpu_seconds: sum.cpu_seconds + one.cpu_seconds,
            peak_rss_bytes: sum.peak_rss_bytes + one.peak_rss_bytes,
        })
}

/// Resets the kernel's peak-RSS mark of `pid` (writes 5 to `clear_refs`), so
/// each scenario reports its own peak. Best effort.
pub fn reset_peak_rss(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Total size of the files under `dir`, bytes.
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Gauges, Metrics};

    fn rendered(memory: u64, files: u64) -> String {
        Metrics::default().render(&Gauges {
            reads_from_memory: memory,
            reads_from_files: files,
            ..Gauges::default()
        })
    }

    /// The bench reads what the server renders.
    #[test]
    fn store_reads_are_read_from_the_metrics_text() {
        let before = parse_reads(&rendered(10, 5)).unwrap();
        assert_eq!(
            before,
            ReadTiers {
                memory: 10,
                files: 5
            }
        );
        let after = parse_reads(&rendered(40, 15)).unwrap();
        assert_eq!(memory_share_pct(before, after), Some(75.0));
        assert_eq!(memory_share_pct(before, before), None);
        assert_eq!(parse_reads("tokenvault_tokens_stored 7\n"), None);
    }
}
