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
