//! Data subjects over real mTLS gRPC: export, rectification, deletion,
//! erasure by crypto-shredding (bytes gone from the files, and still gone
//! after restoring an older copy), consent.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::path::Path;

use common::{TestVault, detokenize, export_subject, revealed, subject_item, tokens_of};
use tokenvault::{
    proto::v1::{
        Code, DeleteTokensRequest, DetokenizeRequest, EraseSubjectRequest, ExportSubjectRequest,
        GetConsentRequest, SetConsentRequest, TokenizeItem, TokenizeRequest, UpdateValueRequest,
        detokenize_result, subjects_client::SubjectsClient, tokenize_result,
    },
    store::{RocksStore, Store, StoreOptions, Table},
};
use tonic::transport::Channel;

async fn tokenize(vault: &TestVault, items: Vec<TokenizeItem>) -> Vec<String> {
    let mut client = vault.client("support").await;
    tokens_of(
        client
            .tokenize(TokenizeRequest {
                items,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner(),
    )
}

/// Each token's value, or its item error code.
async fn reveal(vault: &TestVault, tokens: &[String], purpose: &str) -> Vec<Result<String, Code>> {
    let mut client = vault.client("support").await;
    revealed(detokenize(&mut client, tokens, purpose).await.unwrap())
}

async fn privacy(vault: &TestVault) -> SubjectsClient<Channel> {
    SubjectsClient::new(vault.channel_with(&vault.pki.tls("privacy")).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_update_and_delete() {
    let mut vault = TestVault::start();
    let ada = tokenize(
        &vault,
        vec![
            subject_item("email", "ada@example.com", "cust-ada"),
            subject_item("name", "Ada Lovelace", "cust-ada"),
        ],
    )
    .await;
    let bob = tokenize(
        &vault,
        vec![subject_item("email", "bob@example.com", "cust-bob")],
    )
    .await;
    let mut privacy = privacy(&vault).await;

    let mut exported = Vec::new();
    for mut field in export_subject(&vault, "cust-ada").await {
        assert!(field.created_ms > 0);
        exported.push((
            std::mem::take(&mut field.token),
            std::mem::take(&mut field.field_type),
            std::mem::take(&mut field.value),
        ));
    }
    exported.sort();
    let mut expected = vec![
        (
            ada[0].clone(),
            "email".to_owned(),
            "ada@example.com".to_owned(),
        ),
        (ada[1].clone(), "name".to_owned(), "Ada Lovelace".to_owned()),
    ];
    expected.sort();
    assert_eq!(exported, expected);

    // An export has one purpose, the subject's own request, and needs the
    // subject:export scope under a rule that allows that purpose.
    let status = privacy
        .export_subject(ExportSubjectRequest {
            subject_id: "cust-ada".into(),
            purpose: "customer_support".into(),
            recipient_public_key: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("subject_access_request"),
        "{status:?}"
    );
    let mut support =
        SubjectsClient::new(vault.channel_with(&vault.pki.tls("support")).await.unwrap());
    let status = support
        .export_subject(ExportSubjectRequest {
            subject_id: "cust-ada".into(),
            purpose: "subject_access_request".into(),
            recipient_public_key: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);

    // Rectification keeps the token and validates the new value.
    privacy
        .update_value(UpdateValueRequest {
            token: ada[0].clone(),
            value: " Ada@Example.org".into(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        reveal(&vault, &ada[..1], "customer_support").await,
        vec![Ok("Ada@example.org".to_owned())]
    );
    let status = privacy
        .update_value(UpdateValueRequest {
            token: ada[0].clone(),
            value: "not an address".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(!status.message().contains("not an address"));

    // Deletion of single tokens.
    let response = privacy
        .delete_tokens(DeleteTokensRequest {
            tokens: vec![bob[0].clone(), bob[0].clone()],
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<Code> = response.results.iter().map(|r| r.code()).collect();
    assert_eq!(codes[0], Code::Ok);
    assert_eq!(
        reveal(&vault, &bob, "customer_support").await,
        vec![Err(Code::NotFound)]
    );

    vault.assert_log_free_of(&[
        "ada@example.com",
        "Ada Lovelace",
        "Ada@example.org",
        "bob@example.com",
        "not an address",
    ]);
}

fn files_contain(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().flatten().any(|entry| {
        let path = entry.path();
        if path.is_dir() {
            return files_contain(&path, needle);
        }
        std::fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_shreds_the_subject_for_good() {
    let mut vault = TestVault::start();
    let ada = tokenize(
        &vault,
        vec![
            subject_item("email", "ada@example.com", "cust-ada"),
            subject_item("phone", "+44 20 7946 0958", "cust-ada"),
        ],
    )
    .await;
    let bob = tokenize(
        &vault,
        vec![subject_item("email", "bob@example.com", "cust-bob")],
    )
    .await;
    vault.stop();

    // What erasure must remove: ada's ciphertexts and both subjects' wrapped
    // keys (we learn which is ada's from the receipt).
    let (ciphertexts, subject_keys) = {
        let store = RocksStore::open(&vault.data_dir(), &StoreOptions::default()).unwrap();
        let ciphertexts: Vec<Vec<u8>> = ada
            .iter()
            .map(|t| {
                let record = store
                    .get_blocking(Table::Records, t.as_bytes())
                    .unwrap()
                    .unwrap();
                record[record.len() - 24..].to_vec()
            })
            .collect();
        let keys = store
            .scan_prefix(Table::Keys, b"subject-key/".to_vec())
            .await
            .unwrap();
        store.close();
        (ciphertexts, keys)
    };
    assert_eq!(subject_keys.len(), 2);
    for chunk in &ciphertexts {
        assert!(
            files_contain(&vault.data_dir(), chunk),
            "the check must be able to see ciphertexts"
        );
    }
    let backup = vault.root.path().join("backup");
    common::copy_dir(&vault.data_dir(), &backup);

    vault.spawn().unwrap();
    let mut privacy = privacy(&vault).await;
    let receipt = privacy
        .erase_subject(EraseSubjectRequest {
            subject_id: "cust-ada".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.tokens_erased, 2);
    assert_eq!(receipt.subject_hash.len(), 64);
    let again = privacy
        .erase_subject(EraseSubjectRequest {
            subject_id: "cust-ada".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.tokens_erased, &again.subject_hash),
        (0, &receipt.subject_hash)
    );
    assert_eq!(
        reveal(&vault, &ada, "customer_support").await,
        vec![Err(Code::NotFound), Err(Code::NotFound)]
    );
    assert_eq!(
        reveal(&vault, &bob, "customer_support").await,
        vec![Ok("bob@example.com".to_owned())]
    );
    vault.stop();

    // The bytes left the data files.
    let ada_key = subject_keys
        .iter()
        .find(|(label, _)| label.ends_with(receipt.subject_hash.as_bytes()))
        .map(|(_, wrapped)| wrapped[wrapped.len() - 24..].to_vec())
        .expect("ada's key label");
    for chunk in ciphertexts.iter().chain(std::iter::once(&ada_key)) {
        assert!(
            !files_contain(&vault.data_dir(), chunk),
            "erased bytes remain in the data files"
        );
    }

    // Restoring the older copy does not bring ada back: the ledger (outside
    // the data directory) is re-applied when the vault opens.
    std::fs::remove_dir_all(vault.data_dir()).unwrap();
    common::copy_dir(&backup, &vault.data_dir());
    vault.spawn().unwrap();
    assert!(vault.wait_for_log("re-applied the erasure ledger"));
    assert_eq!(
        reveal(&vault, &ada, "customer_support").await,
        vec![Err(Code::NotFound), Err(Code::NotFound)]
    );
    assert_eq!(
        reveal(&vault, &bob, "customer_support").await,
        vec![Ok("bob@example.com".to_owned())]
    );
    vault.stop();

    // Rolling the ledger back (here: to before the erasure, when it did not
    // exist) stops the vault from starting, with one line saying what to do.
    let ledger = vault.root.path().join("ledger/erasures");
    let current = std::fs::read(&ledger).unwrap();
    std::fs::remove_file(&ledger).unwrap();
    let refused = vault.spawn().unwrap_err();
    assert!(
        refused.contains("holds 0 erasures but this vault recorded")
            && refused.contains("--accept-restored-ledger"),
        "{refused}"
    );
    // So does an edited one.
    let mut edited = current.clone();
    let last = edited.len() - 2;
    edited[last] = if edited[last] == b'0' { b'1' } else { b'0' };
    std::fs::write(&ledger, &edited).unwrap();
    let refused = vault.spawn().unwrap_err();
    assert!(refused.contains("does not verify"), "{refused}");
    // An operator who restored the ledger on purpose says so; the vault
    // writes the erasure back into it from its own record.
    std::fs::remove_file(&ledger).unwrap();
    vault.serve_args = vec!["--accept-restored-ledger".into()];
    vault.spawn().unwrap();
    vault.serve_args.clear();
    assert_eq!(
        reveal(&vault, &ada, "customer_support").await,
        vec![Err(Code::NotFound), Err(Code::NotFound)]
    );
    vault.stop();
    assert_eq!(std::fs::read(&ledger).unwrap(), current);
    vault.spawn().unwrap();
    vault.assert_log_free_of(&[
        "ada@example.com",
        "+442079460958",
        "bob@example.com",
        "cust-ada",
        "cust-bob",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purposes_that_need_consent_are_gated_by_it() {
    let mut vault =
        TestVault::start_with("[field_types.email]\nconsent_purposes = [\"marketing\"]\n");
    let tokens = tokenize(
        &vault,
        vec![
            subject_item("email", "ada@example.com", "cust-ada"),
            subject_item("email", "anon@example.com", ""),
        ],
    )
    .await;
    // No consent recorded: marketing is refused for the subject's value; a
    // value without a subject, and purposes that need no consent, are fine.
    assert_eq!(
        reveal(&vault, &tokens, "marketing").await,
        vec![
            Err(Code::FailedPrecondition),
            Ok("anon@example.com".to_owned())
        ]
    );
    assert_eq!(
        reveal(&vault, &tokens[..1], "customer_support").await,
        vec![Ok("ada@example.com".to_owned())]
    );

    let mut privacy = privacy(&vault).await;
    let set = |granted| SetConsentRequest {
        subject_id: "cust-ada".into(),
        purpose: "marketing".into(),
        granted,
    };
    let state = privacy.set_consent(set(true)).await.unwrap().into_inner();
    assert!(state.granted && state.updated_ms > 0);
    assert_eq!(
        reveal(&vault, &tokens[..1], "marketing").await,
        vec![Ok("ada@example.com".to_owned())]
    );
    privacy.set_consent(set(false)).await.unwrap();
    assert_eq!(
        reveal(&vault, &tokens[..1], "marketing").await,
        vec![Err(Code::FailedPrecondition)]
    );
    let state = privacy
        .get_consent(GetConsentRequest {
            subject_id: "cust-ada".into(),
            purpose: "marketing".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!state.granted);

    // The message says what is missing, never the value.
    let mut support = vault.client("support").await;
    let response = support
        .detokenize(DetokenizeRequest {
            tokens: tokens[..1].to_vec(),
            purpose: "marketing".into(),
            masked: false,
        })
        .await
        .unwrap()
        .into_inner();
    match &response.results[0].result {
        Some(detokenize_result::Result::Error(e)) => {
            assert!(
                e.message.contains("not consented to purpose marketing"),
                "{}",
                e.message
            );
        }
        other => panic!("{other:?}"),
    }
    // Consent writes need their scope.
    let mut checkout = SubjectsClient::new(
        vault
            .channel_with(&vault.pki.tls("checkout"))
            .await
            .unwrap(),
    );
    assert_eq!(
        checkout.set_consent(set(true)).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    vault.assert_log_free_of(&["ada@example.com", "anon@example.com"]);
}

/// "Why do you hold this?": an export says, per value, every purpose the
/// policy lets a service reveal it for, with the purpose's description and
/// legal basis as the config declares them, and whether it needs consent.
/// The declarations reload with the policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_says_why_each_value_is_held() {
    const DECLARED: &str = r#"
[purposes.customer_support]
description = "Answering your questions about your orders"
legal_basis = "contract"
[purposes.order_fulfilment]
description = "Delivering what you ordered"
legal_basis = "contract"
[purposes.marketing]
description = "Offers by e-mail, if you agreed to them"
legal_basis = "legitimate_interests"
[purposes.subject_access_request]
description = "Answering your request for your data"
legal_basis = "legal_obligation"
[field_types.email]
consent_purposes = ["marketing"]
"#;
    let vault = TestVault::start_with(DECLARED);
    tokenize(
        &vault,
        vec![subject_item("email", "ada@example.com", "cust-ada")],
    )
    .await;
    let why =
        |fields: &[tokenvault::proto::v1::SubjectField]| -> Vec<(String, String, String, bool)> {
            fields[0]
                .purposes
                .iter()
                .map(|p| {
                    (
                        p.purpose.clone(),
                        p.legal_basis.clone(),
                        p.description.clone(),
                        p.needs_consent,
                    )
                })
                .collect()
        };
    let fields = export_subject(&vault, "cust-ada").await;
    assert_eq!(fields.len(), 1);
    // The rules that reveal e-mail addresses: support (three purposes),
    // the masked reader and the e-mail reader (customer_support).
    assert_eq!(
        why(&fields),
        vec![
            (
                "customer_support".to_owned(),
                "contract".to_owned(),
                "Answering your questions about your orders".to_owned(),
                false
            ),
            (
                "marketing".to_owned(),
                "legitimate_interests".to_owned(),
                "Offers by e-mail, if you agreed to them".to_owned(),
                true
            ),
            (
                "order_fulfilment".to_owned(),
                "contract".to_owned(),
                "Delivering what you ordered".to_owned(),
                false
            ),
        ]
    );

    let config = std::fs::read_to_string(vault.config_path()).unwrap();
    std::fs::write(
        vault.config_path(),
        config.replace("Delivering what you ordered", "Sending your parcels"),
    )
    .unwrap();
    vault.reload_and_wait("reloaded the policy");
    let fields = export_subject(&vault, "cust-ada").await;
    assert_eq!(why(&fields)[2].2, "Sending your parcels");
}

/// Runs `tokenvault subjects …`; (succeeded, stdout, stderr).
fn subjects_cli(args: &[&str]) -> (bool, String, String) {
    let out = common::tokenvault_command()
        .arg("subjects")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The messages of a sealed export as grpcurl prints them: one JSON object
/// each, bytes in base64, names in lowerCamelCase.
fn as_grpcurl_json(messages: &[tokenvault::proto::v1::SubjectField]) -> String {
    let encode = |bytes: &[u8]| data_encoding::BASE64.encode(bytes);
    messages
        .iter()
        .map(|m| {
            let mut object = serde_json::Map::new();
            object.insert("sealed".into(), encode(&m.sealed).into());
            if !m.encapsulated_key.is_empty() {
                object.insert("encapsulatedKey".into(), encode(&m.encapsulated_key).into());
            }
            serde_json::to_string_pretty(&object).unwrap()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A sealed export streams only ciphertext; `subjects open-export` opens it
/// with the recipient's private key, and refuses another key, a cut-off
/// export and reordered records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_export_opens_only_with_the_recipients_key() {
    let mut vault = TestVault::start();
    let values = ["sealed.ada@example.com", "Ada Sealed Lovelace"];
    tokenize(
        &vault,
        vec![
            subject_item("email", values[0], "cust-sealed"),
            subject_item("name", values[1], "cust-sealed"),
        ],
    )
    .await;
    let keys = tempfile::tempdir().unwrap();
    let dir = keys.path().join("requester");
    let (ok, public_line, err) = subjects_cli(&["keygen", "--out-dir", dir.to_str().unwrap()]);
    assert!(ok, "{err}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.join("export.key"))
            .unwrap()
            .permissions(),
    ) & 0o777;
    assert_eq!(mode, 0o600);
    let public = data_encoding::BASE64
        .decode(public_line.trim().as_bytes())
        .unwrap();

    let mut privacy = privacy(&vault).await;
    let request = |key: Vec<u8>| ExportSubjectRequest {
        subject_id: "cust-sealed".into(),
        purpose: "subject_access_request".into(),
        recipient_public_key: key,
    };
    let mut stream = privacy
        .export_subject(request(public.clone()))
        .await
        .unwrap()
        .into_inner();
    let mut messages = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        messages.push(message);
    }
    // Two values and the end record; nothing in clear.
    assert_eq!(messages.len(), 3);
    for (n, m) in messages.iter().enumerate() {
        assert!(m.value.is_empty() && m.token.is_empty() && m.field_type.is_empty());
        assert!(m.purposes.is_empty() && m.created_ms == 0);
        assert_eq!(m.encapsulated_key.len(), if n == 0 { 32 } else { 0 });
        for value in values {
            assert!(!m.sealed.windows(value.len()).any(|w| w == value.as_bytes()));
        }
    }

    let saved = keys.path().join("export.json");
    std::fs::write(&saved, as_grpcurl_json(&messages)).unwrap();
    let key = dir.join("export.key");
    let vault_key = common::vault_public_key(&vault);
    let open_checking = |key: &Path, file: &Path, subject: &str, checks: &[&str]| {
        let mut args = vec![
            "open-export",
            "--key",
            key.to_str().unwrap(),
            "--vault-key",
            &vault_key,
            "--subject",
            subject,
            "--in",
            file.to_str().unwrap(),
        ];
        args.extend_from_slice(checks);
        subjects_cli(&args)
    };
    let open = |key: &Path, file: &Path| open_checking(key, file, "cust-sealed", &[]);
    let (ok, out, err) = open(&key, &saved);
    assert!(ok, "{err}");
    // The vault signed it: its request id and time, said on stderr.
    let request_id = err
        .split_once("signed by the vault: request ")
        .and_then(|(_, rest)| rest.split(',').next())
        .unwrap_or_else(|| panic!("no signature line in {err}"))
        .to_owned();
    let mut opened: Vec<(String, String)> = out
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            (
                v["field_type"].as_str().unwrap().to_owned(),
                v["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    opened.sort();
    assert_eq!(
        opened,
        [
            ("email".to_owned(), values[0].to_owned()),
            ("name".to_owned(), values[1].to_owned())
        ]
    );

    // Another key.
    let other = keys.path().join("other");
    assert!(subjects_cli(&["keygen", "--out-dir", other.to_str().unwrap()]).0);
    let (ok, _, err) = open(&other.join("export.key"), &saved);
    assert!(!ok && err.contains("does not open with this key"), "{err}");
    // Cut off before the end record.
    let cut = keys.path().join("cut.json");
    std::fs::write(&cut, as_grpcurl_json(&messages[..2])).unwrap();
    let (ok, _, err) = open(&key, &cut);
    assert!(!ok && err.contains("cut off"), "{err}");
    // Two records swapped.
    let mut swapped = messages.clone();
    let second = std::mem::take(&mut swapped[1].sealed);
    swapped[1].sealed = std::mem::replace(&mut swapped[2].sealed, second);
    let reordered = keys.path().join("reordered.json");
    std::fs::write(&reordered, as_grpcurl_json(&swapped)).unwrap();
    let (ok, _, err) = open(&key, &reordered);
    assert!(!ok && err.contains("changed or is out of order"), "{err}");

    // Checked against what the data subject expects: their subject id and
    // the request they made. Another subject's export, or an older one
    // replayed, is refused.
    let (ok, _, err) = open_checking(
        &key,
        &saved,
        "cust-sealed",
        &[
            "--request-id",
            &request_id,
            "--not-before",
            "2020-01-01T00:00:00Z",
        ],
    );
    assert!(ok, "{err}");
    assert!(err.contains("subject checked"), "{err}");
    let (ok, _, err) = open_checking(&key, &saved, "cust-other", &[]);
    assert!(!ok && err.contains("another subject"), "{err}");
    let (ok, _, err) = open_checking(
        &key,
        &saved,
        "cust-sealed",
        &["--request-id", "an-older-request"],
    );
    assert!(!ok && err.contains("replayed"), "{err}");
    let (ok, _, err) = open_checking(
        &key,
        &saved,
        "cust-sealed",
        &["--not-before", "2999-01-01T00:00:00Z"],
    );
    assert!(!ok && err.contains("replayed"), "{err}");

    // Whoever relays the export, holding the recipient's public key only:
    // a substituted empty export, or fabricated values, sealed to the
    // recipient and ended with a signature of their own.
    for fabricated in [0usize, 1] {
        use prost::Message;
        let (encapsulated, mut sealer) = tokenvault::crypto::ExportSealer::new(&public).unwrap();
        let mut records = Vec::new();
        for index in 0..fabricated {
            let mut field = tokenvault::proto::v1::SubjectField::default();
            field.field_type = "email".into();
            field.value = "someone.else@example.com".into();
            let record = tokenvault::proto::v1::SealedRecord {
                field: Some(field),
                index: index as u64,
                ..Default::default()
            };
            records.push(sealer.seal(&record.encode_to_vec()).unwrap());
        }
        // Signed as the vault would, but with a key of the forger's.
        let subject_digest = tokenvault::crypto::subject_digest("cust-sealed");
        let statement = tokenvault::crypto::ExportStatement {
            encapsulated: &encapsulated,
            records: &records,
            subject_digest: &subject_digest,
            request_id: &request_id,
            exported_ms: 1,
        };
        let forger = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let signature = ed25519_dalek::Signer::sign(&forger, &statement.message());
        let end = tokenvault::proto::v1::SealedRecord {
            index: fabricated as u64,
            total: fabricated as u64,
            end: true,
            signature: signature.to_bytes().to_vec(),
            request_id: request_id.clone(),
            exported_ms: 1,
            subject_digest: tokenvault::crypto::subject_digest("cust-sealed").to_vec(),
            ..Default::default()
        };
        records.push(sealer.seal(&end.encode_to_vec()).unwrap());
        let forged: Vec<_> = records
            .into_iter()
            .enumerate()
            .map(|(n, sealed)| {
                let mut message = tokenvault::proto::v1::SubjectField::default();
                message.sealed = sealed;
                if n == 0 {
                    message.encapsulated_key.clone_from(&encapsulated);
                }
                message
            })
            .collect();
        let file = keys.path().join(format!("forged-{fabricated}.json"));
        std::fs::write(&file, as_grpcurl_json(&forged)).unwrap();
        let (ok, out, err) = open(&key, &file);
        assert!(
            !ok && err.contains("not signed with the vault's key"),
            "{fabricated} fabricated: {err}"
        );
        assert!(out.is_empty(), "a forged export printed values: {out}");
    }

    // A key of the wrong length is refused before anything is exported.
    let status = privacy
        .export_subject(request(vec![9; 31]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("32 bytes"),
        "{}",
        status.message()
    );

    vault.assert_log_free_of(&values);
}

/// A call sent again with its `request_id` (a retry after a lost answer)
/// gets the first answer and changes nothing: no second token, no update
/// over a later one, no second erasure. Each check fails if the retry is
/// carried out again (the control: the same calls without the id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_sent_again_with_their_request_id_get_the_first_answer_and_change_nothing() {
    let mut vault = TestVault::start();
    let mut support = vault.client("support").await;
    let mut privacy = privacy(&vault).await;
    let tokenize_request = |request_id: &str| TokenizeRequest {
        items: vec![
            subject_item("email", "ada@example.com", "cust-ada"),
            subject_item("email", "not an address", "cust-ada"),
        ],
        request_id: request_id.into(),
    };

    // Tokenize: the same answer, item errors included; one token stored.
    let first = support
        .tokenize(tokenize_request("7d1c9a52-tokenize"))
        .await
        .unwrap()
        .into_inner();
    let again = support
        .tokenize(tokenize_request("7d1c9a52-tokenize"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, first);
    assert_eq!(export_subject(&vault, "cust-ada").await.len(), 1);
    // Control: without the id, the same request is a new call.
    support.tokenize(tokenize_request("")).await.unwrap();
    assert_eq!(export_subject(&vault, "cust-ada").await.len(), 2);
    let Some(tokenize_result::Result::Token(token)) = first.results[0].result.clone() else {
        panic!("{first:?}");
    };
    assert!(matches!(
        first.results[1].result,
        Some(tokenize_result::Result::Error(_))
    ));

    // The id with another request is refused, without echoing the value.
    let status = support
        .tokenize(TokenizeRequest {
            items: vec![subject_item("email", "eve@example.com", "cust-ada")],
            request_id: "7d1c9a52-tokenize".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("request_id"), "{status:?}");
    assert!(!status.message().contains("eve@"), "{status:?}");
    // Any field changed is another request: the TTL, the subject, the field
    // type. None of them is written.
    for change in [
        |item: &mut TokenizeItem| item.ttl_seconds = 60,
        |item: &mut TokenizeItem| item.subject_id = "cust-bob".into(),
        |item: &mut TokenizeItem| item.field_type = "text".into(),
    ] {
        let mut changed = tokenize_request("7d1c9a52-tokenize");
        change(&mut changed.items[0]);
        let status = support.tokenize(changed).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
    assert!(export_subject(&vault, "cust-bob").await.is_empty());
    assert_eq!(export_subject(&vault, "cust-ada").await.len(), 2);
    // An id is the caller's own: another identity's same id is its own call.
    let mut checkout = vault.client("checkout").await;
    let theirs = checkout
        .tokenize(tokenize_request("7d1c9a52-tokenize"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(
        theirs.results[0].result,
        Some(tokenize_result::Result::Token(token.clone()))
    );
    let status = support
        .tokenize(tokenize_request("has a space"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // UpdateValue: a retry of an update does not undo a later update.
    let update = |value: &str, request_id: &str| UpdateValueRequest {
        token: token.clone(),
        value: value.into(),
        request_id: request_id.into(),
    };
    // The id of the Tokenize above, for another method: its own request.
    privacy
        .update_value(update("ada@example.org", "7d1c9a52-tokenize"))
        .await
        .unwrap();
    privacy
        .update_value(update("ada@example.net", "7d1c9a52-update-2"))
        .await
        .unwrap();
    let replayed = privacy
        .update_value(update("ada@example.org", "7d1c9a52-tokenize"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.field_type, "email");
    assert_eq!(
        reveal(&vault, std::slice::from_ref(&token), "customer_support").await,
        vec![Ok("ada@example.net".to_owned())]
    );

    // EraseSubject: the first receipt; a value made since is not erased.
    let erase = || EraseSubjectRequest {
        subject_id: "cust-ada".into(),
        request_id: "7d1c9a52-erase".into(),
    };
    let receipt = privacy.erase_subject(erase()).await.unwrap().into_inner();
    // The first call's, the control's and the other identity's.
    assert_eq!(receipt.tokens_erased, 3);
    let later = tokenize(
        &vault,
        vec![subject_item("email", "ada@example.com", "cust-ada")],
    )
    .await;
    let again = privacy.erase_subject(erase()).await.unwrap().into_inner();
    assert_eq!(again, receipt);
    assert_eq!(
        reveal(&vault, &later, "customer_support").await,
        vec![Ok("ada@example.com".to_owned())]
    );

    // Each replay is audited, naming the call whose answer it gave.
    let events = common::audit_events(&vault).await;
    for method in ["Tokenize", "UpdateValue", "EraseSubject"] {
        let replays: Vec<_> = events
            .iter()
            .filter(|e| e["method"] == method && e.get("replay_of").is_some())
            .collect();
        assert_eq!(replays.len(), 1, "{method}: {replays:?}");
        let first_call = &replays[0]["replay_of"];
        assert!(
            events.iter().any(|e| e["method"] == method
                && &e["request_id"] == first_call
                && e.get("replay_of").is_none()),
            "{method}: no event for {first_call}"
        );
    }
    vault.assert_log_free_of(&["ada@example.com", "ada@example.org", "eve@example.com"]);
}
