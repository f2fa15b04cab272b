//! One transaction for a group of queued batches, in a fixed number of
//! round trips whatever the group's size, beside the transactions of the
//! process's other committers and of other replicas.
//!
//! Statement by statement, a group of 100-item batches took thousands of
//! round trips on the committer's one connection (a guard read and an
//! upsert per key, each awaited), and tokenize-batch on PostgreSQL ran at a
//! tenth of a bare pgcrypto table. Here the transaction reads every key a
//! guard asks about in one statement, decides the group's units in memory
//! in order (a unit sees the writes of the units before it, as it would
//! statement by statement), and writes the final state of each key in one
//! insert (the keys it read and found absent: under their locks they still
//! are), one upsert (the others) and one delete. A plain insert costs the
//! database about a third less than an upsert, which first probes the
//! index for a conflict, and a key that is there after all fails the
//! transaction instead of being overwritten: audit entries, always new,
//! go the same way.
//!
//! Two transactions may run at once only if they touch different keys:
//! each first takes a transaction-scoped advisory lock on every key its
//! units guard or write ([`lock_id`]), in ascending order, so two groups
//! that share a key run one after the other and the second reads what the
//! first committed. The audit chain's head row is locked last, after the
//! data is written: only appending the group's events, moving the head and
//! the commit itself wait for the other transactions, so the chain still
//! follows commit order while the writes of several groups overlap. Every
//! transaction takes its locks in the same order (keys ascending, then the
//! head), so they never deadlock.
//!
//! PostgreSQL's lock table is shared and bounded (about 12,000 entries
//! with its defaults), and one unit can name tens of thousands of keys
//! (the erasure of a subject with 10,000 tokens). So every transaction
//! with keys first takes the writers' lock: shared when it then locks its
//! keys one by one, exclusive, with no key locks, when it has more than
//! [`MAX_KEY_LOCKS`]. An exclusive writer runs alone, as every writer did
//! before the key locks; the others run beside each other.
//!
//! Statements sent together are awaited together and their errors taken
//! in the order they were sent: once one fails, PostgreSQL answers every
//! later one with "current transaction is aborted", and the caller must
//! hear the first cause (a full disk is `RESOURCE_EXHAUSTED`, a duplicate
//! audit entry names itself), not that.

use std::collections::HashSet;

use tokio_postgres::{Client, Statement, Transaction, types::ToSql};

use super::{check_head_and_entry, classify, corrupt, head_of, history::History};
use crate::store::{
    Error, Op, Table, Unit, UnitOutcomes,
    chain::{self, Head},
    decide::{Decision, guarded},
};

/// The class of the key locks: the first key of PostgreSQL's two-key
/// advisory locks, whose key space does not overlap the one-key locks of
/// the schema, the jobs lease and the ledger. Any constant; never change
/// it (replicas must agree on it).
pub(super) const KEY_LOCK_CLASS: i32 = 0x746b_7631;

/// The class of the writers' lock (its one key is 0). Any constant; never
/// change it.
pub(super) const WRITERS_LOCK_CLASS: i32 = 0x746b_7677;

/// How many key locks a transaction takes at most; with more keys it
/// takes the writers' lock exclusively instead.
pub(super) const MAX_KEY_LOCKS: usize = 2048;

/// The committer's statements, prepared once per connection.
pub(super) struct GroupStatements {
    share_writers: Statement,
    exclude_writers: Statement,
    lock_keys: Statement,
    read: Statement,
    insert: Statement,
    upsert: Statement,
    delete: Statement,
    lock_head: Statement,
    set_head: Statement,
    /// The head and the event the process saw last (see [`History`]).
    check_history: Statement,
}

impl GroupStatements {
    /// Prepares them on `client` (pipelined: one round trip's wait).
    pub(super) async fn prepare(client: &Client) -> Result<Self, Error> {
        let (
            share_writers,
            exclude_writers,
            lock_keys,
            read,
            insert,
            upsert,
            delete,
            lock_head,
            set_head,
            check_history,
        ) = tokio::try_join!(
            client.prepare("SELECT pg_advisory_xact_lock_shared($1::int4, 0)"),
            client.prepare("SELECT pg_advisory_xact_lock($1::int4, 0)"),
            // A function scan yields the arrays in order, so the locks are
            // taken in the (ascending) order they are given, each
            // exclusive or shared as its flag says.
            client.prepare(
                "SELECT CASE WHEN exclusive THEN pg_advisory_xact_lock($1::int4, id) \
                 ELSE pg_advisory_xact_lock_shared($1::int4, id) END \
                 FROM unnest($2::int4[], $3::bool[]) AS wanted(id, exclusive)"
            ),
            client.prepare(
                "SELECT kv.tbl, kv.key, kv.value FROM tokenvault_kv kv \
                 JOIN unnest($1::text[], $2::bytea[]) AS wanted(tbl, key) \
                 ON kv.tbl = wanted.tbl AND kv.key = wanted.key",
            ),
            client.prepare(
                "INSERT INTO tokenvault_kv (tbl, key, value) \
                 SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[])",
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
            client.prepare("SELECT seq, hash FROM tokenvault_audit_head FOR UPDATE"),
            client.prepare("UPDATE tokenvault_audit_head SET seq = $1, hash = $2"),
            client.prepare(super::reads::HEAD_AND_ENTRY),
        )
        .map_err(classify)?;
        Ok(Self {
            share_writers,
            exclude_writers,
            lock_keys,
            read,
            insert,
            upsert,
            delete,
            lock_head,
            set_head,
            check_history,
        })
    }
}

/// The advisory lock that stands for `key` of `table`: FNV-1a over the
/// table's name, a zero byte and the key, folded to 32 bits. It must be
/// the same in every build of every replica, so it is spelled out here
/// rather than taken from `std`'s hasher, whose algorithm may change. Two
/// keys that share a lock only make their transactions take turns.
pub(super) fn lock_id(table: Table, key: &[u8]) -> i32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in table.name().bytes().chain([0]).chain(key.iter().copied()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let [a, b, c, d, e, f, g, h] = hash.to_be_bytes();
    i32::from_be_bytes([a ^ e, b ^ f, c ^ g, d ^ h])
}

/// The keys `unit` guards or writes: what the group locks, each with
/// whether it is written. Audit entries are not among them: they are
/// written under the head's lock.
fn touched(unit: &Unit) -> impl Iterator<Item = (Table, &[u8], bool)> {
    let written = unit.ops().iter().filter_map(|op| match op {
        Op::Put { table, key, .. } | Op::Delete { table, key } => Some((*table, &key[..], true)),
        Op::AppendAudit { .. } => None,
    });
    guarded(unit)
        .map(|(table, key)| (table, key, false))
        .chain(written)
}

/// The locks a group takes: one per key its units touch, sorted and
/// distinct, each exclusive if a unit writes its key and shared if units
/// only guard it. A guard needs its key to stay as read until the commit,
/// which a shared lock gives (a writer of the key waits for it, and it for
/// the writer) while letting every transaction that only reads the key
/// (a guard on the next index key's absence, in every deterministic
/// tokenize) run at once.
fn lock_ids<'a>(units: impl Iterator<Item = &'a Unit>) -> Vec<(i32, bool)> {
    let mut ids: Vec<(i32, bool)> = units
        .flat_map(touched)
        .map(|(table, key, written)| (lock_id(table, key), written))
        .collect();
    // Exclusive first among equal ids, so that dedup keeps it.
    ids.sort_unstable_by_key(|&(id, exclusive)| (id, !exclusive));
    ids.dedup_by_key(|&mut (id, _)| id);
    ids
}

/// How many key locks `units` ask for at most (before duplicates go): what
/// the committer counts against a group's share of PostgreSQL's lock table.
pub(super) fn locks_asked(units: &[Unit]) -> usize {
    units.iter().flat_map(touched).count()
}

/// Applies every unit of every batch whose guards hold, in one
/// transaction, and returns each batch's outcomes and, if the group
/// appended audit events, the chain's new head. Nothing is written to a
/// database that went back behind the head `history` has seen.
///
/// `commit_sent` is set when the COMMIT goes out: from then on, a lost
/// answer leaves the outcome unknown.
pub(super) async fn write_group<'a>(
    client: &mut Client,
    statements: &GroupStatements,
    history: &History,
    batches: impl Iterator<Item = &'a [Unit]> + Clone,
    commit_sent: &std::sync::atomic::AtomicBool,
) -> Result<(Vec<UnitOutcomes>, Option<Head>), Error> {
    let tx = client.transaction().await.map_err(classify)?;
    let locks = lock_ids(batches.clone().flatten());
    let read: HashSet<(Table, &[u8])> = batches.clone().flatten().flat_map(guarded).collect();
    let mut wanted = Keys::default();
    for &(table, key) in &read {
        wanted.push(table, key);
    }
    // Sent together; the server runs them in order, so the guarded keys
    // are read once they are locked. The head and the event this process
    // saw last are read too (no lock: any committed head is at least the
    // one seen), so that nothing is written to a database that went back.
    let alone = locks.len() > MAX_KEY_LOCKS;
    let (lock_ids, exclusive): (Vec<i32>, Vec<bool>) = locks.iter().copied().unzip();
    let lock_params: [&(dyn ToSql + Sync); 3] = [&KEY_LOCK_CLASS, &lock_ids, &exclusive];
    let read_params: [&(dyn ToSql + Sync); 2] = [&wanted.tables, &wanted.keys];
    let seen = history.seen();
    let seen_key = chain::key(seen.seq);
    let check_params: [&(dyn ToSql + Sync); 2] = [&Table::Audit.name(), &&seen_key[..]];
    let (writers, keys, found, checked) = tokio::join!(
        async {
            if locks.is_empty() {
                return Ok(());
            }
            let writers = if alone {
                &statements.exclude_writers
            } else {
                &statements.share_writers
            };
            tx.execute(writers, &[&WRITERS_LOCK_CLASS]).await.map(drop)
        },
        async {
            if locks.is_empty() || alone {
                return Ok(());
            }
            tx.execute(&statements.lock_keys, &lock_params)
                .await
                .map(drop)
        },
        async {
            if wanted.keys.is_empty() {
                return Ok(Vec::new());
            }
            tx.query(&statements.read, &read_params).await
        },
        tx.query_one(&statements.check_history, &check_params),
    );
    writers.and(keys).map_err(classify)?;
    let found = found.map_err(classify)?;
    check_head_and_entry(history, seen, &checked.map_err(classify)?)?;
    let stored = found
        .iter()
        .map(|row| Ok(((table_named(row.get(0))?, row.get(1)), row.get(2))))
        .collect::<Result<Vec<_>, Error>>()?;
    let mut group = Group {
        read,
        decision: Decision::new(stored),
    };
    let outcomes = batches
        .map(|units| {
            units
                .iter()
                .map(|unit| group.decision.apply(unit))
                .collect()
        })
        .collect();
    let head = group.write(&tx, statements).await?;
    commit_sent.store(true, std::sync::atomic::Ordering::SeqCst);
    tx.commit().await.map_err(classify)?;
    Ok((outcomes, head))
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
    fn push(&mut self, table: Table, key: &'a [u8]) {
        self.tables.push(table.name());
        self.keys.push(key);
    }
}

/// Rows to write: parallel arrays of table names, keys and values.
#[derive(Default)]
struct Rows<'a> {
    keys: Keys<'a>,
    values: Vec<&'a [u8]>,
}

impl<'a> Rows<'a> {
    fn push(&mut self, table: Table, key: &'a [u8], value: &'a [u8]) {
        self.keys.push(table, key);
        self.values.push(value);
    }

    /// Writes them with `statement`, the insert or the upsert (nothing to
    /// send when there are none).
    async fn write(
        &self,
        tx: &Transaction<'_>,
        statement: &Statement,
    ) -> Result<(), tokio_postgres::Error> {
        if self.values.is_empty() {
            return Ok(());
        }
        let params: [&(dyn ToSql + Sync); 3] = [&self.keys.tables, &self.keys.keys, &self.values];
        tx.execute(statement, &params).await.map(drop)
    }
}

/// What one transaction read and decided, borrowing the units' keys and
/// values and the rows read (no copy per key).
struct Group<'u> {
    /// The keys the transaction read (every key a unit guards).
    read: HashSet<(Table, &'u [u8])>,
    /// The units decided on what it read (`store::decide`).
    decision: Decision<'u>,
}

impl Group<'_> {
    /// Whether `key` was read and not found: locked since, it is still
    /// absent, and a plain insert writes it.
    fn known_absent(&self, table: Table, key: &[u8]) -> bool {
        self.read.contains(&(table, key)) && !self.decision.was_stored(table, key)
    }

    /// Writes the decided state, then, if the group has events, locks the
    /// chain's head and appends them after it (each step pipelined).
    /// Returns the new head, if the chain moved.
    async fn write(
        &self,
        tx: &Transaction<'_>,
        statements: &GroupStatements,
    ) -> Result<Option<Head>, Error> {
        let mut inserts = Rows::default();
        let mut upserts = Rows::default();
        let mut deletes = Keys::default();
        for (table, key, value) in self.decision.written() {
            match value {
                Some(value) if self.known_absent(table, key) => inserts.push(table, key, value),
                Some(value) => upserts.push(table, key, value),
                None => deletes.push(table, key),
            }
        }
        let delete = async {
            if deletes.keys.is_empty() {
                return Ok(());
            }
            tx.execute(&statements.delete, &[&deletes.tables, &deletes.keys])
                .await
                .map(drop)
        };
        let events = self.decision.events();
        if events.is_empty() {
            let (inserted, upserted, deleted) = tokio::join!(
                inserts.write(tx, &statements.insert),
                upserts.write(tx, &statements.upsert),
                delete
            );
            inserted.and(upserted).and(deleted).map_err(classify)?;
            return Ok(None);
        }
        // The head is locked after the data is written, in the same round
        // trip: the other transactions wait for it only from here on.
        let (inserted, upserted, deleted, locked) = tokio::join!(
            inserts.write(tx, &statements.insert),
            upserts.write(tx, &statements.upsert),
            delete,
            tx.query_one(&statements.lock_head, &[]),
        );
        inserted.and(upserted).and(deleted).map_err(classify)?;
        let mut head = head_of(&locked.map_err(classify)?)?;
        let mut entries: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(events.len());
        let mut index_keys: Vec<Vec<u8>> = Vec::new();
        for event in events {
            let seq = head.seq + 1;
            let value = chain::encode(seq, &head.hash, event.payload);
            head = Head {
                seq,
                hash: chain::hash(seq, &value),
            };
            entries.push((chain::key(seq).to_vec(), value));
            index_keys.extend(
                event
                    .index
                    .iter()
                    .map(|prefix| chain::index_key(prefix, seq)),
            );
        }
        let mut chained = Rows::default();
        for (key, value) in &entries {
            chained.push(Table::Audit, key, value);
        }
        for key in &index_keys {
            chained.push(Table::AuditIndex, key, &[]);
        }
        let seq = i64::try_from(head.seq).map_err(|_| corrupt("an audit sequence past i64"))?;
        let hash = head.hash.as_slice();
        let head_params: [&(dyn ToSql + Sync); 2] = [&seq, &hash];
        let (chained, moved) = tokio::join!(chained.write(tx, &statements.insert), async {
            tx.execute(&statements.set_head, &head_params)
                .await
                .map(drop)
        });
        chained.and(moved).map_err(classify)?;
        Ok(Some(head))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_ids_are_stable_and_name_table_and_key() {
        // Pinned: replicas of different builds must take the same lock
        // for the same key.
        assert_eq!(lock_id(Table::Index, b"k"), lock_id(Table::Index, b"k"));
        assert_ne!(lock_id(Table::Index, b"k"), lock_id(Table::Records, b"k"));
        assert_ne!(lock_id(Table::Index, b"k"), lock_id(Table::Index, b"l"));
        // FNV-1a of "records\0" is 0x653729b0342674b7; its halves XORed.
        assert_eq!(lock_id(Table::Records, b""), 1_360_092_423);
    }

    #[test]
    fn a_group_locks_every_key_it_guards_or_writes_once_in_order() {
        let mut batch = crate::store::Batch::new();
        batch
            .unit()
            .guard_absent(Table::Index, b"a".to_vec())
            .put(Table::Index, b"a".to_vec(), b"t".to_vec())
            .put(Table::Records, b"t".to_vec(), b"r".to_vec())
            .append_audit(b"event".to_vec());
        batch.unit().delete(Table::Expiry, b"x".to_vec());
        // Only guarded: shared. Guarded here, written by another unit:
        // exclusive.
        batch.unit().guard_absent(Table::Keys, b"next".to_vec());
        batch
            .unit()
            .guard_unchanged(Table::Meta, b"m".to_vec(), b"1".to_vec());
        batch.unit().put(Table::Meta, b"m".to_vec(), b"2".to_vec());
        let ids = lock_ids(batch.units().iter());
        let mut expected = vec![
            (lock_id(Table::Index, b"a"), true),
            (lock_id(Table::Records, b"t"), true),
            (lock_id(Table::Expiry, b"x"), true),
            (lock_id(Table::Keys, b"next"), false),
            (lock_id(Table::Meta, b"m"), true),
        ];
        expected.sort_unstable();
        assert_eq!(ids, expected);
        assert_eq!(locks_asked(batch.units()), 7, "before duplicates go");
        // What the vault bounds a request by counts every lock taken.
        let touched: usize = batch.units().iter().map(Unit::keys_touched).sum();
        assert_eq!(touched, 6, "distinct per unit: a, t, x, next, m (twice)");
        assert!(ids.len() <= touched);
    }
}
