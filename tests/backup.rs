//! Online backup of a live vault under writes, verified and restored: every
//! write acknowledged before the backup detokenizes from the restored copy.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::{TestVault, Writers, run_cli};

/// The names and sizes of the files in `dir`, sorted.
fn dir_listing(dir: &std::path::Path) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_a_live_vault_restores_every_acknowledged_write() {
    let mut vault = TestVault::start();
    let client = vault.client("checkout").await;
    let writers = Writers::start(&client, 8, "backup", true);
    writers.wait_for(300).await;

    // Everything acknowledged before the backup starts must be in it.
    let before = writers.acked();
    let backup = vault.root.path().join("backup-1");
    let tls = vault.pki.tls("privacy");
    let (ok, out) = tokio::task::spawn_blocking({
        let (backup, addr) = (backup.clone(), vault.grpc_addr.to_string());
        move || {
            run_cli(&[
                "backup",
                "create",
                "--addr",
                &addr,
                "--ca",
                tls.ca.to_str().unwrap(),
                "--cert",
                tls.cert.to_str().unwrap(),
                "--key",
                tls.key.to_str().unwrap(),
                backup.to_str().unwrap(),
            ])
        }
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("backup written"), "{out}");
    let all = writers.stop().await;
    assert!(all.len() > before.len(), "writes went on during the backup");

    // A second backup to the same path is refused, and the checkpoint scope is enforced.
    let mut admin = tokenvault::proto::v1::admin_client::AdminClient::new(
        vault
            .channel_with(&vault.pki.tls("checkout"))
            .await
            .unwrap(),
    );
    let status = admin
        .create_backup(tokenvault::proto::v1::CreateBackupRequest {
            path: vault.root.path().join("b2").display().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    // Authorisation comes before any look at the path: a caller without
    // the scope learns nothing of the filesystem (an existing path got
    // another answer before).
    let existing = admin
        .create_backup(tokenvault::proto::v1::CreateBackupRequest {
            path: backup.display().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(existing.code(), tonic::Code::PermissionDenied);
    assert_eq!(existing.message(), status.message());
    // With the scope, a second backup to the same path is refused and the
    // first is left as it was.
    let files_before = dir_listing(&backup);
    let mut admin = tokenvault::proto::v1::admin_client::AdminClient::new(
        vault.channel_with(&vault.pki.tls("privacy")).await.unwrap(),
    );
    let again = admin
        .create_backup(tokenvault::proto::v1::CreateBackupRequest {
            path: backup.display().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::InvalidArgument, "{again:?}");
    assert!(again.message().contains("exists"), "{}", again.message());
    assert_eq!(dir_listing(&backup), files_before);

    let (ok, out) = run_cli(&["backup", "verify", backup.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.starts_with("ok: "), "{out}");

    // A damaged copy does not verify: one flipped byte in the first data
    // block of each table file (table files start with their data blocks),
    // which RocksDB's block checksums must catch when verify reads it.
    let damaged = vault.root.path().join("backup-damaged");
    common::copy_dir(&backup, &damaged);
    let mut flipped = 0;
    for entry in std::fs::read_dir(&damaged).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "sst") {
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[10] ^= 0x5a;
            std::fs::write(&path, bytes).unwrap();
            flipped += 1;
        }
    }
    assert!(flipped > 0, "the backup holds no table file to damage");
    let (ok, out) = run_cli(&["backup", "verify", damaged.to_str().unwrap()]);
    assert!(!ok, "a damaged backup verified: {out}");
    assert!(!out.starts_with("ok: "), "{out}");

    let restored = vault.root.path().join("restored");
    let (ok, out) = run_cli(&[
        "backup",
        "restore",
        backup.to_str().unwrap(),
        "--to",
        restored.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let (ok, _) = run_cli(&[
        "backup",
        "restore",
        backup.to_str().unwrap(),
        "--to",
        restored.to_str().unwrap(),
    ]);
    assert!(!ok, "restoring over a non-empty directory must be refused");

    vault.stop();
    std::fs::remove_dir_all(vault.data_dir()).unwrap();
    std::fs::rename(&restored, vault.data_dir()).unwrap();
    vault.spawn().unwrap();
    common::assert_all_detokenize(&vault, &before).await;
}

/// The signed checkpoints of the stopped vault's data directory `dir`, by
/// sequence number, and the methods of its audit events in order.
fn signed_and_events(
    dir: &std::path::Path,
) -> (std::collections::BTreeMap<u64, [u8; 32]>, Vec<String>) {
    use tokenvault::store::{RocksStore, Snapshot, Table, chain};
    let store = RocksStore::open_read_only(dir).unwrap();
    let mut signed = std::collections::BTreeMap::new();
    store
        .scan(Table::AuditCheckpoints, &[], |key, value| {
            let seq = chain::seq_of(key).unwrap();
            let checkpoint = tokenvault::audit::Checkpoint::decode(seq, value).unwrap();
            signed.insert(seq, checkpoint.head);
            true
        })
        .unwrap();
    let mut methods = Vec::new();
    store
        .scan(Table::Audit, &[], |_, value| {
            let payload = chain::decode(value).unwrap().payload;
            let event = tokenvault::audit::AuditEvent::decode(payload).unwrap();
            methods.push(event.method);
            true
        })
        .unwrap();
    (signed, methods)
}

/// A backup restored after the vault signed heads past it: the restored
/// chain hands those numbers out again, to other events, and the vault
/// never signs a second head for any of them (it resumes signing above
/// the highest number it signed). The loss is logged and recorded in the
/// trail once, as a `ChainRolledBack` event. Without the witness beside
/// the ledger, the checkpoint signed a second after the restart is over a
/// number already signed before it, and this test fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_backup_never_gets_a_second_signed_head_for_a_number() {
    let mut vault = TestVault::start_with("[audit]\ncheckpoint_interval_seconds = 1\n");
    let mut client = vault.client("checkout").await;
    for i in 0..3 {
        common::tokenize_one(&mut client, "email", &format!("early{i}@example.com")).await;
    }
    let backup = vault.root.path().join("backup");
    let mut admin = tokenvault::proto::v1::admin_client::AdminClient::new(
        vault.channel_with(&vault.pki.tls("privacy")).await.unwrap(),
    );
    let backed_up = admin
        .create_backup(tokenvault::proto::v1::CreateBackupRequest {
            path: backup.display().to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .audit_seq;
    for i in 0..20 {
        common::tokenize_one(&mut client, "email", &format!("lost{i}@example.com")).await;
    }
    // Checkpoints are signed every second: one covers the writes above.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    vault.stop();
    let (before, _) = signed_and_events(&vault.data_dir());
    let lost = *before.keys().max().unwrap();
    assert!(
        lost >= backed_up + 20,
        "no checkpoint over the writes after the backup: {before:?}"
    );

    std::fs::remove_dir_all(vault.data_dir()).unwrap();
    let (ok, out) = run_cli(&[
        "backup",
        "restore",
        backup.to_str().unwrap(),
        "--to",
        vault.data_dir().to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    vault.spawn().unwrap();
    assert!(
        vault.wait_for_log("the audit chain lost events"),
        "{}",
        vault.logs()
    );
    // Opened again before anything is signed past the loss: the same loss
    // is not recorded twice.
    vault.stop();
    vault.spawn().unwrap();
    // A few writes, fewer than were lost: the head stays below the
    // numbers already signed while checkpoints come due.
    let mut client = vault.client("checkout").await;
    for i in 0..3 {
        common::tokenize_one(&mut client, "email", &format!("after{i}@example.com")).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    // Then past them: signing resumes.
    for i in 0..30 {
        common::tokenize_one(&mut client, "email", &format!("later{i}@example.com")).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    vault.stop();

    let (after, methods) = signed_and_events(&vault.data_dir());
    for (seq, head) in &after {
        if let Some(first) = before.get(seq) {
            assert_eq!(first, head, "two different heads signed for event {seq}");
        }
    }
    let resigned: Vec<u64> = after
        .keys()
        .copied()
        .filter(|seq| (backed_up + 1..=lost).contains(seq))
        .collect();
    assert!(
        resigned.is_empty(),
        "heads signed again for numbers signed before the restore: {resigned:?} (signed up to {lost})"
    );
    assert!(
        after.keys().any(|seq| *seq > lost),
        "signing did not resume past {lost}: {after:?}"
    );
    assert_eq!(
        methods.iter().filter(|m| *m == "ChainRolledBack").count(),
        1,
        "{methods:?}"
    );
    let (ok, out) = run_cli(&[
        "audit",
        "verify",
        "--data-dir",
        vault.data_dir().to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
}
