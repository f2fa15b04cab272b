//! Crash safety: acknowledged writes survive SIGKILL at arbitrary moments,
//! every acknowledgement comes after a completed sync (strace's timestamps
//! against the client's), and
//! erasures and updates in flight at a kill are applied whole or not at all.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use common::{TestVault, Writers, item, tokens_of};
use tokenvault::proto::v1::{TokenizeItem, TokenizeRequest};

/// Where the kills fall: drawn from a seed that is printed, so that a
/// failing run can be replayed (`TV_CRASH_SEED=<seed> cargo test --test
/// crash`); a new seed each run otherwise.
struct KillPoints {
    state: u64,
}

impl KillPoints {
    fn new(test: &str) -> Self {
        let seed = std::env::var("TV_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let mut bytes = [0u8; 8];
                getrandom::fill(&mut bytes).unwrap();
                u64::from_le_bytes(bytes)
            });
        eprintln!("{test}: kill points from TV_CRASH_SEED={seed}");
        Self { state: seed }
    }

    /// The next point below `n` (SplitMix64).
    fn below(&mut self, n: u64) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }
}

/// Sixteen writers tokenize until the server dies under them; returns every
/// (token, value) the server acknowledged.
async fn load_until_killed(
    vault: &mut TestVault,
    round: usize,
    kill_after: usize,
) -> Vec<(String, String)> {
    let client = vault.client("checkout").await;
    let writers = Writers::start(&client, 16, &format!("r{round}"), false);
    // Kill once the target number of writes was acknowledged, whatever is in
    // flight at that moment. The wait is on a count, not on time.
    writers.wait_for(kill_after).await;
    vault.kill();
    writers.stop().await
}

/// Runs `audit verify` on the stopped `vault`: the trail must verify as one
/// chain from its first event; returns how many events it holds.
fn verified_events(vault: &TestVault) -> usize {
    let (ok, out) = common::run_cli(&[
        "audit",
        "verify",
        "--config",
        vault.config_path().to_str().unwrap(),
    ]);
    assert!(ok && out.contains("ok: events 1.."), "{out}");
    out.split_once(" events)")
        .and_then(|(before, _)| before.rsplit_once('(')?.1.parse().ok())
        .unwrap_or_else(|| panic!("no event count in {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let mut vault = TestVault::start();
    let mut all = Vec::new();
    let mut points = KillPoints::new("acknowledged_writes_survive_sigkill");
    for round in 0..4 {
        let kill_after = 100 + usize::try_from(points.below(400)).unwrap();
        all.extend(load_until_killed(&mut vault, round, kill_after).await);
        // The vault must open cleanly on the same directory every time.
        vault
            .spawn()
            .expect("the vault did not reopen after SIGKILL");
    }
    common::assert_all_detokenize(&vault, &all).await;
    eprintln!(
        "crash safety: {} acknowledged writes checked after 4 SIGKILLs",
        all.len()
    );
    assert!(all.len() >= 400);
    // The audit trail of four killed runs is one chain that verifies: every
    // acknowledged write has its event, and no kill left a torn entry.
    vault.stop();
    let events = verified_events(&vault);
    assert!(
        events >= all.len(),
        "{events} events for {} writes",
        all.len()
    );
}

/// Starts the vault under strace (every fsync and fdatasync of every
/// thread written to `trace` with its wall-clock time, its duration and
/// the path of the file synced) and
/// waits for its "serving" line: the process and its gRPC address, or
/// everything it printed if it ended first.
fn start_under_strace(
    vault: &TestVault,
    trace: &std::path::Path,
) -> Result<(std::process::Child, String), String> {
    // Like common::tokenvault_command: the server sees no variable of the
    // test's environment (a TOKENVAULT_* one would be read as config).
    let mut strace = Command::new("strace");
    strace.env_clear();
    if let Ok(path) = std::env::var("PATH") {
        strace.env("PATH", path);
    }
    let mut strace = strace
        .args([
            "-f",
            "-qq",
            "-ttt",
            "-T",
            "-y",
            "-e",
            "trace=fsync,fdatasync",
            "-o",
        ])
        .arg(trace)
        .arg(env!("CARGO_BIN_EXE_tokenvault"))
        .args(["serve", "--config"])
        .arg(vault.config_path())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("strace is not installed (scripts/install-deps.sh --test installs it)");
    let stderr = strace.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let lines = std::sync::Arc::clone(&seen);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(event) = common::log_event(&line)
                && event["message"] == "serving"
            {
                let _ = tx.send(event["grpc.addr"].as_str().unwrap().to_owned());
            }
            lines.lock().unwrap().push(line);
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(addr) => Ok((strace, addr)),
        Err(e) => {
            let _ = strace.kill();
            let status = strace.wait();
            Err(format!(
                "({e}; strace {status:?})\n{}",
                seen.lock().unwrap().join("\n")
            ))
        }
    }
}

/// Seconds since the Unix epoch, as strace's `-ttt` prints them.
fn wall_clock() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// When each fsync or fdatasync of a write-ahead log file (`*.log`) whose
/// path contains `of`, in an
/// `strace -f -ttt -T -y` trace, returned successfully. A call another
/// thread interrupted is printed twice (`<unfinished ...>` with the file,
/// then `<... fdatasync resumed>` at its return, without it).
fn sync_completions(trace: &str, of: &str) -> Vec<f64> {
    let mut unfinished: std::collections::HashMap<&str, bool> = std::collections::HashMap::new();
    trace
        .lines()
        .filter(|l| l.contains("sync"))
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let pid = fields.next()?;
            let at: f64 = fields.next()?.parse().ok()?;
            let of_wal = |line: &str| line.contains(of) && line.contains(".log>");
            if line.contains("<unfinished ...>") {
                unfinished.insert(pid, of_wal(line));
                return None;
            }
            if !line.contains("= 0") {
                unfinished.remove(pid);
                return None;
            }
            if line.contains("resumed>") {
                return unfinished.remove(pid)?.then_some(at);
            }
            if !of_wal(line) {
                return None;
            }
            let took: f64 = line
                .rsplit_once('<')?
                .1
                .trim_end_matches('>')
                .parse()
                .ok()?;
            Some(at + took)
        })
        .collect()
}

#[test]
fn strace_lines_are_read_with_their_return_time_and_file() {
    let trace = "101 1000.500000 fdatasync(12</d/data/000004.log>) = 0 <0.250000>\n\
                 102 1001.000000 fsync(13</d/data/000004.log> <unfinished ...>\n\
                 101 1001.100000 write(2, \"x\", 1) = 1 <0.000010>\n\
                 102 1001.400000 <... fsync resumed>) = 0 <0.400000>\n\
                 104 1001.500000 fsync(15</d/ledger/erasures>) = 0 <0.100000>\n\
                 106 1001.550000 fsync(17</d/data/MANIFEST-000005>) = 0 <0.100000>\n\
                 105 1001.600000 fsync(16</d/ledger/erasures> <unfinished ...>\n\
                 105 1001.900000 <... fsync resumed>) = 0 <0.300000>\n\
                 103 1002.000000 fdatasync(14</d/data/000004.log>) = -1 EIO (Input/output error) <0.1>\n";
    assert_eq!(sync_completions(trace, "/d/data/"), [1000.75, 1001.4]);
}

/// What a run of sequential writes under strace showed.
struct SyncTrace {
    /// fsync + fdatasync calls that returned 0.
    syncs: usize,
    /// Writes whose acknowledgement came with no sync completed between
    /// the request's sending and its answer.
    unsynced_acks: usize,
}

/// The calls a sync trace makes, one at a time.
enum Calls {
    /// Tokenizes of new values.
    Tokenize,
    /// Detokenizes of these tokens, one each: each reveal's audit event is
    /// the write that must be synced before its value leaves.
    Detokenize(Vec<String>),
}

/// Runs the vault under strace, makes `writes` sequential `calls` (each
/// sent only after the previous answer), stops it, and matches the return
/// times of the syncs of files in its data directory (RocksDB's WAL)
/// against each call's window.
async fn syncs_for(vault: &mut TestVault, writes: usize, calls: &Calls) -> SyncTrace {
    use tokenvault::proto::v1::DetokenizeRequest;
    vault.stop();
    let trace_file = vault.root.path().join("strace.txt");
    let (mut strace, addr) = start_under_strace(vault, &trace_file)
        .unwrap_or_else(|output| panic!("no serving line under strace; its output:\n{output}"));
    let mut client = tokenvault::client::connect(&addr, &vault.pki.tls("support"))
        .await
        .unwrap();
    let mut windows = Vec::with_capacity(writes);
    for i in 0..writes {
        let sent = wall_clock();
        match calls {
            Calls::Tokenize => {
                client
                    .tokenize(TokenizeRequest {
                        items: vec![item("email", &format!("sync{i}@example.com"))],
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
            Calls::Detokenize(tokens) => {
                let response = client
                    .detokenize(DetokenizeRequest {
                        tokens: vec![tokens[i % tokens.len()].clone()],
                        purpose: "customer_support".into(),
                        masked: false,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(common::revealed(response).len(), 1);
            }
        }
        windows.push((sent, wall_clock()));
    }
    let server = Command::new("pgrep")
        .args(["-P", &strace.id().to_string()])
        .output()
        .unwrap();
    let server_pid = String::from_utf8_lossy(&server.stdout).trim().to_owned();
    assert!(
        Command::new("kill")
            .args(["-TERM", &server_pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(strace.wait().unwrap().success());
    // As strace prints it: resolved.
    let data_dir = format!("{}/", vault.data_dir().canonicalize().unwrap().display());
    let completions = sync_completions(&std::fs::read_to_string(&trace_file).unwrap(), &data_dir);
    let unsynced_acks = windows
        .iter()
        .filter(|(sent, acked)| !completions.iter().any(|c| sent < c && c < acked))
        .count();
    SyncTrace {
        syncs: completions.len(),
        unsynced_acks,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_waits_for_a_synced_write() {
    const WRITES: usize = 50;
    // One request at a time, so no two can share a group commit: with
    // durability = sync each acknowledgement needs its own sync.
    let mut synced = TestVault::start();
    let sync = syncs_for(&mut synced, WRITES, &Calls::Tokenize).await;
    assert_eq!(
        sync.unsynced_acks, 0,
        "acknowledged before any sync completed ({} syncs in all)",
        sync.syncs
    );
    assert!(
        sync.syncs >= WRITES,
        "{} syncs for {WRITES} writes",
        sync.syncs
    );
    // The same with durability = buffered: acknowledgements come without a
    // sync. This shows that the windows above are filled by the writes'
    // own syncs, not by the engine's background ones.
    let mut buffered = TestVault::start_with("durability = \"buffered\"");
    let unsynced = syncs_for(&mut buffered, WRITES, &Calls::Tokenize).await;
    assert!(
        unsynced.unsynced_acks > WRITES / 2,
        "{} of {WRITES} buffered writes had a sync in their window",
        WRITES - unsynced.unsynced_acks
    );
    eprintln!(
        "durability: {} syncs, every ack after one (sync) vs {} syncs, {} acks without (buffered), {WRITES} sequential writes",
        sync.syncs, unsynced.syncs, unsynced.unsynced_acks
    );
}

/// A reveal's audit event is synced before its value leaves: every one of
/// 30 sequential single-token detokenizes is answered only after a sync
/// of the WAL completed within its window. The control, with durability =
/// buffered, answers without one: the windows are filled by the reveals'
/// own syncs, not by the engine's background ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reveal_waits_for_its_audit_event_to_be_synced() {
    const READS: usize = 30;
    for (config, synced) in [("", true), ("durability = \"buffered\"", false)] {
        let mut vault = TestVault::start_with(config);
        let mut client = vault.client("checkout").await;
        let mut tokens = Vec::new();
        for i in 0..3 {
            tokens.push(
                common::tokenize_one(&mut client, "email", &format!("r{i}@example.com")).await,
            );
        }
        let trace = syncs_for(&mut vault, READS, &Calls::Detokenize(tokens)).await;
        if synced {
            assert_eq!(
                trace.unsynced_acks, 0,
                "a value left before its audit event was synced ({} syncs in all)",
                trace.syncs
            );
        } else {
            assert!(
                trace.unsynced_acks > READS / 2,
                "{} of {READS} buffered reveals had a sync in their window",
                READS - trace.unsynced_acks
            );
        }
    }
}

/// What a token reads as after a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Read {
    Value(String),
    NotFound,
}

async fn read_all(vault: &TestVault, tokens: &[String]) -> Vec<Read> {
    use tokenvault::proto::v1::{Code, DetokenizeRequest, detokenize_result};
    let mut support = vault.client("support").await;
    let response = support
        .detokenize(DetokenizeRequest {
            tokens: tokens.to_vec(),
            purpose: "customer_support".into(),
            masked: false,
        })
        .await
        .unwrap()
        .into_inner();
    response
        .results
        .into_iter()
        .map(|r| match r.result {
            Some(detokenize_result::Result::Value(mut v)) => {
                Read::Value(std::mem::take(&mut v.value))
            }
            Some(detokenize_result::Result::Error(e)) if e.code == Code::NotFound as i32 => {
                Read::NotFound
            }
            other => panic!("a token reads as neither its value nor NOT_FOUND: {other:?}"),
        })
        .collect()
}

/// Erasures and updates killed mid-flight: after the restart each subject
/// is erased entirely or not at all, each value is its old or its new one
/// (never corrupted), and every acknowledged call is in effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasures_and_updates_in_flight_at_sigkill_are_all_or_nothing() {
    use std::sync::{Arc, Mutex};
    use tokenvault::proto::v1::{
        EraseSubjectRequest, UpdateValueRequest, subjects_client::SubjectsClient,
    };
    const SUBJECTS: usize = 30;
    const PER_SUBJECT: usize = 4;
    const UPDATES: usize = 60;
    let mut points =
        KillPoints::new("erasures_and_updates_in_flight_at_sigkill_are_all_or_nothing");

    let mut vault = TestVault::start();
    let (mut erased_checked, mut updates_checked, mut unacknowledged_applied) = (0, 0, 0);
    for round in 0..3 {
        let mut checkout = vault.client("checkout").await;
        let mut tokenize = async |items: Vec<TokenizeItem>| -> Vec<String> {
            tokens_of(
                checkout
                    .tokenize(TokenizeRequest {
                        items,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner(),
            )
        };
        let subject_value = |s: usize, k: usize| format!("r{round}.s{s}.k{k}@example.com");
        let mut subject_tokens = Vec::new();
        for s in 0..SUBJECTS {
            let items = (0..PER_SUBJECT)
                .map(|k| {
                    let mut item = item("email", &subject_value(s, k));
                    item.subject_id = format!("r{round}-cust-{s}");
                    item
                })
                .collect();
            subject_tokens.push(tokenize(items).await);
        }
        let old_value = |i: usize| format!("r{round}.old{i}@example.com");
        let new_value = move |i: usize| format!("r{round}.new{i}@example.com");
        let update_tokens =
            tokenize((0..UPDATES).map(|i| item("email", &old_value(i))).collect()).await;

        // Two erasers and two updaters; each records what was acknowledged
        // and stops at its first failure (the server is gone).
        let channel = vault.channel_with(&vault.pki.tls("privacy")).await.unwrap();
        let erased = Arc::new(Mutex::new(Vec::new()));
        let updated = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for worker in 0..2 {
            let (mut client, erased) = (SubjectsClient::new(channel.clone()), Arc::clone(&erased));
            tasks.push(tokio::spawn(async move {
                for s in (worker..SUBJECTS).step_by(2) {
                    let request = EraseSubjectRequest {
                        subject_id: format!("r{round}-cust-{s}"),
                        ..Default::default()
                    };
                    if client.erase_subject(request).await.is_err() {
                        break;
                    }
                    erased.lock().unwrap().push(s);
                }
            }));
            let (mut client, updated) =
                (SubjectsClient::new(channel.clone()), Arc::clone(&updated));
            let tokens = update_tokens.clone();
            tasks.push(tokio::spawn(async move {
                for i in (worker..UPDATES).step_by(2) {
                    let request = UpdateValueRequest {
                        token: tokens[i].clone(),
                        value: new_value(i),
                        request_id: String::new(),
                    };
                    if client.update_value(request).await.is_err() {
                        break;
                    }
                    updated.lock().unwrap().push(i);
                }
            }));
        }
        let kill_after = 4 + usize::try_from(points.below(30)).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while erased.lock().unwrap().len() + updated.lock().unwrap().len() < kill_after {
            assert!(
                std::time::Instant::now() < deadline,
                "{kill_after} calls not answered within a minute"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        vault.kill();
        for task in tasks {
            task.await.unwrap();
        }
        vault
            .spawn()
            .expect("the vault did not reopen after SIGKILL");

        let erased = erased.lock().unwrap().clone();
        for (s, tokens) in subject_tokens.iter().enumerate() {
            let reads = read_all(&vault, tokens).await;
            let whole: Vec<Read> = (0..PER_SUBJECT)
                .map(|k| Read::Value(subject_value(s, k)))
                .collect();
            let gone = vec![Read::NotFound; PER_SUBJECT];
            if erased.contains(&s) {
                assert_eq!(reads, gone, "acknowledged erasure of subject {s} undone");
            } else {
                assert!(
                    reads == whole || reads == gone,
                    "subject {s} half erased: {reads:?}"
                );
                unacknowledged_applied += usize::from(reads == gone);
            }
            erased_checked += 1;
        }
        let updated = updated.lock().unwrap().clone();
        let reads = read_all(&vault, &update_tokens).await;
        for (i, read) in reads.into_iter().enumerate() {
            let new = Read::Value(new_value(i));
            if updated.contains(&i) {
                assert_eq!(read, new, "acknowledged update {i} lost");
            } else {
                assert!(read == new || read == Read::Value(old_value(i)), "{read:?}");
                unacknowledged_applied += usize::from(read == new);
            }
            updates_checked += 1;
        }
    }
    eprintln!(
        "crash during erase/update: {erased_checked} subjects and {updates_checked} updated values checked after 3 SIGKILLs ({unacknowledged_applied} calls in flight at the kill were applied whole)"
    );
}

/// A group's values, and whether all of it was acknowledged.
type Group = (Vec<String>, bool);

/// Groups of ten values, sent by eight writers until the server dies:
/// each group as one Tokenize of ten items (`batched`), or as ten
/// Tokenizes of one item in a row. Returns each group's values and
/// whether all of it was acknowledged.
async fn groups_until_killed(
    vault: &mut TestVault,
    batched: bool,
    kill_after: usize,
) -> Vec<Group> {
    use std::sync::{Arc, Mutex};
    let client = vault.client("support").await;
    let groups: Arc<Mutex<Vec<Group>>> = Arc::default();
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tag = if batched { "b" } else { "s" };
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (mut client, groups, acked) =
                (client.clone(), Arc::clone(&groups), Arc::clone(&acked));
            tokio::spawn(async move {
                for g in 0.. {
                    let values: Vec<String> = (0..10)
                        .map(|i| format!("{tag}{w}-{g}-{i}@example.com"))
                        .collect();
                    let at = {
                        let mut groups = groups.lock().unwrap();
                        groups.push((values.clone(), false));
                        groups.len() - 1
                    };
                    let item = |value: &String| item("customer_email", value);
                    let stored = if batched {
                        client
                            .tokenize(TokenizeRequest {
                                items: values.iter().map(item).collect(),
                                ..Default::default()
                            })
                            .await
                            .is_ok()
                    } else {
                        let mut all = true;
                        for value in &values {
                            let request = TokenizeRequest {
                                items: vec![item(value)],
                                ..Default::default()
                            };
                            if client.tokenize(request).await.is_err() {
                                all = false;
                                break;
                            }
                        }
                        all
                    };
                    if !stored {
                        return;
                    }
                    groups.lock().unwrap()[at].1 = true;
                    acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked.load(std::sync::atomic::Ordering::SeqCst) < kill_after {
        assert!(
            std::time::Instant::now() < deadline,
            "fewer than {kill_after} groups stored in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    vault.kill();
    for writer in writers {
        tokio::time::timeout(Duration::from_secs(30), writer)
            .await
            .expect("a writer still runs after the kill")
            .unwrap();
    }
    Arc::try_unwrap(groups).unwrap().into_inner().unwrap()
}

/// How many of each group's values a lookup finds.
async fn found_per_group(vault: &TestVault, groups: &[Group]) -> Vec<usize> {
    use tokenvault::proto::v1::{LookupItem, LookupTokensRequest, lookup_result};
    let mut client = vault.client("support").await;
    let mut found = Vec::with_capacity(groups.len());
    for (values, _) in groups {
        let response = client
            .lookup_tokens(LookupTokensRequest {
                items: values
                    .iter()
                    .map(|value| LookupItem {
                        field_type: "customer_email".into(),
                        value: value.clone(),
                        subject_id: String::new(),
                    })
                    .collect(),
            })
            .await
            .unwrap()
            .into_inner();
        found.push(
            response
                .results
                .iter()
                .filter(|r| matches!(r.result, Some(lookup_result::Result::Token(_))))
                .count(),
        );
    }
    found
}

/// A multi-item Tokenize in flight at SIGKILL is stored whole or not at
/// all (README: a batch is one atomic write): after the kill, a lookup of
/// every value sent finds, for each ten-item request, all ten or none, and
/// all ten for each acknowledged one. The control sends the same groups as
/// ten one-item requests in a row: a kill between them leaves groups partly
/// stored, and the same check reports them, so it can catch a torn batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_item_tokenize_in_flight_at_sigkill_is_all_or_nothing() {
    const DETERMINISTIC: &str =
        "[field_types.customer_email]\nkind = \"email\"\ndeterministic = true\n";
    let mut points =
        KillPoints::new("a_multi_item_tokenize_in_flight_at_sigkill_is_all_or_nothing");
    for batched in [true, false] {
        let mut vault = TestVault::start_with(DETERMINISTIC);
        let kill_after = 20 + usize::try_from(points.below(40)).unwrap();
        let groups = groups_until_killed(&mut vault, batched, kill_after).await;
        vault
            .spawn()
            .expect("the vault did not reopen after SIGKILL");
        let found = found_per_group(&vault, &groups).await;
        let torn: Vec<usize> = found
            .iter()
            .copied()
            .filter(|n| *n != 0 && *n != 10)
            .collect();
        let lost = groups
            .iter()
            .zip(&found)
            .filter(|((_, acked), n)| *acked && **n != 10)
            .count();
        assert_eq!(lost, 0, "acknowledged groups not wholly stored");
        if batched {
            assert!(
                torn.is_empty(),
                "ten-item requests stored in part after SIGKILL: {torn:?} of {} groups",
                groups.len()
            );
        } else {
            assert!(
                !torn.is_empty(),
                "the control tore no group ({} groups): the check could not have caught a torn batch",
                groups.len()
            );
        }
        eprintln!(
            "atomicity ({}): {} groups, {} in flight at the kill, {} torn",
            if batched {
                "one request each"
            } else {
                "control, ten requests each"
            },
            groups.len(),
            groups.iter().filter(|(_, acked)| !acked).count(),
            torn.len()
        );
    }
}

/// An `LD_PRELOAD` library that keeps, for every file under
/// `TV_LOSE_UNSYNCED_DIR`, an undo log (in `TV_LOSE_UNSYNCED_LOG`) of what
/// each write since the file's last `fsync`/`fdatasync` overwrote. Applied
/// after a kill ([`lose_unsynced`]), the logs take the files back to what
/// their syncs made durable: the machine's view after a power loss, which
/// a process kill alone (the page cache survives it) never shows.
const LOSE_UNSYNCED: &str = r#"#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

/* Keeps, for every file under TV_LOSE_UNSYNCED_DIR, an undo log in
   TV_LOSE_UNSYNCED_LOG of what each write since the file's last fsync or
   fdatasync overwrote: offset, size before, the old bytes. Applied in
   reverse after a kill, the logs take the files back to what their last
   sync made durable, as a machine that loses its page cache would. */

#define MAX_FD 65536
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int undo_of[MAX_FD]; /* undo log fd + 1, 0 if untracked */

static ssize_t raw_write(int fd, const void *buf, size_t n) {
    return syscall(SYS_write, fd, buf, n);
}

static void track(int fd) {
    const char *dir = getenv("TV_LOSE_UNSYNCED_DIR");
    const char *logs = getenv("TV_LOSE_UNSYNCED_LOG");
    if (fd < 0 || fd >= MAX_FD || dir == NULL || logs == NULL) return;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t len = readlink(link, path, sizeof path - 1);
    if (len <= 0) return;
    path[len] = 0;
    if (strncmp(path, dir, strlen(dir)) != 0) return;
    char name[4200];
    snprintf(name, sizeof name, "%s/", logs);
    size_t at = strlen(name);
    for (ssize_t i = 0; i < len && at < sizeof name - 8; i++)
        name[at++] = path[i] == '/' ? '%' : path[i];
    strcpy(name + at, ".undo");
    int log = (int)syscall(SYS_openat, AT_FDCWD, name, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    /* A file it cannot log would slip past: stop instead. */
    if (log < 0) abort();
    pthread_mutex_lock(&lock);
    if (undo_of[fd]) syscall(SYS_close, undo_of[fd] - 1);
    undo_of[fd] = log + 1;
    pthread_mutex_unlock(&lock);
}

/* Records what [offset, offset + n) of fd holds now, before a write. */
static void save(int fd, off_t offset, size_t n) {
    if (fd < 0 || fd >= MAX_FD) return;
    pthread_mutex_lock(&lock);
    int log = undo_of[fd] - 1;
    if (log >= 0) {
        struct stat st;
        if (fstat(fd, &st) == 0) {
            uint64_t head[3] = {(uint64_t)offset, (uint64_t)st.st_size, 0};
            char *old = NULL;
            if ((off_t)offset < st.st_size && n > 0) {
                size_t avail = (size_t)(st.st_size - offset);
                if (avail > n) avail = n;
                old = malloc(avail);
                ssize_t got = old ? pread(fd, old, avail, offset) : -1;
                /* Bytes it cannot save (a write-only descriptor) would
                   slip past: stop instead. */
                if (got != (ssize_t)avail) abort();
                head[2] = (uint64_t)got;
            }
            raw_write(log, head, sizeof head);
            if (head[2] > 0) raw_write(log, old, head[2]);
            free(old);
        }
    }
    pthread_mutex_unlock(&lock);
}

static void synced(int fd) {
    if (fd < 0 || fd >= MAX_FD) return;
    pthread_mutex_lock(&lock);
    if (undo_of[fd]) syscall(SYS_ftruncate, undo_of[fd] - 1, 0);
    pthread_mutex_unlock(&lock);
}

#define REAL(name) static __typeof__(&name) real_##name; if (!real_##name) real_##name = (__typeof__(&name))dlsym(RTLD_NEXT, #name)

/* What an open with O_TRUNC is about to cut: the file's bytes, read
   before the real open (none if it does not exist or is empty). */
struct cut { char *bytes; size_t len; };
static struct cut before_open(int dirfd, const char *path, int flags) {
    struct cut cut = {NULL, 0};
    if (!(flags & O_TRUNC)) return cut;
    int fd = (int)syscall(SYS_openat, dirfd, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return cut;
    struct stat st;
    if (fstat(fd, &st) == 0 && st.st_size > 0) {
        cut.bytes = malloc((size_t)st.st_size);
        if (cut.bytes == NULL || pread(fd, cut.bytes, (size_t)st.st_size, 0) != st.st_size) abort();
        cut.len = (size_t)st.st_size;
    }
    syscall(SYS_close, fd);
    return cut;
}
/* Tracks a file opened for writing, logging what O_TRUNC cut. */
static void after_open(int fd, int flags, struct cut cut) {
    if (fd >= 0 && (flags & O_ACCMODE) != O_RDONLY) {
        track(fd);
        if (cut.len > 0 && fd < MAX_FD && undo_of[fd]) {
            uint64_t head[3] = {0, (uint64_t)cut.len, (uint64_t)cut.len};
            pthread_mutex_lock(&lock);
            raw_write(undo_of[fd] - 1, head, sizeof head);
            raw_write(undo_of[fd] - 1, cut.bytes, cut.len);
            pthread_mutex_unlock(&lock);
        }
    }
    free(cut.bytes);
}

/* The four opens differ only in their parameters. */
#define WRAP_OPEN(name, params, dir, args) \
int name params { \
    REAL(name); \
    mode_t mode = 0; \
    if (flags & (O_CREAT | O_TMPFILE)) { va_list ap; va_start(ap, flags); mode = va_arg(ap, mode_t); va_end(ap); } \
    struct cut cut = before_open(dir, path, flags); \
    int fd = real_##name args; \
    after_open(fd, flags, cut); \
    return fd; \
}
WRAP_OPEN(open, (const char *path, int flags, ...), AT_FDCWD, (path, flags, mode))
WRAP_OPEN(open64, (const char *path, int flags, ...), AT_FDCWD, (path, flags, mode))
WRAP_OPEN(openat, (int dirfd, const char *path, int flags, ...), dirfd, (dirfd, path, flags, mode))
WRAP_OPEN(openat64, (int dirfd, const char *path, int flags, ...), dirfd, (dirfd, path, flags, mode))
ssize_t write(int fd, const void *buf, size_t n) {
    REAL(write);
    if (fd >= 0 && fd < MAX_FD && undo_of[fd]) {
        off_t at = lseek(fd, 0, SEEK_CUR);
        if (fcntl(fd, F_GETFL) & O_APPEND) { struct stat st; if (fstat(fd, &st) == 0) at = st.st_size; }
        save(fd, at, n);
    }
    return real_write(fd, buf, n);
}
ssize_t pwrite(int fd, const void *buf, size_t n, off_t offset) {
    REAL(pwrite);
    save(fd, offset, n);
    return real_pwrite(fd, buf, n, offset);
}
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t offset) {
    REAL(pwrite64);
    save(fd, offset, n);
    return real_pwrite64(fd, buf, n, offset);
}
ssize_t writev(int fd, const struct iovec *iov, int count) {
    REAL(writev);
    if (fd >= 0 && fd < MAX_FD && undo_of[fd]) {
        size_t n = 0;
        for (int i = 0; i < count; i++) n += iov[i].iov_len;
        save(fd, lseek(fd, 0, SEEK_CUR), n);
    }
    return real_writev(fd, iov, count);
}
static void save_cut(int fd, off_t length) {
    struct stat st;
    if (fstat(fd, &st) == 0 && st.st_size > length) save(fd, length, (size_t)(st.st_size - length));
    else save(fd, length, 0);
}
int ftruncate(int fd, off_t length) {
    REAL(ftruncate);
    save_cut(fd, length);
    return real_ftruncate(fd, length);
}
int ftruncate64(int fd, off_t length) {
    REAL(ftruncate64);
    save_cut(fd, length);
    return real_ftruncate64(fd, length);
}
int fsync(int fd) {
    REAL(fsync);
    int r = real_fsync(fd);
    if (r == 0) synced(fd);
    return r;
}
int fdatasync(int fd) {
    REAL(fdatasync);
    int r = real_fdatasync(fd);
    if (r == 0) synced(fd);
    return r;
}
int close(int fd) {
    REAL(close);
    if (fd >= 0 && fd < MAX_FD) {
        pthread_mutex_lock(&lock);
        if (undo_of[fd]) { syscall(SYS_close, undo_of[fd] - 1); undo_of[fd] = 0; }
        pthread_mutex_unlock(&lock);
    }
    return real_close(fd);
}
"#;

/// Rolls every file the shim logged back to its last sync, as losing the
/// page cache would; returns how many unsynced writes it undid.
fn lose_unsynced(undo_dir: &std::path::Path) -> usize {
    use std::os::unix::fs::FileExt;
    let mut undone = 0;
    for entry in std::fs::read_dir(undo_dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(path) = name.strip_suffix(".undo").map(|p| p.replace('%', "/")) else {
            continue;
        };
        let log = std::fs::read(entry.path()).unwrap();
        // (offset, size before, the bytes it held), in write order.
        let mut writes = Vec::new();
        let mut rest = &log[..];
        while rest.len() >= 24 {
            let word = |i: usize| u64::from_ne_bytes(rest[i * 8..i * 8 + 8].try_into().unwrap());
            let (offset, size, len) = (word(0), word(1), usize::try_from(word(2)).unwrap());
            let Some(old) = rest.get(24..24 + len) else {
                break;
            };
            writes.push((offset, size, old.to_vec()));
            rest = &rest[24 + len..];
        }
        let Ok(file) = std::fs::OpenOptions::new().write(true).open(&path) else {
            continue;
        };
        let Some((_, synced_size, _)) = writes.first() else {
            continue;
        };
        for (offset, _, old) in writes.iter().rev() {
            file.write_all_at(old, *offset).unwrap();
        }
        file.set_len(*synced_size).unwrap();
        undone += writes.len();
    }
    undone
}

/// A crash of the machine, not only of the process: the vault writes ten
/// values and reveals them through the page-cache shim, then is killed
/// under sixteen concurrent writers after 100 more answers, and every
/// file of its data directory is taken back to what its syncs made
/// durable. With `durability = "sync"` every acknowledged value reads after
/// the restart, every reveal that answered has its audit event, and the
/// trail verifies. The control, `"buffered"`, loses acknowledged values and
/// reveals' events (a kill alone would not: the page cache keeps them), so
/// the check can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_losing_the_page_cache() {
    let mut lost_per_mode = Vec::new();
    for durability in ["sync", "buffered"] {
        // No checkpoint (a synced write) while the values go in.
        let mut vault = TestVault::prepare(&format!(
            "durability = \"{durability}\"\n[audit]\ncheckpoint_interval_seconds = 3600\n"
        ));
        vault.write_config();
        let root = std::fs::canonicalize(vault.root.path()).unwrap();
        let undo = root.join("undo");
        std::fs::create_dir(&undo).unwrap();
        let shim = common::build_preload(&root, "loseunsynced", LOSE_UNSYNCED);
        vault.env = vec![
            ("LD_PRELOAD".into(), shim.display().to_string()),
            (
                "TV_LOSE_UNSYNCED_DIR".into(),
                root.join("data").display().to_string(),
            ),
            ("TV_LOSE_UNSYNCED_LOG".into(), undo.display().to_string()),
        ];
        vault.spawn().unwrap();
        let mut client = vault.client("checkout").await;
        let mut acked = Vec::new();
        for i in 0..10 {
            let value = format!("power-{durability}-{i}@example.com");
            let response = client
                .tokenize(TokenizeRequest {
                    items: vec![item("email", &value)],
                    ..Default::default()
                })
                .await
                .unwrap();
            acked.push((tokens_of(response.into_inner()).remove(0), value));
        }
        // Ten reveals that answered: each one's audit event was written
        // before its value left.
        let mut support = vault.client("support").await;
        for (token, _) in &acked[..10] {
            common::detokenize(
                &mut support,
                std::slice::from_ref(token),
                "customer_support",
            )
            .await
            .unwrap();
        }
        // Then the kill under load, writes in flight: each one answered
        // must have been synced before its answer, not by a later write.
        let writers = Writers::start(&client, 16, &format!("power-{durability}"), false);
        writers.wait_for(100).await;
        vault.kill();
        acked.extend(writers.stop().await);
        let undone = lose_unsynced(&undo);
        vault.env.clear();
        vault
            .spawn()
            .expect("the vault did not reopen after losing its page cache");
        let reveals = common::audit_events(&vault)
            .await
            .iter()
            .filter(|e| e["method"] == "Detokenize" && e["outcome"] == "OK")
            .count();
        let mut support = vault.client("support").await;
        let mut lost = 0;
        for (token, value) in &acked {
            let read = common::detokenize(
                &mut support,
                std::slice::from_ref(token),
                "customer_support",
            )
            .await
            .map(common::revealed);
            if !matches!(read.as_deref(), Ok([Ok(v)]) if v == value) {
                lost += 1;
            }
        }
        eprintln!(
            "durability {durability}: {undone} unsynced writes undone, {lost} of {} acknowledged values and {} of 10 reveals' events lost",
            acked.len(),
            10 - reveals.min(10)
        );
        if durability == "sync" {
            vault.stop();
            verified_events(&vault);
        }
        lost_per_mode.push((durability, lost, reveals, undone > 0));
    }
    let [
        (_, sync_lost, sync_reveals, _),
        (_, buffered_lost, buffered_reveals, buffered_undone),
    ] = lost_per_mode[..]
    else {
        unreachable!()
    };
    assert_eq!(
        (sync_lost, sync_reveals),
        (0, 10),
        "sync durability lost acknowledged values or reveals' events: {lost_per_mode:?}"
    );
    assert!(
        buffered_undone && buffered_lost > 0 && buffered_reveals < 10,
        "the control lost nothing, so the shim did not take the page cache away: {lost_per_mode:?}"
    );
}
