//! The vault core against a real RocksDB in a temporary directory.

use std::sync::Arc;

use super::*;
use crate::{
    audit::AuditContext,
    authz::{IdentityPattern, Policy, PurposeSet, RevealForm, Rule, act},
    fields::RawFieldType,
    identity::ClientId,
    store::{RocksStore, StoreOptions},
    token::Token,
};

pub(super) fn ctx(method: &'static str, items: usize) -> AuditContext {
    AuditContext {
        request_id: "test".into(),
        identity: "spiffe://test/x".into(),
        method,
        purpose: None,
        items: items as u32,
        failed_items: 0,
    }
}

pub(super) struct Fixture {
    _dir: tempfile::TempDir,
    pub(super) vault: Vault<RocksStore>,
    pub(super) policy: Policy,
    pub(super) client: ClientId,
}

pub(super) const FIELDS: &str = r#"
[email]
[phone]
default_region = "GB"
[card_number]
[card_fpt]
kind = "card_number"
token_format = "format_preserving"
keep_first_digits = 4
luhn = "invalid"
[customer_email]
kind = "email"
deterministic = true
[masked_name]
kind = "name"
mask = "first:1"
[short_lived]
kind = "email"
retention_days = 1
"#;

pub(super) async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.key");
    MasterKey::create_file(&key).unwrap();
    let master = MasterKey::load(&key).unwrap();
    let store = RocksStore::open(&dir.path().join("data"), &StoreOptions::default()).unwrap();
    let raw: std::collections::BTreeMap<String, RawFieldType> = toml::from_str(FIELDS).unwrap();
    let fields = FieldRegistry::from_raw(&raw, 4096).unwrap();
    let vault = Vault::open(store, &master, fields).await.unwrap();
    let policy = Policy::new(vec![Rule::new(
        IdentityPattern::new("spiffe://*").unwrap(),
        vec![
            "tokenize:*".parse().unwrap(),
            "detokenize:*".parse().unwrap(),
            "lookup:*".parse().unwrap(),
        ],
        PurposeSet::Any,
    )]);
    Fixture {
        _dir: dir,
        vault,
        policy,
        client: ClientId::Spiffe("spiffe://test/x".into()),
    }
}

impl Fixture {
    pub(super) async fn tokenize(&self, items: &[(&str, &str)]) -> Vec<Result<Token, ItemError>> {
        let grants = self.policy.grants(&self.client);
        let permits = items
            .iter()
            .map(|(ft, v)| {
                grants
                    .permit_tokenize(NewValue {
                        field_type: ft.parse().unwrap(),
                        value: SecretValue::new((*v).to_owned()),
                        subject: None,
                        ttl_seconds: None,
                    })
                    .unwrap()
            })
            .collect();
        self.vault
            .tokenize(
                permits,
                |ft| grants.permit_field(act::Lookup, ft),
                &ctx("Tokenize", items.len()),
                None,
            )
            .await
            .unwrap()
    }

    pub(super) async fn reveal(
        &self,
        tokens: &[Token],
        masked: bool,
    ) -> Vec<Result<Revealed, ItemError>> {
        let grants = self.policy.grants(&self.client);
        let purpose = grants.allow_purpose("test".parse().unwrap()).unwrap();
        self.vault
            .detokenize(
                tokens,
                purpose.purpose(),
                |ft| grants.permit_reveal(&purpose, ft, masked),
                &ctx("Detokenize", tokens.len()),
            )
            .await
            .unwrap()
    }

    async fn lookup(&self, field_type: &str, value: &str) -> Result<Token, ItemError> {
        self.lookup_for(None, field_type, value).await
    }

    /// Looks up `value`, tokenized for `subject` (if any).
    pub(super) async fn lookup_for(
        &self,
        subject: Option<&str>,
        field_type: &str,
        value: &str,
    ) -> Result<Token, ItemError> {
        let grants = self.policy.grants(&self.client);
        let permit = grants
            .permit_lookup(LookupValue {
                field_type: field_type.parse().unwrap(),
                value: SecretValue::new(value.to_owned()),
                subject: subject.map(|s| s.parse().unwrap()),
            })
            .unwrap();
        self.vault
            .lookup(vec![permit], &ctx("LookupTokens", 1))
            .await
            .unwrap()
            .remove(0)
    }
}

#[tokio::test]
async fn values_are_stored_normalised() {
    let f = fixture().await;
    let tokens: Vec<Token> = f
        .tokenize(&[
            ("email", " Ada@Example.COM "),
            ("phone", "020 7946 0958"),
            ("card_number", "4111-1111-1111-1111"),
        ])
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let values: Vec<String> = f
        .reveal(&tokens, false)
        .await
        .into_iter()
        .map(|r| r.unwrap().value.expose().to_owned())
        .collect();
    assert_eq!(
        values,
        ["Ada@example.com", "+442079460958", "4111111111111111"]
    );
}

#[tokio::test]
async fn invalid_values_fail_alone_and_name_their_rule() {
    let f = fixture().await;
    let results = f
        .tokenize(&[("email", "not-an-address"), ("email", "ok@example.com")])
        .await;
    let err = results[0].as_ref().unwrap_err();
    assert!(matches!(err, ItemError::Invalid(_)));
    assert!(!err.to_string().contains("not-an-address"));
    assert!(results[1].is_ok());
}

#[tokio::test]
async fn deterministic_values_share_one_token_and_can_be_looked_up() {
    let f = fixture().await;
    assert_eq!(
        f.lookup("customer_email", "ada@example.com").await,
        Err(ItemError::NotFound)
    );
    let first = f
        .tokenize(&[
            ("customer_email", "ada@example.com"),
            ("customer_email", " ada@EXAMPLE.com"),
        ])
        .await;
    // Both spellings normalise to one value, inside one request.
    assert_eq!(first[0], first[1]);
    let again = f.tokenize(&[("customer_email", "ada@example.com")]).await;
    assert_eq!(again[0], first[0]);
    assert_eq!(
        f.lookup("customer_email", " ada@EXAMPLE.com")
            .await
            .as_ref(),
        Ok(first[0].as_ref().unwrap())
    );
    // The local part of an address may be case-sensitive, so it is kept.
    assert_eq!(
        f.lookup("customer_email", "ADA@example.com").await,
        Err(ItemError::NotFound)
    );
    // Other values, and non-deterministic types, get their own tokens.
    let other = f
        .tokenize(&[
            ("customer_email", "bob@example.com"),
            ("email", "ada@example.com"),
            ("email", "ada@example.com"),
        ])
        .await;
    assert_ne!(other[0], first[0]);
    assert_ne!(other[1], other[2]);
    assert_eq!(
        f.lookup("email", "ada@example.com").await,
        Err(ItemError::NotDeterministic("email".parse().unwrap()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tokenizes_of_one_new_value_get_one_token() {
    let f = Arc::new(fixture().await);
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let f = Arc::clone(&f);
            tokio::spawn(async move {
                f.tokenize(&[("customer_email", "race@example.com")])
                    .await
                    .remove(0)
                    .unwrap()
            })
        })
        .collect();
    let mut tokens = std::collections::HashSet::new();
    for task in tasks {
        tokens.insert(task.await.unwrap());
    }
    assert_eq!(tokens.len(), 1);
}

#[tokio::test]
async fn format_preserving_tokens_reveal_their_card() {
    let f = fixture().await;
    let token = f
        .tokenize(&[("card_fpt", "4111 1111 1111 1111")])
        .await
        .remove(0)
        .unwrap();
    assert_eq!(token.as_str().len(), 16);
    assert!(token.as_str().starts_with("4111") && token.as_str().ends_with("1111"));
    assert!(!crate::fields::kinds::luhn_valid(token.as_str()));
    let revealed = f
        .reveal(std::slice::from_ref(&token), false)
        .await
        .remove(0)
        .unwrap();
    assert_eq!(revealed.value.expose(), "4111111111111111");
    assert_eq!(revealed.field_type.as_str(), "card_fpt");
}

#[tokio::test]
async fn masked_reveals_hide_the_value() {
    let f = fixture().await;
    let tokens: Vec<Token> = f
        .tokenize(&[
            ("card_number", "4111 1111 1111 1111"),
            ("email", "ada@example.com"),
            ("masked_name", "Ada Lovelace"),
        ])
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let masked: Vec<(String, RevealForm)> = f
        .reveal(&tokens, true)
        .await
        .into_iter()
        .map(|r| r.map(|r| (r.value.expose().to_owned(), r.form)).unwrap())
        .collect();
    assert_eq!(
        masked,
        [
            ("************1111".to_owned(), RevealForm::Masked),
            ("a***@example.com".to_owned(), RevealForm::Masked),
            ("A***********".to_owned(), RevealForm::Masked),
        ]
    );
}

#[tokio::test]
async fn a_vault_reopened_with_another_master_key_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.key"), dir.path().join("b.key"));
    MasterKey::create_file(&a).unwrap();
    MasterKey::create_file(&b).unwrap();
    let data = dir.path().join("data");
    {
        let store = RocksStore::open(&data, &StoreOptions::default()).unwrap();
        Vault::open(
            store,
            &MasterKey::load(&a).unwrap(),
            FieldRegistry::default(),
        )
        .await
        .unwrap();
    }
    let store = RocksStore::open(&data, &StoreOptions::default()).unwrap();
    let err = Vault::open(
        store,
        &MasterKey::load(&b).unwrap(),
        FieldRegistry::default(),
    )
    .await
    .err()
    .unwrap();
    assert!(matches!(err, Error::WrongMasterKey(_)), "{err}");
}

/// A real RocksDB whose commits can be made to fail, to prove that the
/// vault fails closed when the audit log cannot be written.
struct FailingStore {
    inner: RocksStore,
    fail: std::sync::atomic::AtomicBool,
    /// Every unit guarded by "unchanged" loses, as if a concurrent write
    /// always came first.
    lose_races: std::sync::atomic::AtomicBool,
    /// Every token key reads as taken, as in a full token space.
    records_all_taken: std::sync::atomic::AtomicBool,
    /// How many reads of the records table were answered "taken".
    taken_reads: std::sync::atomic::AtomicUsize,
    /// Scans of the keys table find nothing, as for a process that looked
    /// just before another stored its keys.
    keys_look_empty: std::sync::atomic::AtomicBool,
    /// Committed just before the next commit, as another process's write
    /// that lands between this one's reads and its write.
    slip_in: std::sync::Mutex<Option<store::Batch>>,
}

impl FailingStore {
    fn new(inner: RocksStore) -> Self {
        Self {
            inner,
            fail: std::sync::atomic::AtomicBool::new(false),
            lose_races: std::sync::atomic::AtomicBool::new(false),
            records_all_taken: std::sync::atomic::AtomicBool::new(false),
            taken_reads: std::sync::atomic::AtomicUsize::new(0),
            keys_look_empty: std::sync::atomic::AtomicBool::new(false),
            slip_in: std::sync::Mutex::new(None),
        }
    }
}

impl Store for FailingStore {
    async fn get_many(
        &self,
        table: store::Table,
        keys: Vec<Vec<u8>>,
    ) -> Result<Vec<Option<Vec<u8>>>, store::Error> {
        if table == store::Table::Records
            && self
                .records_all_taken
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            self.taken_reads
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Ok(keys.iter().map(|_| Some(b"taken".to_vec())).collect());
        }
        self.inner.get_many(table, keys).await
    }

    async fn scan_prefix(
        &self,
        table: store::Table,
        prefix: Vec<u8>,
    ) -> Result<store::KeyValues, store::Error> {
        if table == store::Table::Keys
            && self
                .keys_look_empty
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(Vec::new());
        }
        self.inner.scan_prefix(table, prefix).await
    }

    async fn commit(&self, batch: store::Batch) -> Result<store::UnitOutcomes, store::Error> {
        let slipped = self.slip_in.lock().unwrap().take();
        if let Some(other) = slipped {
            assert_eq!(self.inner.commit(other).await?, vec![Ok(())]);
        }
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(store::Error::Backend("injected write failure".into()));
        }
        if self.lose_races.load(std::sync::atomic::Ordering::SeqCst)
            && batch.units().iter().any(|u| !u.unchanged().is_empty())
        {
            return Ok(batch
                .units()
                .iter()
                .map(|u| {
                    Err(store::Conflict {
                        guard: store::FailedGuard::Unchanged(u.unchanged().len() - 1),
                        existing: Vec::new(),
                    })
                })
                .collect());
        }
        self.inner.commit(batch).await
    }

    fn audit_head(&self) -> store::chain::Head {
        self.inner.audit_head()
    }

    async fn scan_from(
        &self,
        table: store::Table,
        from: Vec<u8>,
        limit: usize,
    ) -> Result<store::KeyValues, store::Error> {
        self.inner.scan_from(table, from, limit).await
    }

    fn checkpoints(&self) -> Result<&impl store::Checkpoints, store::Error> {
        self.inner.checkpoints()
    }

    async fn estimated_len(&self, table: store::Table) -> u64 {
        self.inner.estimated_len(table).await
    }

    async fn purge(&self, keys: Vec<(store::Table, Vec<u8>)>) -> Result<(), store::Error> {
        self.inner.purge(keys).await
    }
}

/// A vault with the test fields over a [`FailingStore`] on a real RocksDB,
/// in a directory that lives as long as the returned guard.
async fn failing_vault() -> (tempfile::TempDir, Vault<FailingStore>) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.key");
    MasterKey::create_file(&key).unwrap();
    let store = FailingStore::new(
        RocksStore::open(&dir.path().join("data"), &StoreOptions::default()).unwrap(),
    );
    let raw: std::collections::BTreeMap<String, RawFieldType> = toml::from_str(FIELDS).unwrap();
    let vault = Vault::open(
        store,
        &MasterKey::load(&key).unwrap(),
        FieldRegistry::from_raw(&raw, 4096).unwrap(),
    )
    .await
    .unwrap();
    (dir, vault)
}

#[tokio::test]
async fn when_the_audit_log_cannot_be_written_nothing_is_revealed_or_stored() {
    let (_dir, vault) = failing_vault().await;
    let policy = Policy::new(vec![Rule::new(
        IdentityPattern::new("spiffe://*").unwrap(),
        vec![
            "tokenize:*".parse().unwrap(),
            "detokenize:*".parse().unwrap(),
        ],
        PurposeSet::Any,
    )]);
    let client = ClientId::Spiffe("spiffe://test/x".into());
    let grants = policy.grants(&client);
    let new_value = |v: &str| {
        grants
            .permit_tokenize(NewValue {
                field_type: "email".parse().unwrap(),
                value: SecretValue::new(v.into()),
                subject: None,
                ttl_seconds: None,
            })
            .unwrap()
    };
    let token = vault
        .tokenize(
            vec![new_value("kept@example.com")],
            |ft| grants.permit_field(act::Lookup, ft),
            &ctx("Tokenize", 1),
            None,
        )
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let head = vault.store().audit_head();
    assert_eq!(head.seq, 1, "the tokenize event went in with the data");

    // An update that keeps losing to concurrent writes gives up, and the
    // call is still audited, as ABORTED: a refused or failed write is still
    // a call someone made.
    vault
        .store()
        .lose_races
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let update_grants = Policy::new(vec![Rule::new(
        IdentityPattern::new("spiffe://*").unwrap(),
        vec!["update:*".parse().unwrap()],
        PurposeSet::Any,
    )]);
    let updater = update_grants.grants(&client);
    let gave_up = vault
        .update_value(
            &token,
            SecretValue::new("new@example.com".into()),
            |ft| updater.permit_field(act::Update, ft),
            &ctx("UpdateValue", 1),
            None,
        )
        .await;
    assert!(matches!(gave_up, Err(Error::Conflict(_))), "{gave_up:?}");
    assert_eq!(
        vault.store().audit_head().seq,
        2,
        "the update was not audited"
    );
    let last = vault
        .store()
        .scan_from(store::Table::Audit, Vec::new(), 10)
        .await
        .unwrap();
    let event = String::from_utf8_lossy(&last.last().unwrap().1).into_owned();
    assert!(
        event.contains("\"UpdateValue\"") && event.contains("\"ABORTED\""),
        "{event}"
    );
    vault
        .store()
        .lose_races
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let head = vault.store().audit_head();

    vault
        .store()
        .fail
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let purpose = grants.allow_purpose("test".parse().unwrap()).unwrap();
    let revealed = vault
        .detokenize(
            std::slice::from_ref(&token),
            purpose.purpose(),
            |ft| grants.permit_reveal(&purpose, ft, false),
            &ctx("Detokenize", 1),
        )
        .await;
    assert!(
        matches!(revealed, Err(Error::AuditUnavailable(_))),
        "{revealed:?}"
    );
    let stored = vault
        .tokenize(
            vec![new_value("lost@example.com")],
            |ft| grants.permit_field(act::Lookup, ft),
            &ctx("Tokenize", 1),
            None,
        )
        .await;
    assert!(
        matches!(stored, Err(Error::AuditUnavailable(_))),
        "{stored:?}"
    );
    assert_eq!(vault.store().audit_head(), head, "no event was chained");

    // Writes resume when storage does, and nothing of the failed tokenize
    // was stored: the only record is the first one.
    vault
        .store()
        .fail
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let revealed = vault
        .detokenize(
            std::slice::from_ref(&token),
            purpose.purpose(),
            |ft| grants.permit_reveal(&purpose, ft, false),
            &ctx("Detokenize", 1),
        )
        .await
        .unwrap();
    assert_eq!(
        revealed[0].as_ref().unwrap().value.expose(),
        "kept@example.com"
    );
    let records = vault
        .store()
        .inner
        .scan_prefix(store::Table::Records, Vec::new())
        .await
        .unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(vault.store().audit_head().seq, head.seq + 1);
}

/// A fixture whose clock the test moves.
pub(super) async fn fixture_with_clock() -> (Fixture, std::sync::Arc<std::sync::atomic::AtomicU64>)
{
    let time = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1_000_000));
    let mut f = fixture().await;
    let clock = std::sync::Arc::clone(&time);
    let vault = std::mem::replace(&mut f.vault, placeholder_vault().await);
    f.vault = vault.with_clock(std::sync::Arc::new(move || {
        clock.load(std::sync::atomic::Ordering::SeqCst)
    }));
    (f, time)
}

pub(super) async fn placeholder_vault() -> Vault<RocksStore> {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.key");
    MasterKey::create_file(&key).unwrap();
    let store = RocksStore::open(&dir.path().join("data"), &StoreOptions::default()).unwrap();
    Vault::open(
        store,
        &MasterKey::load(&key).unwrap(),
        FieldRegistry::default(),
    )
    .await
    .unwrap()
}

impl Fixture {
    pub(super) async fn tokenize_for(
        &self,
        subject: &str,
        items: &[(&str, &str, Option<u64>)],
    ) -> Vec<Token> {
        self.try_tokenize_for(subject, items)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect()
    }

    async fn try_tokenize_for(
        &self,
        subject: &str,
        items: &[(&str, &str, Option<u64>)],
    ) -> Vec<Result<Token, ItemError>> {
        let grants = self.policy.grants(&self.client);
        let permits = items
            .iter()
            .map(|(ft, v, ttl)| {
                grants
                    .permit_tokenize(NewValue {
                        field_type: ft.parse().unwrap(),
                        value: SecretValue::new((*v).to_owned()),
                        subject: Some(subject.parse().unwrap()),
                        ttl_seconds: *ttl,
                    })
                    .unwrap()
            })
            .collect();
        self.vault
            .tokenize(
                permits,
                |ft| grants.permit_field(act::Lookup, ft),
                &ctx("Tokenize", items.len()),
                None,
            )
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn a_subject_cannot_grow_past_its_limit() {
    let mut f = fixture().await;
    let vault = std::mem::replace(&mut f.vault, placeholder_vault().await);
    f.vault = vault.with_subject_limit(3);
    f.tokenize_for(
        "cust-big",
        &[
            ("email", "a@example.com", None),
            ("email", "b@example.com", None),
        ],
    )
    .await;
    // Two held and two more asked for: neither is stored.
    let refused = f
        .try_tokenize_for(
            "cust-big",
            &[
                ("email", "c@example.com", None),
                ("email", "d@example.com", None),
            ],
        )
        .await;
    assert!(
        refused
            .iter()
            .all(|r| matches!(r, Err(ItemError::SubjectFull(3)))),
        "{refused:?}"
    );
    // One more fits; after it, nothing does.
    f.tokenize_for("cust-big", &[("email", "c@example.com", None)])
        .await;
    let full = f
        .try_tokenize_for("cust-big", &[("email", "e@example.com", None)])
        .await;
    assert!(
        matches!(full[0], Err(ItemError::SubjectFull(3))),
        "{full:?}"
    );
    // Other subjects, and values without a subject, are not affected.
    f.tokenize_for("cust-small", &[("email", "a@example.com", None)])
        .await;
    assert!(f.tokenize(&[("email", "free@example.com")]).await[0].is_ok());
}

#[tokio::test]
async fn erasing_a_subject_leaves_others_and_is_idempotent() {
    let f = fixture().await;
    let ada = f
        .tokenize_for(
            "cust-ada",
            &[
                ("email", "ada@example.com", Some(3600)),
                ("customer_email", "ada@example.com", None),
            ],
        )
        .await;
    let bob = f
        .tokenize_for(
            "cust-bob",
            &[
                ("email", "bob@example.com", None),
                ("customer_email", "ada@example.com", None),
            ],
        )
        .await;
    // Deterministic tokens are per subject.
    assert_ne!(ada[1], bob[1]);
    let grants = f.policy.grants(&f.client);
    let erase =
        |id: &str| grants.permit_global(act::SubjectErase, id.parse::<SubjectId>().unwrap());
    // The fixture policy lacks subject:erase: permits are refused.
    assert!(erase("cust-ada").is_err());
    let policy = Policy::new(vec![Rule::new(
        IdentityPattern::new("spiffe://*").unwrap(),
        vec!["subject:erase".parse().unwrap()],
        PurposeSet::Any,
    )]);
    let grants = policy.grants(&f.client);
    let permit = || {
        grants
            .permit_global(act::SubjectErase, "cust-ada".parse::<SubjectId>().unwrap())
            .unwrap()
    };
    let receipt = f
        .vault
        .erase_subject(permit(), &ctx("EraseSubject", 1), None)
        .await
        .unwrap();
    assert_eq!(receipt.tokens_erased, 2);
    let expiring = f
        .vault
        .store()
        .scan_prefix(store::Table::Expiry, Vec::new())
        .await
        .unwrap();
    assert!(expiring.is_empty(), "the expiry entry went with the record");
    assert!(
        f.reveal(&ada, false)
            .await
            .iter()
            .all(|r| matches!(r, Err(ItemError::NotFound)))
    );
    assert!(f.reveal(&bob, false).await.iter().all(Result::is_ok));
    let again = f
        .vault
        .erase_subject(permit(), &ctx("EraseSubject", 1), None)
        .await
        .unwrap();
    assert_eq!(
        (again.tokens_erased, again.subject_hash),
        (0, receipt.subject_hash)
    );
    // A new tokenize of the erased value makes a new token.
    let fresh = f
        .tokenize_for("cust-ada", &[("customer_email", "ada@example.com", None)])
        .await;
    assert_ne!(fresh[0], ada[1]);
}

#[tokio::test]
async fn pruned_audit_trails_stay_verifiable_from_the_kept_checkpoint() {
    let (f, time) = fixture_with_clock().await;
    let day = 86_400_000;
    for _ in 0..3 {
        f.tokenize(&[("email", "old@example.com")]).await;
    }
    assert_eq!(f.vault.checkpoint_audit().await.unwrap(), Some(3));
    time.fetch_add(10 * day, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..2 {
        f.tokenize(&[("email", "new@example.com")]).await;
    }
    assert_eq!(f.vault.checkpoint_audit().await.unwrap(), Some(5));
    // Seven days of retention: events up to the old checkpoint go, the
    // checkpoint stays as the anchor, the newer events stay.
    let pruned = f
        .vault
        .prune_audit(std::time::Duration::from_secs(7 * 86_400))
        .await
        .unwrap();
    assert_eq!(pruned, 3);
    let store = RocksStore::open_read_only(f.vault.store().path()).unwrap();
    let report = crate::audit::verify(&store, &f.vault.audit_public_key(), 1).unwrap();
    assert_eq!(
        (report.first_seq, report.last_seq, report.checkpoints),
        (4, 5, 1)
    );
    // Nothing newer than the last checkpoint is ever pruned.
    time.fetch_add(30 * day, std::sync::atomic::Ordering::SeqCst);
    f.tokenize(&[("email", "newest@example.com")]).await;
    // The newest event (6) is after the last checkpoint (5): pruning stops
    // at 5 and keeps its checkpoint.
    assert_eq!(
        f.vault
            .prune_audit(std::time::Duration::from_secs(86_400))
            .await
            .unwrap(),
        2
    );
    drop(store);
    let store = RocksStore::open_read_only(f.vault.store().path()).unwrap();
    let report = crate::audit::verify(&store, &f.vault.audit_public_key(), 1).unwrap();
    assert_eq!(
        (report.first_seq, report.last_seq, report.unsigned_tail),
        (6, 6, 1)
    );
    drop(store);

    // Without the signed prune marker, missing head events are a deletion,
    // not pruning.
    let mut batch = store::Batch::new();
    batch.unit().delete(
        store::Table::Meta,
        crate::layout::AUDIT_PRUNE_MARKER.to_vec(),
    );
    f.vault.store().commit(batch).await.unwrap();
    let store = RocksStore::open_read_only(f.vault.store().path()).unwrap();
    assert!(
        crate::audit::verify(&store, &f.vault.audit_public_key(), 1).is_err(),
        "head events deleted without a prune marker passed verification"
    );
}

/// The events of `f`'s trail from 1 as the Audit service streams them,
/// checked as `audit verify --addr` checks them.
async fn verify_streamed(f: &Fixture) -> Result<crate::audit::VerifyReport, String> {
    let policy = Policy::new(vec![Rule::new(
        IdentityPattern::new("spiffe://*").unwrap(),
        vec!["audit:read".parse().unwrap()],
        PurposeSet::Any,
    )]);
    let permit = policy
        .grants(&f.client)
        .permit_global(
            act::AuditRead,
            EventsQuery {
                from_seq: 1,
                identity: None,
                limit: 100,
            },
        )
        .unwrap();
    let events = f
        .vault
        .audit_events(permit, &ctx("StreamEvents", 1))
        .await
        .unwrap();
    let mut verifier = crate::audit::StreamVerifier::new(f.vault.audit_public_key(), 1);
    for event in &events {
        verifier
            .event(crate::audit::StreamedEvent {
                seq: event.seq,
                prev: event.prev.unwrap(),
                payload: event.json.as_bytes(),
                hash: event.hash,
                checkpoint: event
                    .checkpoint
                    .as_ref()
                    .map(|cp| (cp.time_ms, cp.signature)),
                pruned: event.pruned.clone(),
                newest_checkpoint: event.newest_checkpoint.clone(),
            })
            .map_err(|e| e.to_string())?;
    }
    verifier.finish().map_err(|e| e.to_string())
}

/// A pruned trail streamed from event 1 starts after the prune marker,
/// which comes with the first event and links to it; without the marker,
/// the missing events are a deletion, as offline.
#[tokio::test]
async fn a_pruned_trail_verifies_as_streamed_only_with_its_marker() {
    let (f, time) = fixture_with_clock().await;
    for _ in 0..3 {
        f.tokenize(&[("email", "old@example.com")]).await;
    }
    assert_eq!(f.vault.checkpoint_audit().await.unwrap(), Some(3));
    time.fetch_add(10 * 86_400_000, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..2 {
        f.tokenize(&[("email", "new@example.com")]).await;
    }
    assert_eq!(f.vault.checkpoint_audit().await.unwrap(), Some(5));
    let report = verify_streamed(&f).await.unwrap();
    assert_eq!(
        (report.first_seq, report.last_seq, report.checkpoints),
        (1, 5, 2)
    );
    f.vault
        .prune_audit(std::time::Duration::from_secs(7 * 86_400))
        .await
        .unwrap();
    // The read above is event 6.
    let report = verify_streamed(&f).await.unwrap();
    assert_eq!(
        (
            report.first_seq,
            report.last_seq,
            report.checkpoints,
            report.unsigned_tail
        ),
        (4, 6, 1, 1)
    );
    let mut batch = store::Batch::new();
    batch.unit().delete(
        store::Table::Meta,
        crate::layout::AUDIT_PRUNE_MARKER.to_vec(),
    );
    f.vault.store().commit(batch).await.unwrap();
    let refused = verify_streamed(&f).await.unwrap_err();
    assert!(refused.contains("no signed prune marker"), "{refused}");
}

#[tokio::test]
async fn a_callers_ttl_never_outlives_the_field_types_retention() {
    let (f, time) = fixture_with_clock().await;
    let day = 86_400_000;
    // short_lived keeps values for one day; the caller asks for ten.
    let token = f
        .tokenize_for(
            "cust-ttl",
            &[("short_lived", "ttl@example.com", Some(10 * 86_400))],
        )
        .await
        .remove(0);
    time.fetch_add(day - 1, std::sync::atomic::Ordering::SeqCst);
    assert!(f.reveal(std::slice::from_ref(&token), false).await[0].is_ok());
    time.fetch_add(2, std::sync::atomic::Ordering::SeqCst);
    assert!(
        matches!(
            f.reveal(std::slice::from_ref(&token), false).await[0],
            Err(ItemError::NotFound)
        ),
        "the value outlived its field type's retention"
    );
}

pub(super) async fn tokenize_all<S: store::Store>(
    vault: &Vault<S>,
    grants: &crate::authz::Grants<'_>,
    values: &[String],
) -> Vec<Token> {
    let permits = values
        .iter()
        .map(|v| {
            grants
                .permit_tokenize(NewValue {
                    field_type: "email".parse().unwrap(),
                    value: SecretValue::new(v.clone()),
                    subject: None,
                    ttl_seconds: None,
                })
                .unwrap()
        })
        .collect();
    vault
        .tokenize(
            permits,
            |ft| grants.permit_field(act::Lookup, ft),
            &ctx("Tokenize", values.len()),
            None,
        )
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

/// Someone who can write the data files relabels a format-preserving card
/// record (whose token does not name its field type) as `text`, or extends
/// its expiry: the value is no longer revealed to anyone.
#[tokio::test]
async fn a_relabelled_or_extended_record_does_not_decrypt() {
    let f = fixture().await;
    let token = f
        .tokenize(&[("card_fpt", "4111 1111 1111 1111")])
        .await
        .remove(0)
        .unwrap();
    let key = token.storage_key().to_vec();
    let stored = f
        .vault
        .store()
        .get_many(store::Table::Records, vec![key.clone()])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let original = Record::decode(&stored).unwrap();
    let tamper = |change: &dyn Fn(&mut Record)| {
        let mut record = original.clone();
        change(&mut record);
        let mut batch = store::Batch::new();
        batch
            .unit()
            .put(store::Table::Records, key.clone(), record.encode());
        batch
    };
    for (what, change) in [
        (
            "field type",
            &(|r: &mut Record| r.field_type = "masked_name".parse().unwrap())
                as &dyn Fn(&mut Record),
        ),
        ("expiry", &|r: &mut Record| {
            r.expires_ms = Some(u64::MAX / 2)
        }),
    ] {
        f.vault.store().commit(tamper(change)).await.unwrap();
        let revealed = f.reveal(std::slice::from_ref(&token), false).await;
        assert!(
            matches!(revealed[0], Err(ItemError::DataLoss)),
            "a record with a changed {what} was revealed: {revealed:?}"
        );
    }
    // The untouched record still decrypts.
    f.vault
        .store()
        .commit(tamper(&|_: &mut Record| {}))
        .await
        .unwrap();
    assert!(f.reveal(std::slice::from_ref(&token), false).await[0].is_ok());
}

/// A format-preserving value whose every drawn token is taken fails after
/// eight draws with `TokenSpaceExhausted` (`RESOURCE_EXHAUSTED` over the
/// API), stores nothing, and the call is still audited.
#[tokio::test]
async fn a_full_format_preserving_space_gives_up_after_eight_draws() {
    let (_dir, vault) = failing_vault().await;
    let policy = Policy::new(vec![Rule::new(
        IdentityPattern::new("spiffe://*").unwrap(),
        vec!["tokenize:*".parse().unwrap()],
        PurposeSet::Any,
    )]);
    let client = ClientId::Spiffe("spiffe://test/x".into());
    let grants = policy.grants(&client);
    let card = grants
        .permit_tokenize(NewValue {
            field_type: "card_fpt".parse().unwrap(),
            value: SecretValue::new("4111 1111 1111 1111".into()),
            subject: None,
            ttl_seconds: None,
        })
        .unwrap();
    vault
        .store()
        .records_all_taken
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let result = vault
        .tokenize(
            vec![card],
            |ft| grants.permit_field(act::Lookup, ft),
            &ctx("Tokenize", 1),
            None,
        )
        .await
        .unwrap()
        .remove(0);
    assert!(
        matches!(result, Err(ItemError::TokenSpaceExhausted(ref ft)) if ft.as_str() == "card_fpt"),
        "{result:?}"
    );
    assert_eq!(
        vault
            .store()
            .taken_reads
            .load(std::sync::atomic::Ordering::SeqCst),
        8,
        "one read per draw, eight draws"
    );
    vault
        .store()
        .records_all_taken
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(vault.store().estimated_len(store::Table::Records).await, 0);
    assert_eq!(vault.store().audit_head().seq, 1, "the call is audited");
}

/// Processes that share a store and open it together for the first time
/// (replicas starting at once on an empty database) agree on every key:
/// the first to store one wins and the others use it. Here the second
/// process looked for keys just before the first stored them.
#[tokio::test]
async fn a_keyring_that_lost_the_race_to_create_its_keys_uses_the_winners() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.key");
    MasterKey::create_file(&key).unwrap();
    let master = MasterKey::load(&key).unwrap();
    let store = FailingStore::new(
        RocksStore::open(&dir.path().join("data"), &StoreOptions::default()).unwrap(),
    );
    let first = super::Keyring::open(&store.inner, &master).await.unwrap();
    store
        .keys_look_empty
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let second = super::Keyring::open(&store, &master).await.unwrap();
    store
        .keys_look_empty
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let reopened = super::Keyring::open(&store.inner, &master).await.unwrap();
    let (version, first_key) = first.active();
    let sealed = first_key.seal(b"agreed", b"aad").unwrap();
    for other in [&second, &reopened] {
        let opened = other
            .data_key(version)
            .unwrap()
            .open(&sealed.nonce, &sealed.ciphertext, b"aad")
            .expect("another data key");
        assert_eq!(opened.as_slice(), b"agreed");
        assert_eq!(
            first.subject_key().hash(b"d", b"x"),
            other.subject_key().hash(b"d", b"x")
        );
        assert_eq!(
            first.audit_signer().public_key(),
            other.audit_signer().public_key()
        );
    }
}

/// A data-key rotation through another process that lands between a
/// master-key rotation's read of the keys and its write (its new key
/// wrapped under the old master key, which the re-wrap did not see): the
/// master-key rotation changes nothing, and once retried it re-wraps that
/// key too, so the vault opens under the new master key with every data
/// key.
#[tokio::test]
async fn a_key_added_while_the_master_key_rotates_is_not_left_under_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let old_file = dir.path().join("master.key");
    let new_file = dir.path().join("master-2.key");
    MasterKey::create_file(&old_file).unwrap();
    MasterKey::create_file(&new_file).unwrap();
    let old = MasterKey::load(&old_file).unwrap();
    let store = FailingStore::new(
        RocksStore::open(&dir.path().join("data"), &StoreOptions::default()).unwrap(),
    );
    let here = super::Keyring::open(&store, &old).await.unwrap();
    let there = super::Keyring::open(&store, &old).await.unwrap();
    // What a RotateKeys through the other process commits (store_rotation).
    let (new_key, _) = there.new_data_key().unwrap();
    assert_eq!(new_key.version, 2);
    let mut rotation = store::Batch::new();
    let unit = rotation.unit();
    new_key.store(unit);
    there.guard_master(unit);
    *store.slip_in.lock().unwrap() = Some(rotation);

    let raced = here
        .rotate_master(&store, MasterKey::load(&new_file).unwrap())
        .await;
    assert!(matches!(raced, Err(Error::Conflict(_))), "{raced:?}");
    // Nothing changed: the old master key still opens every key.
    let reopened = super::Keyring::open(&store.inner, &old).await.unwrap();
    assert_eq!(reopened.versions(), [1, 2]);

    let count = here
        .rotate_master(&store, MasterKey::load(&new_file).unwrap())
        .await
        .unwrap();
    assert!(count > 0);
    let under_new = super::Keyring::open(&store.inner, &MasterKey::load(&new_file).unwrap())
        .await
        .expect("every key unwraps under the new master key");
    assert_eq!(under_new.versions(), [1, 2]);
}

/// A data-key rotation through another process sharing the store lands
/// while this process's re-encryption job runs (here: between the job's
/// read of its cursor and its step's write, the cursor at the start, so
/// the cursor alone looks unchanged): the job does not finish on the key
/// it knew, but loads the new one and ends with every record under it.
#[tokio::test]
async fn a_key_rotated_through_another_process_during_a_job_is_where_the_job_ends() {
    let (dir, vault) = failing_vault().await;
    let policy = Policy::new(vec![Rule::new(
        IdentityPattern::new("spiffe://*").unwrap(),
        vec!["tokenize:*".parse().unwrap(), "admin:keys".parse().unwrap()],
        PurposeSet::Any,
    )]);
    let client = ClientId::Spiffe("spiffe://test/x".into());
    let grants = policy.grants(&client);
    let values: Vec<String> = (0..5).map(|i| format!("job{i}@example.com")).collect();
    tokenize_all(&vault, &grants, &values).await;
    let rotated = vault
        .rotate_data_key(
            grants.permit_global(act::AdminKeys, ()).unwrap(),
            &ctx("RotateKeys", 1),
        )
        .await
        .unwrap();
    assert_eq!(rotated, 2);

    // The other process's RotateKeys, as store_rotation writes it.
    let master = MasterKey::load(&dir.path().join("master.key")).unwrap();
    let there = super::Keyring::open(vault.store(), &master).await.unwrap();
    let (newer, _) = there.new_data_key().unwrap();
    assert_eq!(newer.version, 3);
    let mut rotation = store::Batch::new();
    let unit = rotation.unit();
    newer.store(unit);
    there.guard_master(unit);
    vault.start_job(unit, Job::Reencrypt, 0);
    *vault.store().slip_in.lock().unwrap() = Some(rotation);

    let mut steps = 0;
    while !vault.job_step(Job::Reencrypt, 100).await.unwrap().finished {
        steps += 1;
        assert!(steps < 10, "the job never finished");
    }
    let mut versions = Vec::new();
    for (_, bytes) in vault
        .store()
        .scan_from(store::Table::Records, Vec::new(), 100)
        .await
        .unwrap()
    {
        versions.push(Record::decode(&bytes).unwrap().key_version);
    }
    assert_eq!(versions, vec![crate::layout::KeyVersion::Vault(3); 5]);
}
