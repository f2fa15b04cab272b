//! Storage faults on a real filesystem: the data directory lives on a tmpfs
//! of a few MiB that the test fills up and then frees.
//!
//! Mounting needs root. As another user the test re-runs itself inside a new
//! user and mount namespace (`unshare --user --map-root-user --mount`), where
//! it may mount a tmpfs of its own.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{TestVault, item, tokenvault_command};
use tokenvault::proto::v1::{DetokenizeRequest, TokenizeItem, TokenizeRequest, tokenize_result};
use tonic::Code;

/// Set in the environment of the re-run inside the namespace.
const IN_NAMESPACE: &str = "TOKENVAULT_TEST_IN_MOUNT_NAMESPACE";

/// How long RocksDB may take to notice that space is back (its space
/// checker wakes every five seconds, and resumes writes once the free space
/// could hold every memtable: 64 MiB, hence the 160 MiB filesystem).
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// A tmpfs of a fixed size at `path`, unmounted on drop.
struct SmallFs {
    path: PathBuf,
}

impl SmallFs {
    fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("mount(8) is needed");
        assert!(
            status.success(),
            "cannot mount a tmpfs at {}",
            path.display()
        );
        Self {
            path: path.to_owned(),
        }
    }

    /// Writes a file until the filesystem is full; returns its path.
    fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0x5a; 64 << 10];
        loop {
            match file.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => break filler,
                Err(e) => panic!("unexpected error filling the disk: {e}"),
            }
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

/// Runs the named test again as root of a new user and mount namespace;
/// returns false if this process can mount already. The run must have run
/// exactly that one test: a renamed test would otherwise match nothing
/// and pass.
fn rerun_in_namespace(test: &str) -> bool {
    if is_root() || std::env::var_os(IN_NAMESPACE).is_some() {
        return false;
    }
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(IN_NAMESPACE, "1")
        .output()
        .expect("unshare(1) is needed to mount a tmpfs without root");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{test} failed inside its mount namespace:\n{said}"
    );
    assert!(
        said.contains("test result: ok. 1 passed"),
        "{test} did not run exactly once inside its mount namespace:\n{said}"
    );
    true
}

/// The `i`th e-mail address: long, so that it fills the disk sooner.
fn long_email(i: usize) -> String {
    format!("{}.{i}@{}.example.com", "f".repeat(50), "d".repeat(60))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_clearly_and_they_resume_when_space_returns() {
    if rerun_in_namespace("a_full_disk_refuses_writes_clearly_and_they_resume_when_space_returns") {
        return;
    }
    let mut fs = None;
    let mut vault = TestVault::start_after(|v| {
        fs = Some(SmallFs::mount(&v.data_dir(), "160m"));
    });
    let fs = fs.unwrap();
    let mut client = vault.client("checkout").await;
    let mut acked: Vec<(String, String)> = Vec::new();
    let tokenize = async |client: &mut tokenvault::client::TokenVaultClient<_>,
                          items: Vec<TokenizeItem>|
           -> Result<Vec<(String, String)>, tonic::Status> {
        let values: Vec<String> = items.iter().map(|i| i.value.clone()).collect();
        let response = client
            .tokenize(TokenizeRequest {
                items,
                ..Default::default()
            })
            .await?;
        Ok(response
            .into_inner()
            .results
            .into_iter()
            .zip(values)
            .map(|(r, v)| match r.result {
                Some(tokenize_result::Result::Token(t)) => (t, v),
                other => panic!("{other:?}"),
            })
            .collect())
    };
    acked.extend(
        tokenize(
            &mut client,
            (0..50).map(|i| item("email", &long_email(i))).collect(),
        )
        .await
        .unwrap(),
    );

    // Full: writes keep going into space RocksDB set aside until they fail,
    // with a status that says what is wrong.
    let filler = fs.fill();
    let mut next = 50;
    let refusal = loop {
        match tokenize(
            &mut client,
            (next..next + 500)
                .map(|i| item("email", &long_email(i)))
                .collect(),
        )
        .await
        {
            Ok(pairs) => acked.extend(pairs),
            Err(status) => break status,
        }
        next += 500;
        assert!(next < 200_000, "writes never failed on a full disk");
    };
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(refusal.message().contains("storage is full"), "{refusal:?}");
    // Reads are audited before they reveal anything, and the audit cannot be
    // written either: they fail closed, saying why.
    let mut support = vault.client("support").await;
    let read = support
        .detokenize(DetokenizeRequest {
            tokens: vec![acked[0].0.clone()],
            purpose: "customer_support".into(),
            masked: false,
        })
        .await
        .unwrap_err();
    assert_eq!(read.code(), Code::ResourceExhausted, "{read:?}");
    assert!(read.message().contains("audit log"), "{read:?}");

    // Space returns: writes resume without a restart.
    std::fs::remove_file(filler).unwrap();
    let freed = Instant::now();
    loop {
        match tokenize(&mut client, vec![item("email", &long_email(next))]).await {
            Ok(pairs) => {
                acked.extend(pairs);
                break;
            }
            Err(status) => {
                assert!(
                    freed.elapsed() < RECOVERY_TIMEOUT,
                    "writes did not resume within {RECOVERY_TIMEOUT:?} of space returning: {status:?}\n{}\nROCKSDB LOG:\n{}",
                    vault.logs(),
                    std::fs::read_to_string(vault.data_dir().join("LOG")).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    assert!(vault.wait_for_log("storage writes resumed"));
    eprintln!(
        "disk full: {} writes acknowledged, writes resumed {:?} after space returned",
        acked.len(),
        freed.elapsed()
    );

    // Nothing acknowledged was lost or corrupted, before and after a restart,
    // and the audit chain still verifies.
    common::assert_all_detokenize(&vault, &acked).await;
    vault.restart();
    common::assert_all_detokenize(&vault, &acked).await;
    vault.stop();
    let verify = tokenvault_command()
        .args(["audit", "verify", "--data-dir"])
        .arg(vault.data_dir())
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    drop(fs);
}
