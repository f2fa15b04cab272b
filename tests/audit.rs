//! The audit trail end to end: every call leaves one event, the events hold
//! no value, `audit verify` accepts the untouched log and names the first bad
//! sequence number of each kind of tampering.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::path::Path;

use common::{TestVault, item, tokenvault_command};
use tokenvault::{
    proto::v1::{DetokenizeRequest, TokenizeRequest, tokenize_result},
    store::{RocksStore, StoreOptions, Table, chain},
};

fn audit(args: &[&str], data_dir: &Path) -> (bool, String) {
    let out = tokenvault_command()
        .arg("audit")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Builds a vault with six audited calls after the event of the policy it
/// started with, stopped (so its final checkpoint is signed), and returns it
/// with the auditor's copy of the public key.
async fn audited_vault() -> (TestVault, String) {
    let mut vault = TestVault::start();
    let mut support = vault.client("support").await;
    let mut checkout = vault.client("checkout").await;
    let mut stranger = vault.client("stranger").await;
    // 1: tokenize (allowed)
    let response = support
        .tokenize(TokenizeRequest {
            items: vec![
                item("email", "audit.me@example.com"),
                item("phone", "+44 20 7946 0958"),
            ],
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
    let detokenize = |purpose: &str| DetokenizeRequest {
        tokens: tokens.clone(),
        purpose: purpose.into(),
        masked: false,
    };
    // 2: detokenize (allowed)
    support
        .detokenize(detokenize("customer_support"))
        .await
        .unwrap();
    // 3: detokenize by a tokenize-only client (denied)
    checkout
        .detokenize(detokenize("customer_support"))
        .await
        .unwrap_err();
    // 4: an identity the policy does not know (denied)
    stranger
        .tokenize(TokenizeRequest {
            items: vec![item("email", "x@example.com")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    // 5: a purpose support may not state (denied)
    support
        .detokenize(detokenize("advertising"))
        .await
        .unwrap_err();
    // 6: tokenize again
    support
        .tokenize(TokenizeRequest {
            items: vec![item("name", "Ada Lovelace")],
            ..Default::default()
        })
        .await
        .unwrap();
    vault.stop();
    let (ok, key) = audit(&["public-key"], &vault.data_dir());
    assert!(ok);
    (vault, key.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_audited_without_values_and_the_log_verifies() {
    let (mut vault, key) = audited_vault().await;
    let data = vault.data_dir();
    let (ok, out) = audit(&["verify", "--public-key", &key], &data);
    assert!(ok, "{out}");
    // Checkpoints: at start (the policy's event) and at shutdown, and one
    // more if the run outlasted the checkpoint interval.
    assert!(
        out.starts_with("ok: events 1..7 (7 events), ")
            && out.contains("signed checkpoints verified, 0 events after the last checkpoint"),
        "{out}"
    );

    let (ok, export) = audit(&["export"], &data);
    assert!(ok);
    let events: Vec<serde_json::Value> = export
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 7);
    let summary: Vec<(String, String, String)> = events
        .iter()
        .map(|e| {
            (
                e["method"].as_str().unwrap().into(),
                e["outcome"].as_str().unwrap().into(),
                e["identity"].as_str().unwrap().into(),
            )
        })
        .collect();
    let support = common::spiffe("support");
    assert_eq!(
        summary,
        // Allowed calls are events as they happen; refusals are counted and
        // written together (here: at shutdown), one event per identity,
        // method, outcome and purpose. First, before any call, the policy
        // the vault started with.
        vec![
            ("LoadPolicy".into(), "OK".into(), "-".into()),
            ("Tokenize".into(), "OK".into(), support.clone()),
            ("Detokenize".into(), "OK".into(), support.clone()),
            ("Tokenize".into(), "OK".into(), support.clone()),
            (
                "Detokenize".into(),
                "PERMISSION_DENIED".into(),
                common::spiffe("checkout")
            ),
            (
                "Tokenize".into(),
                "PERMISSION_DENIED".into(),
                common::spiffe("stranger")
            ),
            ("Detokenize".into(), "PERMISSION_DENIED".into(), support),
        ]
    );
    assert_eq!(events[0]["policy_hash"].as_str().unwrap().len(), 64);
    for refusal in &events[4..] {
        assert_eq!(refusal["refusals"]["count"], 1, "{refusal}");
    }
    assert_eq!(events[2]["purpose"], "customer_support");
    assert_eq!(
        events[2]["field_types"],
        serde_json::json!(["email", "phone"])
    );
    assert_eq!(events[2]["tokens"].as_array().unwrap().len(), 2);
    assert_eq!(events[6]["purpose"], "advertising");
    for (seq, event) in events.iter().enumerate() {
        assert_eq!(event["seq"], seq as u64 + 1);
    }
    // Request ids tie each event to its log line.
    let request_id = events[2]["request_id"].as_str().unwrap();
    assert!(vault.logs().contains(request_id));
    // Filters.
    let (_, only_checkout) = audit(
        &["export", "--identity", &common::spiffe("checkout")],
        &data,
    );
    assert_eq!(only_checkout.lines().count(), 1);
    let (_, future) = audit(&["export", "--since", "2999-01-01T00:00:00Z"], &data);
    assert_eq!(future.lines().count(), 0);
    // No value and no token in the audit log (tokens appear only as HMACs).
    for secret in [
        "audit.me@example.com",
        "+442079460958",
        "Ada Lovelace",
        "tok_",
    ] {
        assert!(!export.contains(secret), "export contains {secret}");
    }
    vault.assert_log_free_of(&["audit.me@example.com", "+442079460958", "Ada Lovelace"]);
}

/// Applies `tamper` to a copy of the data directory and returns what
/// `audit verify` says of it.
fn verify_after(
    vault: &TestVault,
    key: &str,
    name: &str,
    tamper: impl FnOnce(&RocksStore),
) -> String {
    let copy = vault.root.path().join(name);
    common::copy_dir(&vault.data_dir(), &copy);
    {
        let store = RocksStore::open(&copy, &StoreOptions::default()).unwrap();
        tamper(&store);
        store.close();
    }
    let (ok, out) = audit(&["verify", "--public-key", key], &copy);
    assert!(!ok, "{name}: tampering not detected: {out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_is_detected_at_the_first_bad_sequence_number() {
    let (vault, key) = audited_vault().await;
    let get = |store: &RocksStore, seq: u64| {
        store
            .get_blocking(Table::Audit, &chain::key(seq))
            .unwrap()
            .unwrap()
    };

    let out = verify_after(&vault, &key, "changed", |store| {
        let mut value = get(store, 3);
        let last = value.len() - 2;
        value[last] ^= 0x20;
        store
            .put_blocking(Table::Audit, &chain::key(3), &value)
            .unwrap();
    });
    assert!(
        out.contains("broken at sequence 3: event was changed"),
        "{out}"
    );

    let out = verify_after(&vault, &key, "deleted", |store| {
        store.delete_blocking(Table::Audit, &chain::key(3)).unwrap();
    });
    assert!(
        out.contains("broken at sequence 3: event 3 is missing"),
        "{out}"
    );

    let out = verify_after(&vault, &key, "reordered", |store| {
        let (two, three) = (get(store, 2), get(store, 3));
        store
            .put_blocking(Table::Audit, &chain::key(2), &three)
            .unwrap();
        store
            .put_blocking(Table::Audit, &chain::key(3), &two)
            .unwrap();
    });
    assert!(out.contains("broken at sequence 2"), "{out}");

    let out = verify_after(&vault, &key, "truncated", |store| {
        store.delete_blocking(Table::Audit, &chain::key(7)).unwrap();
        store.delete_blocking(Table::Audit, &chain::key(6)).unwrap();
    });
    assert!(
        out.contains("broken at sequence 6") && out.contains("truncated"),
        "{out}"
    );

    // A rewrite that recomputes the entry's own digest still breaks the
    // next link and the signed checkpoint.
    let out = verify_after(&vault, &key, "rewritten", |store| {
        let prev = chain::decode(&get(store, 4)).unwrap().prev;
        let forged = chain::encode(4, &prev, br#"{"forged":true}"#);
        store
            .put_blocking(Table::Audit, &chain::key(4), &forged)
            .unwrap();
    });
    assert!(out.contains("broken at sequence 4"), "{out}");

    // Another key's signature does not pass.
    let (ok, out) = audit(
        &["verify", "--public-key", &"ab".repeat(32)],
        &vault.data_dir(),
    );
    assert!(!ok && out.contains("signature"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_service_streams_events_to_auditors_only() {
    use tokenvault::proto::v1::{StreamEventsRequest, audit_client::AuditClient};
    let vault = TestVault::start();
    let mut checkout = vault.client("checkout").await;
    checkout
        .tokenize(TokenizeRequest {
            items: vec![item("email", "stream@example.com")],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut auditor =
        AuditClient::new(vault.channel_with(&vault.pki.tls("auditor")).await.unwrap());
    let mut stream = auditor
        .stream_events(StreamEventsRequest {
            from_seq: 1,
            identity: common::spiffe("checkout"),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(record) = stream.message().await.unwrap() {
        events.push(record);
    }
    assert_eq!(events.len(), 1);
    // Event 1 is the policy the vault started with.
    assert_eq!(events[0].seq, 2);
    assert_eq!(events[0].hash.len(), 64);
    let event: serde_json::Value = serde_json::from_str(&events[0].event_json).unwrap();
    assert_eq!(event["method"], "Tokenize");
    assert!(!events[0].event_json.contains("stream@example.com"));
    // Reading the trail is audited, and needs audit:read.
    let methods: Vec<String> = common::audit_events(&vault)
        .await
        .iter()
        .map(|e| e["method"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(methods, ["LoadPolicy", "Tokenize", "StreamEvents"]);
    let mut not_auditor = AuditClient::new(
        vault
            .channel_with(&vault.pki.tls("checkout"))
            .await
            .unwrap(),
    );
    let status = not_auditor
        .stream_events(StreamEventsRequest {
            from_seq: 1,
            identity: String::new(),
            limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
}

/// Every RPC of every service, as README's Audit section promises: allowed,
/// each call is one event with its method and outcome OK; refused for want
/// of a scope (a caller the policy does not know), for want of a usable
/// identity, or by the rate limit, each is counted into a refusal event
/// with its method and outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_of_every_service_leaves_its_event() {
    use tokenvault::{
        client::TokenVaultClient,
        pki::ClientSpec,
        proto::v1::{
            AccessHistoryRequest, CreateBackupRequest, DeleteTokensRequest, EraseSubjectRequest,
            ExportSubjectRequest, GetConsentRequest, Job, ListJobsRequest, LookupItem,
            LookupTokensRequest, ProcessingReportRequest, RotateIndexKeyRequest, RotateKeysRequest,
            RotateMasterKeyRequest, SetConsentRequest, SetJobPausedRequest, StreamEventsRequest,
            UpdateValueRequest, admin_client::AdminClient, audit_client::AuditClient,
            subjects_client::SubjectsClient,
        },
    };
    use tonic::transport::Channel;

    /// Reads a server stream to its end: its status, the first error or OK.
    async fn drain<T>(
        answer: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>,
    ) -> Result<(), tonic::Status> {
        let mut stream = answer?.into_inner();
        while stream.message().await?.is_some() {}
        Ok(())
    }

    /// Calls all eighteen RPCs as the identity behind `channel`, with
    /// requests that are valid (so a caller with the scopes is allowed);
    /// returns the methods whose call failed and how.
    async fn call_everything(
        channel: Channel,
        token: &str,
        root: &Path,
        attempt: &str,
    ) -> Vec<(&'static str, tonic::Code)> {
        let mut vault = TokenVaultClient::new(channel.clone());
        let mut subjects = SubjectsClient::new(channel.clone());
        let mut admin = AdminClient::new(channel.clone());
        let mut audit = AuditClient::new(channel);
        let subject = "cust-audited".to_owned();
        let new_key = root.join(format!("master-{attempt}.key"));
        tokenvault::crypto::MasterKey::create_file(&new_key).unwrap();
        let mut failed = Vec::new();
        let mut check = |method: &'static str, result: Result<(), tonic::Status>| {
            if let Err(status) = result {
                failed.push((method, status.code()));
            }
        };
        let tokenize = TokenizeRequest {
            items: vec![item("email", "audit.all@example.com")],
            ..Default::default()
        };
        check("Tokenize", vault.tokenize(tokenize).await.map(drop));
        check(
            "Detokenize",
            vault
                .detokenize(DetokenizeRequest {
                    tokens: vec![token.to_owned()],
                    purpose: "customer_support".into(),
                    masked: false,
                })
                .await
                .map(drop),
        );
        check(
            "LookupTokens",
            vault
                .lookup_tokens(LookupTokensRequest {
                    items: vec![LookupItem {
                        field_type: "email".into(),
                        value: "audit.all@example.com".into(),
                        subject_id: String::new(),
                    }],
                })
                .await
                .map(drop),
        );
        let export = subjects
            .export_subject(ExportSubjectRequest {
                subject_id: subject.clone(),
                purpose: "subject_access_request".into(),
                recipient_public_key: Vec::new(),
            })
            .await;
        check("ExportSubject", drain(export).await);
        let history = subjects
            .access_history(AccessHistoryRequest {
                subject_id: subject.clone(),
                ..Default::default()
            })
            .await;
        check("AccessHistory", drain(history).await);
        check(
            "SetConsent",
            subjects
                .set_consent(SetConsentRequest {
                    subject_id: subject.clone(),
                    purpose: "marketing".into(),
                    granted: true,
                })
                .await
                .map(drop),
        );
        check(
            "GetConsent",
            subjects
                .get_consent(GetConsentRequest {
                    subject_id: subject.clone(),
                    purpose: "marketing".into(),
                })
                .await
                .map(drop),
        );
        check(
            "UpdateValue",
            subjects
                .update_value(UpdateValueRequest {
                    token: token.to_owned(),
                    value: "audit.updated@example.com".into(),
                    request_id: String::new(),
                })
                .await
                .map(drop),
        );
        check(
            "DeleteTokens",
            subjects
                .delete_tokens(DeleteTokensRequest {
                    tokens: vec![token.to_owned()],
                })
                .await
                .map(drop),
        );
        check(
            "EraseSubject",
            subjects
                .erase_subject(EraseSubjectRequest {
                    subject_id: subject,
                    ..Default::default()
                })
                .await
                .map(drop),
        );
        check(
            "CreateBackup",
            admin
                .create_backup(CreateBackupRequest {
                    path: root.join(format!("backup-{attempt}")).display().to_string(),
                })
                .await
                .map(drop),
        );
        check(
            "RotateKeys",
            admin.rotate_keys(RotateKeysRequest {}).await.map(drop),
        );
        check(
            "RotateIndexKey",
            admin
                .rotate_index_key(RotateIndexKeyRequest {})
                .await
                .map(drop),
        );
        check(
            "RotateMasterKey",
            admin
                .rotate_master_key(RotateMasterKeyRequest {
                    new_key_file: new_key.display().to_string(),
                    new_pkcs11_key: None,
                })
                .await
                .map(drop),
        );
        check(
            "ListJobs",
            admin.list_jobs(ListJobsRequest {}).await.map(drop),
        );
        check(
            "ProcessingReport",
            admin
                .processing_report(ProcessingReportRequest::default())
                .await
                .map(drop),
        );
        check(
            "SetJobPaused",
            admin
                .set_job_paused(SetJobPausedRequest {
                    job: Job::Reencrypt.into(),
                    paused: false,
                })
                .await
                .map(drop),
        );
        let stream = audit
            .stream_events(StreamEventsRequest {
                from_seq: 1,
                identity: String::new(),
                limit: 10,
            })
            .await;
        check("StreamEvents", drain(stream).await);
        failed
    }

    const METHODS: [&str; 18] = [
        "Tokenize",
        "Detokenize",
        "LookupTokens",
        "ExportSubject",
        "AccessHistory",
        "SetConsent",
        "GetConsent",
        "UpdateValue",
        "DeleteTokens",
        "EraseSubject",
        "CreateBackup",
        "RotateKeys",
        "RotateIndexKey",
        "RotateMasterKey",
        "ListJobs",
        "ProcessingReport",
        "SetJobPaused",
        "StreamEvents",
    ];

    let mut vault =
        TestVault::start_with("[limits]\nper_identity_rate = 20.0\nper_identity_burst = 20.0\n");
    let root = vault.root.path().to_owned();
    // One identity holding every scope, so that every call is allowed.
    let everything = format!(
        "\n[[policy]]\nidentity = \"{}\"\nscopes = [\"tokenize:*\", \"detokenize:*\", \"lookup:*\", \"subject:export\", \"subject:erase\", \"subject:history\", \"consent:read\", \"consent:write\", \"update:*\", \"delete:*\", \"admin:backup\", \"admin:keys\", \"audit:read\"]\npurposes = [\"customer_support\", \"subject_access_request\"]\n",
        common::spiffe("everything")
    );
    let config = std::fs::read_to_string(vault.config_path()).unwrap();
    std::fs::write(vault.config_path(), config + &everything).unwrap();
    vault.reload_and_wait("reloaded the policy");

    let all = vault.pki.client(
        "everything",
        &ClientSpec::spiffe(&common::spiffe("everything")),
    );
    let mut client = vault.client_with(&all).await;
    let token = common::tokenize_one(&mut client, "email", "audit.subject@example.com").await;
    let allowed = vault.channel_with(&all).await.unwrap();
    let failed = call_everything(allowed, &token, &root, "allowed").await;
    assert!(failed.is_empty(), "allowed calls failed: {failed:?}");

    let stranger = vault
        .channel_with(&vault.pki.tls("stranger"))
        .await
        .unwrap();
    let refused = call_everything(stranger, &token, &root, "refused").await;
    assert_eq!(refused.len(), METHODS.len(), "{refused:?}");
    assert!(
        refused
            .iter()
            .all(|(_, code)| *code == tonic::Code::PermissionDenied),
        "{refused:?}"
    );
    // No usable identity: two SPIFFE IDs in one certificate.
    let two = vault.pki.client(
        "two-ids",
        &ClientSpec {
            uris: vec![common::spiffe("support"), common::spiffe("checkout")],
            ..ClientSpec::spiffe("unused")
        },
    );
    let unauthenticated = vault
        .client_with(&two)
        .await
        .tokenize(TokenizeRequest {
            items: vec![item("email", "nobody@example.com")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.code(), tonic::Code::Unauthenticated);
    // Past the rate limit.
    let mut flooder = vault.client("checkout").await;
    let mut limited = 0;
    for i in 0..60 {
        let call = flooder.tokenize(TokenizeRequest {
            items: vec![item("email", &format!("flood{i}@example.com"))],
            ..Default::default()
        });
        if call
            .await
            .is_err_and(|s| s.code() == tonic::Code::ResourceExhausted)
        {
            limited += 1;
        }
    }
    assert!(limited > 0, "the rate limit refused nothing");
    vault.stop();

    let (ok, export) = audit(&["export"], &vault.data_dir());
    assert!(ok, "{export}");
    let events: Vec<serde_json::Value> = export
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let has = |identity: &str, method: &str, outcome: &str| {
        events
            .iter()
            .any(|e| e["identity"] == identity && e["method"] == method && e["outcome"] == outcome)
    };
    let (everything, stranger) = (common::spiffe("everything"), common::spiffe("stranger"));
    let missing: Vec<String> = METHODS
        .iter()
        .flat_map(|method| {
            [
                (everything.as_str(), "OK"),
                (stranger.as_str(), "PERMISSION_DENIED"),
            ]
            .into_iter()
            .filter(|(who, outcome)| !has(who, method, outcome))
            .map(move |(who, outcome)| format!("{method} {outcome} by {who}"))
        })
        .collect();
    assert!(missing.is_empty(), "no event for: {missing:#?}");
    assert!(
        events
            .iter()
            .any(|e| e["method"] == "Tokenize" && e["outcome"] == "UNAUTHENTICATED"),
        "no event for the call without a usable identity"
    );
    let rate_limited: u64 = events
        .iter()
        .filter(|e| {
            e["identity"] == common::spiffe("checkout") && e["outcome"] == "RESOURCE_EXHAUSTED"
        })
        .map(|e| e["refusals"]["count"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(rate_limited, limited, "every rate-limited call is counted");
}

/// `audit verify --addr` with the auditor's identity and copy of the key.
fn verify_remote(vault: &TestVault, key: &str) -> (bool, String) {
    let mut args: Vec<String> = vec!["audit".into(), "verify".into()];
    args.extend(common::connection_args(vault, "auditor"));
    args.extend(["--public-key".into(), key.to_owned()]);
    common::run_cli(&args)
}

/// A client checks a running vault's chain itself, over the Audit
/// service: every hash computed from the events it receives, every
/// checkpoint checked with the auditor's key. The same trail with event 4
/// rewritten into another valid event (its identity changed, its own
/// digest recomputed, so the vault serves it as any other) fails at 4 on
/// the link event 5 holds, as the offline check does; a key of its own
/// does not pass the checkpoints. Without the links and checkpoints in the
/// stream there was nothing to check but the server's word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_verifies_a_running_vaults_chain_over_the_network() {
    let (mut vault, key) = audited_vault().await;
    vault.spawn().unwrap();
    let (ok, out) = verify_remote(&vault, &key);
    assert!(ok, "{out}");
    assert!(out.starts_with("ok: events 1.."), "{out}");
    assert!(!out.contains(" 0 signed checkpoints"), "{out}");
    let (ok, out) = verify_remote(&vault, &"ab".repeat(32));
    assert!(!ok && out.contains("signature"), "{out}");

    vault.stop();
    {
        let store = RocksStore::open(&vault.data_dir(), &StoreOptions::default()).unwrap();
        let value = store
            .get_blocking(Table::Audit, &chain::key(4))
            .unwrap()
            .unwrap();
        let link = chain::decode(&value).unwrap();
        let mut event = tokenvault::audit::AuditEvent::decode(link.payload).unwrap();
        event.identity = "spiffe://test.tokenvault.local/someone-else".into();
        let forged = chain::encode(4, &link.prev, &event.encode());
        store
            .put_blocking(Table::Audit, &chain::key(4), &forged)
            .unwrap();
        store.close();
    }
    vault.spawn().unwrap();
    let (ok, out) = verify_remote(&vault, &key);
    assert!(!ok, "{out}");
    assert!(
        out.contains("broken at sequence 4") && out.contains("does not link"),
        "{out}"
    );
}
