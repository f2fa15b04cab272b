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
/// append to a ledger without checking whose it is. Version 3 adds the
/// newest audit head signed ([`LedgerTable::witness`]): a release that
/// knows only version 2 would sign without recording it, and could sign a
/// second head for a number after a restore.
const LEDGER_SCHEMA_VERSION: i32 = 3;

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
ALTER TABLE tokenvault_ledger_schema
    ADD COLUMN IF NOT EXISTS signed_seq bigint,
    ADD COLUMN IF NOT EXISTS signed_head bytea;
";

/// Whether the database holds a vault's main table, in any schema.
const HOLDS_A_VAULT: &str = "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class \
     WHERE relname = 'tokenvault_kv' AND relkind IN ('r', 'p'))";

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
    /// The ledger id the vault is bound to, once checked: every append
    /// checks it, so that a connection made again to another database (a
    /// host name moved, a failover to another cluster) appends nothing.
    expected: std::sync::OnceLock<Vec<u8>>,
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
        // Before anything is created in it.
        if target
            .bounded(client.query_one(HOLDS_A_VAULT, &[]))
            .await?
            .get(0)
        {
            return Err(Error::Backend(format!(
                "{place} also holds a vault's tables (tokenvault_kv): a restore of that database would roll the erasure ledger back with the data it must erase again; give the ledger a database of its own, in a cluster backed up and restored separately"
            )));
        }
        target.bounded_store(migrate(&mut client)).await?;
        Ok(Self {
            target,
            client: Mutex::new(Some(client)),
            place,
            expected: std::sync::OnceLock::new(),
        })
    }

    /// Gives `role` what a running vault needs of the ledger and nothing
    /// more: reading and appending entries (never changing or deleting
    /// one, nor emptying the table), reading the schema row, and setting
    /// the row's vault binding and signed head. `tokenvault migrate
    /// --grant-to` runs it, connected as the owner.
    ///
    /// # Errors
    /// If `role` is not a plain role name, or the grants are refused.
    pub async fn grant_app_role(&self, role: &str) -> Result<(), Error> {
        let role = super::quoted_role(role)?;
        self.call(async |client| {
            client
                .batch_execute(&format!(
                    "GRANT SELECT ON tokenvault_ledger_schema TO {role};
                     GRANT UPDATE (vault_id, signed_seq, signed_head) ON tokenvault_ledger_schema TO {role};
                     GRANT SELECT, INSERT ON tokenvault_erasure_ledger TO {role};"
                ))
                .await
        })
        .await
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
            Ok((row.try_get(0), row.try_get(1)))
        })
        .await
        .and_then(|(ledger_id, vault_id)| {
            Ok(LedgerIdentity {
                ledger_id: ledger_id
                    .ok()
                    .flatten()
                    .ok_or_else(|| Error::Corruption("the ledger has no ledger_id".into()))?,
                vault_id: vault_id.map_err(classify)?,
            })
        })
    }

    /// Refuses an answer from a ledger whose id (`found`) is not the one
    /// [`LedgerTable::expect`] named, once it named one.
    fn still_expected(&self, found: Option<Vec<u8>>) -> Result<(), Error> {
        match self.expected.get() {
            Some(expected) if found.as_ref() != Some(expected) => Err(Error::Backend(format!(
                "{} is no longer the erasure ledger this vault is bound to (its id changed since start: the host name now leads to another database?)",
                self.place
            ))),
            _ => Ok(()),
        }
    }

    /// Makes every later append check that the ledger is still the one
    /// with id `ledger_id` (see [`LedgerTable::identity`]).
    pub fn expect(&self, ledger_id: Vec<u8>) {
        let _ = self.expected.set(ledger_id);
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

    /// The newest audit head any replica of the vault recorded before it
    /// signed it (see [`LedgerTable::witness`]): its number and hash.
    ///
    /// # Errors
    /// If the database cannot be read, or is another ledger now.
    pub async fn signed_head(&self) -> Result<Option<(u64, Vec<u8>)>, Error> {
        let row = self
            .call(async |client| {
                client
                    .query_one(
                        "SELECT ledger_id, signed_seq, signed_head FROM tokenvault_ledger_schema",
                        &[],
                    )
                    .await
            })
            .await?;
        self.still_expected(row.try_get(0).ok().flatten())?;
        match (
            row.get::<_, Option<i64>>(1),
            row.get::<_, Option<Vec<u8>>>(2),
        ) {
            (Some(seq), Some(head)) => Ok(Some((seq_of(seq)?, head))),
            _ => Ok(None),
        }
    }

    /// Records, committed synchronously, that the audit head numbered `seq`
    /// and hashing to `head` is about to be signed, if no head numbered
    /// `seq` or later was recorded. Returns whether it was: only then may
    /// the caller sign it. The record lives here, outside the database a
    /// restore rolls back, so that no head is ever signed for a number that
    /// already had one, whatever the vault's database went back to.
    ///
    /// # Errors
    /// If the database cannot be written, or is another ledger now (then
    /// nothing was recorded).
    pub async fn witness(&self, seq: u64, head: &[u8]) -> Result<bool, Error> {
        let seq = i64::try_from(seq)
            .map_err(|_| Error::Corruption("an audit sequence number is too large".into()))?;
        let head = head.to_vec();
        let expected = self.expected.get().cloned();
        let row = self
            .call(async |client| {
                client
                    .batch_execute("SET synchronous_commit TO on")
                    .await?;
                client
                    .query_one(
                        "WITH recorded AS (UPDATE tokenvault_ledger_schema                          SET signed_seq = $1, signed_head = $2                          WHERE coalesce(signed_seq, 0) < $1                          AND ($3::bytea IS NULL OR ledger_id = $3) RETURNING 1)                          SELECT ledger_id, EXISTS (SELECT 1 FROM recorded)                          FROM tokenvault_ledger_schema",
                        &[&seq, &head, &expected],
                    )
                    .await
            })
            .await?;
        self.still_expected(row.try_get(0).ok().flatten())?;
        Ok(row.get(1))
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
        // The schema row joined in: the ledger's id comes with the entries
        // (one row with NULLs when there are none).
        let rows = self
            .call(async |client| {
                client
                    .query(
                        "SELECT s.ledger_id, e.seq, e.entry FROM tokenvault_ledger_schema s \
                         LEFT JOIN tokenvault_erasure_ledger e ON e.seq > $1 ORDER BY e.seq",
                        &[&after],
                    )
                    .await
            })
            .await?;
        if let Some(first) = rows.first() {
            self.still_expected(first.try_get(0).ok().flatten())?;
        }
        rows.iter()
            .filter_map(|row| {
                let seq: Option<i64> = row.get(1);
                let entry: Option<Vec<u8>> = row.get(2);
                Some((seq?, entry?))
            })
            .map(|(seq, entry)| Ok((seq_of(seq)?, entry)))
            .collect()
    }

    /// The number of the newest entry, if there is one.
    ///
    /// # Errors
    /// If the database cannot be read.
    pub async fn newest(&self) -> Result<Option<u64>, Error> {
        // With the ledger's id, in one snapshot: a reconnect that landed
        // on another database must not answer for this vault's ledger.
        let row = self
            .call(async |client| {
                client
                    .query_one(
                        "SELECT (SELECT max(seq) FROM tokenvault_erasure_ledger), \
                         (SELECT ledger_id FROM tokenvault_ledger_schema)",
                        &[],
                    )
                    .await
            })
            .await?;
        self.still_expected(row.try_get(1).ok().flatten())?;
        row.get::<_, Option<i64>>(0).map(seq_of).transpose()
    }

    /// Writes `entries` in one transaction, committed synchronously, if
    /// none of their numbers is taken and the ledger is still the one
    /// [`LedgerTable::expect`] named.
    ///
    /// # Errors
    /// If the database cannot be written, or is another ledger now (then
    /// nothing was written).
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
        let expected = self.expected.get().map(Vec::as_slice);
        let inserted = tokio::time::timeout(
            self.target.bounds.call,
            insert_all(client, expected, &seqs, &bodies),
        )
        .await
        .map_err(|_| self.forget(&mut slot))?
        .map_err(|e| forget_if_closed(&mut slot, e))?;
        match inserted {
            Inserted::All => Ok(Appended::Written),
            Inserted::Taken => Ok(Appended::Taken),
            Inserted::AnotherLedger => Err(Error::Backend(format!(
                "{} is no longer the erasure ledger this vault is bound to (its id changed since start: the host name now leads to another database?); nothing was written",
                self.place
            ))),
        }
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

/// What [`insert_all`] did.
enum Inserted {
    All,
    /// A number was taken; nothing was written.
    Taken,
    /// The ledger's id is not the one expected; nothing was written.
    AnotherLedger,
}

/// Inserts every row or none, into the ledger with id `expected` if given.
async fn insert_all(
    client: &mut Client,
    expected: Option<&[u8]>,
    seqs: &[i64],
    bodies: &[&[u8]],
) -> Result<Inserted, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL synchronous_commit TO on")
        .await?;
    if let Some(expected) = expected {
        let row = tx
            .query_one(
                "SELECT ledger_id FROM tokenvault_ledger_schema FOR SHARE",
                &[],
            )
            .await?;
        if row.try_get::<_, Option<&[u8]>>(0)? != Some(expected) {
            tx.rollback().await?;
            return Ok(Inserted::AnotherLedger);
        }
    }
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
        Ok(Inserted::All)
    } else {
        tx.rollback().await?;
        Ok(Inserted::Taken)
    }
}

/// An entry's stored number.
fn seq_of(seq: i64) -> Result<u64, Error> {
    u64::try_from(seq)
        .map_err(|_| Error::Corruption("the erasure ledger holds a negative number".into()))
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
    // At this binary's version already (its id made): nothing is created
    // or altered, so the least-privilege app role can open it.
    if super::schema_version(&tx, "tokenvault_ledger_schema").await? == Some(LEDGER_SCHEMA_VERSION)
    {
        return tx.commit().await.map_err(classify);
    }
    tx.batch_execute(LEDGER_SCHEMA)
        .await
        .map_err(super::unprivileged)?;
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
