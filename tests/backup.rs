//! Online backup of a live vault under writes, verified and restored: every
//! write acknowledged before the backup detokenizes from the restored copy.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use common::{TestVault, tokenvault_command};
use tokenvault::proto::v1::{
    DetokenizeRequest, TokenizeItem, TokenizeRequest, detokenize_result, tokenize_result,
};

fn cli(args: &[&str]) -> (bool, String) {
    let out = tokenvault_command().args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_a_live_vault_restores_every_acknowledged_write() {
    let mut vault = TestVault::start();
    let acked = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let client = vault.client("checkout").await;
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (mut client, acked, stop) = (client.clone(), Arc::clone(&acked), Arc::clone(&stop));
            tokio::spawn(async move {
                for i in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let value = format!("w{w}.i{i}@example.com");
                    let item = TokenizeItem {
                        field_type: "email".into(),
                        value: value.clone(),
                        subject_id: String::new(),
                        ttl_seconds: 0,
                    };
                    let response = client
                        .tokenize(TokenizeRequest { items: vec![item] })
                        .await
                        .unwrap();
                    if let Some(tokenize_result::Result::Token(t)) =
                        response.into_inner().results.remove(0).result
                    {
                        acked.lock().unwrap().push((t, value));
                    }
                }
            })
        })
        .collect();
    while acked.lock().unwrap().len() < 300 {
        tokio::task::yield_now().await;
    }

    // Everything acknowledged before the backup starts must be in it.
    let before: Vec<(String, String)> = acked.lock().unwrap().clone();
    let backup = vault.root.path().join("backup-1");
    let tls = vault.pki.tls("privacy");
    let (ok, out) = tokio::task::spawn_blocking({
        let (backup, addr) = (backup.clone(), vault.grpc_addr.to_string());
        move || {
            cli(&[
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
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.await.unwrap();
    }
    assert!(
        acked.lock().unwrap().len() > before.len(),
        "writes went on during the backup"
    );

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

    let (ok, out) = cli(&["backup", "verify", backup.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.starts_with("ok: "), "{out}");

    let restored = vault.root.path().join("restored");
    let (ok, out) = cli(&[
        "backup",
        "restore",
        backup.to_str().unwrap(),
        "--to",
        restored.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let (ok, _) = cli(&[
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
    let mut support = vault.client("support").await;
    for chunk in before.chunks(500) {
        let response = support
            .detokenize(DetokenizeRequest {
                tokens: chunk.iter().map(|(t, _)| t.clone()).collect(),
                purpose: "customer_support".into(),
                masked: false,
            })
            .await
            .unwrap()
            .into_inner();
        for ((_, value), result) in chunk.iter().zip(response.results) {
            match result.result {
                Some(detokenize_result::Result::Value(v)) => assert_eq!(&v.value, value),
                other => panic!("a write acknowledged before the backup is missing: {other:?}"),
            }
        }
    }
}
