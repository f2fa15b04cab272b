//! Field types over real mTLS gRPC: validation, token formats, deterministic
//! tokens under a race, lookups, and masked reveals.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashSet;

use common::{TestVault, item};
use tokenvault::proto::v1::{
    Code, DetokenizeRequest, LookupItem, LookupTokensRequest, RevealForm, TokenizeRequest,
    detokenize_result, lookup_result, tokenize_result,
};

const FIELD_TYPES: &str = r#"
[field_types.customer_email]
kind = "email"
deterministic = true

[field_types.card_fpt]
kind = "card_number"
token_format = "format_preserving"
keep_first_digits = 4
luhn = "invalid"

[field_types.login_email]
kind = "email"
token_format = "email"
token_domain = "tokens.shop.example"

[field_types.passport]
kind = "national_id"
pattern = "[A-Z]{2}[0-9]{7}"
"#;

fn one_token(response: tokenvault::proto::v1::TokenizeResponse) -> String {
    match response.results.into_iter().next().unwrap().result {
        Some(tokenize_result::Result::Token(t)) => t,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_tokenizes_of_one_new_value_get_one_token() {
    let mut vault = TestVault::start_with(FIELD_TYPES);
    // Getting the token of a value that has one needs lookup: as well as
    // tokenize:, which support holds.
    let client = vault.client("support").await;
    let calls: Vec<_> = (0..64)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let request = TokenizeRequest {
                    items: vec![item("customer_email", "race@example.com")],
                    ..Default::default()
                };
                one_token(client.tokenize(request).await.unwrap().into_inner())
            })
        })
        .collect();
    let mut tokens = HashSet::new();
    for call in calls {
        tokens.insert(call.await.unwrap());
    }
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    let token = tokens.into_iter().next().unwrap();

    // LookupTokens finds it (after normalisation), and nothing else.
    let mut support = vault.client("support").await;
    let response = support
        .lookup_tokens(LookupTokensRequest {
            items: vec![
                LookupItem {
                    field_type: "customer_email".into(),
                    value: " race@EXAMPLE.com".into(),
                    subject_id: String::new(),
                },
                LookupItem {
                    field_type: "customer_email".into(),
                    value: "never@example.com".into(),
                    subject_id: String::new(),
                },
                LookupItem {
                    field_type: "email".into(),
                    value: "race@example.com".into(),
                    subject_id: String::new(),
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<_> = response
        .results
        .into_iter()
        .map(|r| match r.result {
            Some(lookup_result::Result::Token(t)) => Ok(t),
            Some(lookup_result::Result::Error(e)) => Err(e.code()),
            None => panic!("empty"),
        })
        .collect();
    assert_eq!(
        got,
        vec![
            Ok(token),
            Err(Code::NotFound),
            Err(Code::FailedPrecondition)
        ]
    );

    // Lookup needs its own scope.
    let mut checkout = vault.client("checkout").await;
    let status = checkout
        .lookup_tokens(LookupTokensRequest {
            items: vec![LookupItem {
                field_type: "customer_email".into(),
                value: "race@example.com".into(),
                subject_id: String::new(),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    vault.assert_log_free_of(&["race@example.com", "race@EXAMPLE.com"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_formats_over_grpc() {
    let vault = TestVault::start_with(FIELD_TYPES);
    let mut support = vault.client("support").await;
    let card = one_token(
        support
            .tokenize(TokenizeRequest {
                items: vec![item("card_fpt", "4111 1111 1111 1111")],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(card.len(), 16);
    assert!(
        card.starts_with("4111") && card.ends_with("1111") && card != "4111111111111111",
        "{card}"
    );
    let login = one_token(
        support
            .tokenize(TokenizeRequest {
                items: vec![item("login_email", "ada@example.com")],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(login.ends_with("@tokens.shop.example"), "{login}");
    let response = support
        .detokenize(DetokenizeRequest {
            tokens: vec![card, login],
            purpose: "customer_support".into(),
            masked: false,
        })
        .await
        .unwrap()
        .into_inner();
    let values: Vec<_> = response
        .results
        .into_iter()
        .map(|r| match r.result {
            Some(detokenize_result::Result::Value(mut v)) => (
                std::mem::take(&mut v.field_type),
                std::mem::take(&mut v.value),
            ),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        values,
        vec![
            ("card_fpt".into(), "4111111111111111".into()),
            ("login_email".into(), "ada@example.com".into())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masked_only_client_never_sees_plaintext() {
    let mut vault = TestVault::start_with(FIELD_TYPES);
    let mut support = vault.client("support").await;
    let response = support
        .tokenize(TokenizeRequest {
            items: vec![
                item("card_number", "4111 1111 1111 1111"),
                item("email", "ada.lovelace@example.com"),
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
    let mut masked_reader = vault.client("masked-reader").await;
    for ask_masked in [false, true] {
        let response = masked_reader
            .detokenize(DetokenizeRequest {
                tokens: tokens.clone(),
                purpose: "customer_support".into(),
                masked: ask_masked,
            })
            .await
            .unwrap()
            .into_inner();
        let got: Vec<_> = response
            .results
            .into_iter()
            .map(|r| match r.result {
                Some(detokenize_result::Result::Value(mut v)) => {
                    (v.form(), std::mem::take(&mut v.value))
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (RevealForm::Masked, "************1111".to_owned()),
                (RevealForm::Masked, "a***@example.com".to_owned()),
                (RevealForm::Masked, "*********0958".to_owned()),
            ]
        );
    }
    // A caller with detokenize gets plaintext, and the masked form on request.
    let response = support
        .detokenize(DetokenizeRequest {
            tokens: tokens[..1].to_vec(),
            purpose: "customer_support".into(),
            masked: true,
        })
        .await
        .unwrap()
        .into_inner();
    match &response.results[0].result {
        Some(detokenize_result::Result::Value(v)) => {
            assert_eq!(v.form(), RevealForm::Masked);
            assert_eq!(v.value, "************1111");
        }
        other => panic!("{other:?}"),
    }
    vault.assert_log_free_of(&[
        "4111111111111111",
        "ada.lovelace@example.com",
        "+442079460958",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_rejects_bad_values_without_echoing_them() {
    let mut vault = TestVault::start_with(FIELD_TYPES);
    let mut support = vault.client("support").await;
    let bad = [
        ("email", "ada-at-example.com", "is not an e-mail address"),
        ("phone", "call me maybe", "is not a phone number"),
        ("card_number", "4111 1111 1111 1112", "fails the Luhn check"),
        ("card_number", "4111 abcd", "must be digits"),
        ("date", "10/12/1815", "is not an ISO 8601 calendar date"),
        (
            "name",
            "Ada\u{7}Lovelace",
            "must not contain control characters",
        ),
        ("address", "   ", "is blank"),
        (
            "passport",
            "XY12",
            "does not match the configured national_id pattern",
        ),
        ("text", "nul\0byte", "must not contain NUL"),
    ];
    let response = support
        .tokenize(TokenizeRequest {
            items: bad.iter().map(|(f, v, _)| item(f, v)).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for ((field_type, value, rule), result) in bad.iter().zip(response.results) {
        match result.result {
            Some(tokenize_result::Result::Error(e)) => {
                assert_eq!(e.code(), Code::InvalidArgument, "{field_type}");
                assert!(
                    e.message
                        .starts_with(&format!("field type {field_type}: value ")),
                    "{}",
                    e.message
                );
                assert!(e.message.contains(rule), "{}", e.message);
                assert!(
                    !e.message.contains(value.trim()) || value.trim().is_empty(),
                    "{}",
                    e.message
                );
            }
            other => panic!("{field_type} {value:?} accepted: {other:?}"),
        }
    }
    vault.assert_log_free_of(&[
        "ada-at-example.com",
        "call me maybe",
        "4111 1111 1111 1112",
        "XY12",
    ]);
}
