//! Dual control of the master key: split 2-of-3 with `keys split-master`,
//! a vault configured with `[keys.shares]` starts sealed and opens once two
//! holders have run `tokenvault unseal`; any two shares open it, one does
//! not, and a share of another key does not get in the way.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::{TestVault, tokenvault_command};

/// Splits the key file at `key` 2-of-3 into `out`; the share files, and
/// the `commitments = [...]` line it printed for the config.
fn split(key: &Path, out: &Path) -> (Vec<PathBuf>, String) {
    let result = tokenvault_command()
        .args(["keys", "split-master", "--threshold", "2", "--shares", "3"])
        .arg("--key-file")
        .arg(key)
        .arg("--out-dir")
        .arg(out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(stdout.contains("any 2 make the master key"), "{stdout}");
    let shares: Vec<PathBuf> = (1..=3).map(|n| out.join(format!("share-{n}"))).collect();
    for share in &shares {
        let mode = std::fs::metadata(share).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", share.display());
    }
    let commitments = stdout
        .lines()
        .find(|line| line.starts_with("commitments = ["))
        .unwrap_or_else(|| panic!("no commitments in {stdout}"))
        .to_owned();
    // Each holder can say which commitment is theirs, sending nothing.
    for (share, listed) in shares.iter().zip(commitments.split('"').skip(1).step_by(2)) {
        let out = tokenvault_command()
            .args(["unseal", "--print-commitment", "--share-file"])
            .arg(share)
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), listed);
    }
    (shares, commitments)
}

/// `tokenvault unseal --socket … --share-file …`: (succeeded, what it said).
fn unseal(socket: &Path, share: &Path) -> (bool, String) {
    let out = tokenvault_command()
        .arg("unseal")
        .arg("--socket")
        .arg(socket)
        .arg("--share-file")
        .arg(share)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the vault never opened its unseal socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A vault whose master key comes in shares over `socket`, split 2-of-3
/// into `out`; not started. The share files.
fn sealed_vault(socket: &Path, out: &Path) -> (TestVault, Vec<PathBuf>) {
    let mut vault = TestVault::prepare("");
    let (shares, commitments) = split(&vault.root.path().join("master.key"), out);
    vault.keys = format!(
        "[keys.shares]\nthreshold = 2\nsocket = \"{}\"\n{commitments}\n",
        socket.display()
    );
    vault.write_config();
    (vault, shares)
}

/// Starts `vault` while `holders` runs beside it (the vault reports
/// serving only once they have unsealed it); what `holders` returned.
fn start_while<T: Send>(vault: &mut TestVault, holders: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let holders = scope.spawn(holders);
        let started = vault.spawn();
        let said = holders.join().unwrap();
        started.expect("the vault did not start");
        said
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_split_two_of_three_opens_with_any_two_shares() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("unseal.sock");
    let (mut vault, shares) = sealed_vault(&socket, &dir.path().join("shares"));
    let key = vault.root.path().join("master.key");
    // The holders have the shares; nobody keeps the key.
    std::fs::remove_file(&key).unwrap();

    let said = start_while(&mut vault, || {
        wait_for_socket(&socket);
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the unseal socket is open to others");
        [
            unseal(&socket, &shares[0]),
            unseal(&socket, &shares[0]),
            unseal(&socket, &shares[2]),
        ]
    });
    assert!(
        said[0].0 && said[0].1.contains("accepted: 1 of 2"),
        "{said:?}"
    );
    assert!(
        !said[1].0 && said[1].1.contains("already given"),
        "{said:?}"
    );
    assert!(said[2].0 && said[2].1.contains("unsealed"), "{said:?}");
    assert!(
        vault
            .logs()
            .contains("sealed: waiting for master-key shares")
    );
    assert!(!socket.exists(), "the socket outlives the sealed state");

    let pairs = vec![(
        common::tokenize_one(
            &mut vault.client("support").await,
            "email",
            "sealed@example.com",
        )
        .await,
        "sealed@example.com".to_owned(),
    )];
    common::assert_all_detokenize(&vault, &pairs).await;

    // Another pair of holders opens it after a restart.
    vault.stop();
    let said = start_while(&mut vault, || {
        wait_for_socket(&socket);
        [unseal(&socket, &shares[1]), unseal(&socket, &shares[2])]
    });
    assert!(said[1].0 && said[1].1.contains("unsealed"), "{said:?}");
    common::assert_all_detokenize(&vault, &pairs).await;

    let share_texts: Vec<String> = shares
        .iter()
        .map(|s| std::fs::read_to_string(s).unwrap().trim().to_owned())
        .collect();
    vault.assert_log_free_of(&share_texts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_share_does_not_open_it_and_another_keys_shares_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("unseal.sock");
    let (mut vault, shares) = sealed_vault(&socket, &dir.path().join("shares"));
    // Whoever reaches the socket, with a whole split of a key of their own.
    let other_key = dir.path().join("other.key");
    tokenvault::crypto::MasterKey::create_file(&other_key).unwrap();
    let (other, _) = split(&other_key, &dir.path().join("other-shares"));

    let said = start_while(&mut vault, || {
        wait_for_socket(&socket);
        let first = [
            unseal(&socket, &other[0]),
            unseal(&socket, &shares[1]),
            unseal(&socket, &other[1]),
        ];
        // One share of its key, two of another: still sealed.
        std::thread::sleep(Duration::from_millis(300));
        let still_sealed = socket.exists();
        let last = unseal(&socket, &shares[0]);
        (first, still_sealed, last)
    });
    let (first, still_sealed, last) = said;
    for refused in [&first[0], &first[2]] {
        assert!(
            !refused.0 && refused.1.contains("not one of this vault's"),
            "{first:?}"
        );
    }
    assert!(
        first[1].0 && first[1].1.contains("accepted: 1 of 2"),
        "{first:?}"
    );
    assert!(still_sealed, "the vault opened with shares of another key");
    assert!(last.0 && last.1.contains("unsealed"), "{last:?}");
    common::tokenize_one(&mut vault.client("support").await, "email", "x@example.com").await;
}

#[test]
fn unseal_says_clearly_when_no_vault_is_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::write(&share, "tvshare1-2-00\n").unwrap();
    let (ok, said) = unseal(&dir.path().join("nothing.sock"), &share);
    assert!(!ok);
    assert!(said.contains("cannot reach a sealed vault"), "{said}");
}
