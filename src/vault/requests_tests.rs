//! Request ids over a real RocksDB: a call sent again gets the first answer
//! and changes nothing; two calls with one id take effect once.

use std::sync::atomic::Ordering;

use super::{
    tests::{Fixture, ctx, fixture, fixture_with_clock},
    *,
};
use crate::{authz::act, store::Table, token::Token};

const WINDOW_MS: u64 = DEFAULT_REQUEST_WINDOW.as_millis() as u64;

fn id(text: &str) -> RequestId {
    RequestId::parse(text).unwrap().unwrap()
}

/// A policy that grants every identity `scope`.
fn granting(scope: &str) -> crate::authz::Policy {
    crate::authz::Policy::new(vec![crate::authz::Rule::new(
        crate::authz::IdentityPattern::new("spiffe://*").unwrap(),
        vec![scope.parse().unwrap()],
        crate::authz::PurposeSet::Any,
    )])
}

fn encode(results: &[Result<Token, ItemError>]) -> Vec<u8> {
    let tokens: Vec<String> = results
        .iter()
        .map(|r| {
            r.as_ref()
                .map_or_else(|e| e.to_string(), ToString::to_string)
        })
        .collect();
    tokens.join(",").into_bytes()
}

impl Fixture {
    /// What the vault holds for `request_id` of `identity` with `value`.
    async fn prior_of(
        &self,
        identity: &str,
        request_id: &str,
        value: &str,
    ) -> Result<Prior, Error> {
        let key = self
            .vault
            .request_key(&id(request_id), identity, "Tokenize", [value.as_bytes()]);
        self.vault.prior(key).await
    }

    /// Tokenizes `value` as the call `request` (found new).
    async fn tokenize_as(&self, request: &NewRequest, value: &str) -> Result<String, Error> {
        let grants = self.policy.grants(&self.client);
        let permit = grants
            .permit_tokenize(NewValue {
                field_type: "email".parse().unwrap(),
                value: SecretValue::new(value.to_owned()),
                subject: None,
                ttl_seconds: None,
            })
            .unwrap();
        let results = self
            .vault
            .tokenize(
                vec![permit],
                |ft| grants.permit_field(act::Lookup, ft),
                &ctx("Tokenize", 1),
                Some(Remember {
                    request,
                    answer: &encode,
                }),
            )
            .await?;
        Ok(String::from_utf8(encode(&results)).unwrap())
    }

    /// A call with a request id, as the API makes it: the first answer if
    /// there is one (and `true`), else a new token.
    async fn tokenize_once(
        &self,
        identity: &str,
        request_id: &str,
        value: &str,
    ) -> Result<(String, bool), Error> {
        match self.prior_of(identity, request_id, value).await? {
            Prior::Answered(first) => Ok((String::from_utf8(first.answer).unwrap(), true)),
            Prior::New(request) => Ok((self.tokenize_as(&request, value).await?, false)),
        }
    }

    async fn count(&self, table: Table, prefix: &[u8]) -> usize {
        self.vault
            .store()
            .scan_prefix(table, prefix.to_vec())
            .await
            .unwrap()
            .len()
    }
}

#[tokio::test]
async fn a_request_sent_again_gets_the_first_answer_and_stores_nothing_more() {
    let f = fixture().await;
    let (first, replayed) = f
        .tokenize_once("spiffe://a", "r-1", "ada@example.com")
        .await
        .unwrap();
    assert!(!replayed && first.starts_with("tok_email_"), "{first}");
    let (again, replayed) = f
        .tokenize_once("spiffe://a", "r-1", "ada@example.com")
        .await
        .unwrap();
    assert!(replayed);
    assert_eq!(again, first);
    assert_eq!(f.count(Table::Records, b"").await, 1);

    // The id is the caller's own: another identity's same id is a new call.
    let (other, replayed) = f
        .tokenize_once("spiffe://b", "r-1", "ada@example.com")
        .await
        .unwrap();
    assert!(!replayed);
    assert_ne!(other, first);
    assert_eq!(f.count(Table::Records, b"").await, 2);

    // The same id with another request is refused, and stores nothing.
    let reused = f
        .tokenize_once("spiffe://a", "r-1", "bob@example.com")
        .await;
    assert!(matches!(reused, Err(Error::RequestIdReused)), "{reused:?}");
    assert!(!Error::RequestIdReused.to_string().contains("bob"));
    assert_eq!(f.count(Table::Records, b"").await, 2);
}

#[tokio::test]
async fn two_calls_with_one_request_id_take_effect_once() {
    let f = fixture().await;
    // Both looked the id up before either wrote: both are new.
    let Prior::New(a) = f
        .prior_of("spiffe://a", "r-2", "ada@example.com")
        .await
        .unwrap()
    else {
        panic!("new");
    };
    let Prior::New(b) = f
        .prior_of("spiffe://a", "r-2", "ada@example.com")
        .await
        .unwrap()
    else {
        panic!("new");
    };
    let first = f.tokenize_as(&a, "ada@example.com").await.unwrap();
    let second = f.tokenize_as(&b, "ada@example.com").await;
    assert!(
        matches!(second, Err(Error::Conflict(m)) if m == requests::REQUEST_ID_IN_FLIGHT),
        "{second:?}"
    );
    assert_eq!(f.count(Table::Records, b"").await, 1);
    // Sent again, the loser gets the winner's answer.
    let (again, replayed) = f
        .tokenize_once("spiffe://a", "r-2", "ada@example.com")
        .await
        .unwrap();
    assert!(replayed);
    assert_eq!(again, first);
}

#[tokio::test]
async fn a_request_id_is_forgotten_after_its_window_and_swept() {
    let (f, time) = fixture_with_clock().await;
    let (first, _) = f
        .tokenize_once("spiffe://a", "r-3", "ada@example.com")
        .await
        .unwrap();
    time.fetch_add(WINDOW_MS - 1, Ordering::SeqCst);
    assert_eq!(f.vault.sweep_requests().await.unwrap(), 0);
    let (again, replayed) = f
        .tokenize_once("spiffe://a", "r-3", "ada@example.com")
        .await
        .unwrap();
    assert!(replayed && again == first);

    // Past the window the id is free again, even for another request; the
    // expired record is replaced in the write, not first swept.
    time.fetch_add(2, Ordering::SeqCst);
    let (reused, replayed) = f
        .tokenize_once("spiffe://a", "r-3", "bob@example.com")
        .await
        .unwrap();
    assert!(!replayed);
    assert_ne!(reused, first);
    assert_eq!(f.count(Table::Meta, crate::layout::REQUEST_PREFIX).await, 1);
    assert_eq!(
        f.count(Table::Meta, crate::layout::REQUEST_EXPIRY_PREFIX)
            .await,
        1
    );

    // The sweep deletes what is due, and only that.
    time.fetch_add(10, Ordering::SeqCst);
    f.tokenize_once("spiffe://a", "r-4", "eve@example.com")
        .await
        .unwrap();
    time.fetch_add(WINDOW_MS - 5, Ordering::SeqCst);
    assert_eq!(f.vault.sweep_requests().await.unwrap(), 1);
    assert_eq!(f.count(Table::Meta, crate::layout::REQUEST_PREFIX).await, 1);
    time.fetch_add(WINDOW_MS, Ordering::SeqCst);
    assert_eq!(f.vault.sweep_requests().await.unwrap(), 1);
    assert_eq!(f.count(Table::Meta, crate::layout::REQUEST_PREFIX).await, 0);
    assert_eq!(
        f.count(Table::Meta, crate::layout::REQUEST_EXPIRY_PREFIX)
            .await,
        0
    );
    // The tokens stay: only the memory of the calls goes.
    assert_eq!(f.count(Table::Records, b"").await, 3);
}

/// Two UpdateValue calls with one id, both prepared before either wrote,
/// on a deterministic field type: the loser's write fails on the index
/// entry the winner made first, and must still be told that its id was
/// taken (`ABORTED`), not that the value belongs to another token.
#[tokio::test]
async fn an_update_that_lost_to_its_own_id_is_told_so() {
    let f = fixture().await;
    let policy = granting("update:*");
    let grants = policy.grants(&f.client);
    for round in 0..8 {
        let token = f
            .tokenize(&[("customer_email", &format!("old{round}@example.com"))])
            .await
            .remove(0)
            .unwrap();
        let new = format!("new{round}@example.com");
        let key = || {
            f.vault.request_key(
                &id(&format!("u-{round}")),
                "spiffe://a",
                "UpdateValue",
                [token.as_str().as_bytes(), new.as_bytes()],
            )
        };
        let (Prior::New(a), Prior::New(b)) = (
            f.vault.prior(key()).await.unwrap(),
            f.vault.prior(key()).await.unwrap(),
        ) else {
            panic!("new");
        };
        let answer = |ft: &crate::token::FieldType| ft.to_string().into_bytes();
        let audit = ctx("UpdateValue", 1);
        let update = |request| {
            f.vault.update_value(
                &token,
                SecretValue::new(new.clone()),
                |ft| grants.permit_field(act::Update, ft),
                &audit,
                Some(Remember {
                    request,
                    answer: &answer,
                }),
            )
        };
        let (first, second) = tokio::join!(update(&a), update(&b));
        let outcomes = [first, second];
        let won = outcomes.iter().filter(|o| matches!(o, Ok(Ok(_)))).count();
        let told = outcomes
            .iter()
            .filter(
                |o| matches!(o, Err(Error::Conflict(m)) if *m == requests::REQUEST_ID_IN_FLIGHT),
            )
            .count();
        assert_eq!((won, told), (1, 1), "round {round}: {outcomes:?}");
    }
}

/// An erasure whose id another call took first, while it waited for its
/// turn at the ledger, writes no ledger entry of its own: none is left
/// that the vault never applied (which would stop every replica's writes
/// on a shared ledger).
#[tokio::test]
async fn an_erasure_that_lost_to_its_own_id_leaves_nothing_unapplied() {
    use super::{LedgerLocation, LedgerRollback, ledger::LedgerFile, ledger_sink::LedgerSink};
    let mut f = fixture().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("erasures");
    let vault = std::mem::replace(&mut f.vault, super::tests::placeholder_vault().await);
    f.vault = vault
        .with_ledger(LedgerLocation::File(path.clone()), LedgerRollback::Refuse)
        .await
        .unwrap()
        .0;
    let policy = granting("subject:erase");
    let grants = policy.grants(&f.client);
    f.tokenize_for("cust-1", &[("email", "ada@example.com", None)])
        .await;
    let key = || {
        f.vault.request_key(
            &id("e-1"),
            "spiffe://a",
            "EraseSubject",
            [b"cust-1".as_slice()],
        )
    };
    let (Prior::New(a), Prior::New(b)) = (
        f.vault.prior(key()).await.unwrap(),
        f.vault.prior(key()).await.unwrap(),
    ) else {
        panic!("new");
    };
    let answer = |r: &ErasureReceipt| r.tokens_erased.to_be_bytes().to_vec();
    let audit = ctx("EraseSubject", 1);
    let erase = |request| {
        let permit = grants
            .permit_global(act::SubjectErase, "cust-1".parse().unwrap())
            .unwrap();
        f.vault.erase_subject(
            permit,
            &audit,
            Some(Remember {
                request,
                answer: &answer,
            }),
        )
    };
    assert_eq!(erase(&a).await.unwrap().tokens_erased, 1);
    let lost = erase(&b).await;
    assert!(
        matches!(lost, Err(Error::Conflict(m)) if m == requests::REQUEST_ID_IN_FLIGHT),
        "{lost:?}"
    );
    let (_, content) = LedgerSink::open(LedgerLocation::File(path)).await.unwrap();
    let LedgerFile::Chained(entries) = content else {
        panic!("a chained ledger");
    };
    assert_eq!(entries.len(), 1);
    assert_eq!(f.vault.recorded_ledger().await.unwrap().len(), 1);
}

/// An erasure forgets the request ids of the calls that named the subject
/// (their records hold keyed hashes of its values, and its tokens): the
/// records, their subject and expiry entries go; a call that named another
/// subject stays; a retry of a forgotten call runs again.
#[tokio::test]
async fn an_erasure_forgets_the_request_ids_of_the_subjects_calls() {
    let (f, time) = fixture_with_clock().await;
    let grants = f.policy.grants(&f.client);
    let tokenize = |request_id: &'static str, subjects: &'static [&'static str]| {
        let grants = &grants;
        let f = &f;
        async move {
            let key = f.vault.request_key(
                &id(request_id),
                "spiffe://a",
                "Tokenize",
                subjects.iter().map(|s| s.as_bytes()),
            );
            let Prior::New(request) = f.vault.prior(key).await.unwrap() else {
                return None;
            };
            let permits = subjects
                .iter()
                .map(|s| {
                    grants
                        .permit_tokenize(NewValue {
                            field_type: "email".parse().unwrap(),
                            value: SecretValue::new(format!("{s}@example.com")),
                            subject: Some(s.parse().unwrap()),
                            ttl_seconds: None,
                        })
                        .unwrap()
                })
                .collect();
            let results = f
                .vault
                .tokenize(
                    permits,
                    |ft| grants.permit_field(act::Lookup, ft),
                    &ctx("Tokenize", subjects.len()),
                    Some(Remember {
                        request: &request,
                        answer: &encode,
                    }),
                )
                .await
                .unwrap();
            Some(results)
        }
    };
    tokenize("both", &["cust-ada", "cust-bob"]).await.unwrap();
    tokenize("bob", &["cust-bob"]).await.unwrap();
    assert!(tokenize("bob", &["cust-bob"]).await.is_none(), "remembered");
    // More of Ada's calls than a page holds.
    for request_id in ["ada-1", "ada-2", "ada-3", "ada-4", "ada-5"] {
        tokenize(request_id, &["cust-ada"]).await.unwrap();
    }
    assert_eq!(
        f.count(Table::Meta, crate::layout::REQUEST_SUBJECT_PREFIX)
            .await,
        8
    );

    // The erasure, itself with a request id, which it keeps.
    let policy = granting("subject:erase");
    let permit = policy
        .grants(&f.client)
        .permit_global(act::SubjectErase, "cust-ada".parse().unwrap())
        .unwrap();
    let erase_key = || {
        f.vault.request_key(
            &id("erase-ada"),
            "spiffe://a",
            "EraseSubject",
            [b"cust-ada".as_slice()],
        )
    };
    let Prior::New(erasing) = f.vault.prior(erase_key()).await.unwrap() else {
        panic!("new");
    };
    let receipt = |r: &ErasureReceipt| r.tokens_erased.to_be_bytes().to_vec();
    f.vault
        .erase_subject(
            permit,
            &ctx("EraseSubject", 1),
            Some(Remember {
                request: &erasing,
                answer: &receipt,
            }),
        )
        .await
        .unwrap();
    // Every call that named Ada is forgotten with all its entries; Bob's
    // own call and the erasure's stay.
    assert_eq!(f.count(Table::Meta, crate::layout::REQUEST_PREFIX).await, 2);
    assert_eq!(
        f.count(Table::Meta, crate::layout::REQUEST_SUBJECT_PREFIX)
            .await,
        2
    );
    assert_eq!(
        f.count(Table::Meta, crate::layout::REQUEST_EXPIRY_PREFIX)
            .await,
        2
    );
    assert!(matches!(
        f.vault.prior(erase_key()).await.unwrap(),
        Prior::Answered(_)
    ));
    assert!(
        tokenize("bob", &["cust-bob"]).await.is_none(),
        "Bob's own call stays"
    );
    assert!(
        tokenize("both", &["cust-ada", "cust-bob"]).await.is_some(),
        "runs again"
    );

    // The sweep takes a record's subject entries with it.
    time.fetch_add(WINDOW_MS + 1, Ordering::SeqCst);
    assert_eq!(f.vault.sweep_requests().await.unwrap(), 3);
    for prefix in [
        crate::layout::REQUEST_PREFIX,
        crate::layout::REQUEST_SUBJECT_PREFIX,
        crate::layout::REQUEST_EXPIRY_PREFIX,
    ] {
        assert_eq!(f.count(Table::Meta, prefix).await, 0);
    }
}
