//! Key rotation on a live vault: no request fails, every old token still
//! detokenizes (or is found by lookup), the background jobs move every record
//! to the new key, and an operator can hold and release them.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use common::{TestVault, Writers, tokenvault_command};
use tokenvault::proto::v1::{
    DetokenizeRequest, LookupItem, LookupTokensRequest, TokenizeItem, TokenizeRequest,
    detokenize_result, lookup_result, tokenize_result,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_traffic_keeps_every_token_and_moves_every_record() {
    let mut vault = TestVault::start();
    let client = vault.client("checkout").await;
    // No request may fail during the rotation.
    let writers = Writers::start(&client, 4, "rot", true);
    writers.wait_for(200).await;
    let (ok, out, err) = common::keys_cli(&vault, &["rotate"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("data key version 2 is active"), "{out}");
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
        .tokenize(TokenizeRequest {
            items: vec![item],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let Some(tokenize_result::Result::Token(token)) =
        response.results.into_iter().next().unwrap().result
    else {
        panic!("no token");
    };
    let out = common::rotate_master_to_new_file(&vault, "master-2.key").await;
    assert!(out.contains("re-wrapped"), "{out}");
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
    common::switch_master_key_file(&vault, "master-2.key");
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

/// Runs `tokenvault keys ARGS` against `vault` as the `privacy` identity
/// (scope admin:keys); returns (success, stdout, stderr).
const DETERMINISTIC: &str = r#"
[field_types.customer_email]
kind = "email"
deterministic = true
"#;

fn customer_item(value: &str) -> TokenizeItem {
    TokenizeItem {
        field_type: "customer_email".into(),
        value: value.into(),
        subject_id: String::new(),
        ttl_seconds: 0,
    }
}

fn lookup_item(value: &str) -> LookupItem {
    LookupItem {
        field_type: "customer_email".into(),
        value: value.into(),
        subject_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_rotation_held_and_released_over_the_cli_while_lookups_go_on() {
    let mut vault = TestVault::start_with(DETERMINISTIC);
    let mut support = vault.client("support").await;
    let values: Vec<String> = (0..300).map(|i| format!("lk{i}@example.com")).collect();
    let response = support
        .tokenize(TokenizeRequest {
            items: values.iter().map(|v| customer_item(v)).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let tokens: Vec<String> = response
        .results
        .into_iter()
        .map(|r| match r.result {
            Some(tokenize_result::Result::Token(t)) => t,
            other => panic!("{other:?}"),
        })
        .collect();

    // Lookups run the whole time and must always find every value.
    let stop = Arc::new(AtomicBool::new(false));
    let lookups = {
        let (mut client, stop) = (support.clone(), Arc::clone(&stop));
        let (values, tokens) = (values.clone(), tokens.clone());
        tokio::spawn(async move {
            let mut rounds = 0u32;
            while !stop.load(Ordering::SeqCst) || rounds == 0 {
                let response = client
                    .lookup_tokens(LookupTokensRequest {
                        items: values.iter().map(|v| lookup_item(v)).collect(),
                    })
                    .await
                    .expect("a lookup failed during the rotation")
                    .into_inner();
                let found: Vec<String> = response
                    .results
                    .into_iter()
                    .map(|r| match r.result {
                        Some(lookup_result::Result::Token(t)) => t,
                        other => panic!("a value was not found during the rotation: {other:?}"),
                    })
                    .collect();
                assert_eq!(found, tokens);
                rounds += 1;
            }
            rounds
        })
    };

    // Held first: the rotation's job waits, and says so.
    let (ok, out, err) = common::keys_cli(&vault, &["pause", "reindex"]).await;
    assert!(ok && out.contains("held"), "{out}{err}");
    let (ok, out, err) = common::keys_cli(&vault, &["rotate-index"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("blind-index key version 2 is active"), "{out}");
    let (ok, out, err) = common::keys_cli(&vault, &["jobs"]).await;
    assert!(ok && out.contains("reindex    held at 0/"), "{out}{err}");
    while metric_value(&vault, "tokenvault_job_paused{job=\"reindex\"}").await != Some(1.0) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Released: `jobs --wait` follows it to the end (no terminal: lines).
    let (ok, out, err) = common::keys_cli(&vault, &["resume", "reindex"]).await;
    assert!(ok && !out.contains("held"), "{out}{err}");
    let (ok, _, err) = common::keys_cli(&vault, &["jobs", "--wait"]).await;
    assert!(
        ok && err.contains("no key-rotation job is running"),
        "{err}"
    );
    assert!(vault.wait_for_log("re-indexing finished"));
    stop.store(true, Ordering::SeqCst);
    assert!(lookups.await.unwrap() > 0);
    let text = common::scrape(vault.metrics_addr).await;
    assert_eq!(
        common::metric(&text, "tokenvault_job_records_moved_total{job=\"reindex\"}"),
        300.0
    );
    assert_eq!(
        common::metric(&text, "tokenvault_job_running{job=\"reindex\"}"),
        0.0
    );

    // Tokenizing a value again still gives its one token.
    let again = support
        .tokenize(TokenizeRequest {
            items: vec![customer_item(&values[42])],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        &again.results[0].result,
        Some(tokenize_result::Result::Token(t)) if *t == tokens[42]
    ));
    vault.stop();
    let out = tokenvault_command()
        .args(["keys", "list", "--data-dir"])
        .arg(vault.data_dir())
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("blind-index key versions (more than one while re-indexing): 2 (created"),
        "{listing}"
    );
}

/// One sample of the vault's metrics, if it is there yet.
async fn metric_value(vault: &TestVault, name_and_labels: &str) -> Option<f64> {
    common::find_metric(&common::scrape(vault.metrics_addr).await, name_and_labels)
}
