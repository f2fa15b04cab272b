//! Key rotation and its background jobs, against a real RocksDB that is
//! closed and reopened in the middle.

use std::path::PathBuf;

use super::tests::{FIELDS, ctx, tokenize_all};
use super::*;
use crate::layout::KeyVersion;
use crate::{
    authz::{Grants, IdentityPattern, Policy, PurposeSet, Rule, act},
    fields::RawFieldType,
    identity::ClientId,
    store::{RocksStore, StoreOptions, Table},
    token::Token,
};

/// A vault directory that tests open, close and reopen.
struct Rig {
    _dir: tempfile::TempDir,
    key: PathBuf,
    data: PathBuf,
    policy: Policy,
    client: ClientId,
}

impl Rig {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("master.key");
        MasterKey::create_file(&key).unwrap();
        let data = dir.path().join("data");
        let policy = Policy::new(vec![Rule::new(
            IdentityPattern::new("spiffe://*").unwrap(),
            vec![
                "tokenize:*".parse().unwrap(),
                "detokenize:*".parse().unwrap(),
                "lookup:*".parse().unwrap(),
                "update:*".parse().unwrap(),
                "admin:keys".parse().unwrap(),
            ],
            PurposeSet::Any,
        )]);
        Self {
            _dir: dir,
            key,
            data,
            policy,
            client: ClientId::Spiffe("spiffe://test/x".into()),
        }
    }

    async fn open(&self) -> Vault<RocksStore> {
        let store = RocksStore::open(&self.data, &StoreOptions::default()).unwrap();
        let raw: std::collections::BTreeMap<String, RawFieldType> = toml::from_str(FIELDS).unwrap();
        Vault::open(
            store,
            &MasterKey::load(&self.key).unwrap(),
            FieldRegistry::from_raw(&raw, 4096).unwrap(),
        )
        .await
        .unwrap()
    }

    fn grants(&self) -> Grants<'_> {
        self.policy.grants(&self.client)
    }

    fn keys_permit<T>(&self, item: T) -> crate::authz::Permit<act::AdminKeys, T> {
        self.grants().permit_global(act::AdminKeys, item).unwrap()
    }
}

/// Each of `tokens` revealed in plain through `vault`, for the purpose
/// `test`.
async fn reveal_all<S: crate::store::Store>(
    vault: &Vault<S>,
    grants: &Grants<'_>,
    tokens: &[Token],
) -> Vec<Result<Revealed, ItemError>> {
    let purpose = grants.allow_purpose("test".parse().unwrap()).unwrap();
    vault
        .detokenize(
            tokens,
            purpose.purpose(),
            |ft| grants.permit_reveal(&purpose, ft, false),
            &ctx("Detokenize", tokens.len()),
        )
        .await
        .unwrap()
}

/// Deterministic values, half of them for a data subject (so under the
/// subject's own key).
fn customer_values(n: usize) -> Vec<(String, Option<&'static str>)> {
    (0..n)
        .map(|i| {
            let subject = (i % 2 == 0).then_some("cust-7");
            (format!("idx{i}@example.com"), subject)
        })
        .collect()
}

async fn tokenize_customers(
    vault: &Vault<RocksStore>,
    rig: &Rig,
    values: &[(String, Option<&'static str>)],
) -> Vec<Token> {
    let permits = values
        .iter()
        .map(|(v, subject)| {
            rig.grants()
                .permit_tokenize(NewValue {
                    field_type: "customer_email".parse().unwrap(),
                    value: SecretValue::new(v.clone()),
                    subject: subject.map(|s| s.parse().unwrap()),
                    ttl_seconds: None,
                })
                .unwrap()
        })
        .collect();
    vault
        .tokenize(
            permits,
            |ft| rig.grants().permit_field(act::Lookup, ft),
            &ctx("Tokenize", values.len()),
            None,
        )
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

async fn lookup_customers(
    vault: &Vault<RocksStore>,
    rig: &Rig,
    values: &[(String, Option<&'static str>)],
) -> Vec<Result<Token, ItemError>> {
    let permits = values
        .iter()
        .map(|(v, subject)| {
            rig.grants()
                .permit_lookup(LookupValue {
                    field_type: "customer_email".parse().unwrap(),
                    value: SecretValue::new(v.clone()),
                    subject: subject.map(|s| s.parse().unwrap()),
                })
                .unwrap()
        })
        .collect();
    vault
        .lookup(permits, &ctx("LookupTokens", values.len()))
        .await
        .unwrap()
}

async fn index_entries(vault: &Vault<RocksStore>) -> usize {
    vault
        .store()
        .scan_from(Table::Index, Vec::new(), 100_000)
        .await
        .unwrap()
        .len()
}

async fn index_key_labels(vault: &Vault<RocksStore>) -> Vec<String> {
    vault
        .store()
        .scan_prefix(Table::Keys, b"index-hash/".to_vec())
        .await
        .unwrap()
        .into_iter()
        .map(|(label, _)| String::from_utf8(label).unwrap())
        .collect()
}

#[tokio::test]
async fn index_rotation_keeps_lookups_working_and_retires_the_old_key() {
    let rig = Rig::new();
    let values = customer_values(30);
    let vault = rig.open().await;
    let tokens = tokenize_customers(&vault, &rig, &values).await;
    assert_eq!(index_entries(&vault).await, 30);
    assert_eq!(
        vault
            .rotate_index_key(rig.keys_permit(()), &ctx("RotateIndexKey", 1))
            .await
            .unwrap(),
        2
    );

    // Before the job has moved anything: lookups find every value, and
    // tokenizing one again gives its existing token, not a second one.
    let found: Vec<Token> = lookup_customers(&vault, &rig, &values)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(found, tokens);
    assert_eq!(
        tokenize_customers(&vault, &rig, &values[..4]).await,
        tokens[..4]
    );
    // A new value is indexed under the new key and found at once.
    let fresh = vec![("fresh@example.com".to_owned(), None)];
    let fresh_token = tokenize_customers(&vault, &rig, &fresh).await;
    assert_eq!(
        lookup_customers(&vault, &rig, &fresh).await[0]
            .as_ref()
            .unwrap(),
        &fresh_token[0]
    );
    // Rectifying an old value moves its entry: the new value is found, the
    // old one no longer is.
    let corrected = vec![("corrected@example.com".to_owned(), None)];
    let changed = vault
        .update_value(
            &tokens[1],
            SecretValue::new(corrected[0].0.clone()),
            |ft| rig.grants().permit_field(act::Update, ft),
            &ctx("UpdateValue", 1),
            None,
        )
        .await
        .unwrap();
    assert!(changed.is_ok(), "{changed:?}");
    assert_eq!(
        lookup_customers(&vault, &rig, &corrected).await[0]
            .as_ref()
            .unwrap(),
        &tokens[1]
    );
    assert_eq!(
        lookup_customers(&vault, &rig, &values[1..2]).await[0],
        Err(ItemError::NotFound)
    );

    // Part of the job, a restart, lookups in between, the rest.
    let step = vault.job_step(Job::Reindex, 8).await.unwrap();
    assert!(step.ran && !step.finished && step.moved > 0, "{step:?}");
    drop(vault);
    let vault = rig.open().await;
    let status = vault.job_status(Job::Reindex).await.unwrap();
    assert!(status.pending && status.done == 8, "{status:?}");
    let mut want: Vec<Result<Token, ItemError>> = tokens.iter().cloned().map(Ok).collect();
    want[1] = Err(ItemError::NotFound);
    assert_eq!(lookup_customers(&vault, &rig, &values).await, want);
    while !vault.job_step(Job::Reindex, 8).await.unwrap().finished {}

    // Done: one index key left, one entry per value, every lookup as before.
    assert_eq!(index_key_labels(&vault).await, ["index-hash/0000000002"]);
    assert!(vault.keyring.index_keys().older.is_empty());
    assert_eq!(index_entries(&vault).await, 31);
    assert_eq!(lookup_customers(&vault, &rig, &values).await, want);
    assert!(!vault.job_status(Job::Reindex).await.unwrap().pending);
    drop(vault);
    let vault = rig.open().await;
    assert_eq!(lookup_customers(&vault, &rig, &values).await, want);
    assert_eq!(
        tokenize_customers(&vault, &rig, &values[2..]).await,
        tokens[2..]
    );
}

#[tokio::test]
async fn a_held_job_keeps_its_place_across_restarts_until_released() {
    let rig = Rig::new();
    let values: Vec<String> = (0..12).map(|i| format!("held{i}@example.com")).collect();
    let vault = rig.open().await;
    tokenize_all(&vault, &rig.grants(), &values).await;
    // Held before the rotation: the job it starts waits.
    let status = vault
        .set_job_paused(
            rig.keys_permit(JobHold {
                job: Job::Reencrypt,
                paused: true,
            }),
            &ctx("SetJobPaused", 1),
        )
        .await
        .unwrap();
    assert!(status.paused && !status.pending);
    vault
        .rotate_data_key(rig.keys_permit(()), &ctx("RotateKeys", 1))
        .await
        .unwrap();
    let step = vault.job_step(Job::Reencrypt, 5).await.unwrap();
    assert!(step.paused && !step.ran && step.moved == 0, "{step:?}");
    drop(vault);

    let vault = rig.open().await;
    let status = vault.job_status(Job::Reencrypt).await.unwrap();
    assert!(
        status.paused && status.pending && status.done == 0,
        "{status:?}"
    );
    assert!(vault.job_step(Job::Reencrypt, 5).await.unwrap().paused);
    assert_eq!(
        vault.key_usage().await.unwrap(),
        vec![(KeyVersion::Vault(1), 12), (KeyVersion::Vault(2), 0)]
    );
    vault
        .set_job_paused(
            rig.keys_permit(JobHold {
                job: Job::Reencrypt,
                paused: false,
            }),
            &ctx("SetJobPaused", 1),
        )
        .await
        .unwrap();
    while !vault.job_step(Job::Reencrypt, 5).await.unwrap().finished {}
    assert_eq!(
        vault.key_usage().await.unwrap(),
        vec![(KeyVersion::Vault(1), 0), (KeyVersion::Vault(2), 12)]
    );
}

#[tokio::test]
async fn a_rotation_during_a_pass_restarts_it_so_no_record_is_left_behind() {
    let rig = Rig::new();
    let values: Vec<String> = (0..20).map(|i| format!("pass{i}@example.com")).collect();
    let vault = rig.open().await;
    tokenize_all(&vault, &rig.grants(), &values).await;
    let rotate = async || {
        vault
            .rotate_data_key(rig.keys_permit(()), &ctx("RotateKeys", 1))
            .await
            .unwrap()
    };
    assert_eq!(rotate().await, 2);
    let step = vault.job_step(Job::Reencrypt, 15).await.unwrap();
    assert_eq!(step.moved, 15);
    // The first 15 records are on version 2, not 3: the new pass must
    // start over rather than go on from record 16.
    assert_eq!(rotate().await, 3);
    assert_eq!(vault.job_status(Job::Reencrypt).await.unwrap().done, 0);
    while !vault.job_step(Job::Reencrypt, 15).await.unwrap().finished {}
    assert_eq!(
        vault.key_usage().await.unwrap(),
        vec![
            (KeyVersion::Vault(1), 0),
            (KeyVersion::Vault(2), 0),
            (KeyVersion::Vault(3), 20)
        ]
    );
}

#[tokio::test]
async fn rotation_reencrypts_in_the_background_and_resumes_after_a_restart() {
    let rig = Rig::new();
    let grants = rig.grants();
    let values: Vec<String> = (0..30).map(|i| format!("rot{i}@example.com")).collect();
    let vault = rig.open().await;
    let tokens = tokenize_all(&vault, &grants, &values).await;
    assert_eq!(
        vault
            .rotate_data_key(rig.keys_permit(()), &ctx("RotateKeys", 1))
            .await
            .unwrap(),
        2
    );
    // New writes use version 2 at once.
    let fresh = tokenize_all(&vault, &grants, &["new@example.com".to_owned()]).await;
    let step = vault.job_step(Job::Reencrypt, 10).await.unwrap();
    assert!(!step.finished && step.moved > 0);
    drop(vault);

    // After a restart the job resumes where it stopped.
    let vault = rig.open().await;
    let usage = vault.key_usage().await.unwrap();
    assert!(
        usage.contains(&(KeyVersion::Vault(2), 1 + step.moved)),
        "{usage:?}"
    );
    while !vault.job_step(Job::Reencrypt, 7).await.unwrap().finished {}
    assert_eq!(
        vault.key_usage().await.unwrap(),
        vec![(KeyVersion::Vault(1), 0), (KeyVersion::Vault(2), 31)]
    );
    let all: Vec<Token> = tokens.into_iter().chain(fresh).collect();
    let got: Vec<String> = reveal_all(&vault, &grants, &all)
        .await
        .into_iter()
        .map(|r| r.unwrap().value.expose().to_owned())
        .collect();
    let mut want = values.clone();
    want.push("new@example.com".into());
    assert_eq!(got, want);
    // Nothing left to do.
    let step = vault.job_step(Job::Reencrypt, 10).await.unwrap();
    assert!(step.finished && !step.ran);
}

/// Re-encryption and rectification race on the same records, many rounds:
/// the job's compare-and-set must never write an old value back over an
/// update (a broken guard would silently revert the rectification).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reencryption_never_reverts_a_concurrent_update() {
    let rig = Rig::new();
    let grants = rig.grants();
    let vault = std::sync::Arc::new(rig.open().await);
    let values: Vec<String> = (0..40).map(|i| format!("old{i}@example.com")).collect();
    let tokens = tokenize_all(&vault, &grants, &values).await;
    let purpose = grants.allow_purpose("test".parse().unwrap()).unwrap();
    for round in 0..15 {
        vault
            .rotate_data_key(rig.keys_permit(()), &ctx("RotateKeys", 1))
            .await
            .unwrap();
        let job = {
            let vault = std::sync::Arc::clone(&vault);
            tokio::spawn(async move {
                // Small pages so the job interleaves with the updates.
                while !vault.job_step(Job::Reencrypt, 3).await.unwrap().finished {}
            })
        };
        for (i, token) in tokens.iter().enumerate() {
            let updated = vault
                .update_value(
                    token,
                    SecretValue::new(format!("r{round}.{i}@example.com")),
                    |ft| grants.permit_field(act::Update, ft),
                    &ctx("UpdateValue", 1),
                    None,
                )
                .await
                .unwrap();
            assert!(updated.is_ok(), "{updated:?}");
        }
        job.await.unwrap();
        let revealed = vault
            .detokenize(
                &tokens,
                purpose.purpose(),
                |ft| grants.permit_reveal(&purpose, ft, false),
                &ctx("Detokenize", tokens.len()),
            )
            .await
            .unwrap();
        for (i, r) in revealed.into_iter().enumerate() {
            assert_eq!(
                r.unwrap().value.expose(),
                format!("r{round}.{i}@example.com"),
                "round {round}: an update was reverted"
            );
        }
    }
}

/// Two replicas on one PostgreSQL database: a data-key rotation through
/// one (B) while the other (A) is part-way through the re-encryption job
/// that an earlier rotation started. A's next step finds the newer key
/// (it guards the next key label), loads it and goes on; when the job
/// finishes, every record is under the newest key, and none was moved to
/// the key B's rotation replaced (issue 32: rotations and job steps take
/// turns across replicas, not only within one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_through_one_replica_during_the_others_reencryption_leaves_no_record_behind() {
    let cluster = crate::store::postgres::cluster::ThrowawayCluster::start();
    cluster.create_database("vault").await;
    let rig = Rig::new();
    let open = || async {
        let store = crate::store::PgStore::connect(&cluster.conninfo("vault"))
            .await
            .unwrap();
        let raw: std::collections::BTreeMap<String, RawFieldType> = toml::from_str(FIELDS).unwrap();
        Vault::open(
            store,
            &MasterKey::load(&rig.key).unwrap(),
            FieldRegistry::from_raw(&raw, 4096).unwrap(),
        )
        .await
        .unwrap()
    };
    let a = open().await;
    let b = open().await;
    let values: Vec<String> = (0..30).map(|i| format!("turns{i}@example.com")).collect();
    let tokens = tokenize_all(&a, &rig.grants(), &values).await;

    let first = a
        .rotate_data_key(rig.keys_permit(()), &ctx("RotateKeys", 1))
        .await
        .unwrap();
    let step = a.job_step(Job::Reencrypt, 10).await.unwrap();
    assert!(step.moved > 0 && !step.finished, "{step:?}");
    // B rotates while A's job is part-way. B has not loaded A's key yet:
    // its first try finds the version taken and is refused, having loaded
    // it; the retry makes the next one.
    let refused = b
        .rotate_data_key(rig.keys_permit(()), &ctx("RotateKeys", 1))
        .await;
    assert!(matches!(refused, Err(Error::Conflict(_))), "{refused:?}");
    let newest = b
        .rotate_data_key(rig.keys_permit(()), &ctx("RotateKeys", 1))
        .await
        .unwrap();
    assert!(newest > first);
    let mut finished = false;
    for _ in 0..20 {
        if a.job_step(Job::Reencrypt, 10).await.unwrap().finished {
            finished = true;
            break;
        }
    }
    assert!(finished, "the job never finished");
    let usage = a.key_usage().await.unwrap();
    let under = |version: KeyVersion| {
        usage
            .iter()
            .find(|(v, _)| *v == version)
            .map_or(0, |(_, n)| *n)
    };
    assert_eq!(under(KeyVersion::Vault(newest)), 30, "{usage:?}");
    assert_eq!(under(KeyVersion::Vault(first)), 0, "{usage:?}");
    // Every value still reads, through either replica.
    for vault in [&a, &b] {
        let read = reveal_all(vault, &rig.grants(), &tokens).await;
        assert!(read.iter().all(Result::is_ok), "{read:?}");
    }
}
