//! The RocksDB engine behind [`Store`]; the committer thread is in
//! `committer.rs`, the reader threads in `readers.rs`.
//!
//! A point read is first tried from memory (memtables and block cache) on
//! the caller's runtime thread; one that needs the files goes to the reader
//! threads, which take every read queued when they wake. Scans, purges and
//! checkpoints run on tokio's blocking pool. Writes go through one committer
//! thread that drains every batch waiting in its queue into a single
//! `WriteBatch` and a single (fsync'd, by default) write: concurrent requests
//! share one sync instead of queueing behind each other's, which is what lets
//! a synced single-item tokenize scale with concurrency.

mod committer;
mod readers;
#[cfg(test)]
mod tests;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
};

use committer::run_committer;
pub use readers::ReaderStats;
use readers::Readers;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, Direction, ErrorKind,
    IteratorMode, Options, ReadOptions, ReadTier,
    statistics::{StatsLevel, Ticker},
};
use tokio::sync::{mpsc, oneshot};

use super::{
    Batch, BlockCacheLookups, Durability, Error, HitsMisses, KeyValues, ReadTiers, Store,
    StoreStats, Table, UnitOutcomes,
    chain::{self, Head},
    commit::{COMMIT_QUEUE_DEPTH, Commit, Committed},
};

/// Memory all memtables may use together.
const MEMTABLE_BUDGET_BYTES: usize = 64 << 20;

/// Tuning for [`RocksStore::open`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Whether acknowledged writes are fsync'd.
    pub durability: Durability,
    /// Size of the block cache shared by all tables, in bytes.
    pub block_cache_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Sync,
            block_cache_bytes: 64 << 20,
        }
    }
}

/// A [`Store`] on an embedded RocksDB database.
pub struct RocksStore {
    db: Arc<DB>,
    /// `None` once [`RocksStore::close`] has begun.
    commits: Option<mpsc::Sender<Commit>>,
    committer: Option<thread::JoinHandle<()>>,
    committed: Arc<Committed>,
    /// The audit chain's head; the committer updates it after each write.
    head: Arc<Mutex<Head>>,
    path: PathBuf,
    /// Reads from memtables and block cache only (never I/O), made once.
    memory_only: ReadOptions,
    /// The threads that read what is not in memory.
    readers: Readers,
    /// What [`RocksStore::stats`] reports of reads (boxed: read rarely).
    counters: Box<ReadCounters>,
}

/// The store's own read counters and RocksDB's.
struct ReadCounters {
    /// The options the database was opened with: they hold its statistics
    /// (counters only).
    options: Options,
    /// Point reads answered from memory, and sent to the reader threads.
    from_memory: AtomicU64,
    from_files: AtomicU64,
}

impl RocksStore {
    /// Opens (creating if needed) the database in `path`.
    ///
    /// # Errors
    /// [`Error::Locked`] if another process holds the directory; other
    /// variants for engine failures.
    pub fn open(path: &Path, options: &StoreOptions) -> Result<Self, Error> {
        // HyperClockCache (0: its size-adapting variant) rather than LRU:
        // a hit takes no shard mutex and moves nothing in a list. Reads
        // of a million records from the cache, in process, paired rounds:
        // 1.25–1.31 × LRU's throughput (LRU against itself: 1.05).
        let cache = Cache::new_hyper_clock_cache(options.block_cache_bytes, 0);
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        db_opts.set_bytes_per_sync(1 << 20);
        db_opts.set_keep_log_file_num(5);
        // Bound all memtables together, so memory is the block cache plus
        // this plus a little, whatever the write load (see deploy/README.md).
        db_opts.set_db_write_buffer_size(MEMTABLE_BUDGET_BYTES);
        // The audit index's memtable is a vector (below), which takes one
        // writer at a time: the committer is the only writer anyway, so
        // concurrent memtable inserts never happened.
        db_opts.set_allow_concurrent_memtable_write(false);
        // Counters only (block cache hits and misses for the metrics and the
        // benchmark): no timers, no histograms, which cost on every read.
        db_opts.enable_statistics();
        db_opts.set_statistics_level(StatsLevel::ExceptHistogramOrTimers);

        let mut cfs: Vec<ColumnFamilyDescriptor> = Table::ALL
            .map(|table| {
                let mut cf_opts = Options::default();
                let mut table_opts = BlockBasedOptions::default();
                table_opts.set_block_cache(&cache);
                table_opts.set_cache_index_and_filter_blocks(true);
                table_opts.set_pin_l0_filter_and_index_blocks_in_cache(true);
                cf_opts.set_write_buffer_size(match table {
                    Table::Records => MEMTABLE_BUDGET_BYTES / 2,
                    // Every call writes an event: under reads, the audit
                    // table takes most of the writes, and a small memtable
                    // flushed it several times a second (L0 files piling
                    // up until writes stall).
                    Table::Audit => MEMTABLE_BUDGET_BYTES / 4,
                    _ => 4 << 20,
                });
                if table == Table::Records {
                    // Records are read by exact key: a bloom filter saves a
                    // block read for every miss.
                    table_opts.set_bloom_filter(10.0, false);
                    cf_opts.set_compression_type(DBCompressionType::Lz4);
                }
                if table == Table::AuditIndex {
                    // Each audit event adds an entry keyed by a subject: a
                    // random key, whose skiplist insert (a walk with cache
                    // misses all the way down) cost a detokenize of a
                    // subject's value ~5 % of the machine in the benchmark.
                    // A vector memtable appends and sorts once, at flush;
                    // the index is read rarely (an access history), and a
                    // read sorts the few megabytes not yet flushed.
                    cf_opts.set_memtable_factory(rocksdb::MemtableFactory::Vector);
                }
                if matches!(table, Table::Records | Table::Index) {
                    // The same for the memtables: most reads are of keys written
                    // before the last flush, and a whole-key bloom filter lets
                    // them skip the skiplist walk (cache misses all the way down;
                    // ~14 % of server CPU under single-token detokenize).
                    cf_opts.set_memtable_prefix_bloom_ratio(0.05);
                    cf_opts.set_memtable_whole_key_filtering(true);
                }
                cf_opts.set_block_based_table_factory(&table_opts);
                ColumnFamilyDescriptor::new(table.name(), cf_opts)
            })
            .into();
        // Tables a later release added: RocksDB opens a database only with
        // every column family it has, so opening them (untouched) is what
        // lets a vault roll back to this release.
        for name in DB::list_cf(&db_opts, path).unwrap_or_default() {
            if name != rocksdb::DEFAULT_COLUMN_FAMILY_NAME
                && !Table::ALL.iter().any(|t| t.name() == name)
            {
                tracing::warn!(table = %name, "the data directory has a table this release does not know (written by a later release?); it is kept as it is");
                cfs.push(ColumnFamilyDescriptor::new(name, Options::default()));
            }
        }

        let db = DB::open_cf_descriptors(&db_opts, path, cfs)
            .map_err(|e| classify_open_error(e, path))?;
        let db = Arc::new(db);
        let head = Arc::new(Mutex::new(read_head(&db)?));
        let committed = Arc::new(Committed::default());
        let (tx, rx) = mpsc::channel(COMMIT_QUEUE_DEPTH);
        let committer = {
            let db = Arc::clone(&db);
            let committed = Arc::clone(&committed);
            let head = Arc::clone(&head);
            let sync = options.durability == Durability::Sync;
            thread::Builder::new()
                .name("tokenvault-commit".into())
                .spawn(move || run_committer(&db, rx, sync, &committed, &head))
                .map_err(|e| Error::Backend(format!("cannot start the commit thread: {e}")))?
        };
        let mut memory_only = ReadOptions::default();
        memory_only.set_read_tier(ReadTier::BlockCache);
        let readers = Readers::start(&db)?;
        Ok(Self {
            db,
            memory_only,
            readers,
            counters: Box::new(ReadCounters {
                options: db_opts,
                from_memory: AtomicU64::new(0),
                from_files: AtomicU64::new(0),
            }),
            commits: Some(tx),
            committer: Some(committer),
            committed,
            head,
            path: path.to_owned(),
        })
    }

    /// Opens the database read-only, for offline tools (`audit verify`,
    /// `audit export`). Works while a server holds the directory, and on a
    /// vault (or backup) made before a table was added: a table it lacks
    /// reads as empty.
    ///
    /// # Errors
    /// Engine failures, e.g. no database in `path`.
    pub fn open_read_only(path: &Path) -> Result<ReadOnlyStore, Error> {
        let existing = DB::list_cf(&Options::default(), path).map_err(classify)?;
        let names = Table::ALL
            .map(Table::name)
            .into_iter()
            .filter(|name| existing.iter().any(|e| e == name));
        let db =
            DB::open_cf_for_read_only(&Options::default(), path, names, false).map_err(classify)?;
        Ok(ReadOnlyStore { db })
    }

    /// Numbers for the metrics endpoint.
    pub fn stats(&self) -> StoreStats {
        let int = |table: Table, name: &str| {
            cf(&self.db, table)
                .ok()
                .and_then(|cf| self.db.property_int_value_cf(cf, name).ok().flatten())
                .unwrap_or(0)
        };
        let records = int(Table::Records, "rocksdb.estimate-num-keys");
        let pending: u64 = Table::ALL
            .iter()
            .map(|t| int(*t, "rocksdb.estimate-pending-compaction-bytes"))
            .sum();
        let wal = std::fs::read_dir(&self.path)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        let lookups = |hit: Ticker, miss: Ticker| HitsMisses {
            hits: self.counters.options.get_ticker_count(hit),
            misses: self.counters.options.get_ticker_count(miss),
        };
        StoreStats {
            records,
            pending_compaction_bytes: pending,
            wal_bytes: wal,
            reads: ReadTiers {
                memory: self.counters.from_memory.load(Ordering::Relaxed),
                files: self.counters.from_files.load(Ordering::Relaxed),
            },
            block_cache: BlockCacheLookups {
                data: lookups(Ticker::BlockCacheDataHit, Ticker::BlockCacheDataMiss),
                index: lookups(Ticker::BlockCacheIndexHit, Ticker::BlockCacheIndexMiss),
                filter: lookups(Ticker::BlockCacheFilterHit, Ticker::BlockCacheFilterMiss),
            },
            commits: self.committed.counts(),
        }
    }

    /// Counters of the reader threads.
    pub fn reader_stats(&self) -> ReaderStats {
        self.readers.stats()
    }

    /// The directory the database lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting writes, waits for queued ones and the committer
    /// thread, then closes the database. Dropping the store does the same.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.readers.stop();
        self.commits.take();
        if let Some(handle) = self.committer.take()
            && handle.join().is_err()
        {
            tracing::error!("the commit thread panicked");
        }
    }

    /// Reads one key synchronously. For tools that run without a runtime
    /// (tests that inspect the data directory, offline commands).
    ///
    /// # Errors
    /// Engine failures.
    #[cfg(any(test, feature = "testkit"))]
    pub fn get_blocking(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let cf = cf(&self.db, table)?;
        self.db.get_cf(cf, key).map_err(classify)
    }

    /// Writes one key synchronously, bypassing the committer. For tools and
    /// tests that edit a stopped vault's data directory.
    ///
    /// # Errors
    /// Engine failures.
    #[cfg(any(test, feature = "testkit"))]
    pub fn put_blocking(&self, table: Table, key: &[u8], value: &[u8]) -> Result<(), Error> {
        let cf = cf(&self.db, table)?;
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        self.db.put_cf_opt(cf, key, value, &opts).map_err(classify)
    }
}

impl RocksStore {
    /// Deletes one key synchronously, bypassing the committer. For tools and
    /// tests that edit a stopped vault's data directory.
    ///
    /// # Errors
    /// Engine failures.
    #[cfg(any(test, feature = "testkit"))]
    pub fn delete_blocking(&self, table: Table, key: &[u8]) -> Result<(), Error> {
        let cf = cf(&self.db, table)?;
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        self.db.delete_cf_opt(cf, key, &opts).map_err(classify)
    }
}

impl Drop for RocksStore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Store for RocksStore {
    async fn get_many(
        &self,
        table: Table,
        keys: Vec<Vec<u8>>,
    ) -> Result<Vec<Option<Vec<u8>>>, Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // First from memory only (memtables and block cache) on this thread:
        // that tier never does I/O, so it cannot stall the runtime, and it
        // saves the hand-off to a reader thread (two context switches) for
        // the hot keys most reads are after. A key that would need the disk
        // sends the whole read to the reader threads.
        //
        // One Get per key, not MultiGet: RocksDB 11.8's batched MultiGet
        // with this read tier returned corrupted values under load (the
        // bench saw DATA_LOSS on about 1 read in 10,000 after a 1M-token
        // preload, every run; single Gets with the same tier: none in three
        // runs, nor MultiGet with the default tier). Several Gets read one
        // snapshot, as the trait promises: a re-index moves an entry from
        // one key to another in one batch, and a lookup that read the two
        // keys at two moments could miss it under both.
        {
            let cf = cf(&self.db, table)?;
            let mut found = Vec::with_capacity(keys.len());
            let mut complete = true;
            let snapshot = (keys.len() > 1).then(|| self.db.snapshot());
            let several;
            let read = match &snapshot {
                Some(snapshot) => {
                    let mut options = ReadOptions::default();
                    options.set_read_tier(ReadTier::BlockCache);
                    options.set_snapshot(snapshot);
                    several = options;
                    &several
                }
                None => &self.memory_only,
            };
            for key in &keys {
                match self.db.get_pinned_cf_opt(cf, key, read) {
                    Ok(value) => found.push(value.map(|v| v.to_vec())),
                    Err(e) if e.kind() == ErrorKind::Incomplete => {
                        complete = false;
                        break;
                    }
                    Err(e) => return Err(classify(e)),
                }
            }
            if complete {
                self.counters.from_memory.fetch_add(1, Ordering::Relaxed);
                return Ok(found);
            }
            self.counters.from_files.fetch_add(1, Ordering::Relaxed);
        }
        // MultiGet reads all its keys at one sequence number by itself.
        self.readers.read(table, keys).await
    }

    async fn scan_prefix(&self, table: Table, prefix: Vec<u8>) -> Result<KeyValues, Error> {
        let db = Arc::clone(&self.db);
        blocking(move || {
            let cf = cf(&db, table)?;
            let mut out = Vec::new();
            for item in db.iterator_cf(cf, IteratorMode::From(&prefix, Direction::Forward)) {
                let (key, value) = item.map_err(classify)?;
                if !key.starts_with(&prefix) {
                    break;
                }
                out.push((key.into_vec(), value.into_vec()));
            }
            Ok(out)
        })
        .await
    }

    async fn scan_from(
        &self,
        table: Table,
        from: Vec<u8>,
        limit: usize,
    ) -> Result<KeyValues, Error> {
        let db = Arc::clone(&self.db);
        blocking(move || {
            let cf = cf(&db, table)?;
            let mut out = Vec::new();
            for item in db.iterator_cf(cf, IteratorMode::From(&from, Direction::Forward)) {
                if out.len() >= limit {
                    break;
                }
                let (key, value) = item.map_err(classify)?;
                out.push((key.into_vec(), value.into_vec()));
            }
            Ok(out)
        })
        .await
    }

    async fn estimated_len(&self, table: Table) -> u64 {
        // RocksDB's own estimate: a property read, no scan.
        cf(&self.db, table)
            .ok()
            .and_then(|cf| {
                self.db
                    .property_int_value_cf(cf, "rocksdb.estimate-num-keys")
                    .ok()
                    .flatten()
            })
            .unwrap_or(0)
    }

    async fn purge(&self, keys: Vec<(Table, Vec<u8>)>) -> Result<(), Error> {
        let db = Arc::clone(&self.db);
        blocking(move || {
            let mut flush = rocksdb::FlushOptions::default();
            flush.set_wait(true);
            for table in Table::ALL {
                db.flush_cf_opt(cf(&db, table)?, &flush).map_err(classify)?;
            }
            let mut opts = rocksdb::CompactOptions::default();
            // Rewrite the bottom level too, so no older copy survives there.
            opts.set_bottommost_level_compaction(
                rocksdb::BottommostLevelCompaction::ForceOptimized,
            );
            for (table, start, end) in compaction_ranges(keys) {
                db.compact_range_cf_opt(cf(&db, table)?, Some(&start), Some(&end), &opts);
            }
            Ok(())
        })
        .await
    }

    fn checkpoints(&self) -> Result<&impl super::Checkpoints, Error> {
        Ok(self)
    }

    fn audit_head(&self) -> Head {
        *self
            .head
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn commit(&self, batch: Batch) -> Result<UnitOutcomes, Error> {
        let commits = self.commits.as_ref().ok_or(Error::Closed)?;
        let (done, result) = oneshot::channel();
        commits
            .send(Commit { batch, done })
            .await
            .map_err(|_| Error::Closed)?;
        result.await.map_err(|_| Error::Closed)?
    }
}

/// Runs `f` on tokio's blocking pool so a slow disk never stalls a runtime
/// worker thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Backend(format!("storage task failed: {e}")))?
}

/// The newest audit entry on disk, or the empty chain.
fn read_head(db: &DB) -> Result<Head, Error> {
    let mut iter = db.iterator_cf(cf(db, Table::Audit)?, IteratorMode::End);
    match iter.next() {
        None => Ok(Head::default()),
        Some(item) => {
            let (key, value) = item.map_err(classify)?;
            let seq = chain::seq_of(&key)
                .ok_or_else(|| Error::Corruption("audit key is not a sequence number".into()))?;
            Ok(Head {
                seq,
                hash: chain::hash(seq, &value),
            })
        }
    }
}

impl super::Checkpoints for RocksStore {
    async fn checkpoint(&self, path: PathBuf) -> Result<(), Error> {
        let db = Arc::clone(&self.db);
        blocking(move || {
            rocksdb::checkpoint::Checkpoint::new(&db)
                .and_then(|c| c.create_checkpoint(&path))
                .map_err(classify)
        })
        .await
    }
}

/// A read-only view of a vault's database for offline tools: the state
/// at the moment it was opened.
pub struct ReadOnlyStore {
    db: DB,
}

impl super::Snapshot for ReadOnlyStore {
    fn scan(
        &self,
        table: Table,
        from: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), Error> {
        let Some(handle) = self.db.cf_handle(table.name()) else {
            return Ok(());
        };
        for item in self
            .db
            .iterator_cf(handle, IteratorMode::From(from, Direction::Forward))
        {
            let (key, value) = item.map_err(classify)?;
            if !f(&key, &value) {
                break;
            }
        }
        Ok(())
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        match self.db.cf_handle(table.name()) {
            Some(handle) => self.db.get_cf(handle, key).map_err(classify),
            None => Ok(None),
        }
    }
}

fn cf(db: &DB, table: Table) -> Result<&rocksdb::ColumnFamily, Error> {
    db.cf_handle(table.name())
        .ok_or_else(|| Error::Backend(format!("column family {} is missing", table.name())))
}

fn classify(e: rocksdb::Error) -> Error {
    let kind = e.kind();
    let message = e.into_string();
    match kind {
        ErrorKind::Corruption => Error::Corruption(message),
        _ if message.contains("No space left") => Error::NoSpace(message),
        _ => Error::Backend(message),
    }
}

fn classify_open_error(e: rocksdb::Error, path: &Path) -> Error {
    let message = e.as_ref().to_owned();
    if message.contains("lock") && (message.contains("LOCK") || message.contains("Resource")) {
        return Error::Locked {
            path: path.display().to_string(),
        };
    }
    classify(e)
}

/// Up to this many keys of one table are compacted one by one; more are
/// compacted as one range from the smallest to the largest.
const KEYS_COMPACTED_ONE_BY_ONE: usize = 16;

/// The ranges [start, end) to compact so that `keys` leave the files: few
/// keys each get their own small range; many keys of one table (an erasure
/// of a subject with thousands of tokens, spread over the whole table by
/// their random tokens) get one range covering them all, so the table is
/// rewritten once rather than once per key.
fn compaction_ranges(keys: Vec<(Table, Vec<u8>)>) -> Vec<(Table, Vec<u8>, Vec<u8>)> {
    let just_after = |key: &[u8]| [key, &[0]].concat();
    let mut ranges = Vec::new();
    for table in Table::ALL {
        let mut mine: Vec<Vec<u8>> = keys
            .iter()
            .filter(|(t, _)| *t == table)
            .map(|(_, key)| key.clone())
            .collect();
        mine.sort_unstable();
        mine.dedup();
        match (mine.first(), mine.last()) {
            (Some(first), Some(last)) if mine.len() > KEYS_COMPACTED_ONE_BY_ONE => {
                ranges.push((table, first.clone(), just_after(last)));
            }
            _ => ranges.extend(mine.iter().map(|key| (table, key.clone(), just_after(key)))),
        }
    }
    ranges
}
