//! Prometheus metrics: counters and histograms kept in atomics, rendered as
//! the text exposition format on the plaintext metrics port.

use std::{
    collections::BTreeMap,
    fmt::Write,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// The block cache counter's name (the benchmark reads it too).
pub const BLOCK_CACHE_LOOKUPS: &str = "rocksdb_block_cache_lookups_total";

/// The point reads counter's name (the benchmark reads it too).
pub const STORE_READS: &str = "tokenvault_store_reads_total";

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Request latency of one method.
#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// Every metric the server exports. Labels carry method names, status codes
/// and denial reasons: never an identity, value or token.
#[derive(Default)]
pub struct Metrics {
    handled: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    latency: Mutex<BTreeMap<&'static str, std::sync::Arc<Histogram>>>,
    denials: Mutex<BTreeMap<&'static str, u64>>,
    purged: AtomicU64,
    /// Per background job (by name): records rewritten, and its status.
    jobs: Mutex<BTreeMap<&'static str, JobMetrics>>,
}

/// Where a background job stands, as the metrics show it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JobState {
    /// It has work to do and is not paused.
    pub running: bool,
    /// An operator holds it.
    pub paused: bool,
    /// Records visited in this pass.
    pub done: u64,
    /// Records to visit in this pass.
    pub total: u64,
}

/// What the metrics show of one background job.
#[derive(Debug, Default, Clone, Copy)]
struct JobMetrics {
    moved: u64,
    running: bool,
    paused: bool,
    done: u64,
    total: u64,
}

/// Gauges read when the metrics are scraped.
#[derive(Debug, Default, Clone)]
pub struct Gauges {
    /// Estimated records stored.
    pub tokens_stored: u64,
    /// The audit chain's newest sequence number.
    pub audit_head: u64,
    /// RocksDB bytes pending compaction.
    pub pending_compaction_bytes: u64,
    /// Size of the write-ahead log files.
    pub wal_bytes: u64,
    /// Client connections open on the mTLS port.
    pub open_connections: u64,
    /// Format-preserving values that needed several token draws.
    pub fpt_crowded: u64,
    /// Point reads since the store opened, answered from memory.
    pub reads_from_memory: u64,
    /// Point reads since the store opened, answered from files.
    pub reads_from_files: u64,
    /// RocksDB block cache lookups since the store opened, by kind of block.
    pub block_cache: Vec<BlockLookups>,
    /// Batches the store committed since it opened.
    pub committed_batches: u64,
    /// The writes (RocksDB) or transactions (PostgreSQL) they shared.
    pub commit_groups: u64,
    /// Groups that failed (nothing of them written).
    pub failed_commit_groups: u64,
}

/// One kind of block's lookups in RocksDB's block cache.
#[derive(Debug, Default, Clone, Copy)]
pub struct BlockLookups {
    /// The kind of block (`data`, `index`, `filter`): the `block` label.
    pub block: &'static str,
    /// Found in the cache.
    pub hits: u64,
    /// Not found.
    pub misses: u64,
}

impl Metrics {
    /// Counts one finished request.
    pub fn request(&self, method: &'static str, code: &'static str, latency: Duration) {
        *self
            .handled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry((method, code))
            .or_default() += 1;
        let histogram = std::sync::Arc::clone(
            self.latency
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(method)
                .or_default(),
        );
        let seconds = latency.as_secs_f64();
        for (bucket, bound) in histogram.buckets.iter().zip(BUCKETS) {
            if seconds <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        histogram.count.fetch_add(1, Ordering::Relaxed);
        histogram.sum_micros.fetch_add(
            u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Counts one denial by reason (`scope`, `purpose`, `rate_limit`...).
    pub fn denial(&self, reason: &'static str) {
        *self
            .denials
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(reason)
            .or_default() += 1;
    }

    /// Counts expired values purged.
    pub fn purged(&self, n: u64) {
        self.purged.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts records the background job `name` rewrote, and records
    /// where it stands.
    pub fn job(&self, name: &'static str, state: JobState, moved: u64) {
        let mut jobs = self
            .jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = jobs.entry(name).or_default();
        entry.moved += moved;
        entry.running = state.running;
        entry.paused = state.paused;
        entry.done = state.done;
        entry.total = state.total;
    }

    /// The text exposition format.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        out.push_str("# HELP grpc_server_handled_total RPCs completed, by method and status code.\n# TYPE grpc_server_handled_total counter\n");
        for ((method, code), n) in self
            .handled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(
                out,
                "grpc_server_handled_total{{grpc_method=\"{method}\",grpc_code=\"{code}\"}} {n}"
            );
        }
        out.push_str("# HELP grpc_server_handling_seconds Time to handle an RPC.\n# TYPE grpc_server_handling_seconds histogram\n");
        for (method, h) in self
            .latency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            for (bucket, bound) in h.buckets.iter().zip(BUCKETS) {
                let _ = writeln!(
                    out,
                    "grpc_server_handling_seconds_bucket{{grpc_method=\"{method}\",le=\"{bound}\"}} {}",
                    bucket.load(Ordering::Relaxed)
                );
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "grpc_server_handling_seconds_bucket{{grpc_method=\"{method}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "grpc_server_handling_seconds_sum{{grpc_method=\"{method}\"}} {}",
                h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "grpc_server_handling_seconds_count{{grpc_method=\"{method}\"}} {count}"
            );
        }
        out.push_str("# HELP tokenvault_denials_total Requests or items refused by the policy or a limit, by reason.\n# TYPE tokenvault_denials_total counter\n");
        for (reason, n) in self
            .denials
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(out, "tokenvault_denials_total{{reason=\"{reason}\"}} {n}");
        }
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        gauge(
            &mut out,
            "tokenvault_expired_purged_total",
            "Expired values purged by the retention sweep.",
            "counter",
            self.purged.load(Ordering::Relaxed),
        );
        let jobs = self
            .jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let per_job = |out: &mut String,
                       name: &str,
                       help: &str,
                       kind: &str,
                       value: fn(&JobMetrics) -> u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (job, m) in &jobs {
                let _ = writeln!(out, "{name}{{job=\"{job}\"}} {}", value(m));
            }
        };
        per_job(
            &mut out,
            "tokenvault_job_records_moved_total",
            "Records a key-rotation job rewrote (reencrypt: new data key; reindex: new index key).",
            "counter",
            |m| m.moved,
        );
        per_job(
            &mut out,
            "tokenvault_job_running",
            "1 while a key-rotation job has records left and is not paused.",
            "gauge",
            |m| u64::from(m.running),
        );
        per_job(
            &mut out,
            "tokenvault_job_paused",
            "1 while an operator holds the job.",
            "gauge",
            |m| u64::from(m.paused),
        );
        per_job(
            &mut out,
            "tokenvault_job_records_visited",
            "Records the job's current pass has visited.",
            "gauge",
            |m| m.done,
        );
        per_job(
            &mut out,
            "tokenvault_job_records_total",
            "Records in the vault when the job's current pass started (estimate).",
            "gauge",
            |m| m.total,
        );
        gauge(
            &mut out,
            "tokenvault_tokens_stored",
            "Records stored (RocksDB estimate).",
            "gauge",
            gauges.tokens_stored,
        );
        gauge(
            &mut out,
            "tokenvault_audit_chain_head",
            "Sequence number of the newest audit event.",
            "gauge",
            gauges.audit_head,
        );
        gauge(
            &mut out,
            "rocksdb_pending_compaction_bytes",
            "Bytes RocksDB estimates it must compact.",
            "gauge",
            gauges.pending_compaction_bytes,
        );
        gauge(
            &mut out,
            "rocksdb_wal_bytes",
            "Size of the write-ahead log files.",
            "gauge",
            gauges.wal_bytes,
        );
        let _ = writeln!(
            out,
            "# HELP {STORE_READS} Point reads, by where they were answered: from memory (memtables, block cache), or from files on the reader threads.\n# TYPE {STORE_READS} counter\n{STORE_READS}{{tier=\"memory\"}} {}\n{STORE_READS}{{tier=\"files\"}} {}",
            gauges.reads_from_memory, gauges.reads_from_files
        );
        let _ = writeln!(
            out,
            "# HELP {BLOCK_CACHE_LOOKUPS} RocksDB block cache lookups, by kind of block and result: a miss reads the file system. Compactions' lookups count too, and a read answered from files counts its miss twice (once in the memory tier); tokenvault_store_reads_total is the hit ratio of reads.\n# TYPE {BLOCK_CACHE_LOOKUPS} counter"
        );
        for lookups in &gauges.block_cache {
            let block = lookups.block;
            for (result, n) in [("hit", lookups.hits), ("miss", lookups.misses)] {
                let _ = writeln!(
                    out,
                    "{BLOCK_CACHE_LOOKUPS}{{block=\"{block}\",result=\"{result}\"}} {n}"
                );
            }
        }
        gauge(
            &mut out,
            "tokenvault_store_committed_batches_total",
            "Batches committed (one per request that writes) since the store opened.",
            "counter",
            gauges.committed_batches,
        );
        gauge(
            &mut out,
            "tokenvault_store_commit_groups_total",
            "RocksDB writes or PostgreSQL transactions those batches were grouped into: batches per group is how much concurrent requests share a commit.",
            "counter",
            gauges.commit_groups,
        );
        gauge(
            &mut out,
            "tokenvault_store_failed_commit_groups_total",
            "Groups of batches whose write or transaction failed (nothing of them was written): a storage outage shows here.",
            "counter",
            gauges.failed_commit_groups,
        );
        gauge(
            &mut out,
            "tokenvault_open_connections",
            "Client connections open on the mTLS port.",
            "gauge",
            gauges.open_connections,
        );
        gauge(
            &mut out,
            "tokenvault_fpt_crowded_total",
            "Format-preserving card values that needed several token draws: a bucket (head and last four) filling up.",
            "counter",
            gauges.fpt_crowded,
        );
        out
    }
}

/// The gRPC code name, as `grpc_code` labels use it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.request("Tokenize", "OK", Duration::from_micros(700));
        m.request("Tokenize", "OK", Duration::from_millis(30));
        m.denial("scope");
        let text = m.render(&Gauges {
            tokens_stored: 7,
            reads_from_memory: 5,
            reads_from_files: 2,
            block_cache: vec![BlockLookups {
                block: "data",
                hits: 9,
                misses: 4,
            }],
            committed_batches: 12,
            commit_groups: 3,
            failed_commit_groups: 2,
            ..Gauges::default()
        });
        assert!(
            text.contains("grpc_server_handled_total{grpc_method=\"Tokenize\",grpc_code=\"OK\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "grpc_server_handling_seconds_bucket{grpc_method=\"Tokenize\",le=\"0.001\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "grpc_server_handling_seconds_bucket{grpc_method=\"Tokenize\",le=\"0.05\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("tokenvault_denials_total{reason=\"scope\"} 1"));
        assert!(text.contains("tokenvault_tokens_stored 7"));
        assert!(text.contains("tokenvault_store_reads_total{tier=\"files\"} 2"));
        assert!(text.contains("# TYPE tokenvault_store_commit_groups_total counter"));
        assert!(text.contains("tokenvault_store_committed_batches_total 12"));
        assert!(text.contains("tokenvault_store_failed_commit_groups_total 2"));
        assert!(text.contains("tokenvault_store_commit_groups_total 3"));
        assert!(
            text.contains("rocksdb_block_cache_lookups_total{block=\"data\",result=\"miss\"} 4"),
            "{text}"
        );
    }
}
