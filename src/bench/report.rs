//! The benchmark report: rows, ratios against the ceilings, JSON and Markdown.

use serde::{Deserialize, Serialize};

/// One measured scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// Scenario name (`tokenize`, `detokenize@50%`, `in-process tokenize-batch`...).
    pub scenario: String,
    /// The configuration: `sync` or `buffered` (the embedded engine),
    /// `postgres×N` (N replicas on PostgreSQL), `peer` or `peer+audit`
    /// (PostgreSQL + pgcrypto), or `target` for an external server.
    pub durability: String,
    /// Tokens stored in the vault when the scenario ran.
    pub stored_tokens: u64,
    /// Whether this row is from the pass after the preload.
    pub preloaded: bool,
    /// Requests in flight.
    pub in_flight: usize,
    /// Items per request.
    pub batch: usize,
    /// Requests answered.
    pub requests: u64,
    /// Items in those requests.
    pub items: u64,
    /// Failed requests plus failed items.
    pub errors: u64,
    /// Requests per second.
    pub requests_per_s: f64,
    /// Items per second.
    pub items_per_s: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// 99.9th percentile latency, ms.
    pub p999_ms: f64,
    /// Median time in the server's handler, ms, from its request log
    /// (`null` for an external server or an unlogged RPC). The difference
    /// to `p50_ms` is the network, TLS, HTTP/2 and the load generator, which
    /// shares the machine.
    pub handler_p50_ms: Option<f64>,
    /// 99th percentile time in the server's handler, ms.
    pub handler_p99_ms: Option<f64>,
    /// Server CPU seconds per 1,000 items (`null` when not measurable).
    pub server_cpu_s_per_1k_items: Option<f64>,
    /// The load generator's CPU seconds per 1,000 items (`null` for the
    /// in-process rows, which have none). It shares the machine with a
    /// self-started server, so this is CPU the server did not get.
    pub client_cpu_s_per_1k_items: Option<f64>,
    /// Server peak resident memory during the scenario, MiB.
    pub server_peak_rss_mib: Option<f64>,
    /// Point reads the store answered from memory (memtables, block
    /// cache) without reading a block from a file, percent: the block
    /// cache's hit ratio for reads. A batch is one read, from memory only
    /// if all its keys were (`null` where the engine does not count
    /// them, PostgreSQL, or nothing was read).
    #[serde(default)]
    pub reads_from_memory_pct: Option<f64>,
}

/// The machine and build a report came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model name.
    pub cpu: String,
    /// Cores available to the process.
    pub cores: usize,
    /// `git describe` of the working tree, if known.
    pub commit: String,
    /// When the run started (UTC).
    pub date: String,
}

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The command line that produced it.
    pub command: String,
    /// Where it ran.
    pub machine: Machine,
    /// The measurements.
    pub rows: Vec<Row>,
    /// Bytes on disk per stored token, after the preload.
    pub disk_bytes_per_token: Option<f64>,
    /// Seconds waited after the preload for the server's background work
    /// (flushes, compactions) to finish before the second pass.
    pub settle_seconds: Option<f64>,
    /// The targets, computed from rows of this same run.
    pub targets: Vec<Target>,
    /// How long vaults took to open (`--open-subjects`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub opens: Vec<OpenTime>,
    /// The server's peak memory through the preload and its compactions
    /// (the rows' peaks cover their scenarios only), MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preload_peak_rss_mib: Option<f64>,
    /// The unmeasured reads after each configuration's preload that
    /// brought its block cache to its steady state before the second pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warm_ups: Vec<WarmUp>,
    /// Detokenizes of subject values with the audit trail's subject index
    /// over the same without it, per pair of adjacent rounds (in process).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_index_ratios: Vec<f64>,
    /// With `--db-latency-ms`: the round trip to the database measured
    /// directly and through the latency proxy, per configuration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub db_round_trips: Vec<DbRoundTrip>,
}

/// A query's round trip to the database, directly and through the
/// latency proxy (the proxy's timer rounds each delay up to its tick, so
/// what it adds is measured rather than taken from the setting).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DbRoundTrip {
    /// The configuration, as in the rows.
    pub configuration: String,
    /// Median of sequential `SELECT 1`s over the unix socket, ms.
    pub direct_ms: f64,
    /// The same through the proxy, ms.
    pub through_proxy_ms: f64,
}

/// The warm-up after a configuration's preload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WarmUp {
    /// The configuration, as in the rows.
    pub configuration: String,
    /// How long it read.
    pub seconds: f64,
    /// The share of its last round's reads answered from memory, percent.
    pub reads_from_memory_pct: f64,
}

/// How long a vault took to open, start to serving.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenTime {
    /// The configuration, as in the rows (`sync`, `sync+hsm`...).
    pub configuration: String,
    /// Subject keys stored when it opened.
    pub subject_keys: u64,
    /// Seconds from starting the process to its "serving" line, the median
    /// of three restarts.
    pub median_s: f64,
}

/// A target ratio and whether this run met it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    /// What is compared.
    pub name: String,
    /// The measured value.
    pub measured: f64,
    /// The goal.
    pub goal: String,
    /// Whether the measured value meets the goal.
    pub met: bool,
}

impl Report {
    /// The rows and targets as a Markdown document.
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut out = format!(
            "Command: `{}`\n\nMachine: {} ({} cores), commit {}, {}\n\n",
            self.command, m.cpu, m.cores, m.commit, m.date
        );
        out.push_str("| scenario | durability | stored tokens | in flight | batch | req/s | items/s | p50 ms | p99 ms | p99.9 ms | handler p50 ms | handler p99 ms | server CPU s / 1k items | client CPU s / 1k items | server peak RSS MiB | reads from memory % | errors |\n");
        out.push_str(
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for r in &self.rows {
            let opt = |v: Option<f64>, digits: usize| {
                v.map_or("–".to_owned(), |v| format!("{v:.digits$}"))
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.scenario,
                r.durability,
                r.stored_tokens,
                r.in_flight,
                r.batch,
                r.requests_per_s,
                r.items_per_s,
                r.p50_ms,
                r.p99_ms,
                r.p999_ms,
                opt(r.handler_p50_ms, 2),
                opt(r.handler_p99_ms, 2),
                opt(r.server_cpu_s_per_1k_items, 3),
                opt(r.client_cpu_s_per_1k_items, 3),
                opt(r.server_peak_rss_mib, 0),
                opt(r.reads_from_memory_pct, 1),
                r.errors
            ));
        }
        if let Some(bytes) = self.disk_bytes_per_token {
            out.push_str(&format!("\nBytes on disk per stored token: {bytes:.0}\n"));
        }
        if let Some(seconds) = self.settle_seconds {
            out.push_str(&format!(
                "\nEvery scenario starts on a settled server (its CPU under 5 % for 2 s: the flushes and compactions left by the scenario before are done; `--settle-limit` caps each wait). After the preload that took {seconds:.0} s.\n"
            ));
        }
        for trip in &self.db_round_trips {
            out.push_str(&format!(
                "\n{}: a `SELECT 1` round trip to the database took {:.3} ms through the latency proxy, {:.3} ms directly (medians of 200).\n",
                trip.configuration, trip.through_proxy_ms, trip.direct_ms
            ));
        }
        for warm in &self.warm_ups {
            out.push_str(&format!(
                "\n{}: after the preload, before its first read scenario, {:.0} s of unmeasured uniform single reads brought the block cache to its steady state ({:.1} % of the last round's reads answered from memory).\n",
                warm.configuration, warm.seconds, warm.reads_from_memory_pct
            ));
        }
        if !self.opens.is_empty() {
            out.push_str("\n| configuration | subject keys stored | open, start to serving, s (median of 3) |\n|---|---:|---:|\n");
            for open in &self.opens {
                out.push_str(&format!(
                    "| {} | {} | {:.3} |\n",
                    open.configuration, open.subject_keys, open.median_s
                ));
            }
        }
        out.push_str(&self.peer_comparison());
        if !self.targets.is_empty() {
            out.push_str("\n| target | measured | goal | met |\n|---|---:|---|---|\n");
            for t in &self.targets {
                out.push_str(&format!(
                    "| {} | {:.2} | {} | {} |\n",
                    t.name,
                    t.measured,
                    t.goal,
                    if t.met { "yes" } else { "**no**" }
                ));
            }
        }
        out
    }

    /// Each vault configuration against the peer, per workload, in items/s
    /// of the first pass: empty without peer rows.
    fn peer_comparison(&self) -> String {
        const PEER: &str = super::peer::PEER;
        const AUDITED: &str = super::peer::PEER_AUDITED;
        if !self.rows.iter().any(|r| r.durability == PEER) {
            return String::new();
        }
        let mut setups: Vec<&str> = Vec::new();
        for r in &self.rows {
            if r.durability != PEER
                && r.durability != AUDITED
                && !r.scenario.starts_with("in-process")
                && !setups.contains(&r.durability.as_str())
            {
                setups.push(&r.durability);
            }
        }
        let mut out = String::from(
            "\n| workload | vault | vault items/s | peer items/s | vault / peer | peer+audit items/s | vault / peer+audit |\n|---|---|---:|---:|---:|---:|---:|\n",
        );
        for workload in [
            "tokenize",
            "tokenize-batch",
            "detokenize",
            "detokenize-batch",
        ] {
            let items = |setup: &str| self.row(workload, setup, false).map(|r| r.items_per_s);
            let (Some(peer), Some(audited)) = (items(PEER), items(AUDITED)) else {
                continue;
            };
            for setup in &setups {
                if let Some(vault) = items(setup) {
                    out.push_str(&format!(
                        "| {workload} | {setup} | {vault:.0} | {peer:.0} | {:.2} | {audited:.0} | {:.2} |\n",
                        vault / peer.max(1e-9),
                        vault / audited.max(1e-9)
                    ));
                }
            }
        }
        out
    }

    /// Finds the row of `scenario` and `durability` from the first pass
    /// (`preloaded` false) or the one after the preload.
    pub fn row(&self, scenario: &str, durability: &str, preloaded: bool) -> Option<&Row> {
        self.rows.iter().find(|r| {
            r.scenario == scenario && r.durability == durability && r.preloaded == preloaded
        })
    }
}
