//! Key rotation on a live vault: no request fails, every old token still
//! detokenizes, and the background job moves every record to the new key.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::{TestVault, Writers, tokenvault_command};
use tokenvault::proto::v1::{
    DetokenizeRequest, TokenizeItem, TokenizeRequest, detokenize_result, tokenize_result,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_traffic_keeps_every_token_and_moves_every_record() {
    let mut vault = TestVault::start();
    let client = vault.client("checkout").await;
    // No request may fail during the rotation.
    let writers = Writers::start(&client, 4, "rot", true);
    writers.wait_for(200).await;
    let tls = vault.pki.tls("privacy");
    let addr = vault.grpc_addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        tokenvault_command()
            .args(["keys", "rotate", "--addr", &addr])
            .args([
                "--ca",
                tls.ca.to_str().unwrap(),
                "--cert",
                tls.cert.to_str().unwrap(),
                "--key",
                tls.key.to_str().unwrap(),
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("data key version 2 is active"));
    let seen = writers.acked().len();
    writers.wait_for(seen + 200).await;
    let all = writers.stop().await;
    assert!(
        vault.wait_for_log("re-encryption finished"),
        "the job did not finish"
    );

    common::assert_all_detokenize(&vault, &all).await;
    vault.stop();
    let out = tokenvault_command()
        .args(["keys", "list", "--data-dir"])
        .arg(vault.data_dir())
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{listing}");
    let counts: Vec<(u32, u64)> = listing
        .lines()
        .skip(1)
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            Some((fields.first()?.parse().ok()?, fields.get(2)?.parse().ok()?))
        })
        .collect();
    assert_eq!(counts, vec![(1, 0), (2, all.len() as u64)], "{listing}");
    assert!(listing.contains("(active)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_key_rotates_without_touching_records() {
    let mut vault = TestVault::start();
    let mut support = vault.client("support").await;
    let item = TokenizeItem {
        field_type: "email".into(),
        value: "kek@example.com".into(),
        subject_id: "cust-1".into(),
        ttl_seconds: 0,
    };
    let response = support
        .tokenize(TokenizeRequest { items: vec![item] })
        .await
        .unwrap()
        .into_inner();
    let Some(tokenize_result::Result::Token(token)) =
        response.results.into_iter().next().unwrap().result
    else {
        panic!("no token");
    };
    let new_key = vault.root.path().join("master-2.key");
    tokenvault::crypto::MasterKey::create_file(&new_key).unwrap();
    let tls = vault.pki.tls("privacy");
    let addr = vault.grpc_addr.to_string();
    let key_arg = new_key.clone();
    let out = tokio::task::spawn_blocking(move || {
        tokenvault_command()
            .args([
                "keys",
                "rotate-master",
                "--addr",
                &addr,
                "--new-key-file",
                key_arg.to_str().unwrap(),
            ])
            .args([
                "--ca",
                tls.ca.to_str().unwrap(),
                "--cert",
                tls.cert.to_str().unwrap(),
                "--key",
                tls.key.to_str().unwrap(),
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("re-wrapped"));
    vault.stop();

    // The old key no longer opens the vault; the new one does, and the value is there.
    let old_refused = tokenvault_command()
        .args(["serve", "--config"])
        .arg(vault.config_path())
        .output()
        .unwrap();
    assert!(!old_refused.status.success());
    assert!(
        String::from_utf8_lossy(&old_refused.stderr).contains("master key does not match"),
        "{}",
        String::from_utf8_lossy(&old_refused.stderr)
    );
    let config = std::fs::read_to_string(vault.config_path()).unwrap();
    std::fs::write(
        vault.config_path(),
        config.replace(
            "master_key_file = \"master.key\"",
            "master_key_file = \"master-2.key\"",
        ),
    )
    .unwrap();
    vault.spawn().unwrap();
    let mut support = vault.client("support").await;
    let response = support
        .detokenize(DetokenizeRequest {
            tokens: vec![token],
            purpose: "customer_support".into(),
            masked: false,
        })
        .await
        .unwrap()
        .into_inner();
    match &response.results[0].result {
        Some(detokenize_result::Result::Value(v)) => assert_eq!(v.value, "kek@example.com"),
        other => panic!("{other:?}"),
    }
}
