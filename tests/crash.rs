//! Crash safety: acknowledged writes survive SIGKILL at arbitrary moments,
//! an acknowledgement waits for a synced write (counted with strace), and
//! erasures and updates in flight at a kill are applied whole or not at all.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use common::{TestVault, Writers, item};
use tokenvault::proto::v1::{TokenizeItem, TokenizeRequest};

fn random_below(n: u64) -> u64 {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).unwrap();
    u64::from_le_bytes(bytes) % n
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let mut vault = TestVault::start();
    let mut all = Vec::new();
    for round in 0..4 {
        let kill_after = 100 + usize::try_from(random_below(400)).unwrap();
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
}

/// Starts the vault under `strace -f -c` (fsync and fdatasync counted into
/// `summary`) and waits for its "serving" line: the process and its gRPC
/// address, or everything it printed if it ended first.
fn start_under_strace(
    vault: &TestVault,
    summary: &std::path::Path,
) -> Result<(std::process::Child, String), String> {
    // Like common::tokenvault_command: the server sees no variable of the
    // test's environment (a TOKENVAULT_* one would be read as config).
    let mut strace = Command::new("strace");
    strace.env_clear();
    if let Ok(path) = std::env::var("PATH") {
        strace.env("PATH", path);
    }
    let mut strace = strace
        .args(["-f", "-qq", "-c", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(summary)
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

/// Runs the vault under `strace -f -c`, makes `writes` sequential tokenize
/// calls, stops it, and returns the number of fsync + fdatasync calls.
async fn syncs_for(vault: &mut TestVault, writes: usize) -> u64 {
    vault.stop();
    let summary = vault.root.path().join("strace.txt");
    let (mut strace, addr) = start_under_strace(vault, &summary)
        .unwrap_or_else(|output| panic!("no serving line under strace; its output:\n{output}"));
    let mut client = tokenvault::client::connect(&addr, &vault.pki.tls("checkout"))
        .await
        .unwrap();
    for i in 0..writes {
        client
            .tokenize(TokenizeRequest {
                items: vec![item("email", &format!("sync{i}@example.com"))],
            })
            .await
            .unwrap();
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
    let report = std::fs::read_to_string(&summary).unwrap();
    report
        .lines()
        .filter(|l| l.trim_end().ends_with("fsync") || l.trim_end().ends_with("fdatasync"))
        .map(|l| {
            l.split_whitespace()
                .nth(3)
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_waits_for_a_synced_write() {
    const WRITES: usize = 50;
    // One request at a time, so no two can share a group commit: with
    // durability = sync each acknowledgement needs its own sync.
    let mut synced = TestVault::start();
    let sync_calls = syncs_for(&mut synced, WRITES).await;
    assert!(
        sync_calls >= WRITES as u64,
        "{sync_calls} syncs for {WRITES} acknowledged writes"
    );
    // The same with durability = buffered: no sync per write. This is what
    // shows the count above comes from the acknowledgements.
    let mut buffered = TestVault::start_with("durability = \"buffered\"");
    let buffered_calls = syncs_for(&mut buffered, WRITES).await;
    assert!(
        buffered_calls < WRITES as u64 / 2,
        "{buffered_calls} syncs with durability = buffered"
    );
    eprintln!(
        "durability: {sync_calls} syncs (sync) vs {buffered_calls} (buffered) for {WRITES} sequential writes"
    );
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
        EraseSubjectRequest, UpdateValueRequest, subjects_client::SubjectsClient, tokenize_result,
    };
    const SUBJECTS: usize = 30;
    const PER_SUBJECT: usize = 4;
    const UPDATES: usize = 60;

    let mut vault = TestVault::start();
    let (mut erased_checked, mut updates_checked, mut unacknowledged_applied) = (0, 0, 0);
    for round in 0..3 {
        let mut checkout = vault.client("checkout").await;
        let mut tokenize = async |items: Vec<TokenizeItem>| -> Vec<String> {
            checkout
                .tokenize(TokenizeRequest { items })
                .await
                .unwrap()
                .into_inner()
                .results
                .into_iter()
                .map(|r| match r.result {
                    Some(tokenize_result::Result::Token(t)) => t,
                    other => panic!("{other:?}"),
                })
                .collect()
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
                    };
                    if client.update_value(request).await.is_err() {
                        break;
                    }
                    updated.lock().unwrap().push(i);
                }
            }));
        }
        let kill_after = 4 + usize::try_from(random_below(30)).unwrap();
        while erased.lock().unwrap().len() + updated.lock().unwrap().len() < kill_after {
            tokio::task::yield_now().await;
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
