//! The vault over real mTLS gRPC: round trips, denials, bad input, restart,
//! tampering, and that no value ever reaches the log.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashSet;

use common::{TestVault, detokenize, item, spiffe, tokens_of};
use tokenvault::{
    pki::ClientSpec,
    proto::v1::{
        Code, DetokenizeResponse, TokenizeItem, TokenizeRequest, detokenize_result, tokenize_result,
    },
    store::{RocksStore, StoreOptions, Table},
};
use tonic::transport::Channel;

type Client = tokenvault::client::TokenVaultClient<Channel>;

/// Tokenizes items that must all succeed; returns the tokens in order.
async fn tokenize_ok(client: &mut Client, items: Vec<TokenizeItem>) -> Vec<String> {
    let response = client
        .tokenize(TokenizeRequest {
            items,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    tokens_of(response)
}

/// The value of each result, or its error code.
fn values(response: &DetokenizeResponse) -> Vec<Result<(String, String), Code>> {
    response
        .results
        .iter()
        .map(|r| match &r.result {
            Some(detokenize_result::Result::Value(v)) => {
                Ok((v.field_type.clone(), v.value.clone()))
            }
            Some(detokenize_result::Result::Error(e)) => Err(e.code()),
            None => panic!("empty result"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_batch_round_trips_exactly() {
    let mut vault = TestVault::start();
    let mut support = vault.client("support").await;
    // (field type, value sent, value stored: the normalised form).
    let cases = [
        (
            "email",
            "grace.hopper@Example.com",
            "grace.hopper@example.com",
        ),
        ("phone", "+44 20 7946 0958", "+442079460958"),
        (
            "name",
            "Zoë  Ñúñez-Åkesson 王小明",
            "Zoë Ñúñez-Åkesson 王小明",
        ),
        (
            "address",
            "Flat 3, 221b Baker Street\nLondon NW1 6XE",
            "Flat 3, 221b Baker Street\nLondon NW1 6XE",
        ),
        ("card_number", "4111 1111 1111 1111", "4111111111111111"),
        ("date", "1815-12-10", "1815-12-10"),
        (
            "text",
            "emoji 🔐 and tabs\tand \"quotes\"",
            "emoji 🔐 and tabs\tand \"quotes\"",
        ),
    ];
    let inputs = cases.map(|(f, v, _)| (f, v));
    let tokens = tokenize_ok(
        &mut support,
        inputs.iter().map(|(f, v)| item(f, v)).collect(),
    )
    .await;
    assert_eq!(tokens.len(), inputs.len());
    for (token, (field_type, _)) in tokens.iter().zip(&inputs) {
        assert!(token.starts_with(&format!("tok_{field_type}_")), "{token}");
    }
    let response = detokenize(&mut support, &tokens, "customer_support")
        .await
        .unwrap();
    let expected: Vec<_> = cases
        .iter()
        .map(|(f, _, stored)| Ok(((*f).to_owned(), (*stored).to_owned())))
        .collect();
    assert_eq!(values(&response), expected);
    // The same value twice gets two different tokens (tokens are random).
    let again = tokenize_ok(&mut support, vec![item("email", inputs[0].1)]).await;
    assert_ne!(again[0], tokens[0]);
    vault.assert_log_free_of(&inputs.map(|(_, v)| v));
    vault.assert_log_free_of(&cases.map(|(_, _, stored)| stored));
    vault.assert_log_free_of(&tokens);
}

/// Spells `n` with the digits 0, 1, 8 and 9 only.
///
/// Token random parts use RFC 4648 base32 (A-Z, 2-7). A random 26-character
/// string contains any given 4-character string of that alphabet with
/// probability about 2e-5, so over 100,000 tokens a value with such a run
/// would match by chance alone. Values built from characters outside the
/// alphabet make the assertion below about derivation, not luck.
fn outside_alphabet(mut n: usize) -> String {
    const DIGITS: [char; 4] = ['0', '1', '8', '9'];
    let mut out = Vec::new();
    for _ in 0..9 {
        out.push(DIGITS[n % 4]);
        n /= 4;
    }
    out.into_iter().rev().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hundred_thousand_tokens_are_distinct_and_never_contain_their_value() {
    let vault = TestVault::start();
    let mut checkout = vault.client("checkout").await;
    let mut seen = HashSet::new();
    for batch in 0..100 {
        let values: Vec<String> = (0..1000)
            .map(|i| format!("user.{}@example.org", outside_alphabet(batch * 1000 + i)))
            .collect();
        let tokens = tokenize_ok(
            &mut checkout,
            values.iter().map(|v| item("email", v)).collect(),
        )
        .await;
        for (token, value) in tokens.into_iter().zip(&values) {
            let chars: Vec<char> = value.chars().collect();
            for window in chars.windows(4) {
                let piece: String = window.iter().collect();
                assert!(
                    !token.contains(&piece),
                    "token shares {piece:?} with its value"
                );
            }
            assert!(seen.insert(token), "duplicate token");
        }
    }
    assert_eq!(seen.len(), 100_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_and_purposes_are_enforced() {
    let mut vault = TestVault::start();
    let mut support = vault.client("support").await;
    let tokens = tokenize_ok(
        &mut support,
        vec![
            item("email", "ada@example.com"),
            item("phone", "+44 20 7946 0018"),
        ],
    )
    .await;

    // Tokenize-only client: refused for the whole request.
    let mut checkout = vault.client("checkout").await;
    let status = detokenize(&mut checkout, &tokens, "customer_support")
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().contains(&spiffe("checkout")),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("detokenize"),
        "{}",
        status.message()
    );

    // A purpose the caller may not state.
    let status = detokenize(&mut support, &tokens, "advertising")
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().contains("purpose advertising"),
        "{}",
        status.message()
    );

    // Scope for one field type only: per item.
    let mut reader = vault.client("email-reader").await;
    let response = detokenize(&mut reader, &tokens, "customer_support")
        .await
        .unwrap();
    let got = values(&response);
    assert_eq!(got[0], Ok(("email".into(), "ada@example.com".into())));
    assert_eq!(got[1], Err(Code::PermissionDenied));
    let message = match &response.results[1].result {
        Some(detokenize_result::Result::Error(e)) => e.message.clone(),
        _ => unreachable!(),
    };
    assert!(message.contains("detokenize:phone"), "{message}");

    // A tokenize scope for some field types only.
    let response = reader
        .tokenize(TokenizeRequest {
            items: vec![item("email", "a@b.example"), item("name", "Ada")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        response.results[0].result,
        Some(tokenize_result::Result::Token(_))
    ));
    match &response.results[1].result {
        Some(tokenize_result::Result::Error(e)) => assert_eq!(e.code(), Code::PermissionDenied),
        other => panic!("{other:?}"),
    }

    // An identity the policy does not know.
    let mut stranger = vault.client("stranger").await;
    let status = stranger
        .tokenize(TokenizeRequest {
            items: vec![item("email", "x@example.com")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    // A DNS identity matched by a glob.
    let dns = vault.pki.client(
        "billing",
        &ClientSpec {
            uris: vec![],
            dns: vec!["api.billing.internal".into()],
            ..ClientSpec::spiffe("unused")
        },
    );
    let mut billing = vault.client_with(&dns).await;
    tokenize_ok(&mut billing, vec![item("email", "dns@example.com")]).await;

    assert!(
        vault.wait_for_log("permission denied"),
        "denials are logged"
    );
    vault.assert_log_free_of(&[
        "ada@example.com",
        "+44 20 7946 0018",
        "a@b.example",
        "x@example.com",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_code_and_spares_the_other_items() {
    let mut vault = TestVault::start();
    let mut support = vault.client("support").await;
    let good = tokenize_ok(&mut support, vec![item("email", "kept@example.com")])
        .await
        .remove(0);

    // Per-item errors in a tokenize batch.
    let long = "x".repeat(321);
    let response = support
        .tokenize(TokenizeRequest {
            items: vec![
                item("", "v1@example.com"),
                item("iban", "GB82WEST12345698765432"),
                item("email", &long),
                item("email", ""),
                item("Email", "v2@example.com"),
                item("email", "fine@example.com"),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<_> = response
        .results
        .iter()
        .map(|r| match &r.result {
            Some(tokenize_result::Result::Error(e)) => {
                assert!(
                    !e.message.contains("v1@")
                        && !e.message.contains("GB82")
                        && !e.message.contains("xxxx"),
                    "{}",
                    e.message
                );
                e.code()
            }
            Some(tokenize_result::Result::Token(_)) => Code::Ok,
            None => panic!("empty"),
        })
        .collect();
    use Code::{InvalidArgument as Inv, Ok as Fine};
    assert_eq!(codes, vec![Inv, Inv, Inv, Inv, Inv, Fine]);
    let messages: Vec<_> = response
        .results
        .iter()
        .filter_map(|r| match &r.result {
            Some(tokenize_result::Result::Error(e)) => Some(e.message.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(messages[0], "field_type is empty");
    assert_eq!(messages[1], "field type iban is not configured");
    assert_eq!(
        messages[2],
        "field type email: value is 321 bytes, longer than the 320 allowed (max_value_bytes)"
    );

    // Per-item errors in a detokenize batch.
    let unknown = good.replace(&good[good.len() - 4..], "AAAA");
    let tokens = vec![
        "tok_email_not-a-token".to_owned(),
        good.clone(),
        String::new(),
        unknown,
    ];
    let response = detokenize(&mut support, &tokens, "customer_support")
        .await
        .unwrap();
    let got = values(&response);
    assert_eq!(got[0], Err(Code::InvalidArgument));
    assert_eq!(got[1], Ok(("email".into(), "kept@example.com".into())));
    assert_eq!(got[2], Err(Code::InvalidArgument));
    assert_eq!(got[3], Err(Code::NotFound));
    if let Some(detokenize_result::Result::Error(e)) = &response.results[0].result {
        assert!(
            !e.message.contains("not-a-token"),
            "the token is echoed: {}",
            e.message
        );
    }

    // Whole-request errors.
    let too_many = (0..1001)
        .map(|i| item("email", &format!("n{i}@example.com")))
        .collect();
    let status = support
        .tokenize(TokenizeRequest {
            items: too_many,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("limits.max_items_per_request"),
        "{}",
        status.message()
    );
    let status = support
        .tokenize(TokenizeRequest {
            items: vec![],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = detokenize(&mut support, std::slice::from_ref(&good), "")
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "purpose is required");
    let status = detokenize(&mut support, &[], "customer_support")
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // A malformed purpose is the caller's mistake, not a denial; the message
    // does not echo it.
    let status = detokenize(
        &mut support,
        std::slice::from_ref(&good),
        "Customer Support!",
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        !status.message().contains("Customer Support!"),
        "{status:?}"
    );
    // A malformed subject id fails its item, not the call.
    let mut with_subject = item("email", "subject@example.com");
    with_subject.subject_id = "bad subject\n".into();
    let response = support
        .tokenize(TokenizeRequest {
            items: vec![with_subject, item("email", "other@example.com")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    match &response.results[0].result {
        Some(tokenize_result::Result::Error(e)) => {
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
            assert!(!e.message.contains("bad subject"), "{}", e.message);
        }
        other => panic!("a malformed subject id was accepted: {other:?}"),
    }
    assert!(matches!(
        response.results[1].result,
        Some(tokenize_result::Result::Token(_))
    ));

    vault.assert_log_free_of(&[
        "kept@example.com",
        "fine@example.com",
        "GB82WEST12345698765432",
        "v1@example.com",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_refused_by_the_transport() {
    let vault =
        TestVault::start_with("[limits]\nmax_message_bytes = 65536\nmax_value_bytes = 4096");
    let mut support = vault.client("support").await;
    let items = (0..30).map(|_| item("text", &"y".repeat(4000))).collect();
    let status = support
        .tokenize(TokenizeRequest {
            items,
            ..Default::default()
        })
        .await
        .unwrap_err();
    // tonic answers a message over max_decoding_message_size with
    // OUT_OF_RANGE before the handler runs; the README documents this.
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("65536"), "{}", status.message());
    // The server is still up.
    tokenize_ok(&mut support, vec![item("email", "after@example.com")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_survive_a_restart() {
    let mut vault = TestVault::start();
    let mut support = vault.client("support").await;
    let tokens = tokenize_ok(
        &mut support,
        vec![
            item("email", "durable@example.com"),
            item("name", "Ada Lovelace"),
        ],
    )
    .await;
    drop(support);
    vault.restart();
    let mut support = vault.client("support").await;
    let response = detokenize(&mut support, &tokens, "order_fulfilment")
        .await
        .unwrap();
    assert_eq!(
        values(&response),
        vec![
            Ok(("email".into(), "durable@example.com".into())),
            Ok(("name".into(), "Ada Lovelace".into()))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_or_flipped_ciphertexts_are_data_loss_and_nothing_else_breaks() {
    let mut vault = TestVault::start();
    let mut support = vault.client("support").await;
    let tokens = tokenize_ok(
        &mut support,
        vec![
            item("email", "a@example.com"),
            item("email", "b@example.com"),
            item("email", "c@example.com"),
        ],
    )
    .await;
    drop(support);
    vault.stop();
    {
        let store = RocksStore::open(&vault.data_dir(), &StoreOptions::default()).unwrap();
        // Copy A's record (ciphertext and all) onto B's token.
        let a = store
            .get_blocking(Table::Records, tokens[0].as_bytes())
            .unwrap()
            .unwrap();
        store
            .put_blocking(Table::Records, tokens[1].as_bytes(), &a)
            .unwrap();
        // Flip one ciphertext byte of C.
        let mut c = store
            .get_blocking(Table::Records, tokens[2].as_bytes())
            .unwrap()
            .unwrap();
        let last = c.len() - 1;
        c[last] ^= 0x01;
        store
            .put_blocking(Table::Records, tokens[2].as_bytes(), &c)
            .unwrap();
        store.close();
    }
    vault.spawn().unwrap();
    let mut support = vault.client("support").await;
    let response = detokenize(&mut support, &tokens, "customer_support")
        .await
        .unwrap();
    assert_eq!(
        values(&response),
        vec![
            Ok(("email".into(), "a@example.com".into())),
            Err(Code::DataLoss),
            Err(Code::DataLoss)
        ]
    );
    assert!(vault.wait_for_log("failed authentication"));
    vault.assert_log_free_of(&["a@example.com", "b@example.com", "c@example.com"]);
}
