//! The connections reads go through: a few of them, so the database serves
//! concurrent reads on more than one backend process, each with its
//! statements prepared once (a statement sent as text is parsed and
//! described on every call, one more round trip per read).

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

use tokio_postgres::{Row, Statement, types::ToSql};

use super::{Session, Target, classify};
use crate::store::Error;

/// How many connections each vault process reads through.
const READ_CONNECTIONS: usize = 4;

/// `(tbl, key)` → one row: the audit head's `seq` and `hash`, and the
/// value under `key` of `tbl` or NULL, in one snapshot.
pub(super) const HEAD_AND_ENTRY: &str = "SELECT h.seq, h.hash, \
     (SELECT value FROM tokenvault_kv WHERE tbl = $1 AND key = $2) \
     FROM tokenvault_audit_head h";

/// The statements reads use.
#[derive(Debug, Clone, Copy)]
pub(super) enum Read {
    /// `(tbl, keys[])` → every `(key, value)` found.
    GetMany,
    /// `(tbl, from, to)` → keys in `[from, to)`, in order.
    ScanRange,
    /// `(tbl, from)` → keys from `from` on, in order.
    ScanOpen,
    /// `(tbl, from, limit)` → at most `limit` keys from `from` on, in order.
    ScanFrom,
    /// `(tbl, key)` → one row: the audit head's `seq` and `hash`, and the
    /// value under `key` of `tbl` (the audit event numbered as the head
    /// the process saw) or NULL, in one snapshot.
    HeadAndEntry,
}

impl Read {
    const ALL: [Read; 5] = [
        Read::GetMany,
        Read::ScanRange,
        Read::ScanOpen,
        Read::ScanFrom,
        Read::HeadAndEntry,
    ];

    fn sql(self) -> &'static str {
        match self {
            Read::GetMany => {
                "SELECT key, value FROM tokenvault_kv WHERE tbl = $1 AND key = ANY($2)"
            }
            Read::ScanRange => {
                "SELECT key, value FROM tokenvault_kv \
                 WHERE tbl = $1 AND key >= $2 AND key < $3 ORDER BY key"
            }
            Read::ScanOpen => {
                "SELECT key, value FROM tokenvault_kv WHERE tbl = $1 AND key >= $2 ORDER BY key"
            }
            Read::ScanFrom => {
                "SELECT key, value FROM tokenvault_kv \
                 WHERE tbl = $1 AND key >= $2 ORDER BY key LIMIT $3"
            }
            Read::HeadAndEntry => HEAD_AND_ENTRY,
        }
    }
}

/// One connection and its prepared statements, in [`Read::ALL`]'s order
/// (which is the order of the variants, so `read as usize` indexes them).
struct Connection {
    client: Session,
    statements: Vec<Statement>,
    /// Set when a read on it passed the call deadline: its answer may
    /// still come, so it must not serve another read.
    abandoned: AtomicBool,
}

impl Connection {
    async fn open(target: &Target) -> Result<Self, Error> {
        let client = target.connect().await?;
        let mut statements = Vec::with_capacity(Read::ALL.len());
        for read in Read::ALL {
            statements.push(target.bounded(client.prepare(read.sql())).await?);
        }
        Ok(Self {
            client,
            statements,
            abandoned: AtomicBool::new(false),
        })
    }

    /// Whether it can serve no more reads.
    fn lost(&self) -> bool {
        self.client.is_closed() || self.abandoned.load(Ordering::Relaxed)
    }

    async fn run(
        &self,
        read: Read,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        self.client
            .query(&self.statements[read as usize], params)
            .await
    }
}

/// A connection that is replaced when it is lost (the database restarted,
/// or failed over to another host of the setting).
struct Slot {
    current: Mutex<Arc<Connection>>,
    /// Held while one caller reconnects; the others wait for its result.
    reconnecting: tokio::sync::Mutex<()>,
}

/// The read connections, used in turn.
pub(super) struct Reads {
    target: Target,
    slots: Vec<Slot>,
    next: AtomicUsize,
}

impl Reads {
    /// Opens every connection.
    pub(super) async fn connect(target: &Target) -> Result<Self, Error> {
        let mut slots = Vec::with_capacity(READ_CONNECTIONS);
        for _ in 0..READ_CONNECTIONS {
            slots.push(Slot {
                current: Mutex::new(Arc::new(Connection::open(target).await?)),
                reconnecting: tokio::sync::Mutex::new(()),
            });
        }
        Ok(Self {
            target: target.clone(),
            slots,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `read` on the next connection, within the call deadline. If
    /// that connection turns out to be gone (the database restarted, or
    /// failed over), connects it again (one attempt, bounded by the connect
    /// timeout) and runs the read once more there: a read changes nothing,
    /// so it can be repeated. A read past the deadline is not repeated (the
    /// database is slow or cut off); its connection is made again by the
    /// next read on it. If the database cannot be reached, the caller hears
    /// UNAVAILABLE.
    /// How many keys `table` holds: a count over the primary key's index,
    /// on a session of its own (opened and closed here, within the call
    /// deadline each), so that a long count never holds up the reads that
    /// share the pool's connections.
    pub(super) async fn count(&self, table: &str) -> Result<u64, Error> {
        let session = self.target.connect().await?;
        let row = self
            .target
            .bounded(session.query_one(
                "SELECT count(*) FROM tokenvault_kv WHERE tbl = $1",
                &[&table],
            ))
            .await?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    pub(super) async fn query(
        &self,
        read: Read,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        let slot = &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()];
        let mut connection = slot.connection();
        if connection.lost() {
            connection = self
                .reconnect(slot, &connection)
                .await
                .ok_or_else(|| Error::Backend("the database is unreachable".into()))?;
        }
        match self.run(&connection, read, params).await {
            Err(e) if connection.client.is_closed() => {
                match self.reconnect(slot, &connection).await {
                    Some(replaced) => self.run(&replaced, read, params).await,
                    None => Err(e),
                }
            }
            answer => answer,
        }
    }

    /// Runs `read` on `connection` within the call deadline; past it, the
    /// connection is abandoned.
    async fn run(
        &self,
        connection: &Connection,
        read: Read,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        match tokio::time::timeout(self.target.bounds.call, connection.run(read, params)).await {
            Ok(answer) => answer.map_err(classify),
            Err(_) => {
                connection.abandoned.store(true, Ordering::Relaxed);
                Err(self.target.no_answer())
            }
        }
    }

    /// Runs `sql` on every connection (tests ask each about itself).
    #[cfg(test)]
    pub(super) async fn on_each(&self, sql: &str) -> Result<Vec<Vec<Row>>, Error> {
        let mut answers = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            answers.push(
                slot.connection()
                    .client
                    .query(sql, &[])
                    .await
                    .map_err(classify)?,
            );
        }
        Ok(answers)
    }

    /// The slot's connection in place of `lost`: made now, or by another
    /// caller meanwhile; `None` if the database cannot be reached.
    async fn reconnect(&self, slot: &Slot, lost: &Arc<Connection>) -> Option<Arc<Connection>> {
        let _one_at_a_time = slot.reconnecting.lock().await;
        let current = slot.connection();
        if !Arc::ptr_eq(&current, lost) {
            return Some(current); // another caller has replaced it
        }
        match Connection::open(&self.target).await {
            Ok(connection) => {
                let connection = Arc::new(connection);
                *slot
                    .current
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::clone(&connection);
                tracing::warn!("reconnected to PostgreSQL for reads");
                Some(connection)
            }
            Err(e) => {
                tracing::warn!(error = %e, "PostgreSQL is unreachable; reads fail until it is back");
                None
            }
        }
    }
}

impl Slot {
    fn connection(&self) -> Arc<Connection> {
        Arc::clone(
            &self
                .current
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}
