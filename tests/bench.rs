//! A short smoke run of `tokenvault bench`, so the tool cannot rot. The real
//! runs (release build, seconds per scenario) are in BENCHMARKS.md.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

/// Runs `tokenvault bench ARGS` in a new temporary directory, writing
/// bench.json and bench.md there; the directory and the JSON report.
fn run_bench(args: &[&str]) -> (tempfile::TempDir, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let out = common::tokenvault_command()
        .arg("bench")
        .args(args)
        .arg("--json")
        .arg(dir.path().join("bench.json"))
        .arg("--markdown")
        .arg(dir.path().join("bench.md"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report =
        serde_json::from_slice(&std::fs::read(dir.path().join("bench.json")).unwrap()).unwrap();
    (dir, report)
}

#[test]
fn a_tiny_bench_run_measures_every_scenario_without_errors() {
    let (dir, report) = run_bench(&[
        "--seconds",
        "0.3",
        "--pool",
        "200",
        "--preload",
        "500",
        "--in-flight",
        "8",
        "--connections",
        "2",
        "--batch",
        "10",
        "--settle-limit",
        "0",
        "--sustained",
        "0.5",
    ]);
    let rows = report["rows"].as_array().unwrap();
    let scenarios = [
        "noop",
        "tokenize",
        "tokenize-batch",
        "detokenize",
        "detokenize-batch",
        "mixed",
        "detokenize@50%",
        "mixed-sustained",
    ];
    let mut client_cpu = 0.0;
    for durability in ["sync", "buffered"] {
        for scenario in scenarios {
            let matching: Vec<_> = rows
                .iter()
                .filter(|r| r["scenario"] == scenario && r["durability"] == durability)
                .collect();
            // Once before and once after the preload.
            assert_eq!(matching.len(), 2, "{scenario} {durability}");
            assert_eq!(
                matching.iter().filter(|r| r["preloaded"] == true).count(),
                1
            );
            for row in matching {
                assert!(row["requests"].as_u64().unwrap() > 0, "{row}");
                assert_eq!(row["errors"].as_u64().unwrap(), 0, "{row}");
                assert!(row["p99_ms"].as_f64().unwrap() > 0.0, "{row}");
                assert!(row["server_peak_rss_mib"].as_f64().unwrap() > 1.0, "{row}");
                // The load generator's own CPU (it shares the machine):
                // reported for every row; a short slow row can read 0 at
                // the kernel's accounting tick, the run as a whole cannot.
                client_cpu += row["client_cpu_s_per_1k_items"].as_f64().unwrap();
                // The time in the server's handler, from its request log,
                // lies inside the time the client saw (the health check
                // logs no line).
                if scenario == "noop" {
                    assert!(row["handler_p50_ms"].is_null(), "{row}");
                } else {
                    let handler = row["handler_p50_ms"].as_f64().unwrap();
                    let client = row["p50_ms"].as_f64().unwrap();
                    assert!(handler > 0.0 && handler <= client * 1.01, "{row}");
                    assert!(row["handler_p99_ms"].as_f64().unwrap() >= handler, "{row}");
                }
                // Reads say where the store answered them (from its
                // metrics port).
                if scenario.starts_with("detokenize") {
                    let pct = row["reads_from_memory_pct"].as_f64();
                    let pct = pct.unwrap_or_else(|| panic!("{row}"));
                    assert!((0.0..=100.0).contains(&pct), "{row}");
                }
            }
        }
    }
    assert!(
        client_cpu > 0.0,
        "the load generator's CPU was never measured"
    );
    for scenario in ["in-process tokenize", "in-process tokenize-batch"] {
        assert!(
            rows.iter().any(|r| r["scenario"] == scenario
                && r["items"].as_u64().unwrap() > 0
                && r["client_cpu_s_per_1k_items"].is_null()),
            "{scenario}"
        );
    }
    assert!(report["disk_bytes_per_token"].as_f64().unwrap() > 16.0);
    // Reads after the preload start on a warmed cache, and say so.
    let warm_ups = report["warm_ups"].as_array().unwrap();
    assert_eq!(warm_ups.len(), 2, "{warm_ups:?}");
    assert!(warm_ups[0]["reads_from_memory_pct"].as_f64().unwrap() > 0.0);
    // Peak memory is sampled through the preload too, not only in the rows.
    assert!(report["preload_peak_rss_mib"].as_f64().unwrap() > 1.0);
    assert!(report["targets"].as_array().unwrap().len() >= 5);
    // The scale target names what its rows ran on: the scenarios before
    // them store tokens too, beyond the preload.
    let detokenize_after = rows
        .iter()
        .find(|r| {
            r["scenario"] == "detokenize" && r["durability"] == "sync" && r["preloaded"] == true
        })
        .unwrap();
    let scale = format!(
        "detokenize after 500 more tokens ({} stored) / before, req/s",
        detokenize_after["stored_tokens"]
    );
    assert!(
        report["targets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == scale.as_str()),
        "{scale} in {}",
        report["targets"]
    );
    assert!(report["machine"]["cores"].as_u64().unwrap() >= 1);
    // The commit is the binary's, recorded when it was built: this run's
    // directory is a temporary one, not a checkout.
    assert_eq!(
        report["machine"]["commit"]
            .as_str()
            .unwrap()
            .trim_end_matches("-dirty"),
        source_commit(),
        "{}",
        report["machine"]
    );
    let table = std::fs::read_to_string(dir.path().join("bench.md")).unwrap();
    // BENCHMARKS.md's tables come from the committed JSON: rendering the
    // saved report gives the same tables the run printed.
    let rendered = dir.path().join("rendered.md");
    let out = common::tokenvault_command()
        .args(["bench", "--render"])
        .arg(dir.path().join("bench.json"))
        .arg("--markdown")
        .arg(&rendered)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&rendered).unwrap(), table);
    assert!(table.contains("| tokenize-batch | sync |"), "{table}");
    assert!(
        table.contains("| handler p50 ms | handler p99 ms | server CPU s / 1k items | client CPU s / 1k items |"),
        "{table}"
    );
}

/// What the source tree's `git describe` says (the binary's build script
/// asks the same), without the `-dirty` mark: files outside `src/` may have
/// changed since the build.
fn source_commit() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--abbrev=10"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map_or_else(
            || "unknown".to_owned(),
            |out| String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
}

/// The PostgreSQL engine with one and two replicas, and the peer a team
/// would build instead (a pgcrypto table, bare and audited), in one run on
/// a throwaway cluster the bench starts itself; the report compares them.
#[test]
fn a_tiny_bench_run_compares_postgres_replicas_with_the_peer() {
    let (_dir, report) = run_bench(&[
        "--engine",
        "postgres",
        "--replicas",
        "1,2",
        "--peer",
        "postgres",
        "--scenarios",
        "tokenize,tokenize-batch,detokenize,detokenize-batch",
        "--seconds",
        "0.3",
        "--pool",
        "200",
        "--preload",
        "0",
        "--in-flight",
        "8",
        "--connections",
        "2",
        "--batch",
        "10",
        "--settle-limit",
        "0",
        "--no-in-process",
    ]);
    let rows = report["rows"].as_array().unwrap();
    for setup in ["postgres×1", "postgres×2", "peer", "peer+audit"] {
        for scenario in [
            "tokenize",
            "tokenize-batch",
            "detokenize",
            "detokenize-batch",
        ] {
            let row = rows
                .iter()
                .find(|r| r["scenario"] == scenario && r["durability"] == setup)
                .unwrap_or_else(|| panic!("no {scenario} row for {setup}"));
            assert!(row["requests"].as_u64().unwrap() > 0, "{row}");
            // Every token read was found and decrypted.
            assert_eq!(row["errors"].as_u64().unwrap(), 0, "{row}");
            // The database's processes count as the server's.
            assert!(
                row["server_cpu_s_per_1k_items"].as_f64().unwrap() > 0.0,
                "{row}"
            );
        }
    }
    let targets: Vec<String> = report["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    for name in [
        "detokenize (postgres×1) / peer+audit, items/s",
        "tokenize-batch (postgres×1) / peer+audit, items/s",
        "detokenize: postgres×2 / postgres×1, items/s",
    ] {
        assert!(targets.iter().any(|t| t == name), "{name} in {targets:?}");
    }
}

#[test]
fn a_tiny_bench_run_compares_a_master_key_in_an_hsm_with_one_in_a_file() {
    let (_dir, report) = run_bench(&[
        "--engine",
        "rocksdb",
        "--durability",
        "sync",
        "--master-key",
        "file,hsm",
        "--open-subjects",
        "300",
        "--scenarios",
        "tokenize,detokenize,tokenize-batch",
        "--seconds",
        "0.3",
        "--pool",
        "100",
        "--preload",
        "0",
        "--in-flight",
        "4",
        "--batch",
        "10",
        "--settle-limit",
        "0",
        "--no-in-process",
    ]);
    let rows = report["rows"].as_array().unwrap();
    for configuration in ["sync", "sync+hsm"] {
        for scenario in ["tokenize", "detokenize", "tokenize-batch"] {
            let row = rows
                .iter()
                .find(|r| r["scenario"] == scenario && r["durability"] == configuration)
                .unwrap_or_else(|| panic!("no {scenario} row for {configuration}"));
            assert!(row["items"].as_u64().unwrap() > 0, "{row}");
            assert_eq!(row["errors"].as_u64().unwrap(), 0, "{row}");
        }
    }
    let opens = report["opens"].as_array().unwrap();
    let configurations: Vec<&str> = opens
        .iter()
        .map(|o| o["configuration"].as_str().unwrap())
        .collect();
    assert_eq!(configurations, ["sync", "sync+hsm"]);
    for open in opens {
        assert_eq!(open["subject_keys"], 300);
        let seconds = open["median_s"].as_f64().unwrap();
        assert!(seconds > 0.0 && seconds < 60.0, "{open}");
    }
    let targets: Vec<&str> = report["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for scenario in ["tokenize", "detokenize", "tokenize-batch"] {
        let name = format!("{scenario}, master key in an HSM / in a file, items/s");
        assert!(targets.contains(&name.as_str()), "{targets:?}");
    }
}

/// `--db-latency-ms` runs the replicas through the latency proxy: the
/// configuration says so, and the report holds the round trip it measured
/// through the proxy, which is the requested latency each way more than
/// the direct one (and not, say, a millisecond timer tick more).
#[test]
fn a_tiny_bench_run_through_the_latency_proxy_measures_its_round_trip() {
    let (_dir, report) = run_bench(&[
        "--engine",
        "postgres",
        "--replicas",
        "1",
        "--db-latency-ms",
        "2",
        "--scenarios",
        "tokenize",
        "--seconds",
        "0.3",
        "--pool",
        "50",
        "--preload",
        "0",
        "--in-flight",
        "4",
        "--connections",
        "1",
        "--settle-limit",
        "0",
        "--no-in-process",
    ]);
    let row = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["scenario"] == "tokenize" && r["durability"] == "postgres×1+2ms")
        .unwrap_or_else(|| panic!("no postgres×1+2ms row: {report}"));
    assert!(row["requests"].as_u64().unwrap() > 0, "{row}");
    let trip = &report["db_round_trips"][0];
    assert_eq!(trip["configuration"], "postgres×1+2ms", "{trip}");
    let added = trip["through_proxy_ms"].as_f64().unwrap() - trip["direct_ms"].as_f64().unwrap();
    // 2 ms each way; a loaded machine adds to it, but not another tick.
    assert!((3.9..5.0).contains(&added), "{trip}");
}

/// The `bench/results/…` paths `line` names, brace lists kept whole
/// (`…-{a,b}-{1,2}.json`).
fn result_refs(line: &str) -> Vec<String> {
    let mut refs = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("bench/results/") {
        let tail = &rest[at..];
        let mut depth = 0;
        let end = tail
            .char_indices()
            .find(|&(_, c)| {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                depth == 0 && matches!(c, '`' | ')' | ' ' | ',' | ';')
            })
            .map_or(tail.len(), |(i, _)| i);
        refs.push(tail[..end].trim_end_matches('.').to_owned());
        rest = &tail[end..];
    }
    refs
}

/// `path` with its first brace list expanded, recursively.
fn expand(path: &str) -> Vec<String> {
    let (Some(open), Some(close)) = (path.find('{'), path.find('}')) else {
        return vec![path.to_owned()];
    };
    path[open + 1..close]
        .split(',')
        .flat_map(|alt| expand(&format!("{}{alt}{}", &path[..open], &path[close + 1..])))
        .collect()
}

/// BENCHMARKS.md quotes only runs whose JSON is committed:
/// - every `bench/results/…` path it names exists (brace lists expanded);
/// - every table `bench --render` prints (a `Command:` line, then
///   `Machine:`) is, whole and in order, what it renders of a JSON the same
///   section names whose run was of a clean tree (the commit it records
///   is not `-dirty`), unless the section's heading says the run kept no
///   JSON.
#[test]
fn benchmarks_md_quotes_only_committed_runs() {
    assert_eq!(
        expand("bench/results/x-{a,b}-{1,2}.json"),
        [
            "bench/results/x-a-1.json",
            "bench/results/x-a-2.json",
            "bench/results/x-b-1.json",
            "bench/results/x-b-2.json"
        ]
    );
    assert_eq!(
        result_refs("(JSON: `bench/results/a-{b,c}.json`), and bench/results/d.json."),
        ["bench/results/a-{b,c}.json", "bench/results/d.json"]
    );
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("BENCHMARKS.md")).unwrap();
    let lines: Vec<&str> = doc.lines().collect();
    let mut missing = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        // A glob (`bench/results/*.json`) names the directory, not a run.
        for path in result_refs(line)
            .iter()
            .filter(|r| !r.contains('*'))
            .flat_map(|r| expand(r))
        {
            if !root.join(&path).is_file() {
                missing.push(format!("line {}: {path}", n + 1));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "BENCHMARKS.md names JSON that is not committed:\n{}",
        missing.join("\n")
    );

    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    let mut unmatched = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let rendered_block = line.starts_with("Command: `")
            && lines[n + 1..]
                .iter()
                .find(|l| !l.trim().is_empty())
                .is_some_and(|l| l.starts_with("Machine: "));
        if !rendered_block {
            continue;
        }
        let start = lines[..n]
            .iter()
            .rposition(|l| l.starts_with("## "))
            .unwrap();
        if lines[start].contains("no JSON kept") {
            continue;
        }
        let table: Vec<&str> = lines[n + 1..]
            .iter()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .copied()
            .collect();
        assert!(
            table.len() > 2,
            "line {}: a run's table without rows",
            n + 1
        );
        // Runs of a clean tree only: the commit each JSON records.
        let clean = |path: &String| {
            let json: serde_json::Value =
                serde_json::from_slice(&std::fs::read(root.join(path)).unwrap()).unwrap();
            json["machine"]["commit"]
                .as_str()
                .is_some_and(|commit| !commit.ends_with("-dirty"))
        };
        let sources: Vec<String> = lines[start..n]
            .iter()
            .flat_map(|l| result_refs(l))
            .flat_map(|r| expand(&r))
            .filter(clean)
            .collect();
        // The whole table, in order, as the renderer printed it.
        let matched = sources.iter().any(|path| {
            let out = dir.path().join("rendered.md");
            let rendered = common::tokenvault_command()
                .args(["bench", "--render"])
                .arg(root.join(path))
                .arg("--markdown")
                .arg(&out)
                .output()
                .unwrap();
            rendered.status.success()
                && std::fs::read_to_string(&out).is_ok_and(|text| {
                    let printed: Vec<&str> = text.lines().collect();
                    printed.windows(table.len()).any(|window| window == table)
                })
        });
        if matched {
            checked += 1;
        } else {
            unmatched.push(format!("line {}: {}", n + 1, lines[start]));
        }
    }
    assert!(
        unmatched.is_empty(),
        "tables in BENCHMARKS.md that no committed JSON of their section renders (name the JSON, or say \"no JSON kept\" in the heading):\n{}",
        unmatched.join("\n")
    );
    assert!(checked >= 2, "only {checked} rendered tables were found");
}
