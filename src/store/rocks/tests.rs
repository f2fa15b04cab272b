//! The RocksDB engine's own tests; the conformance suite runs here too.

use super::*;
use crate::store::Snapshot;

pub(super) fn open(dir: &Path) -> RocksStore {
    RocksStore::open(dir, &StoreOptions::default()).unwrap()
}

/// RocksDB stores in temporary directories, kept until the test ends.
#[derive(Default)]
struct Rocks {
    dirs: std::sync::Mutex<Vec<tempfile::TempDir>>,
}

impl crate::store::conformance::Engine for Rocks {
    type Store = RocksStore;

    async fn open(&self) -> RocksStore {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        self.dirs.lock().unwrap().push(dir);
        store
    }

    async fn reopen(&self, store: RocksStore) -> RocksStore {
        let path = store.path().to_owned();
        store.close();
        open(&path)
    }
}

crate::store::conformance::conformance_tests!(Rocks::default());

#[test]
fn many_purged_keys_compact_as_one_range_per_table() {
    let few: Vec<_> = (0..3u8).map(|i| (Table::Records, vec![b'k', i])).collect();
    let ranges = compaction_ranges(few);
    assert_eq!(ranges.len(), 3);
    assert_eq!(ranges[0], (Table::Records, vec![b'k', 0], vec![b'k', 0, 0]));

    let mut many: Vec<_> = (0..5_000u32)
        .map(|i| {
            (
                Table::Records,
                i.wrapping_mul(2_654_435_761).to_be_bytes().to_vec(),
            )
        })
        .collect();
    many.push((Table::Keys, b"subject-key/x".to_vec()));
    let ranges = compaction_ranges(many);
    assert_eq!(ranges.len(), 2, "one range per table, not one per key");
    let (table, start, end) = &ranges.iter().find(|r| r.0 == Table::Records).unwrap();
    assert_eq!(*table, Table::Records);
    // The range covers every key.
    for i in 0..5_000u32 {
        let key = i.wrapping_mul(2_654_435_761).to_be_bytes().to_vec();
        assert!(start <= &key && &key < end);
    }
}

/// Reads from memory only must never mistake "not cached" for "absent":
/// keys in data files (after a reopen, nothing is cached) and keys in
/// files being flushed and compacted under concurrent writes are found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_find_keys_wherever_they_are() {
    const KEYS: u32 = 20_000;
    let key = |i: u32| format!("key-{:08}", i.wrapping_mul(2_654_435_761)).into_bytes();
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        for chunk in (0..KEYS).collect::<Vec<_>>().chunks(1000) {
            let mut batch = Batch::new();
            for i in chunk {
                batch.put(Table::Records, key(*i), vec![7; 200]);
            }
            store.commit(batch).await.unwrap();
        }
        store.purge(vec![(Table::Records, key(0))]).await.unwrap();
        store.close();
    }
    let store = Arc::new(open(dir.path()));
    // Writers keep memtables filling and flushing meanwhile.
    let writer = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            for round in 0..200u32 {
                let mut batch = Batch::new();
                for i in 0..500u32 {
                    batch.put(
                        Table::Records,
                        format!("new-{round}-{i}").into_bytes(),
                        vec![1; 400],
                    );
                }
                store.commit(batch).await.unwrap();
            }
        })
    };
    for i in 0..KEYS {
        let got = store.get_many(Table::Records, vec![key(i)]).await.unwrap();
        assert_eq!(got, vec![Some(vec![7; 200])], "key {i} not found");
    }
    writer.await.unwrap();
}

/// Reads that need the files, many at once (as a loaded vault after a
/// restart sends them): every caller gets its own keys' values, also when
/// several ask for the same key at the same moment, and the reader threads
/// serve them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_from_files_each_get_their_own_values() {
    const KEYS: u32 = 4_000;
    let key = |i: u32| format!("key-{:08}", i.wrapping_mul(2_654_435_761)).into_bytes();
    let value = |i: u32| i.to_be_bytes().repeat(40);
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        let mut batch = Batch::new();
        for i in 0..KEYS {
            batch.put(Table::Records, key(i), value(i));
        }
        store.commit(batch).await.unwrap();
        store.close();
    }
    // Nothing is cached after a reopen.
    let store = Arc::new(open(dir.path()));
    let tasks: Vec<_> = (0..KEYS)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                // Single reads; every tenth a read of several keys, one of
                // them absent and one shared with the neighbouring tasks.
                let keys = if i % 10 == 0 {
                    vec![key(i), b"absent".to_vec(), key(0)]
                } else {
                    vec![key(i)]
                };
                (i, store.get_many(Table::Records, keys).await.unwrap())
            })
        })
        .collect();
    for task in tasks {
        let (i, got) = task.await.unwrap();
        if i % 10 == 0 {
            assert_eq!(got, vec![Some(value(i)), None, Some(value(0))], "read {i}");
        } else {
            assert_eq!(got, vec![Some(value(i))], "read {i}");
        }
    }
    let files = store.stats().reads.files;
    let readers = store.reader_stats();
    assert!(files > 0, "nothing was read from the files");
    assert_eq!(readers.reads, files);
    assert!(readers.wakeups >= 1 && readers.wakeups <= readers.reads);
}

/// The counters the metrics and the benchmark report: after a reopen
/// nothing is cached, so the first read of a flushed key misses the
/// block cache and goes to the file, and the second, of the same block,
/// hits and is answered from memory.
#[tokio::test]
async fn reads_and_block_cache_lookups_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        let mut batch = Batch::new();
        batch.put(Table::Records, b"k".to_vec(), vec![7; 200]);
        store.commit(batch).await.unwrap();
        store.close();
    }
    let store = open(dir.path());
    let before = store.stats();
    let read = || store.get_many(Table::Records, vec![b"k".to_vec()]);
    assert!(read().await.unwrap()[0].is_some());
    let first = store.stats();
    assert_eq!(
        first.reads,
        ReadTiers {
            memory: 0,
            files: 1
        }
    );
    assert!(
        first.block_cache.data.misses > before.block_cache.data.misses,
        "{before:?} then {first:?}"
    );
    assert!(read().await.unwrap()[0].is_some());
    let second = store.stats();
    assert_eq!(
        second.reads,
        ReadTiers {
            memory: 1,
            files: 1
        }
    );
    let (first, second) = (first.block_cache.data, second.block_cache.data);
    assert_eq!(second.hits, first.hits + 1, "{first:?} then {second:?}");
    assert_eq!(second.misses, first.misses);
}

/// The committer counts every caller's batch, and concurrent batches
/// share physical writes: 200 callers at once, queued while a write's sync
/// runs, take fewer than half as many writes (in practice a handful; one
/// write per batch fails it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committer_counts_batches_and_their_shared_writes() {
    let engine = Rocks::default();
    let store = crate::store::conformance::concurrent_commits_all_land(&engine).await;
    let commits = store.stats().commits;
    assert_eq!(commits.batches, 200);
    let writes = commits.groups;
    assert!(
        (1..100).contains(&writes),
        "{writes} writes for 200 batches"
    );
}

/// Tables are added over releases: a vault (or backup) made before one
/// opens for offline tools, which read the table as empty, and for the
/// server, which creates it.
#[tokio::test]
async fn a_vault_made_before_a_table_existed_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let older = Table::ALL
            .iter()
            .filter(|t| **t != Table::Expiry)
            .map(|t| t.name());
        let db = DB::open_cf(&opts, dir.path(), older).unwrap();
        db.put_cf(db.cf_handle("records").unwrap(), b"a", b"1")
            .unwrap();
    }
    let read_only = RocksStore::open_read_only(dir.path()).unwrap();
    assert_eq!(
        read_only.get(Table::Records, b"a").unwrap(),
        Some(b"1".to_vec())
    );
    assert_eq!(read_only.get(Table::Expiry, b"a").unwrap(), None);
    let mut seen = 0;
    read_only
        .scan(Table::Expiry, b"", |_, _| {
            seen += 1;
            true
        })
        .unwrap();
    assert_eq!(seen, 0);
    drop(read_only);

    let store = open(dir.path());
    let mut batch = Batch::new();
    batch.put(Table::Expiry, b"e".to_vec(), Vec::new());
    store.commit(batch).await.unwrap();
    let got = store
        .get_many(Table::Expiry, vec![b"e".to_vec()])
        .await
        .unwrap();
    assert_eq!(got, vec![Some(Vec::new())]);
}

/// A table from a later release does not stop this one from opening
/// the vault (a rollback), and is kept as it was.
#[tokio::test]
async fn a_table_from_a_later_release_is_opened_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store.close();
        let mut opts = Options::default();
        opts.create_missing_column_families(true);
        let mut names: Vec<&str> = Table::ALL.iter().map(|t| t.name()).collect();
        names.push("from_a_later_release");
        let db = DB::open_cf(&opts, dir.path(), &names).unwrap();
        db.put_cf(db.cf_handle("from_a_later_release").unwrap(), b"k", b"v")
            .unwrap();
    }
    let store = open(dir.path());
    let mut batch = Batch::new();
    batch.put(Table::Records, b"a".to_vec(), b"1".to_vec());
    store.commit(batch).await.unwrap();
    store.close();
    let names = DB::list_cf(&Options::default(), dir.path()).unwrap();
    assert!(names.iter().any(|n| n == "from_a_later_release"));
    let db = DB::open_cf(&Options::default(), dir.path(), &names).unwrap();
    let kept = db
        .get_cf(db.cf_handle("from_a_later_release").unwrap(), b"k")
        .unwrap();
    assert_eq!(kept, Some(b"v".to_vec()));
}

#[test]
fn a_second_open_reports_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path());
    let err = RocksStore::open(dir.path(), &StoreOptions::default())
        .err()
        .expect("second open must fail");
    assert!(matches!(err, Error::Locked { .. }), "{err}");
}
