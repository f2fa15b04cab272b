//! What every storage engine promises, as one set of tests generic over the
//! engine. An engine's tests call [`conformance_tests!`] with a way to open
//! a fresh store and to reopen one: the same assertions then run against
//! each engine, so a second engine cannot keep weaker promises than the
//! first.

use std::{future::Future, sync::Arc};

use super::{Batch, Conflict, FailedGuard, Store, Table};

/// How the suite gets stores of one engine.
pub(crate) trait Engine: Sized {
    /// The engine's store.
    type Store: Store;

    /// A new, empty store.
    fn open(&self) -> impl Future<Output = Self::Store> + Send;

    /// Closes `store` and opens it again over the same data, as a restart
    /// does.
    fn reopen(&self, store: Self::Store) -> impl Future<Output = Self::Store> + Send;
}

/// Generates one `#[tokio::test]` per promise for the engine `$engine`
/// (an expression of a type implementing [`Engine`]).
macro_rules! conformance_tests {
    ($engine:expr) => {
        $crate::store::conformance::conformance_tests!(@each $engine,
            committed_batches_are_read_back_after_reopen,
            tables_are_separate_namespaces,
            deletes_apply,
            prefix_scans_stop_at_the_prefix,
            scans_from_a_key_page_in_key_order,
            concurrent_commits_all_land,
            a_read_of_several_keys_sees_one_point_in_time,
            a_unit_applies_whole_or_not_at_all,
            absent_guards_let_exactly_one_concurrent_writer_win,
            unchanged_guards_are_a_compare_and_set,
            a_unit_sees_the_store_as_the_units_before_it_left_it,
            the_audit_head_covers_every_acknowledged_event,
            audit_entries_are_indexed_in_their_own_write,
            a_key_asked_for_twice_is_answered_twice,
        );
    };
    (@each $engine:expr, $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::store::conformance::$name(&$engine).await;
            }
        )+
    };
}
pub(crate) use conformance_tests;

async fn commit<S: Store>(store: &S, batch: Batch) -> super::UnitOutcomes {
    store.commit(batch).await.unwrap()
}

async fn get<S: Store>(store: &S, table: Table, keys: &[&[u8]]) -> Vec<Option<Vec<u8>>> {
    store
        .get_many(table, keys.iter().map(|k| k.to_vec()).collect())
        .await
        .unwrap()
}

pub(crate) async fn committed_batches_are_read_back_after_reopen<E: Engine>(engine: &E) {
    let store = engine.open().await;
    let mut batch = Batch::new();
    batch.put(Table::Records, b"a".to_vec(), b"1".to_vec());
    batch.put(Table::Records, b"b".to_vec(), b"2".to_vec());
    commit(&store, batch).await;
    let store = engine.reopen(store).await;
    assert_eq!(
        get(&store, Table::Records, &[b"a", b"x", b"b"]).await,
        vec![Some(b"1".to_vec()), None, Some(b"2".to_vec())]
    );
}

pub(crate) async fn tables_are_separate_namespaces<E: Engine>(engine: &E) {
    let store = engine.open().await;
    let mut batch = Batch::new();
    batch.put(Table::Records, b"a".to_vec(), b"record".to_vec());
    batch.put(Table::Keys, b"a".to_vec(), b"key".to_vec());
    commit(&store, batch).await;
    assert_eq!(
        get(&store, Table::Keys, &[b"a"]).await,
        vec![Some(b"key".to_vec())]
    );
    assert_eq!(get(&store, Table::Meta, &[b"a"]).await, vec![None]);
    assert_eq!(
        get(&store, Table::Records, &[b"a"]).await,
        vec![Some(b"record".to_vec())]
    );
}

pub(crate) async fn deletes_apply<E: Engine>(engine: &E) {
    let store = engine.open().await;
    let mut batch = Batch::new();
    batch.put(Table::Meta, b"k".to_vec(), b"v".to_vec());
    commit(&store, batch).await;
    let mut batch = Batch::new();
    batch.delete(Table::Meta, b"k".to_vec());
    commit(&store, batch).await;
    assert_eq!(get(&store, Table::Meta, &[b"k"]).await, vec![None]);
}

pub(crate) async fn prefix_scans_stop_at_the_prefix<E: Engine>(engine: &E) {
    let store = engine.open().await;
    let mut batch = Batch::new();
    for key in ["dek/1", "dek/2", "hash/1", "dea", "dek0"] {
        batch.put(
            Table::Keys,
            key.as_bytes().to_vec(),
            key.as_bytes().to_vec(),
        );
    }
    // A key ending in 0xff must not end a prefix scan early.
    batch.put(Table::Keys, b"dek/\xff".to_vec(), b"last".to_vec());
    commit(&store, batch).await;
    let found = store
        .scan_prefix(Table::Keys, b"dek/".to_vec())
        .await
        .unwrap();
    let keys: Vec<&[u8]> = found.iter().map(|(k, _)| k.as_slice()).collect();
    assert_eq!(keys, [b"dek/1".as_slice(), b"dek/2", b"dek/\xff"]);
}

pub(crate) async fn scans_from_a_key_page_in_key_order<E: Engine>(engine: &E) {
    let store = engine.open().await;
    let mut batch = Batch::new();
    // Written out of order; big-endian keys sort as numbers.
    for i in (0..25u32).rev() {
        batch.put(Table::Expiry, i.to_be_bytes().to_vec(), Vec::new());
    }
    commit(&store, batch).await;
    let mut seen = Vec::new();
    let mut from = Vec::new();
    loop {
        let page = store.scan_from(Table::Expiry, from, 10).await.unwrap();
        assert!(page.len() <= 10);
        seen.extend(page.iter().map(|(k, _)| k.clone()));
        match page.last() {
            Some((last, _)) if page.len() == 10 => {
                from = last.clone();
                from.push(0);
            }
            _ => break,
        }
    }
    let expected: Vec<Vec<u8>> = (0..25u32).map(|i| i.to_be_bytes().to_vec()).collect();
    assert_eq!(seen, expected);
}

/// Returns the store, so that an engine's own tests can look at what the
/// commits did inside it (the RocksDB committer's counters).
pub(crate) async fn concurrent_commits_all_land<E: Engine>(engine: &E) -> Arc<E::Store> {
    let store = Arc::new(engine.open().await);
    let tasks: Vec<_> = (0..200u32)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut batch = Batch::new();
                batch.put(Table::Records, i.to_be_bytes().to_vec(), vec![1]);
                store.commit(batch).await
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), vec![Ok(())]);
    }
    let keys = (0..200u32).map(|i| i.to_be_bytes().to_vec()).collect();
    let got = store.get_many(Table::Records, keys).await.unwrap();
    assert!(got.iter().all(Option::is_some));
    store
}

/// Re-indexing moves an entry from one key to another in one unit; a
/// lookup reads both keys in one call. If that call saw the keys at two
/// moments, it could miss the entry under both and answer "not found" for
/// a value that is there.
pub(crate) async fn a_read_of_several_keys_sees_one_point_in_time<E: Engine>(engine: &E) {
    let store = Arc::new(engine.open().await);
    let mut first = Batch::new();
    first.put(Table::Index, b"old".to_vec(), b"token".to_vec());
    commit(&*store, first).await;
    let moved = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (store, moved) = (Arc::clone(&store), Arc::clone(&moved));
            tokio::spawn(async move {
                let mut reads = 0u64;
                while !moved.load(std::sync::atomic::Ordering::Relaxed) {
                    let seen = get(&*store, Table::Index, &[b"new", b"old"]).await;
                    let present = seen.iter().filter(|v| v.is_some()).count();
                    assert_eq!(present, 1, "the entry was under {present} keys at once");
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let (mut from, mut to): (&[u8], &[u8]) = (b"old", b"new");
    for _ in 0..300 {
        let mut batch = Batch::new();
        batch.unit().delete(Table::Index, from.to_vec()).put(
            Table::Index,
            to.to_vec(),
            b"token".to_vec(),
        );
        commit(&*store, batch).await;
        (from, to) = (to, from);
    }
    moved.store(true, std::sync::atomic::Ordering::Relaxed);
    for reader in readers {
        assert!(reader.await.unwrap() > 0, "a reader never read");
    }
}

pub(crate) async fn a_unit_applies_whole_or_not_at_all<E: Engine>(engine: &E) {
    let store = engine.open().await;
    let head = store.audit_head();
    let mut batch = Batch::new();
    // Two units claim the same key in one batch: the first wins; the
    // second leaves nothing behind, not its other puts, not its event.
    batch
        .unit()
        .guard_absent(Table::Index, b"k".to_vec())
        .put(Table::Index, b"k".to_vec(), b"first".to_vec())
        .put(Table::Records, b"r1".to_vec(), vec![1]);
    batch
        .unit()
        .guard_absent(Table::Index, b"k".to_vec())
        .put(Table::Index, b"k".to_vec(), b"second".to_vec())
        .put(Table::Records, b"r2".to_vec(), vec![2])
        .append_audit(b"the loser's event".to_vec());
    batch.unit().put(Table::Records, b"r3".to_vec(), vec![3]);
    let outcomes = commit(&store, batch).await;
    assert_eq!(
        outcomes,
        vec![
            Ok(()),
            Err(Conflict {
                guard: FailedGuard::Absent(0),
                existing: b"first".to_vec()
            }),
            Ok(())
        ]
    );
    assert_eq!(
        get(&store, Table::Records, &[b"r1", b"r2", b"r3"]).await,
        vec![Some(vec![1]), None, Some(vec![3])]
    );
    assert_eq!(store.audit_head(), head, "the skipped unit's event");
    // A later batch sees the stored key.
    let mut later = Batch::new();
    later.unit().guard_absent(Table::Index, b"k".to_vec()).put(
        Table::Index,
        b"k".to_vec(),
        b"third".to_vec(),
    );
    assert_eq!(
        commit(&store, later).await,
        vec![Err(Conflict {
            guard: FailedGuard::Absent(0),
            existing: b"first".to_vec()
        })]
    );
}

pub(crate) async fn absent_guards_let_exactly_one_concurrent_writer_win<E: Engine>(engine: &E) {
    let store = Arc::new(engine.open().await);
    let tasks: Vec<_> = (0..64u8)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut batch = Batch::new();
                batch
                    .unit()
                    .guard_absent(Table::Index, b"one value".to_vec())
                    .put(Table::Index, b"one value".to_vec(), vec![i]);
                store.commit(batch).await.unwrap().remove(0)
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut losers_saw = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(()) => winners.push(i as u8),
            Err(conflict) => losers_saw.push(conflict.existing),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert!(losers_saw.iter().all(|seen| *seen == winners));
    assert_eq!(
        get(&*store, Table::Index, &[b"one value"]).await,
        vec![Some(winners)]
    );
}

pub(crate) async fn unchanged_guards_are_a_compare_and_set<E: Engine>(engine: &E) {
    let store = engine.open().await;
    let mut batch = Batch::new();
    batch.put(Table::Records, b"r".to_vec(), b"v1".to_vec());
    commit(&store, batch).await;
    let cas = |expected: &[u8], new: &[u8]| {
        let mut batch = Batch::new();
        batch
            .unit()
            .guard_unchanged(Table::Records, b"r".to_vec(), expected.to_vec())
            .put(Table::Records, b"r".to_vec(), new.to_vec());
        batch
    };
    assert_eq!(commit(&store, cas(b"v1", b"v2")).await, vec![Ok(())]);
    assert_eq!(
        commit(&store, cas(b"v1", b"v3")).await,
        vec![Err(Conflict {
            guard: FailedGuard::Unchanged(0),
            existing: b"v2".to_vec()
        })]
    );
    assert_eq!(
        get(&store, Table::Records, &[b"r"]).await,
        vec![Some(b"v2".to_vec())]
    );
    // A key that is gone is not unchanged.
    let mut batch = Batch::new();
    batch.delete(Table::Records, b"r".to_vec());
    commit(&store, batch).await;
    assert_eq!(
        commit(&store, cas(b"v2", b"v4")).await,
        vec![Err(Conflict {
            guard: FailedGuard::Unchanged(0),
            existing: Vec::new()
        })]
    );
    assert_eq!(get(&store, Table::Records, &[b"r"]).await, vec![None]);
}

/// The units of one group are decided as if applied one at a time, in
/// order: each guard sees every earlier unit's writes (guarded or not), and
/// nothing else of theirs. Units of one batch always share a group, so
/// each case is one batch of two units.
pub(crate) async fn a_unit_sees_the_store_as_the_units_before_it_left_it<E: Engine>(engine: &E) {
    let store = engine.open().await;
    let k = || b"k".to_vec();

    // (a) Unit 1 deletes K, which held v; unit 2 then finds K absent.
    let mut batch = Batch::new();
    batch.put(Table::Records, k(), b"v".to_vec());
    commit(&store, batch).await;
    let mut batch = Batch::new();
    batch
        .unit()
        .guard_unchanged(Table::Records, k(), b"v".to_vec())
        .delete(Table::Records, k());
    batch
        .unit()
        .guard_absent(Table::Records, k())
        .put(Table::Records, k(), b"w".to_vec());
    assert_eq!(commit(&store, batch).await, vec![Ok(()), Ok(())], "(a)");
    assert_eq!(
        get(&store, Table::Records, &[b"k"]).await,
        vec![Some(b"w".to_vec())],
        "(a)"
    );

    // (b) Unit 1 writes K without guarding it; unit 2's absent guard sees it.
    let mut batch = Batch::new();
    batch.unit().put(Table::Index, k(), b"first".to_vec());
    batch
        .unit()
        .guard_absent(Table::Index, k())
        .put(Table::Index, k(), b"second".to_vec());
    assert_eq!(
        commit(&store, batch).await,
        vec![
            Ok(()),
            Err(Conflict {
                guard: FailedGuard::Absent(0),
                existing: b"first".to_vec()
            })
        ],
        "(b)"
    );
    assert_eq!(
        get(&store, Table::Index, &[b"k"]).await,
        vec![Some(b"first".to_vec())],
        "(b)"
    );

    // (c) Unit 1 only checks that K is absent; unit 2 finds it absent too.
    let mut batch = Batch::new();
    batch.unit().guard_absent(Table::Meta, k());
    batch
        .unit()
        .guard_absent(Table::Meta, k())
        .put(Table::Meta, k(), b"mine".to_vec());
    assert_eq!(commit(&store, batch).await, vec![Ok(()), Ok(())], "(c)");
    assert_eq!(
        get(&store, Table::Meta, &[b"k"]).await,
        vec![Some(b"mine".to_vec())],
        "(c)"
    );
}

/// Checkpoints sign the head the store reports: it has moved past an event
/// by the time the event's write is acknowledged (so the next checkpoint
/// covers every acknowledged event), and it is where the chain on disk
/// ends.
pub(crate) async fn the_audit_head_covers_every_acknowledged_event<E: Engine>(engine: &E) {
    let event = |i: u32| {
        let mut batch = Batch::new();
        batch.unit().append_audit(i.to_be_bytes().to_vec());
        batch
    };
    let store = Arc::new(engine.open().await);
    for i in 1..=20 {
        commit(&*store, event(i)).await;
        assert_eq!(store.audit_head().seq, u64::from(i));
    }
    let tasks: Vec<_> = (21..=120)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.commit(event(i)).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let head = store.audit_head();
    assert_eq!(head.seq, 120);
    // Every entry is stored under its number and links to the one before.
    let entries = store
        .scan_from(Table::Audit, Vec::new(), 1000)
        .await
        .unwrap();
    assert_eq!(entries.len(), 120);
    let mut prev = super::chain::GENESIS;
    for (i, (key, value)) in entries.iter().enumerate() {
        let seq = i as u64 + 1;
        assert_eq!(super::chain::seq_of(key), Some(seq));
        let link = super::chain::decode(value).unwrap();
        assert_eq!(link.prev, prev, "entry {seq} links to the one before");
        assert!(link.is_intact(seq));
        prev = super::chain::hash(seq, value);
    }
    assert_eq!(head.hash, prev);
    let store = Arc::into_inner(store).unwrap();
    let reopened = engine.reopen(store).await;
    assert_eq!(
        reopened.audit_head(),
        head,
        "the chain on disk ends where the head said"
    );
}

/// An audit entry's index entries land in the same write as the entry,
/// under the sequence number the committer gave it, newest first within a
/// prefix; a unit whose guard fails writes neither.
pub(crate) async fn audit_entries_are_indexed_in_their_own_write<E: Engine>(engine: &E) {
    use super::chain::{index_key, seq_of_index_key};
    let store = Arc::new(engine.open().await);
    let tasks: Vec<_> = (0..40u8)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut batch = Batch::new();
                let prefixes = if i % 2 == 0 {
                    vec![b"even".to_vec(), b"all".to_vec()]
                } else {
                    vec![b"all".to_vec()]
                };
                batch.unit().append_audit_indexed(vec![i], prefixes);
                store.commit(batch).await.unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    // A unit that loses its guard writes no event and no index entry.
    let mut batch = Batch::new();
    batch.put(Table::Meta, b"taken".to_vec(), Vec::new());
    commit(&*store, batch).await;
    let mut batch = Batch::new();
    batch
        .unit()
        .guard_absent(Table::Meta, b"taken".to_vec())
        .append_audit_indexed(b"never".to_vec(), vec![b"all".to_vec()]);
    assert!(commit(&*store, batch).await[0].is_err());

    let index = store
        .scan_from(Table::AuditIndex, Vec::new(), 1000)
        .await
        .unwrap();
    let seqs = |prefix: &[u8]| -> Vec<u64> {
        index
            .iter()
            .filter_map(|(key, _)| seq_of_index_key(prefix, key))
            .collect()
    };
    let all = seqs(b"all");
    assert_eq!(all, (1..=40).rev().collect::<Vec<u64>>(), "newest first");
    // Each `even` entry points at the event that asked for it.
    let even = seqs(b"even");
    assert_eq!(even.len(), 20);
    let events = store
        .get_many(
            Table::Audit,
            even.iter()
                .map(|&seq| super::chain::key(seq).to_vec())
                .collect(),
        )
        .await
        .unwrap();
    for (seq, event) in even.iter().zip(events) {
        let event = event.unwrap_or_else(|| panic!("event {seq} is missing"));
        let payload = super::chain::decode(&event).unwrap().payload;
        assert_eq!(payload[0] % 2, 0, "event {seq} was not indexed as even");
    }
    assert!(even.windows(2).all(|w| w[0] > w[1]));
    assert_eq!(index_key(b"all", 1).len(), 11);
}

/// `get_many` answers every position, also a key that appears twice (a
/// batch detokenize of one token twice).
pub(crate) async fn a_key_asked_for_twice_is_answered_twice<E: Engine>(engine: &E) {
    let store = engine.open().await;
    let mut batch = Batch::new();
    batch.put(Table::Records, b"a".to_vec(), b"1".to_vec());
    batch.put(Table::Records, b"b".to_vec(), b"2".to_vec());
    commit(&store, batch).await;
    assert_eq!(
        get(&store, Table::Records, &[b"a", b"b", b"a", b"x", b"a"]).await,
        vec![
            Some(b"1".to_vec()),
            Some(b"2".to_vec()),
            Some(b"1".to_vec()),
            None,
            Some(b"1".to_vec())
        ]
    );
}
