//! The engine a server runs on, chosen by its configuration
//! (`storage.engine`): one type the layers above can hold whichever it is.

use super::{
    Batch, Error, KeyValues, PgSnapshot, PgStore, ReadOnlyStore, RocksStore, Snapshot, Store,
    StoreStats, Table, UnitOutcomes, chain::Head,
};

/// A snapshot on either engine, for the offline tools.
pub enum AnySnapshot {
    /// A RocksDB directory, opened read-only.
    RocksDb(ReadOnlyStore),
    /// A PostgreSQL database, in one read-only transaction.
    Postgres(Box<PgSnapshot>),
}

impl Snapshot for AnySnapshot {
    fn scan(
        &self,
        table: Table,
        from: &[u8],
        f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), Error> {
        match self {
            AnySnapshot::RocksDb(snapshot) => snapshot.scan(table, from, f),
            AnySnapshot::Postgres(snapshot) => snapshot.scan(table, from, f),
        }
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        match self {
            AnySnapshot::RocksDb(snapshot) => snapshot.get(table, key),
            AnySnapshot::Postgres(snapshot) => snapshot.get(table, key),
        }
    }
}

/// A store on either engine.
pub enum AnyStore {
    /// The embedded engine: one process, one directory.
    RocksDb(RocksStore),
    /// Replicas sharing one PostgreSQL database (boxed: its connections
    /// make it several times the size of the other).
    Postgres(Box<PgStore>),
}

impl AnyStore {
    /// The engine's numbers for the metrics endpoint (for PostgreSQL only
    /// the commits: its server has its own monitoring).
    pub fn stats(&self) -> StoreStats {
        match self {
            AnyStore::RocksDb(store) => store.stats(),
            AnyStore::Postgres(store) => store.stats(),
        }
    }

    /// Checks that the storage can serve now: always for the embedded
    /// engine; for PostgreSQL, that a query gets an answer (a lost
    /// connection is made again on the way) and that the database has not
    /// gone back behind what this process saw of it.
    ///
    /// # Errors
    /// [`Error::Rewound`] for a database that went back in time (for
    /// good); the error of one that does not answer.
    pub async fn check(&self) -> Result<(), Error> {
        match self {
            AnyStore::RocksDb(_) => Ok(()),
            AnyStore::Postgres(store) => store.check_history().await,
        }
    }

    /// Refuses every write from now on (the database went back, as the
    /// erasure ledger shows): see [`PgStore::refuse_writes`]. The embedded
    /// engine's ledger is checked at open only, so it has nothing to do.
    pub fn refuse_writes(&self, why: String) {
        if let AnyStore::Postgres(store) = self {
            store.refuse_writes(why);
        }
    }

    /// Closes the store once its last write is done.
    pub async fn close(self) {
        match self {
            AnyStore::RocksDb(store) => store.close(),
            AnyStore::Postgres(store) => store.close().await,
        }
    }
}

/// Calls `$call` on whichever engine `$store` is.
macro_rules! on_engine {
    ($store:expr, $engine:ident => $call:expr) => {
        match $store {
            AnyStore::RocksDb($engine) => $call,
            AnyStore::Postgres($engine) => $call,
        }
    };
}

impl Store for AnyStore {
    async fn get_many(
        &self,
        table: Table,
        keys: Vec<Vec<u8>>,
    ) -> Result<Vec<Option<Vec<u8>>>, Error> {
        on_engine!(self, store => store.get_many(table, keys).await)
    }

    async fn scan_prefix(&self, table: Table, prefix: Vec<u8>) -> Result<KeyValues, Error> {
        on_engine!(self, store => store.scan_prefix(table, prefix).await)
    }

    async fn commit(&self, batch: Batch) -> Result<UnitOutcomes, Error> {
        on_engine!(self, store => store.commit(batch).await)
    }

    fn audit_head(&self) -> Head {
        on_engine!(self, store => store.audit_head())
    }

    async fn scan_from(
        &self,
        table: Table,
        from: Vec<u8>,
        limit: usize,
    ) -> Result<KeyValues, Error> {
        on_engine!(self, store => store.scan_from(table, from, limit).await)
    }

    fn checkpoints(&self) -> Result<&impl super::Checkpoints, Error> {
        match self {
            AnyStore::RocksDb(store) => Ok(store),
            AnyStore::Postgres(_) => {
                Err(Error::Unsupported(super::postgres::BACKED_UP_BY_POSTGRES))
            }
        }
    }

    async fn estimated_len(&self, table: Table) -> u64 {
        on_engine!(self, store => store.estimated_len(table).await)
    }

    async fn purge(&self, keys: Vec<(Table, Vec<u8>)>) -> Result<(), Error> {
        on_engine!(self, store => store.purge(keys).await)
    }

    fn max_keys_per_request(&self) -> Option<usize> {
        on_engine!(self, store => store.max_keys_per_request())
    }

    async fn leads_background_jobs(&self) -> bool {
        on_engine!(self, store => store.leads_background_jobs().await)
    }
}
