//! Storage: ordered key-value tables with atomic, durable batches.
//!
//! [`Store`] is the only view the layers above have of storage; the RocksDB
//! engine ([`RocksStore`]) lives behind it and nothing above this module names
//! RocksDB. The store sees only bytes it is handed: records arrive already
//! encrypted, keys already wrapped.

pub mod chain;
mod commit;
#[cfg(test)]
pub(crate) mod conformance;
mod decide;
mod engine;
pub mod postgres;
mod rocks;

use std::future::Future;

pub use engine::{AnySnapshot, AnyStore};
pub use postgres::{
    PgSnapshot, PgStore,
    ledger::{Appended, LedgerTable},
};
pub use rocks::{ReadOnlyStore, RocksStore, StoreOptions};

/// The tables (RocksDB column families) the vault uses. What their keys
/// are is `crate::layout`'s business; the store sees bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// Encrypted records, keyed by token.
    Records,
    /// Data keys and hash keys, wrapped by the master key, keyed by label.
    Keys,
    /// Bookkeeping: background jobs' cursors and progress, the audit prune
    /// marker, the vault's copy of the erasure ledger, one-time migration
    /// markers (see `layout`'s meta section).
    Meta,
    /// Blind index of deterministic field types: keyed hash of the value →
    /// token.
    Index,
    /// The audit trail: a hash chain (see [`chain`]) of events.
    Audit,
    /// Signed checkpoints of the audit chain, by sequence number.
    AuditCheckpoints,
    /// Subject hash + token → nothing: what export and erasure find a
    /// subject's values by.
    SubjectIndex,
    /// Subject hash + purpose → consent decision.
    Consent,
    /// Expiry (ms since the epoch, big-endian) + token → nothing: what the
    /// retention sweep reads, so that it visits only records that are due.
    Expiry,
    /// Index prefix + audit sequence number (newest first, see
    /// [`chain::index_key`]) → nothing: written by the committer with each
    /// audit entry that names index prefixes, so that a data subject's
    /// events are found without reading the whole trail.
    AuditIndex,
}

impl Table {
    /// Every table, in the order they are created.
    pub const ALL: [Table; 10] = [
        Table::Records,
        Table::Keys,
        Table::Meta,
        Table::Index,
        Table::Audit,
        Table::AuditCheckpoints,
        Table::SubjectIndex,
        Table::Consent,
        Table::Expiry,
        Table::AuditIndex,
    ];

    /// The column family name on disk. Never change a released name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Records => "records",
            Table::Keys => "keys",
            Table::Meta => "meta",
            Table::Index => "blind_index",
            Table::Audit => "audit",
            Table::AuditCheckpoints => "audit_checkpoints",
            Table::SubjectIndex => "subject_index",
            Table::Consent => "consent",
            Table::Expiry => "expiry",
            Table::AuditIndex => "audit_index",
        }
    }
}

/// How an acknowledged write is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// The write-ahead log is fsync'd before a write is acknowledged: an
    /// acknowledged write survives power loss. The default.
    Sync,
    /// The write-ahead log is written but not fsync'd: an acknowledged write
    /// survives a process crash but may be lost with the machine.
    Buffered,
}

/// One change in a [`Batch`].
#[derive(Debug)]
pub enum Op {
    /// Set `key` to `value` in `table`.
    Put {
        /// The table.
        table: Table,
        /// The key.
        key: Vec<u8>,
        /// The value (already encrypted where it needs to be).
        value: Vec<u8>,
    },
    /// Remove `key` from `table`.
    Delete {
        /// The table.
        table: Table,
        /// The key.
        key: Vec<u8>,
    },
    /// Append `payload` to the audit chain; the committer assigns its
    /// sequence number and link, and indexes the entry under each of
    /// `index` (see [`chain::index_key`]) in the same write.
    AppendAudit {
        /// The encoded event.
        payload: Vec<u8>,
        /// The index prefixes the entry is found by.
        index: Vec<Vec<u8>>,
    },
}

/// Changes that go to storage in one write.
///
/// A batch is made of units. Every unit is applied whole or not at all, and
/// a unit may carry guards: keys that must not exist yet. A unit whose guard
/// key exists (in the store, or written by an earlier unit of the same
/// physical write) is skipped and reported as a [`Conflict`]; the other
/// units still apply. This is how a deterministic token is created exactly
/// once under concurrency, and how format-preserving tokens stay unique.
#[derive(Debug, Default)]
pub struct Batch {
    units: Vec<Unit>,
}

/// A part of a [`Batch`] that is applied whole or not at all.
#[derive(Debug, Default)]
pub struct Unit {
    ops: Vec<Op>,
    guards: Vec<(Table, Vec<u8>)>,
    /// Keys whose current value must still be this one (compare-and-set).
    unchanged: Vec<(Table, Vec<u8>, Vec<u8>)>,
}

impl Unit {
    /// How many distinct keys the unit guards or writes: what an engine
    /// that locks keys locks for it.
    pub fn keys_touched(&self) -> usize {
        let written = self.ops.iter().filter_map(|op| match op {
            Op::Put { table, key, .. } | Op::Delete { table, key } => Some((*table, &key[..])),
            Op::AppendAudit { .. } => None,
        });
        let guarded = self
            .guards
            .iter()
            .map(|(table, key)| (*table, &key[..]))
            .chain(
                self.unchanged
                    .iter()
                    .map(|(table, key, _)| (*table, &key[..])),
            );
        written
            .chain(guarded)
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    /// Adds a put.
    pub fn put(&mut self, table: Table, key: impl Into<Vec<u8>>, value: Vec<u8>) -> &mut Self {
        self.ops.push(Op::Put {
            table,
            key: key.into(),
            value,
        });
        self
    }

    /// Adds a delete.
    pub fn delete(&mut self, table: Table, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Delete {
            table,
            key: key.into(),
        });
        self
    }

    /// Appends an event to the audit chain, in the same write as the rest.
    pub fn append_audit(&mut self, payload: Vec<u8>) -> &mut Self {
        self.append_audit_indexed(payload, Vec::new())
    }

    /// Appends an event to the audit chain and indexes it under each of
    /// `index` in [`Table::AuditIndex`], all in the same write as the rest.
    pub fn append_audit_indexed(&mut self, payload: Vec<u8>, index: Vec<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::AppendAudit { payload, index });
        self
    }

    /// Applies the unit only if `key` does not exist in `table`.
    pub fn guard_absent(&mut self, table: Table, key: impl Into<Vec<u8>>) -> &mut Self {
        self.guards.push((table, key.into()));
        self
    }

    /// Applies the unit only if `key` in `table` still holds `expected`
    /// (nobody changed it since it was read). A unit skipped for this is
    /// reported as a [`Conflict`] with [`FailedGuard::Unchanged`].
    pub fn guard_unchanged(
        &mut self,
        table: Table,
        key: impl Into<Vec<u8>>,
        expected: Vec<u8>,
    ) -> &mut Self {
        self.unchanged.push((table, key.into(), expected));
        self
    }

    /// The keys that must still hold a given value.
    pub fn unchanged(&self) -> &[(Table, Vec<u8>, Vec<u8>)] {
        &self.unchanged
    }

    /// The changes, in order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// The keys that must be absent.
    pub fn guards(&self) -> &[(Table, Vec<u8>)] {
        &self.guards
    }
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a new unit and returns it.
    pub fn unit(&mut self) -> &mut Unit {
        self.units.push(Unit::default());
        let last = self.units.len() - 1;
        &mut self.units[last]
    }

    /// Adds a put to the current unit (starting one if there is none).
    pub fn put(&mut self, table: Table, key: impl Into<Vec<u8>>, value: Vec<u8>) {
        self.current().put(table, key, value);
    }

    /// Adds a delete to the current unit (starting one if there is none).
    pub fn delete(&mut self, table: Table, key: impl Into<Vec<u8>>) {
        self.current().delete(table, key);
    }

    fn current(&mut self) -> &mut Unit {
        if self.units.is_empty() {
            self.units.push(Unit::default());
        }
        let last = self.units.len() - 1;
        &mut self.units[last]
    }

    /// How many changes the batch holds.
    pub fn len(&self) -> usize {
        self.units.iter().map(|u| u.ops.len()).sum()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The units, in order.
    pub fn units(&self) -> &[Unit] {
        &self.units
    }
}

/// A unit that was skipped because one of its guards did not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// Which guard of the unit failed.
    pub guard: FailedGuard,
    /// The value stored under that guard's key now (empty if none).
    pub existing: Vec<u8>,
}

/// The guard a [`Conflict`] names, by kind and by its position among the
/// unit's guards of that kind (in the order they were added).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailedGuard {
    /// A [`Unit::guard_absent`] key exists.
    Absent(usize),
    /// A [`Unit::guard_unchanged`] key holds another value, or none.
    Unchanged(usize),
}

/// The engine's numbers for the metrics endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Records stored (the engine's estimate).
    pub records: u64,
    /// Bytes waiting for compaction, over every table.
    pub pending_compaction_bytes: u64,
    /// The size of the write-ahead log files.
    pub wal_bytes: u64,
    /// Point reads since the engine opened, by where they were answered.
    pub reads: ReadTiers,
    /// Block cache lookups since the engine opened, by kind of block.
    pub block_cache: BlockCacheLookups,
    /// Batches committed since the engine opened, and the writes they
    /// were grouped into.
    pub commits: CommitGroups,
}

/// Committed batches (one per caller of [`Store::commit`]) and the groups
/// they shared: one RocksDB write or one PostgreSQL transaction each.
/// Batches per group is how much concurrent requests share a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommitGroups {
    /// Batches committed.
    pub batches: u64,
    /// Groups (writes or transactions) they were committed in.
    pub groups: u64,
    /// Groups that failed: nothing of them was written (a write outage
    /// shows here).
    pub failed_groups: u64,
}

/// Point reads (one call of [`Store::get_many`], whatever its number of
/// keys) by where they were answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadTiers {
    /// From memory (memtables and block cache) on the caller's thread.
    pub memory: u64,
    /// Off the caller's thread (RocksDB: on a reader thread), because a
    /// block had to be read from a file.
    pub files: u64,
}

/// Block cache lookups by kind of block, counted since the engine opened:
/// a miss is a read from the file system (the OS page cache or the disk)
/// and, for data blocks, a decompression. Compactions' lookups count too,
/// and a read that the memory tier cannot finish counts its miss twice
/// (once there, once on a reader thread): [`ReadTiers`] is the hit ratio
/// of reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockCacheLookups {
    /// Blocks of records, index entries, keys and events.
    pub data: HitsMisses,
    /// The tables' index blocks (which data block holds a key).
    pub index: HitsMisses,
    /// The tables' bloom filter blocks.
    pub filter: HitsMisses,
}

/// Lookups found in a cache, and not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HitsMisses {
    /// Found.
    pub hits: u64,
    /// Not found.
    pub misses: u64,
}

/// What became of each unit of a committed batch, in order.
pub type UnitOutcomes = Vec<Result<(), Conflict>>;

/// A storage failure. Messages name files and operations, never stored bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another process (or another open in this one) holds the data directory.
    #[error(
        "data directory {path} is in use by another tokenvault process (RocksDB lock held); stop it or choose another data_dir"
    )]
    Locked {
        /// The data directory.
        path: String,
    },
    /// The storage device is full.
    #[error("storage is full: {0}")]
    NoSpace(String),
    /// The engine reported corruption.
    #[error("storage corruption: {0}")]
    Corruption(String),
    /// Any other engine or I/O failure.
    #[error("storage error: {0}")]
    Backend(String),
    /// The store is shutting down and accepts no more writes.
    #[error("storage is closed")]
    Closed,
    /// This engine does not do that; the message says what to do instead.
    #[error("{0}")]
    Unsupported(&'static str),
    /// The shared database went back in time under this process (restored
    /// from a backup, or failed over to a standby that lacked the last
    /// commits): what it acknowledged may be gone and what was erased may
    /// be back. The process takes no more writes; a restart re-applies the
    /// erasure ledger.
    #[error("the database went back in time: {0}")]
    Rewound(String),
    /// The commit was sent and its answer never came (the connection
    /// dropped, or the call's deadline passed): the write may have been
    /// applied or not.
    #[error("the commit's answer was lost, the write may have been applied: {0}")]
    Indeterminate(String),
}

impl Error {
    /// A copy of this error for each caller in a failed group commit.
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            Error::Locked { path } => Error::Locked { path: path.clone() },
            Error::NoSpace(m) => Error::NoSpace(m.clone()),
            Error::Corruption(m) => Error::Corruption(m.clone()),
            Error::Backend(m) => Error::Backend(m.clone()),
            Error::Closed => Error::Closed,
            Error::Unsupported(what) => Error::Unsupported(what),
            Error::Rewound(m) => Error::Rewound(m.clone()),
            Error::Indeterminate(m) => Error::Indeterminate(m.clone()),
        }
    }
}

/// Key-value pairs in key order, as a scan returns them.
pub type KeyValues = Vec<(Vec<u8>, Vec<u8>)>;

/// One point in time of a vault's tables, read-only: what the offline
/// tools (`audit verify`, `audit export`, `report processing`, `backup
/// verify`) read, from a RocksDB directory ([`ReadOnlyStore`]) or a
/// PostgreSQL database ([`PgSnapshot`]), stopped or running. Blocking:
/// for tools, not for a server's runtime.
pub trait Snapshot {
    /// Calls `f` with each key and value of `table` from `from` on, in key
    /// order, until it returns false.
    ///
    /// # Errors
    /// Engine failures.
    fn scan(
        &self,
        table: Table,
        from: &[u8],
        f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), Error>;

    /// Reads one key.
    ///
    /// # Errors
    /// Engine failures.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, Error>;
}

/// An engine that copies itself to a directory while it serves
/// ([`Store::checkpoints`]).
pub trait Checkpoints: Send + Sync {
    /// Writes a consistent point-in-time copy of the whole store to `path`
    /// (which must not exist), while writes continue.
    fn checkpoint(
        &self,
        path: std::path::PathBuf,
    ) -> impl Future<Output = Result<(), Error>> + Send;
}

/// The checkpoints of an engine that makes none: no value of it exists.
pub enum NoCheckpoints {}

impl Checkpoints for NoCheckpoints {
    async fn checkpoint(&self, _path: std::path::PathBuf) -> Result<(), Error> {
        match *self {}
    }
}

/// Ordered tables with atomic, durable batches.
///
/// Every method is async and never blocks the caller's runtime thread: an
/// engine does its blocking work elsewhere.
pub trait Store: Send + Sync + 'static {
    /// Reads several keys of one table; one result per key, in order, all
    /// as of one point in time (no commit lands between two of them).
    fn get_many(
        &self,
        table: Table,
        keys: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<Vec<Option<Vec<u8>>>, Error>> + Send;

    /// Every key and value in `table` whose key starts with `prefix`, in key
    /// order. For small tables only (keys, meta).
    fn scan_prefix(
        &self,
        table: Table,
        prefix: Vec<u8>,
    ) -> impl Future<Output = Result<KeyValues, Error>> + Send;

    /// Applies `batch` in one write, durable as configured when it returns
    /// Ok, with one outcome per unit. Concurrent commits may share one
    /// physical write (group commit).
    fn commit(&self, batch: Batch) -> impl Future<Output = Result<UnitOutcomes, Error>> + Send;

    /// The newest entry of the audit chain, as of the last commit.
    fn audit_head(&self) -> chain::Head;

    /// Up to `limit` keys and values of `table` from `from` (inclusive) on,
    /// in key order: a page of a scan over a large table.
    fn scan_from(
        &self,
        table: Table,
        from: Vec<u8>,
        limit: usize,
    ) -> impl Future<Output = Result<KeyValues, Error>> + Send;

    /// The engine's own backups, where it makes them (RocksDB); the reason
    /// where the database is backed up by its own tools (PostgreSQL). A
    /// caller holds this before it records a backup, so that nothing is
    /// recorded for one the engine cannot make.
    ///
    /// # Errors
    /// [`Error::Unsupported`], saying how this engine is backed up.
    fn checkpoints(&self) -> Result<&impl Checkpoints, Error>;

    /// About how many keys `table` holds, for a job's progress; 0 if the
    /// engine cannot tell now.
    fn estimated_len(&self, table: Table) -> impl Future<Output = u64> + Send;

    /// Makes deleted keys leave the data files: flushes memtables (so the
    /// write-ahead log holding the old values is retired) and compacts the
    /// ranges holding `keys`.
    fn purge(&self, keys: Vec<(Table, Vec<u8>)>) -> impl Future<Output = Result<(), Error>> + Send;

    /// The most keys one unit of a request may touch ([`Unit::keys_touched`])
    /// without holding up every other writer: `None` where no unit does
    /// (one process, one committer). PostgreSQL's writers lock the keys
    /// they touch, and a group past its bound locks out every other writer
    /// of every replica instead.
    fn max_keys_per_request(&self) -> Option<usize> {
        None
    }

    /// Whether this process should run the background jobs that one process
    /// at a time runs (key-rotation jobs, retention sweeps, audit
    /// checkpoints and pruning). An engine that one process owns says yes;
    /// one that processes share lets one of them at a time say yes, and
    /// another once that one is gone.
    fn leads_background_jobs(&self) -> impl Future<Output = bool> + Send {
        std::future::ready(true)
    }
}
