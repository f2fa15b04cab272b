//! A read-only snapshot of a vault's PostgreSQL database for the offline
//! tools: one `REPEATABLE READ, READ ONLY` transaction, so a scan sees one
//! point in time however long it pages (audit entries pruned meanwhile,
//! or appended, are not seen), and nothing is ever written: no schema
//! created, no lease taken.

use tokio_postgres::{Statement, error::SqlState};

use super::{Bounds, SCHEMA_VERSION, Session, Target, classify};
use crate::store::{Error, Snapshot, Table};

/// How many rows one query of a scan reads.
const PAGE: i64 = 1000;

/// How long the tool may leave its transaction idle between two pages (a
/// consumer of `audit export` that stops reading): long enough for any
/// pipe, short enough that a tool left hanging does not hold its snapshot,
/// and the old row versions it keeps from vacuum, for good.
const IDLE_BETWEEN_PAGES: &str = "5min";

/// A vault's database at one point in time, read over one connection.
pub struct PgSnapshot {
    // Dropped before the runtime that drives its connection.
    session: Session,
    scan: Statement,
    get: Statement,
    target: Target,
    runtime: tokio::runtime::Runtime,
}

impl PgSnapshot {
    /// Connects as [`super::PgStore::connect_with`] does, and opens the
    /// snapshot.
    ///
    /// # Errors
    /// If the database cannot be reached, holds no vault, or holds one of
    /// a newer schema than this binary's.
    pub fn open(
        connection: &str,
        password: Option<&str>,
        ca: Option<&[u8]>,
        bounds: Bounds,
    ) -> Result<Self, Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Backend(format!("cannot start a runtime: {e}")))?;
        let target = Target::new(connection, password, ca, bounds)?;
        let (session, scan, get) = runtime.block_on(async {
            let session = target.connect().await?;
            target
                .bounded(session.batch_execute(&format!(
                    "SET idle_in_transaction_session_timeout = '{IDLE_BETWEEN_PAGES}'; \
                     BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"
                )))
                .await?;
            target.bounded_store(check_schema(&session)).await?;
            let scan = target
                .bounded(session.prepare(
                    "SELECT key, value FROM tokenvault_kv \
                     WHERE tbl = $1 AND key >= $2 ORDER BY key LIMIT $3",
                ))
                .await?;
            let get = target
                .bounded(
                    session.prepare("SELECT value FROM tokenvault_kv WHERE tbl = $1 AND key = $2"),
                )
                .await?;
            Ok::<_, Error>((session, scan, get))
        })?;
        Ok(Self {
            session,
            scan,
            get,
            target,
            runtime,
        })
    }
}

/// Refuses a database without the vault's tables (a wrong `dbname`), or
/// with a schema this binary does not know.
async fn check_schema(session: &Session) -> Result<(), Error> {
    let version: i32 = match session
        .query_opt("SELECT version FROM tokenvault_schema", &[])
        .await
    {
        Ok(Some(row)) => row.get(0),
        Ok(None) => return Err(no_vault()),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => return Err(no_vault()),
        Err(e) => return Err(classify(e)),
    };
    if version > SCHEMA_VERSION {
        return Err(Error::Backend(format!(
            "the database has schema version {version}, newer than this binary's {SCHEMA_VERSION}: use a newer tokenvault"
        )));
    }
    Ok(())
}

fn no_vault() -> Error {
    Error::Backend(
        "the database holds no tokenvault vault (no tokenvault_schema row): check dbname in the connection setting"
            .to_owned(),
    )
}

impl Snapshot for PgSnapshot {
    fn scan(
        &self,
        table: Table,
        from: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), Error> {
        let mut from = from.to_vec();
        loop {
            let rows = self.runtime.block_on(
                self.target.bounded(
                    self.session
                        .query(&self.scan, &[&table.name(), &from, &PAGE]),
                ),
            )?;
            for row in &rows {
                if !f(row.get(0), row.get(1)) {
                    return Ok(());
                }
            }
            match rows.last() {
                // The next page starts just after this one's last key.
                Some(last) if rows.len() as i64 == PAGE => {
                    from = [last.get::<_, &[u8]>(0), &[0]].concat();
                }
                _ => return Ok(()),
            }
        }
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let row = self.runtime.block_on(
            self.target
                .bounded(self.session.query_opt(&self.get, &[&table.name(), &key])),
        )?;
        Ok(row.map(|row| row.get(0)))
    }
}
