//! The committer thread: the single writer. It drains every batch waiting
//! in its queue into one `WriteBatch` and one write, checking each unit's
//! guards against the store and against the units before it in the group.

use std::{
    collections::HashMap,
    sync::{Mutex, atomic::Ordering},
};

use rocksdb::{DB, WriteBatch, WriteOptions};
use tokio::sync::{mpsc, oneshot};

use super::{CommitStats, cf, classify};
use crate::store::{
    Batch, Conflict, Error, FailedGuard, Op, Table, Unit, UnitOutcomes,
    chain::{self, Head},
};

/// How many queued batches one physical write may carry at most. Bounds the
/// latency a batch can add to the others in its group.
const MAX_GROUP_BATCHES: usize = 256;

/// One caller's batch waiting for the committer.
pub(super) struct Commit {
    pub(super) batch: Batch,
    pub(super) done: oneshot::Sender<Result<UnitOutcomes, Error>>,
}

/// The committer thread: one physical write per group of queued batches.
pub(super) fn run_committer(
    db: &DB,
    mut queue: mpsc::Receiver<Commit>,
    sync: bool,
    stats: &CommitStats,
    shared_head: &Mutex<Head>,
) {
    let mut head = *shared_head
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut write_opts = WriteOptions::default();
    write_opts.set_sync(sync);
    // When writes started failing, so the log can say when they resume
    // (RocksDB resumes by itself once the disk has room again).
    let mut failing_since: Option<std::time::Instant> = None;
    while let Some(first) = queue.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP_BATCHES {
            match queue.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let result = write_group(db, &group, &write_opts, &mut head);
        if result.is_ok() {
            *shared_head
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = head;
        } else {
            // Nothing was written: the chain continues from the stored head.
            head = *shared_head
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        stats.writes.fetch_add(1, Ordering::Relaxed);
        stats
            .batches
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        match (&result, failing_since) {
            (Ok(_), Some(since)) => {
                tracing::warn!(
                    failed_for_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
                    "storage writes resumed"
                );
                failing_since = None;
            }
            (Err(e), None) => {
                tracing::error!(error = %e, "storage writes are failing; requests that write are refused until they resume");
                failing_since = Some(std::time::Instant::now());
            }
            _ => {}
        }
        match result {
            Ok(outcomes) => {
                for (commit, outcome) in group.into_iter().zip(outcomes) {
                    // The caller may have gone away (cancelled request); its
                    // batch is committed all the same, as a cancelled request
                    // would be.
                    let _ = commit.done.send(Ok(outcome));
                }
            }
            Err(e) => {
                for commit in group {
                    let _ = commit.done.send(Err(e.duplicate()));
                }
            }
        }
    }
}

/// Builds one `WriteBatch` from every unit of every queued batch whose guards
/// pass, and writes it.
fn write_group(
    db: &DB,
    group: &[Commit],
    opts: &WriteOptions,
    head: &mut Head,
) -> Result<Vec<UnitOutcomes>, Error> {
    let mut wb = WriteBatch::default();
    // Guarded keys written by earlier units of this group: the committer is
    // the only writer, so the store plus this map is the whole truth.
    let mut claimed: HashMap<(Table, Vec<u8>), Vec<u8>> = HashMap::new();
    // Compare-and-set guards must see every earlier write of the group, not
    // only guarded ones; tracked only when some unit needs it.
    let track_all = group
        .iter()
        .flat_map(|c| c.batch.units())
        .any(|u| !u.unchanged().is_empty());
    let mut written: HashMap<(Table, Vec<u8>), Option<Vec<u8>>> = HashMap::new();
    let mut outcomes = Vec::with_capacity(group.len());
    for commit in group {
        let mut batch_outcomes = Vec::with_capacity(commit.batch.units().len());
        for unit in commit.batch.units() {
            if let Some(conflict) = find_conflict(db, unit.guards(), &claimed)? {
                batch_outcomes.push(Err(conflict));
                continue;
            }
            if let Some(conflict) = find_changed(db, unit, &written)? {
                batch_outcomes.push(Err(conflict));
                continue;
            }
            for op in unit.ops() {
                match op {
                    Op::Put { table, key, value } => {
                        if unit.guards().iter().any(|(t, k)| t == table && k == key) {
                            claimed.insert((*table, key.clone()), value.clone());
                        }
                        if track_all {
                            written.insert((*table, key.clone()), Some(value.clone()));
                        }
                        wb.put_cf(cf(db, *table)?, key, value);
                    }
                    Op::Delete { table, key } => {
                        if track_all {
                            written.insert((*table, key.clone()), None);
                        }
                        wb.delete_cf(cf(db, *table)?, key);
                    }
                    Op::AppendAudit { payload, index } => {
                        let seq = head.seq + 1;
                        let value = chain::encode(seq, &head.hash, payload);
                        *head = Head {
                            seq,
                            hash: chain::hash(seq, &value),
                        };
                        wb.put_cf(cf(db, Table::Audit)?, chain::key(seq), value);
                        for prefix in index {
                            wb.put_cf(
                                cf(db, Table::AuditIndex)?,
                                chain::index_key(prefix, seq),
                                [],
                            );
                        }
                    }
                }
            }
            for (table, key) in unit.guards() {
                claimed.entry((*table, key.clone())).or_default();
            }
            batch_outcomes.push(Ok(()));
        }
        outcomes.push(batch_outcomes);
    }
    db.write_opt(wb, opts).map_err(classify)?;
    Ok(outcomes)
}

/// The first compare-and-set guard of `unit` whose key no longer holds the
/// expected value (counting this group's earlier writes).
fn find_changed(
    db: &DB,
    unit: &Unit,
    written: &HashMap<(Table, Vec<u8>), Option<Vec<u8>>>,
) -> Result<Option<Conflict>, Error> {
    for (index, (table, key, expected)) in unit.unchanged().iter().enumerate() {
        let current = match written.get(&(*table, key.clone())) {
            Some(value) => value.clone(),
            None => db.get_cf(cf(db, *table)?, key).map_err(classify)?,
        };
        if current.as_ref() != Some(expected) {
            return Ok(Some(Conflict {
                guard: FailedGuard::Unchanged(index),
                existing: current.unwrap_or_default(),
            }));
        }
    }
    Ok(None)
}

fn find_conflict(
    db: &DB,
    guards: &[(Table, Vec<u8>)],
    claimed: &HashMap<(Table, Vec<u8>), Vec<u8>>,
) -> Result<Option<Conflict>, Error> {
    for (index, (table, key)) in guards.iter().enumerate() {
        if let Some(existing) = claimed.get(&(*table, key.clone())) {
            return Ok(Some(Conflict {
                guard: FailedGuard::Absent(index),
                existing: existing.clone(),
            }));
        }
        if let Some(existing) = db.get_cf(cf(db, *table)?, key).map_err(classify)? {
            return Ok(Some(Conflict {
                guard: FailedGuard::Absent(index),
                existing,
            }));
        }
    }
    Ok(None)
}
