//! Crash safety: acknowledged writes survive SIGKILL at arbitrary moments,
//! and an acknowledgement waits for a synced write (counted with strace).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use common::{TestVault, Writers};
use tokenvault::proto::v1::{TokenizeItem, TokenizeRequest};

fn item(value: String) -> TokenizeItem {
    TokenizeItem {
        field_type: "email".into(),
        value,
        subject_id: String::new(),
        ttl_seconds: 0,
    }
}

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

/// Runs the vault under `strace -f -c`, makes `writes` sequential tokenize
/// calls, stops it, and returns the number of fsync + fdatasync calls.
async fn syncs_for(vault: &mut TestVault, writes: usize) -> u64 {
    vault.stop();
    let summary = vault.root.path().join("strace.txt");
    let mut strace = Command::new("strace")
        .args(["-f", "-qq", "-c", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(&summary)
        .arg(env!("CARGO_BIN_EXE_tokenvault"))
        .args(["serve", "--config"])
        .arg(vault.config_path())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("strace is not installed (scripts/install-deps.sh --test installs it)");
    let stderr = strace.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(event) = common::log_event(&line)
                && event["message"] == "serving"
            {
                let _ = tx.send(event["grpc.addr"].as_str().unwrap().to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("no serving line under strace");
    let mut client = tokenvault::client::connect(&addr, &vault.pki.tls("checkout"))
        .await
        .unwrap();
    for i in 0..writes {
        client
            .tokenize(TokenizeRequest {
                items: vec![item(format!("sync{i}@example.com"))],
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
