//! A subject's access history, against a real RocksDB.

use super::{tests::*, *};
use crate::{
    authz::{IdentityPattern, Policy, PurposeSet, Rule, act},
    store::{self, Table, chain},
};

fn history_grants() -> Policy {
    Policy::new(vec![Rule::new(
        IdentityPattern::new("spiffe://*").unwrap(),
        vec!["subject:history".parse().unwrap()],
        PurposeSet::Any,
    )])
}

impl Fixture {
    /// One page of `subject`'s history.
    async fn history(&self, subject: &str, before: Option<u64>, limit: usize) -> HistoryPage {
        self.try_history(HistoryQuery {
            subject: subject.parse().unwrap(),
            since_ms: None,
            until_ms: None,
            before_seq: before,
            limit,
        })
        .await
        .unwrap()
    }

    async fn try_history(&self, query: HistoryQuery) -> Result<HistoryPage, Error> {
        let policy = history_grants();
        let permit = policy
            .grants(&self.client)
            .permit_global(act::SubjectHistory, query)
            .unwrap();
        self.vault
            .access_history(permit, &ctx("AccessHistory", 1))
            .await
    }

    /// Every page of `subject`'s history, `limit` at a time.
    async fn whole_history(&self, subject: &str, limit: usize) -> Vec<HistoryEntry> {
        let mut entries = Vec::new();
        let mut before = None;
        loop {
            let page = self.history(subject, before, limit).await;
            assert!(page.entries.len() <= limit);
            entries.extend(page.entries);
            match page.next_before {
                Some(next) => before = Some(next),
                None => return entries,
            }
        }
    }
}

fn methods(entries: &[HistoryEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.event.method.as_str()).collect()
}

#[tokio::test]
async fn a_subjects_history_lists_every_call_that_touched_their_values_newest_first() {
    let f = fixture().await;
    let ada = f
        .tokenize_for(
            "cust-ada",
            &[
                ("email", "ada@example.com", None),
                ("customer_email", "ada@example.com", None),
            ],
        )
        .await;
    let bob = f
        .tokenize_for("cust-bob", &[("email", "bob@example.com", None)])
        .await;
    assert!(f.reveal(&ada[..1], false).await[0].is_ok());
    // One call over both subjects' values is in both histories.
    let both = [ada[1].clone(), bob[0].clone()];
    assert!(f.reveal(&both, true).await.iter().all(Result::is_ok));
    f.lookup_for(Some("cust-ada"), "customer_email", "ada@example.com")
        .await
        .unwrap();
    // A lookup of a value the subject does not have names nobody.
    assert!(
        f.lookup_for(Some("cust-ada"), "customer_email", "other@example.com")
            .await
            .is_err()
    );

    let page = f.history("cust-ada", None, 100).await;
    assert_eq!(
        methods(&page.entries),
        ["LookupTokens", "Detokenize", "Detokenize", "Tokenize"]
    );
    assert!(page.entries.windows(2).all(|w| w[0].seq > w[1].seq));
    assert_eq!(page.entries[1].event.forms, ["masked"]);
    assert_eq!(page.entries[2].event.forms, ["plain"]);
    assert_eq!(page.entries[3].event.forms, Vec::<String>::new());
    assert_eq!(page.next_before, None);
    assert_eq!(page.coverage.indexed_from, 1);
    assert_eq!(page.coverage.checkpoint, None, "nothing signed yet");
    assert!(page.entries.iter().all(|e| !e.checkpointed));

    // Bob's: his tokenize, the shared detokenize, nothing of Ada's; and
    // now Ada's history read is in Ada's history.
    let bobs = f.history("cust-bob", None, 100).await;
    assert_eq!(methods(&bobs.entries), ["Detokenize", "Tokenize"]);
    assert_eq!(bobs.entries[0].seq, page.entries[1].seq);
    // Each sees only its own part of the shared call: one item each, its
    // own field type; nothing of the other's.
    let part = |entry: &HistoryEntry| {
        (
            entry.event.items,
            entry.event.field_types.clone(),
            entry.event.forms.clone(),
            entry.event.subjects.len(),
            entry.event.tokens.len(),
        )
    };
    assert_eq!(
        part(&bobs.entries[0]),
        (1, vec!["email".to_owned()], vec!["masked".to_owned()], 1, 0)
    );
    assert_eq!(
        part(&page.entries[1]),
        (
            1,
            vec!["customer_email".to_owned()],
            vec!["masked".to_owned()],
            1,
            0
        )
    );
    // Each entry carries its event's chain hash.
    for entry in &page.entries {
        let stored = f
            .vault
            .store()
            .get_many(
                crate::store::Table::Audit,
                vec![crate::store::chain::key(entry.seq).to_vec()],
            )
            .await
            .unwrap()
            .pop()
            .flatten()
            .unwrap();
        assert_eq!(entry.hash, crate::store::chain::hash(entry.seq, &stored));
    }
    // A call of one subject alone is shown whole.
    assert_eq!(
        (
            page.entries[3].event.items,
            page.entries[3].event.field_types.len()
        ),
        (2, 2)
    );
    let again = f.history("cust-ada", None, 100).await;
    assert_eq!(
        methods(&again.entries)[..2],
        ["AccessHistory", "LookupTokens"]
    );
    assert!(f.history("cust-nobody", None, 100).await.entries.is_empty());

    // After a checkpoint the same events are covered by it.
    let signed = f.vault.checkpoint_audit().await.unwrap().unwrap();
    let covered = f.history("cust-ada", None, 100).await;
    assert_eq!(
        covered.coverage.checkpoint.map(|(seq, _)| seq),
        Some(signed)
    );
    assert!(covered.entries.iter().all(|e| e.checkpointed));
    assert_eq!(covered.coverage.head, signed, "read before its own event");
}

#[tokio::test]
async fn pages_cover_the_history_once_and_time_bounds_apply() {
    let f = fixture().await;
    let tokens = f
        .tokenize_for("cust-pages", &[("email", "pages@example.com", None)])
        .await;
    for _ in 0..6 {
        // Other subjects' events between, which no page may show.
        f.tokenize_for("cust-other", &[("email", "o@example.com", None)])
            .await;
        assert!(f.reveal(&tokens, false).await[0].is_ok());
    }
    let whole = f.history("cust-pages", None, 100).await.entries;
    assert_eq!(whole.len(), 7);
    let paged = f.whole_history("cust-pages", 2).await;
    // The pages hold the first answer's events once each, after that
    // answer's own read; the pages' own reads are newer than the first
    // page, so no page shows them.
    let seqs = |entries: &[HistoryEntry]| entries.iter().map(|e| e.seq).collect::<Vec<_>>();
    assert_eq!(paged[0].event.method, "AccessHistory");
    assert_eq!(seqs(&paged[1..]), seqs(&whole));

    let now = crate::vault::now_ms();
    let bounded = |since_ms, until_ms| HistoryQuery {
        subject: "cust-pages".parse().unwrap(),
        since_ms,
        until_ms,
        before_seq: None,
        limit: 100,
    };
    let future = f
        .try_history(bounded(Some(now + 3_600_000), None))
        .await
        .unwrap();
    assert!(future.entries.is_empty());
    let past = f
        .try_history(bounded(None, Some(now - 3_600_000)))
        .await
        .unwrap();
    assert!(past.entries.is_empty());
    let today = f
        .try_history(bounded(Some(now - 3_600_000), Some(now + 3_600_000)))
        .await
        .unwrap();
    // The seven events and the history reads made since.
    assert!(today.entries.len() >= 7);
}

#[tokio::test]
async fn after_erasure_the_history_still_answers_with_the_erasure() {
    let f = fixture().await;
    let tokens = f
        .tokenize_for("cust-gone", &[("email", "gone@example.com", None)])
        .await;
    assert!(f.reveal(&tokens, false).await[0].is_ok());
    let policy = Policy::new(vec![Rule::new(
        IdentityPattern::new("spiffe://*").unwrap(),
        vec!["subject:erase".parse().unwrap()],
        PurposeSet::Any,
    )]);
    let permit = policy
        .grants(&f.client)
        .permit_global(act::SubjectErase, "cust-gone".parse::<SubjectId>().unwrap())
        .unwrap();
    f.vault
        .erase_subject(permit, &ctx("EraseSubject", 1), None)
        .await
        .unwrap();
    // A read of the erased token finds no record, so names no subject.
    assert!(f.reveal(&tokens, false).await[0].is_err());
    let page = f.history("cust-gone", None, 100).await;
    assert_eq!(
        methods(&page.entries),
        ["EraseSubject", "Detokenize", "Tokenize"]
    );
}

#[tokio::test]
async fn an_index_entry_that_points_at_a_changed_event_is_refused() {
    let f = fixture().await;
    f.tokenize_for("cust-a", &[("email", "a@example.com", None)])
        .await;
    f.tokenize_for("cust-b", &[("email", "b@example.com", None)])
        .await;
    let a = f.history("cust-a", None, 10).await.entries[0].seq;
    let b = f.history("cust-b", None, 10).await.entries[0].seq;
    // Point Ada's index at Bob's event, as someone hiding Ada's would
    // have to: the event does not name her.
    let form = f.vault.audit_subject(&"cust-a".parse().unwrap());
    let mut form_bytes = [0u8; 32];
    data_encoding::HEXLOWER
        .decode_mut(form.as_bytes(), &mut form_bytes)
        .unwrap();
    let prefix = crate::layout::audit_subject_prefix(&form_bytes);
    let mut batch = store::Batch::new();
    batch.delete(Table::AuditIndex, chain::index_key(&prefix, a));
    batch.put(Table::AuditIndex, chain::index_key(&prefix, b), Vec::new());
    f.vault.store().commit(batch).await.unwrap();
    let refused = f
        .try_history(HistoryQuery {
            subject: "cust-a".parse().unwrap(),
            since_ms: None,
            until_ms: None,
            before_seq: None,
            limit: 10,
        })
        .await;
    assert!(
        matches!(&refused, Err(Error::AuditDamaged(m)) if m.contains(&format!("event {b}"))),
        "{refused:?}"
    );
}

#[tokio::test]
async fn pruning_takes_the_index_entries_of_the_events_it_deletes() {
    let (f, time) = fixture_with_clock().await;
    f.tokenize_for("cust-old", &[("email", "old@example.com", None)])
        .await;
    f.vault.checkpoint_audit().await.unwrap();
    time.fetch_add(10 * 86_400_000, std::sync::atomic::Ordering::SeqCst);
    f.tokenize_for("cust-old", &[("email", "new@example.com", None)])
        .await;
    f.vault.checkpoint_audit().await.unwrap();
    let before = f.history("cust-old", None, 10).await;
    assert_eq!(methods(&before.entries), ["Tokenize", "Tokenize"]);
    let pruned = f
        .vault
        .prune_audit(std::time::Duration::from_secs(7 * 86_400))
        .await
        .unwrap();
    assert!(pruned >= 1);
    let first_kept = f
        .vault
        .store()
        .scan_from(Table::Audit, Vec::new(), 1)
        .await
        .unwrap()[0]
        .0
        .clone();
    let first_kept = chain::seq_of(&first_kept).unwrap();
    let index = f
        .vault
        .store()
        .scan_from(Table::AuditIndex, Vec::new(), 1000)
        .await
        .unwrap();
    assert!(!index.is_empty());
    for (key, _) in &index {
        let seq = u64::MAX - u64::from_be_bytes(key[key.len() - 8..].try_into().unwrap());
        assert!(seq >= first_kept, "index entry of pruned event {seq}");
    }
    let after = f.history("cust-old", None, 10).await;
    assert_eq!(methods(&after.entries)[1..], ["Tokenize"]);
}

#[tokio::test]
async fn a_vault_made_before_the_index_says_where_its_history_starts() {
    let f = fixture().await;
    f.tokenize_for("cust-early", &[("email", "early@example.com", None)])
        .await;
    // As a vault from before this release: the mark is absent.
    let mut batch = store::Batch::new();
    batch.delete(
        Table::Meta,
        crate::layout::AUDIT_SUBJECTS_INDEXED_FROM.to_vec(),
    );
    f.vault.store().commit(batch).await.unwrap();
    let head = f.vault.store().audit_head().seq;
    f.vault.mark_subject_index_start().await.unwrap();
    f.vault.mark_subject_index_start().await.unwrap();
    let page = f.history("cust-early", None, 10).await;
    assert_eq!(page.coverage.indexed_from, head + 1);
}

/// One Tokenize over two subjects' values and a value of no subject, one
/// of Bob's items failing: each history shows its subject's own items and
/// failures only.
#[tokio::test]
async fn a_shared_tokenize_shows_each_subject_its_own_items() {
    use crate::crypto::SecretValue;
    let f = fixture().await;
    let grants = f.policy.grants(&f.client);
    let item = |value: &str, subject: Option<&str>| {
        grants
            .permit_tokenize(NewValue {
                field_type: "email".parse().unwrap(),
                value: SecretValue::new(value.to_owned()),
                subject: subject.map(|s| s.parse().unwrap()),
                ttl_seconds: None,
            })
            .unwrap()
    };
    let results = f
        .vault
        .tokenize(
            vec![
                item("ada@example.com", Some("cust-ada")),
                item("not an e-mail address", Some("cust-bob")),
                item("bob@example.com", Some("cust-bob")),
                item("nobody@example.com", None),
            ],
            |ft| grants.permit_field(act::Lookup, ft),
            &ctx("Tokenize", 4),
            None,
        )
        .await
        .unwrap();
    assert!(results[1].is_err() && results[0].is_ok() && results[2].is_ok());
    let part = |entries: &[HistoryEntry]| {
        let event = &entries[0].event;
        (event.method.clone(), event.items, event.failed_items)
    };
    let ada = f.history("cust-ada", None, 10).await.entries;
    let bob = f.history("cust-bob", None, 10).await.entries;
    assert_eq!(part(&ada), ("Tokenize".to_owned(), 1, 0));
    assert_eq!(part(&bob), ("Tokenize".to_owned(), 2, 1));
}
