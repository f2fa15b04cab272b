//! Expiry seen from every side: reveal, tokenize, lookup and the sweeper,
//! against a real RocksDB with a clock the test moves.

use std::sync::{Arc, atomic::Ordering};

use super::tests::{Fixture, ctx, fixture_with_clock};
use super::*;
use crate::{
    authz::{IdentityPattern, Policy, PurposeSet, Rule, act},
    store::{Batch, Table},
    token::Token,
};

const SUBJECT: &str = "cust-1";
const VALUE: &str = "ada@example.com";
const MINUTE_MS: u64 = 60_000;

impl Fixture {
    /// Tokenizes `VALUE` as the deterministic `customer_email` of `SUBJECT`,
    /// expiring after a minute.
    async fn tokenize_expiring(&self) -> Token {
        self.tokenize_for(SUBJECT, &[("customer_email", VALUE, Some(60))])
            .await
            .remove(0)
    }

    async fn lookup_for_subject(&self) -> Result<Token, ItemError> {
        self.lookup_for(Some(SUBJECT), "customer_email", VALUE)
            .await
    }

    async fn delete(&self, token: &Token) {
        let policy = Policy::new(vec![Rule::new(
            IdentityPattern::new("spiffe://*").unwrap(),
            vec!["delete:*".parse().unwrap()],
            PurposeSet::Any,
        )]);
        let grants = policy.grants(&self.client);
        let results = self
            .vault
            .delete_tokens(
                std::slice::from_ref(token),
                |ft| grants.permit_field(act::Delete, ft),
                &ctx("DeleteTokens", 1),
            )
            .await
            .unwrap();
        assert_eq!(results, vec![Ok(())]);
    }

    /// Points the blind-index entry of the value behind `token` at another
    /// token, as a tokenize that replaced it would have; returns the key.
    async fn repoint_index_entry(&self, token: &Token) -> [u8; 32] {
        let bytes = self
            .vault
            .store()
            .get_many(Table::Records, vec![token.storage_key().to_vec()])
            .await
            .unwrap()
            .remove(0)
            .unwrap();
        let blind = Record::decode(&bytes).unwrap().blind.unwrap();
        let mut batch = Batch::new();
        batch.put(Table::Index, blind.to_vec(), b"tok_newer".to_vec());
        self.vault.store().commit(batch).await.unwrap();
        blind
    }

    async fn stored(&self, table: Table) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.vault
            .store()
            .scan_prefix(table, Vec::new())
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn expired_values_are_not_found_at_once_and_swept_later() {
    let (f, time) = fixture_with_clock().await;
    let tokens = f
        .tokenize_for(
            "cust-1",
            &[
                ("email", "short@example.com", Some(60)),
                ("email", "long@example.com", None),
            ],
        )
        .await;
    assert!(f.reveal(&tokens, false).await.iter().all(Result::is_ok));
    time.fetch_add(MINUTE_MS + 1, Ordering::SeqCst);
    let after = f.reveal(&tokens, false).await;
    assert!(matches!(after[0], Err(ItemError::NotFound)));
    assert_eq!(
        after[1].as_ref().unwrap().value.expose(),
        "long@example.com"
    );
    assert_eq!(f.vault.sweep_expired().await.unwrap(), 1);
    assert_eq!(f.vault.sweep_expired().await.unwrap(), 0);
    assert_eq!(f.stored(Table::Records).await.len(), 1);
}

#[tokio::test]
async fn a_deterministic_value_whose_token_expired_gets_a_new_one() {
    let (f, time) = fixture_with_clock().await;
    let first = f.tokenize_expiring().await;
    assert_eq!(
        f.tokenize_expiring().await,
        first,
        "deterministic while live"
    );
    assert_eq!(f.lookup_for_subject().await, Ok(first.clone()));

    time.fetch_add(MINUTE_MS + 1, Ordering::SeqCst);
    assert_eq!(
        f.lookup_for_subject().await,
        Err(ItemError::NotFound),
        "lookup reports no dead token"
    );
    let second = f.tokenize_expiring().await;
    assert_ne!(second, first, "tokenize must not hand back a dead token");
    let revealed = f.reveal(&[first.clone(), second.clone()], false).await;
    assert!(matches!(revealed[0], Err(ItemError::NotFound)));
    assert_eq!(revealed[1].as_ref().unwrap().value.expose(), VALUE);
    assert_eq!(f.tokenize_expiring().await, second, "deterministic again");
    assert_eq!(f.lookup_for_subject().await, Ok(second.clone()));

    // The dead token is gone with everything that pointed at it, so the
    // sweeper has nothing left and the new token keeps its index entry.
    let records = f.stored(Table::Records).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].0, second.storage_key());
    assert_eq!(f.stored(Table::Index).await.len(), 1);
    assert_eq!(f.stored(Table::SubjectIndex).await.len(), 1);
    assert_eq!(f.vault.sweep_expired().await.unwrap(), 0);
    assert_eq!(f.tokenize_expiring().await, second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tokenizes_of_an_expired_value_agree_on_one_new_token() {
    let (f, time) = fixture_with_clock().await;
    let f = Arc::new(f);
    let first = f.tokenize_expiring().await;
    time.fetch_add(MINUTE_MS + 1, Ordering::SeqCst);
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let f = Arc::clone(&f);
            tokio::spawn(async move { f.tokenize_expiring().await })
        })
        .collect();
    let mut tokens = std::collections::HashSet::new();
    for task in tasks {
        tokens.insert(task.await.unwrap());
    }
    assert_eq!(tokens.len(), 1, "one new token between them");
    assert!(!tokens.contains(&first));
    assert_eq!(f.stored(Table::Records).await.len(), 1);
}

/// A tokenize may give an expired value a new token between the sweeper's
/// read of the old record and its write: the sweeper must delete the old
/// record and leave the index entry, which names the new token by then.
#[tokio::test]
async fn the_sweeper_leaves_an_index_entry_that_names_a_newer_token() {
    let (f, time) = fixture_with_clock().await;
    let dead = f.tokenize_expiring().await;
    let blind = f.repoint_index_entry(&dead).await;

    time.fetch_add(MINUTE_MS + 1, Ordering::SeqCst);
    assert_eq!(f.vault.sweep_expired().await.unwrap(), 1);
    assert!(f.stored(Table::Records).await.is_empty());
    assert!(f.stored(Table::SubjectIndex).await.is_empty());
    assert_eq!(
        f.stored(Table::Index).await,
        vec![(blind.to_vec(), b"tok_newer".to_vec())]
    );
    let swept = f.reveal(&[dead], false).await;
    assert!(matches!(swept[0], Err(ItemError::NotFound)));
}

#[tokio::test]
async fn the_sweeper_deletes_an_expired_value_with_its_index_entries() {
    let (f, time) = fixture_with_clock().await;
    let expiring = f.tokenize_expiring().await;
    let kept = f
        .tokenize_for(SUBJECT, &[("customer_email", "bob@example.com", None)])
        .await
        .remove(0);
    time.fetch_add(MINUTE_MS + 1, Ordering::SeqCst);
    assert_eq!(f.vault.sweep_expired().await.unwrap(), 1);
    assert_eq!(f.vault.sweep_expired().await.unwrap(), 0);
    let records = f.stored(Table::Records).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].0, kept.storage_key());
    assert_eq!(f.stored(Table::Index).await.len(), 1);
    assert_eq!(f.stored(Table::SubjectIndex).await.len(), 1);
    assert_ne!(f.tokenize_expiring().await, expiring);
}

/// Deleting a deterministic token frees its value for a new token, and
/// removes only an index entry that still names the deleted token.
#[tokio::test]
async fn deleting_a_token_removes_only_an_index_entry_that_names_it() {
    let (f, _) = fixture_with_clock().await;
    let first = f.tokenize_expiring().await;
    f.delete(&first).await;
    assert!(f.stored(Table::Index).await.is_empty());
    let second = f.tokenize_expiring().await;
    assert_ne!(second, first);

    let blind = f.repoint_index_entry(&second).await;
    f.delete(&second).await;
    assert!(f.stored(Table::Records).await.is_empty());
    assert_eq!(
        f.stored(Table::Index).await,
        vec![(blind.to_vec(), b"tok_newer".to_vec())]
    );
}

/// A vault made before the expiry table gets it from its first sweep, which
/// reads every record; later sweeps read only the entries that are due.
#[tokio::test]
async fn the_first_sweep_of_an_older_vault_builds_the_expiry_table() {
    let (f, time) = fixture_with_clock().await;
    let tokens = f
        .tokenize_for(
            SUBJECT,
            &[
                ("email", "soon@example.com", Some(60)),
                ("email", "later@example.com", Some(3600)),
                ("email", "never@example.com", None),
            ],
        )
        .await;
    let entries = f.stored(Table::Expiry).await;
    assert_eq!(
        entries.len(),
        2,
        "tokenize writes an entry per expiring value"
    );
    // What an older vault holds: the same records, no entries.
    let mut batch = Batch::new();
    for (key, _) in entries {
        batch.delete(Table::Expiry, key);
    }
    f.vault.store().commit(batch).await.unwrap();

    time.fetch_add(MINUTE_MS + 1, Ordering::SeqCst);
    assert_eq!(f.vault.sweep_expired().await.unwrap(), 1);
    let entries = f.stored(Table::Expiry).await;
    assert_eq!(entries.len(), 1, "the one still to expire got its entry");
    assert!(entries[0].0.ends_with(tokens[1].storage_key()));

    time.fetch_add(3600 * 1000, Ordering::SeqCst);
    assert_eq!(f.vault.sweep_expired().await.unwrap(), 1);
    assert!(f.stored(Table::Expiry).await.is_empty());
    let records = f.stored(Table::Records).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].0, tokens[2].storage_key());
}

/// Deletion takes a record's expiry entry with it; an entry left behind
/// anyway, or a damaged one, is dropped when it comes due, and entries not
/// yet due are not touched.
#[tokio::test]
async fn expiry_entries_go_with_their_records() {
    let (f, time) = fixture_with_clock().await;
    let gone = f.tokenize_expiring().await;
    f.delete(&gone).await;
    assert!(f.stored(Table::Expiry).await.is_empty());
    f.vault.sweep_expired().await.unwrap(); // indexes this vault

    let mut batch = Batch::new();
    batch.put(
        Table::Expiry,
        crate::layout::expiry_key(1_000, b"tok_long_gone"),
        Vec::new(),
    );
    // Damage that sorts first must not hold the sweep back.
    batch.put(Table::Expiry, vec![0], Vec::new());
    f.vault.store().commit(batch).await.unwrap();
    let pending = f.tokenize_expiring().await;
    assert_eq!(f.vault.sweep_expired().await.unwrap(), 0);
    let entries = f.stored(Table::Expiry).await;
    assert_eq!(
        entries.len(),
        1,
        "the stray entry is gone, the pending one stays"
    );
    assert!(entries[0].0.ends_with(pending.storage_key()));

    time.fetch_add(MINUTE_MS + 1, Ordering::SeqCst);
    assert_eq!(f.vault.sweep_expired().await.unwrap(), 1);
    assert!(f.stored(Table::Expiry).await.is_empty());
}
