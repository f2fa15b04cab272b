//! Fail closed: when nothing can be written durably (the audit event of a
//! call included), every RPC that reveals or changes data answers
//! `UNAVAILABLE`, reveals nothing and changes nothing.
//!
//! The fault is real: the server runs with a small `LD_PRELOAD` library,
//! compiled by the test, that makes `fsync` and `fdatasync` fail with `EIO`
//! while a trigger file exists, as a failing disk does. RocksDB then refuses
//! every write until it is reopened.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::{TestVault, detokenize, item, subject_item, tokens_of};
use tokenvault::proto::v1::{
    AccessHistoryRequest, CreateBackupRequest, DeleteTokensRequest, DetokenizeRequest,
    EraseSubjectRequest, ExportSubjectRequest, GetConsentRequest, LookupItem, LookupTokensRequest,
    RotateKeysRequest, SetConsentRequest, TokenizeRequest, UpdateValueRequest,
    admin_client::AdminClient, detokenize_result, subjects_client::SubjectsClient,
};
use tonic::Code;

/// The shim: `fsync` and `fdatasync` fail with `EIO` while the file named by
/// `TV_FAIL_SYNC_WHEN` exists.
const SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

static int failing(void) {
    const char *trigger = getenv("TV_FAIL_SYNC_WHEN");
    return trigger != NULL && access(trigger, F_OK) == 0;
}

int fsync(int fd) {
    static int (*real)(int);
    if (failing()) { errno = EIO; return -1; }
    if (real == NULL) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (failing()) { errno = EIO; return -1; }
    if (real == NULL) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return real(fd);
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_nothing_can_be_synced_every_call_fails_closed() {
    let mut vault = TestVault::start();
    let mut support = vault.client("support").await;
    let tokens = tokens_of(
        support
            .tokenize(TokenizeRequest {
                items: vec![
                    item("email", "closed@example.com"),
                    subject_item("email", "subject.closed@example.com", "cust-closed"),
                ],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner(),
    );

    // Restart the same vault with the shim loaded, its trigger not yet set.
    vault.stop();
    let shim = common::build_preload(vault.root.path(), "failsync", SHIM);
    let trigger = vault.root.path().join("fail-syncs-now");
    vault.env = vec![
        ("LD_PRELOAD".into(), shim.display().to_string()),
        ("TV_FAIL_SYNC_WHEN".into(), trigger.display().to_string()),
    ];
    vault.spawn().unwrap();
    let mut support = vault.client("support").await;
    detokenize(&mut support, &tokens, "customer_support")
        .await
        .expect("the shim does nothing until its trigger exists");

    std::fs::write(&trigger, b"").unwrap();
    let channel = vault.channel_with(&vault.pki.tls("privacy")).await.unwrap();
    let mut subjects = SubjectsClient::new(channel.clone());
    let mut admin = AdminClient::new(channel);
    let mut masked = vault.client("masked-reader").await;
    let backup = vault.root.path().join("backup-while-failing");

    let mut answers: Vec<(&str, Result<(), tonic::Status>)> = vec![(
        "Tokenize",
        support
            .tokenize(TokenizeRequest {
                items: vec![item("email", "never.stored@example.com")],
                ..Default::default()
            })
            .await
            .map(drop),
    )];
    let revealed = detokenize(&mut support, &tokens, "customer_support").await;
    answers.push(("Detokenize", revealed.map(drop)));
    let revealed_masked = masked
        .detokenize(DetokenizeRequest {
            tokens: tokens.clone(),
            purpose: "customer_support".into(),
            masked: true,
        })
        .await;
    answers.push(("Detokenize (masked)", revealed_masked.map(drop)));
    let looked_up = support
        .lookup_tokens(LookupTokensRequest {
            items: vec![LookupItem {
                field_type: "email".into(),
                value: "closed@example.com".into(),
                subject_id: String::new(),
            }],
        })
        .await;
    answers.push(("LookupTokens", looked_up.map(drop)));
    let exported = match subjects
        .export_subject(ExportSubjectRequest {
            subject_id: "cust-closed".into(),
            purpose: "subject_access_request".into(),
            recipient_public_key: Vec::new(),
        })
        .await
    {
        // A stream: the refusal may come as its first message.
        Ok(stream) => stream.into_inner().message().await.map(|first| {
            assert!(first.is_none(), "a value was exported: {first:?}");
        }),
        Err(status) => Err(status),
    };
    answers.push(("ExportSubject", exported));
    let history = match subjects
        .access_history(AccessHistoryRequest {
            subject_id: "cust-closed".into(),
            ..Default::default()
        })
        .await
    {
        // A stream: the refusal may come as its first message.
        Ok(stream) => stream.into_inner().message().await.map(|first| {
            assert!(first.is_none(), "a history was answered: {first:?}");
        }),
        Err(status) => Err(status),
    };
    answers.push(("AccessHistory", history));
    let updated = subjects
        .update_value(UpdateValueRequest {
            token: tokens[0].clone(),
            value: "changed@example.com".into(),
            request_id: String::new(),
        })
        .await;
    answers.push(("UpdateValue", updated.map(drop)));
    let deleted = subjects
        .delete_tokens(DeleteTokensRequest {
            tokens: vec![tokens[0].clone()],
        })
        .await;
    answers.push(("DeleteTokens", deleted.map(drop)));
    let consent = subjects
        .set_consent(SetConsentRequest {
            subject_id: "cust-closed".into(),
            purpose: "marketing".into(),
            granted: true,
        })
        .await;
    answers.push(("SetConsent", consent.map(drop)));
    let read_consent = subjects
        .get_consent(GetConsentRequest {
            subject_id: "cust-closed".into(),
            purpose: "marketing".into(),
        })
        .await;
    answers.push(("GetConsent", read_consent.map(drop)));
    let erased = subjects
        .erase_subject(EraseSubjectRequest {
            subject_id: "cust-closed".into(),
            ..Default::default()
        })
        .await;
    answers.push(("EraseSubject", erased.map(drop)));
    let rotated = admin.rotate_keys(RotateKeysRequest {}).await;
    answers.push(("RotateKeys", rotated.map(drop)));
    let backed_up = admin
        .create_backup(CreateBackupRequest {
            path: backup.display().to_string(),
        })
        .await;
    answers.push(("CreateBackup", backed_up.map(drop)));

    let wrong: Vec<String> = answers
        .iter()
        .filter(|(_, answer)| !matches!(answer, Err(status) if status.code() == Code::Unavailable))
        .map(|(method, answer)| format!("{method}: {answer:?}"))
        .collect();
    assert!(wrong.is_empty(), "not UNAVAILABLE: {wrong:#?}");
    for (method, answer) in &answers {
        let message = answer.as_ref().unwrap_err().message();
        for value in ["closed@example.com", "changed@example.com", "cust-closed"] {
            assert!(
                !message.contains(value),
                "{method} echoes {value}: {message}"
            );
        }
    }
    assert!(!backup.exists(), "a backup was written without its event");
    // The outage shows in the metrics: groups that failed, nothing of
    // them written.
    let metrics = common::scrape(vault.metrics_addr).await;
    assert!(
        common::metric(&metrics, "tokenvault_store_failed_commit_groups_total") >= 1.0,
        "{metrics}"
    );

    // Nothing changed: with syncs working again and the vault reopened,
    // every value reads as before and the erasure never happened.
    std::fs::remove_file(&trigger).unwrap();
    vault.kill();
    vault.env.clear();
    vault.spawn().unwrap();
    let mut support = vault.client("support").await;
    let values: Vec<String> = detokenize(&mut support, &tokens, "customer_support")
        .await
        .unwrap()
        .results
        .into_iter()
        .map(|r| match r.result {
            Some(detokenize_result::Result::Value(v)) => v.value.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(values, ["closed@example.com", "subject.closed@example.com"]);
    vault.assert_log_free_of(&["closed@example.com", "changed@example.com"]);
}
