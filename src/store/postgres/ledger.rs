//! A numbered, append-only table in a PostgreSQL database other than the
//! vault's: where replicas on a shared database keep the erasure ledger.
//!
//! The ledger must survive a restore of the vault's database (it is what
//! erases again the subjects a restored backup brings back), so it cannot
//! live only in that database; and every replica must append to the same
//! one, so it cannot be a file in a pod. A second database, backed up and
//! restored on its own, is both.
//!
//! Entries are numbered from 1 without gaps. [`LedgerTable::append`] writes
//! them only if their numbers are free: two replicas that erase at once both
//! try the next number, one gets it and the other hears
//! [`Appended::Taken`], reads what was added and chains to it. The table
//! sees opaque bytes; what an entry holds is the vault's business.

use tokio::sync::Mutex;
use tokio_postgres::Client;

use super::{Bounds, Session, Target, classify};
use crate::store::Error;

/// The version of this table's schema; a newer one is refused.
///
/// Version 2 adds the ledger's own id and the id of the vault it belongs
/// to ([`LedgerIdentity`]): a release that knows only version 1 would
/// append to a ledger without checking whose it is.
const LEDGER_SCHEMA_VERSION: i32 = 2;

/// Taken while the table is created, so replicas starting together do it
/// once. Any constant; never change it.
const LEDGER_SCHEMA_LOCK: i64 = 0x746f_6b65_6e6c_6467;

const LEDGER_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokenvault_ledger_schema (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version integer NOT NULL
);
CREATE TABLE IF NOT EXISTS tokenvault_erasure_ledger (
    seq bigint PRIMARY KEY CHECK (seq > 0),
    entry bytea NOT NULL
);
ALTER TABLE tokenvault_ledger_schema
    ADD COLUMN IF NOT EXISTS ledger_id bytea,
    ADD COLUMN IF NOT EXISTS vault_id bytea;
";

/// Whose a ledger table is: its own id, made with it, and the id of the
/// vault that first bound it (`None` until one did).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerIdentity {
    /// Made at random when the table was created (or first upgraded).
    pub ledger_id: Vec<u8>,
    /// The vault it belongs to.
    pub vault_id: Option<Vec<u8>>,
}

/// What [`LedgerTable::append`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Every entry is written, durably.
    Written,
    /// Another process wrote an entry under one of the numbers first;
    /// nothing was written.
    Taken,
}

/// The ledger table, with one connection made again when it is lost.
pub struct LedgerTable {
    target: Target,
    client: Mutex<Option<Session>>,
    /// Where it is, for messages: host(s) and database, never a password.
    place: String,
}

impl LedgerTable {
    /// Connects to the database `connection` names (with the password, the
    /// CA for TLS and the bounds, as for the vault's own database), and
    /// creates the table if there is none.
    ///
    /// # Errors
    /// If the database cannot be reached or holds a newer schema.
    pub async fn connect_with(
        connection: &str,
        password: Option<&str>,
        ca: Option<&[u8]>,
        bounds: Bounds,
    ) -> Result<Self, Error> {
        let target = Target::new(connection, password, ca, bounds)?;
        let place = describe(&target.config);
        let mut client = target.connect().await?;
        target.bounded_store(migrate(&mut client)).await?;
        Ok(Self {
            target,
            client: Mutex::new(Some(client)),
            place,
        })
    }

    /// Whose the ledger is.
    ///
    /// # Errors
    /// If the database cannot be read.
    pub async fn identity(&self) -> Result<LedgerIdentity, Error> {
        self.call(async |client| {
            let row = client
                .query_one(
                    "SELECT ledger_id, vault_id FROM tokenvault_ledger_schema",
                    &[],
                )
                .await?;
            Ok(LedgerIdentity {
                ledger_id: row.get(0),
                vault_id: row.get(1),
            })
        })
        .await
    }

    /// Binds the ledger to `vault_id` if no vault is bound yet, and says
    /// whose it is now (another vault's, if one bound it first).
    ///
    /// # Errors
    /// If the database cannot be written.
    pub async fn bind(&self, vault_id: &[u8]) -> Result<LedgerIdentity, Error> {
        let vault_id = vault_id.to_vec();
        self.call(async |client| {
            client
                .execute(
                    "UPDATE tokenvault_ledger_schema SET vault_id = $1 WHERE vault_id IS NULL",
                    &[&vault_id],
                )
                .await?;
            Ok(())
        })
        .await?;
        self.identity().await
    }

    /// Whether the ledger's database also holds a vault's tables: a restore
    /// of that database would roll the ledger back with the data, which
    /// is what the ledger is there to undo.
    ///
    /// # Errors
    /// If the database cannot be read.
    pub async fn beside_a_vault(&self) -> Result<bool, Error> {
        self.call(async |client| {
            let row = client
                .query_one("SELECT to_regclass('tokenvault_kv') IS NOT NULL", &[])
                .await?;
            Ok(row.get(0))
        })
        .await
    }

    /// Runs `query` on the connection within the call deadline.
    async fn call<T>(
        &self,
        query: impl AsyncFnOnce(&Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, Error> {
        let mut slot = self.connected().await?;
        let Some(client) = slot.as_mut() else {
            return Err(Error::Closed);
        };
        match tokio::time::timeout(self.target.bounds.call, query(client)).await {
            Err(_) => Err(self.forget(&mut slot)),
            Ok(answer) => answer.map_err(|e| forget_if_closed(&mut slot, e)),
        }
    }

    /// The database it is in (host and name), for messages.
    pub fn place(&self) -> &str {
        &self.place
    }

    /// Every entry numbered above `after`, in order.
    ///
    /// # Errors
    /// If the database cannot be read.
    pub async fn entries_after(&self, after: u64) -> Result<Vec<(u64, Vec<u8>)>, Error> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let mut slot = self.connected().await?;
        let Some(client) = slot.as_mut() else {
            return Err(Error::Closed);
        };
        let rows = tokio::time::timeout(
            self.target.bounds.call,
            client.query(
                "SELECT seq, entry FROM tokenvault_erasure_ledger WHERE seq > $1 ORDER BY seq",
                &[&after],
            ),
        )
        .await
        .map_err(|_| self.forget(&mut slot))?
        .map_err(|e| forget_if_closed(&mut slot, e))?;
        rows.iter()
            .map(|row| {
                let seq: i64 = row.get(0);
                let seq = u64::try_from(seq).map_err(|_| {
                    Error::Corruption("the erasure ledger holds a negative number".into())
                })?;
                Ok((seq, row.get(1)))
            })
            .collect()
    }

    /// The number of the newest entry, if there is one.
    ///
    /// # Errors
    /// If the database cannot be read.
    pub async fn newest(&self) -> Result<Option<u64>, Error> {
        let mut slot = self.connected().await?;
        let Some(client) = slot.as_mut() else {
            return Err(Error::Closed);
        };
        let row = tokio::time::timeout(
            self.target.bounds.call,
            client.query_one("SELECT max(seq) FROM tokenvault_erasure_ledger", &[]),
        )
        .await
        .map_err(|_| self.forget(&mut slot))?
        .map_err(|e| forget_if_closed(&mut slot, e))?;
        let newest: Option<i64> = row.get(0);
        newest
            .map(|seq| {
                u64::try_from(seq).map_err(|_| {
                    Error::Corruption("the erasure ledger holds a negative number".into())
                })
            })
            .transpose()
    }

    /// Writes `entries` in one transaction, committed synchronously, if
    /// none of their numbers is taken.
    ///
    /// # Errors
    /// If the database cannot be written (then nothing was).
    pub async fn append(&self, entries: &[(u64, Vec<u8>)]) -> Result<Appended, Error> {
        let seqs: Vec<i64> = entries
            .iter()
            .map(|(seq, _)| i64::try_from(*seq).unwrap_or(i64::MAX))
            .collect();
        let bodies: Vec<&[u8]> = entries.iter().map(|(_, entry)| entry.as_slice()).collect();
        let mut slot = self.connected().await?;
        let Some(client) = slot.as_mut() else {
            return Err(Error::Closed);
        };
        let written =
            tokio::time::timeout(self.target.bounds.call, insert_all(client, &seqs, &bodies))
                .await
                .map_err(|_| self.forget(&mut slot))?
                .map_err(|e| forget_if_closed(&mut slot, e))?;
        Ok(if written {
            Appended::Written
        } else {
            Appended::Taken
        })
    }

    /// A call past the deadline: its connection is dropped (the answer may
    /// still come), and the next call makes a new one.
    fn forget(&self, slot: &mut Option<Session>) -> Error {
        *slot = None;
        self.target.no_answer()
    }

    /// The connection, made (again) if there is none or it was lost.
    async fn connected(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Session>>, Error> {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(|session| session.is_closed()) {
            *slot = None;
            *slot = Some(self.target.connect().await?);
        }
        Ok(slot)
    }
}

/// Inserts every row or none: false if a number was taken.
async fn insert_all(
    client: &mut Client,
    seqs: &[i64],
    bodies: &[&[u8]],
) -> Result<bool, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL synchronous_commit TO on")
        .await?;
    let written = tx
        .execute(
            "INSERT INTO tokenvault_erasure_ledger (seq, entry) \
             SELECT * FROM unnest($1::bigint[], $2::bytea[]) \
             ON CONFLICT (seq) DO NOTHING",
            &[&seqs, &bodies],
        )
        .await?;
    if written == seqs.len() as u64 {
        tx.commit().await?;
        Ok(true)
    } else {
        tx.rollback().await?;
        Ok(false)
    }
}

/// A failed call's error; a connection it found closed is dropped, so the
/// next call makes a new one.
fn forget_if_closed(slot: &mut Option<Session>, e: tokio_postgres::Error) -> Error {
    if slot.as_ref().is_some_and(|session| session.is_closed()) {
        *slot = None;
    }
    classify(e)
}

/// Creates the table, or checks the one there.
async fn migrate(client: &mut Client) -> Result<(), Error> {
    let tx = client.transaction().await.map_err(classify)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LEDGER_SCHEMA_LOCK])
        .await
        .map_err(classify)?;
    tx.batch_execute(LEDGER_SCHEMA).await.map_err(classify)?;
    let stored: Option<i32> = tx
        .query_opt("SELECT version FROM tokenvault_ledger_schema", &[])
        .await
        .map_err(classify)?
        .map(|row| row.get(0));
    match stored {
        None => {
            tx.execute(
                "INSERT INTO tokenvault_ledger_schema (version) VALUES ($1)",
                &[&LEDGER_SCHEMA_VERSION],
            )
            .await
            .map_err(classify)?;
        }
        Some(version) if version > LEDGER_SCHEMA_VERSION => {
            return Err(Error::Backend(format!(
                "the erasure ledger's schema is version {version}, newer than this tokenvault's ({LEDGER_SCHEMA_VERSION}); run a release that knows it"
            )));
        }
        Some(_) => {
            tx.execute(
                "UPDATE tokenvault_ledger_schema SET version = $1",
                &[&LEDGER_SCHEMA_VERSION],
            )
            .await
            .map_err(classify)?;
        }
    }
    // Made once, with the table (or at the upgrade to version 2).
    let mut ledger_id = [0u8; 16];
    getrandom::fill(&mut ledger_id)
        .map_err(|e| Error::Backend(format!("cannot draw the ledger's id: {e}")))?;
    tx.execute(
        "UPDATE tokenvault_ledger_schema SET ledger_id = $1 WHERE ledger_id IS NULL",
        &[&&ledger_id[..]],
    )
    .await
    .map_err(classify)?;
    tx.commit().await.map_err(classify)
}

/// "database D on H1,H2" for messages (no user, no password).
fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    format!(
        "database {} on {}",
        config.get_dbname().unwrap_or("(the user's)"),
        hosts.join(",")
    )
}
