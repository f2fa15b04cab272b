//! The performance targets BENCHMARKS.md states, each computed as a ratio
//! of two rows of one run.

use super::{Report, report::Target};

/// The performance targets BENCHMARKS.md states, each computed from rows
/// of this run.
pub(super) fn targets(report: &Report, preload: u64) -> Vec<Target> {
    let mut out = Vec::new();
    let mut ratio = |name: &str, num: Option<f64>, den: Option<f64>, goal: f64| {
        if let (Some(n), Some(d)) = (num, den)
            && d > 0.0
        {
            let measured = n / d;
            out.push(Target {
                name: name.into(),
                measured,
                goal: format!("≥ {goal}"),
                met: measured >= goal,
            });
        }
    };
    let rps = |s: &str, d: &str| report.row(s, d, false).map(|r| r.requests_per_s);
    ratio(
        "tokenize (sync, 1 item) / noop, req/s",
        rps("tokenize", "sync"),
        rps("noop", "sync"),
        0.6,
    );
    ratio(
        "tokenize-batch items/s / in-process tokenize-batch items/s",
        report
            .row("tokenize-batch", "sync", false)
            .map(|r| r.items_per_s),
        report
            .row("in-process tokenize-batch", "sync", false)
            .map(|r| r.items_per_s),
        0.5,
    );
    // The master key in an HSM is used at open and at rotation only, so a
    // request costs the same: equal within this machine's noise.
    for scenario in ["tokenize", "detokenize", "tokenize-batch"] {
        let items = |d: &str| report.row(scenario, d, false).map(|r| r.items_per_s);
        ratio(
            &format!("{scenario}, master key in an HSM / in a file, items/s"),
            items("sync+hsm"),
            items("sync"),
            0.9,
        );
    }
    // What indexing audit events by subject costs a detokenize of subject
    // values: the same reads with and without the index, in alternating
    // rounds of one run (issue 20's target: under 10%).
    let mut pairs = report.subject_index_ratios.clone();
    pairs.sort_by(f64::total_cmp);
    ratio(
        "detokenize of subject values, subject index / none (in process, median of paired rounds), req/s",
        pairs.get(pairs.len() / 2).copied(),
        (!pairs.is_empty()).then_some(1.0),
        0.9,
    );
    if preload > 0 {
        for scenario in ["tokenize", "detokenize"] {
            let after = report.row(scenario, "sync", true);
            // The scenarios before it store tokens too: name what it ran on.
            let stored = after.map_or(String::new(), |r| format!(" ({} stored)", r.stored_tokens));
            ratio(
                &format!("{scenario} after {preload} more tokens{stored} / before, req/s"),
                after.map(|r| r.requests_per_s),
                rps(scenario, "sync"),
                0.8,
            );
        }
        let rss = report
            .rows
            .iter()
            .filter(|r| r.preloaded)
            .filter_map(|r| r.server_peak_rss_mib)
            .chain(report.preload_peak_rss_mib)
            .fold(0.0, f64::max);
        out.push(Target {
            name: format!("server peak RSS through and after the {preload}-token preload, MiB"),
            measured: rss,
            goal: "< 1024".into(),
            met: rss < 1024.0,
        });
    }
    // What the audit's chained event costs the group-commit path: the same
    // commits with and without one event each, in the same run.
    for (with_name, without_name) in [
        (
            "in-process store commit + audit event (no vault)",
            "in-process store commit (no vault, no audit)",
        ),
        (
            "in-process store commit-batch + audit event (no vault)",
            "in-process store commit-batch (no vault, no audit)",
        ),
    ] {
        if let (Some(with), Some(without)) = (
            report.row(with_name, "sync", false),
            report.row(without_name, "sync", false),
        ) && without.items_per_s > 0.0
        {
            out.push(Target {
                name: format!("{with_name} / without, items/s"),
                measured: with.items_per_s / without.items_per_s,
                goal: "(report only)".into(),
                met: true,
            });
        }
    }
    // Not a target of its own, but what the audit and the rest of the
    // vault cost against bare storage, measured in the same run.
    if let (Some(vault), Some(store)) = (
        report.row("in-process tokenize-batch", "sync", false),
        report.row(
            "in-process store commit-batch (no vault, no audit)",
            "sync",
            false,
        ),
    ) && store.items_per_s > 0.0
    {
        out.push(Target {
            name: "in-process tokenize-batch (vault + audit) / bare store commits, items/s".into(),
            measured: vault.items_per_s / store.items_per_s,
            goal: "(report only)".into(),
            met: true,
        });
    }
    if let Some(row) = report.row("detokenize@50%", "sync", false) {
        out.push(Target {
            name: "detokenize p99 at half its max throughput, ms".into(),
            measured: row.p99_ms,
            goal: "< 5".into(),
            met: row.p99_ms < 5.0,
        });
    }
    peer_targets(report, &mut out);
    // The floor under that p99: each read waits for a synced audit write.
    if let Some(row) = report.row("device fdatasync, 4 KiB append", "sync", false) {
        out.push(Target {
            name: "device fdatasync p99 alone (the floor of a durably audited read), ms".into(),
            measured: row.p99_ms,
            goal: "(report only)".into(),
            met: true,
        });
    }
    out
}

/// The vault against the peer (PostgreSQL + pgcrypto, `--peer postgres`)
/// and the PostgreSQL engine's replicas against one another, in items/s of
/// the first pass; only the ones whose rows this run has.
fn peer_targets(report: &Report, out: &mut Vec<Target>) {
    use super::peer::{PEER, PEER_AUDITED};
    let items = |scenario: &str, setup: &str| {
        report
            .row(scenario, setup, false)
            .map(|r| r.items_per_s)
            .filter(|v| *v > 0.0)
    };
    let mut ratio = |name: String, num: Option<f64>, den: Option<f64>, goal: f64| {
        if let (Some(n), Some(d)) = (num, den) {
            out.push(Target {
                name,
                measured: n / d,
                goal: format!("≥ {goal}"),
                met: n / d >= goal,
            });
        }
    };
    // The embedded engine (issue 18's goals).
    ratio(
        "detokenize (sync) / peer, items/s".into(),
        items("detokenize", "sync"),
        items("detokenize", PEER),
        1.5,
    );
    ratio(
        "detokenize (sync) / peer+audit, items/s".into(),
        items("detokenize", "sync"),
        items("detokenize", PEER_AUDITED),
        3.0,
    );
    ratio(
        "detokenize-batch (sync) / peer+audit, items/s".into(),
        items("detokenize-batch", "sync"),
        items("detokenize-batch", PEER_AUDITED),
        3.0,
    );
    ratio(
        "tokenize-batch (sync) / peer, items/s".into(),
        items("tokenize-batch", "sync"),
        items("tokenize-batch", PEER),
        2.5,
    );
    // One replica on PostgreSQL against the audited peer on the same
    // database server: single items at least even, batches 1.5x (the vault
    // groups concurrent requests into one transaction; the peer commits
    // each).
    for (scenario, goal) in [
        ("tokenize", 1.0),
        ("detokenize", 1.0),
        ("tokenize-batch", 1.5),
        ("detokenize-batch", 1.5),
    ] {
        ratio(
            format!("{scenario} (postgres×1) / peer+audit, items/s"),
            items(scenario, "postgres×1"),
            items(scenario, PEER_AUDITED),
            goal,
        );
    }
    for scenario in ["tokenize", "detokenize"] {
        ratio(
            format!("{scenario}: postgres×2 / postgres×1, items/s"),
            items(scenario, "postgres×2"),
            items(scenario, "postgres×1"),
            1.5,
        );
    }
}
