//! One transaction for a group of queued batches, in a fixed number of
//! round trips whatever the group's size.
//!
//! Statement by statement, a group of 100-item batches took thousands of
//! round trips on the committer's one connection (a guard read and an
//! upsert per key, each awaited), and tokenize-batch on PostgreSQL ran at a
//! tenth of a bare pgcrypto table. Here the transaction reads every key a
//! guard asks about in one statement, decides the group's units in memory
//! in order (a unit sees the writes of the units before it, as it would
//! statement by statement), and writes the final state of each key in one
//! upsert and one delete. The lock on the audit chain's head, taken first,
//! orders every replica's writers, so nothing changes between the read and
//! the writes.

use std::collections::HashMap;

use tokio_postgres::{Client, Statement, Transaction, types::ToSql};

use super::{classify, corrupt, head_of};
use crate::store::{
    Conflict, Error, FailedGuard, Op, Table, Unit, UnitOutcomes,
    chain::{self, Head},
};

/// The committer's statements, prepared once per connection.
pub(super) struct GroupStatements {
    lock_head: Statement,
    read: Statement,
    upsert: Statement,
    delete: Statement,
    set_head: Statement,
}

impl GroupStatements {
    /// Prepares them on `client` (pipelined: one round trip's wait).
    pub(super) async fn prepare(client: &Client) -> Result<Self, Error> {
        let (lock_head, read, upsert, delete, set_head) = tokio::try_join!(
            client.prepare("SELECT seq, hash FROM tokenvault_audit_head FOR UPDATE"),
            client.prepare(
                "SELECT kv.tbl, kv.key, kv.value FROM tokenvault_kv kv \
                 JOIN unnest($1::text[], $2::bytea[]) AS wanted(tbl, key) \
                 ON kv.tbl = wanted.tbl AND kv.key = wanted.key",
            ),
            client.prepare(
                "INSERT INTO tokenvault_kv (tbl, key, value) \
                 SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[]) \
                 ON CONFLICT (tbl, key) DO UPDATE SET value = EXCLUDED.value",
            ),
            client.prepare(
                "DELETE FROM tokenvault_kv kv USING unnest($1::text[], $2::bytea[]) AS gone(tbl, key) \
                 WHERE kv.tbl = gone.tbl AND kv.key = gone.key",
            ),
            client.prepare("UPDATE tokenvault_audit_head SET seq = $1, hash = $2"),
        )
        .map_err(classify)?;
        Ok(Self {
            lock_head,
            read,
            upsert,
            delete,
            set_head,
        })
    }
}

/// Applies every unit of every batch whose guards hold, in one
/// transaction, and returns each batch's outcomes and the new chain head.
pub(super) async fn write_group<'a>(
    client: &mut Client,
    statements: &GroupStatements,
    batches: impl Iterator<Item = &'a [Unit]> + Clone,
) -> Result<(Vec<UnitOutcomes>, Head), Error> {
    let tx = client.transaction().await.map_err(classify)?;
    let wanted = Keys::guarded_by(batches.clone().flatten());
    // Sent together; the server runs them in order, so the read happens
    // under the head's lock.
    let read_params: [&(dyn ToSql + Sync); 2] = [&wanted.tables, &wanted.keys];
    let (locked, found) = tokio::try_join!(
        tx.query_one(&statements.lock_head, &[]),
        tx.query(&statements.read, &read_params),
    )
    .map_err(classify)?;
    let mut group = Group {
        head: head_of(&locked)?,
        stored: found
            .into_iter()
            .map(|row| {
                let table = table_named(row.get(0))?;
                Ok(((table, row.get(1)), row.get(2)))
            })
            .collect::<Result<_, Error>>()?,
        written: HashMap::new(),
    };
    let outcomes = batches
        .map(|units| units.iter().map(|unit| group.apply(unit)).collect())
        .collect();
    group.write(&tx, statements).await?;
    tx.commit().await.map_err(classify)?;
    Ok((outcomes, group.head))
}

/// The table a stored row's `tbl` names.
fn table_named(name: &str) -> Result<Table, Error> {
    Table::ALL
        .into_iter()
        .find(|table| table.name() == name)
        .ok_or_else(|| corrupt("a row of an unknown table"))
}

/// Parallel arrays of table names and keys, as `unnest` takes them.
#[derive(Default)]
struct Keys<'a> {
    tables: Vec<&'static str>,
    keys: Vec<&'a [u8]>,
}

impl<'a> Keys<'a> {
    fn guarded_by(units: impl Iterator<Item = &'a Unit>) -> Self {
        let mut wanted = Self::default();
        for unit in units {
            for (table, key) in unit.guards() {
                wanted.push(*table, key);
            }
            for (table, key, _) in unit.unchanged() {
                wanted.push(*table, key);
            }
        }
        wanted
    }

    fn push(&mut self, table: Table, key: &'a [u8]) {
        self.tables.push(table.name());
        self.keys.push(key);
    }
}

/// What one transaction knows and has decided so far.
struct Group {
    head: Head,
    /// The guarded keys' values as the transaction found them.
    stored: HashMap<(Table, Vec<u8>), Vec<u8>>,
    /// The final state of every key the group writes (`None`: deleted).
    written: HashMap<(Table, Vec<u8>), Option<Vec<u8>>>,
}

impl Group {
    /// Decides `unit`: its changes if every guard holds, else which failed.
    fn apply(&mut self, unit: &Unit) -> Result<(), Conflict> {
        if let Some(conflict) = self.failed_guard(unit) {
            return Err(conflict);
        }
        for op in unit.ops() {
            match op {
                Op::Put { table, key, value } => {
                    self.written
                        .insert((*table, key.clone()), Some(value.clone()));
                }
                Op::Delete { table, key } => {
                    self.written.insert((*table, key.clone()), None);
                }
                Op::AppendAudit { payload, index } => {
                    let seq = self.head.seq + 1;
                    let value = chain::encode(seq, &self.head.hash, payload);
                    self.head = Head {
                        seq,
                        hash: chain::hash(seq, &value),
                    };
                    self.written
                        .insert((Table::Audit, chain::key(seq).to_vec()), Some(value));
                    for prefix in index {
                        self.written.insert(
                            (Table::AuditIndex, chain::index_key(prefix, seq)),
                            Some(Vec::new()),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The value under `key` as the unit being decided sees it.
    fn current(&self, table: Table, key: &[u8]) -> Option<&Vec<u8>> {
        let key = (table, key.to_vec());
        match self.written.get(&key) {
            Some(decided) => decided.as_ref(),
            None => self.stored.get(&key),
        }
    }

    fn failed_guard(&self, unit: &Unit) -> Option<Conflict> {
        for (index, (table, key)) in unit.guards().iter().enumerate() {
            if let Some(existing) = self.current(*table, key) {
                return Some(Conflict {
                    guard: FailedGuard::Absent(index),
                    existing: existing.clone(),
                });
            }
        }
        for (index, (table, key, expected)) in unit.unchanged().iter().enumerate() {
            let current = self.current(*table, key);
            if current != Some(expected) {
                return Some(Conflict {
                    guard: FailedGuard::Unchanged(index),
                    existing: current.cloned().unwrap_or_default(),
                });
            }
        }
        None
    }

    /// Writes the decided state and the new head (pipelined).
    async fn write(&self, tx: &Transaction<'_>, statements: &GroupStatements) -> Result<(), Error> {
        let mut puts = Keys::default();
        let mut values: Vec<&[u8]> = Vec::new();
        let mut deletes = Keys::default();
        for ((table, key), value) in &self.written {
            match value {
                Some(value) => {
                    puts.push(*table, key);
                    values.push(value);
                }
                None => deletes.push(*table, key),
            }
        }
        let seq =
            i64::try_from(self.head.seq).map_err(|_| corrupt("an audit sequence past i64"))?;
        let hash = self.head.hash.as_slice();
        let upsert = async {
            if puts.keys.is_empty() {
                return Ok(0);
            }
            tx.execute(&statements.upsert, &[&puts.tables, &puts.keys, &values])
                .await
        };
        let delete = async {
            if deletes.keys.is_empty() {
                return Ok(0);
            }
            tx.execute(&statements.delete, &[&deletes.tables, &deletes.keys])
                .await
        };
        let head_params: [&(dyn ToSql + Sync); 2] = [&seq, &hash];
        tokio::try_join!(
            upsert,
            delete,
            tx.execute(&statements.set_head, &head_params),
        )
        .map_err(classify)?;
        Ok(())
    }
}
