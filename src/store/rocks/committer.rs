//! The committer thread: the single writer. It drains every batch waiting
//! in its queue into one `WriteBatch` and one write, each unit decided on
//! the store as the units before it in the group left it
//! (`store::decide`).

use std::sync::Mutex;

use rocksdb::{DB, WriteBatch, WriteOptions};
use tokio::sync::mpsc;

use super::{cf, classify};
use crate::store::{
    Error, Table, UnitOutcomes,
    chain::{self, Head},
    commit::{Commit, Committed, MAX_GROUP_BATCHES},
    decide::{Decision, guarded},
};

/// The committer thread: one physical write per group of queued batches.
pub(super) fn run_committer(
    db: &DB,
    mut queue: mpsc::Receiver<Commit>,
    sync: bool,
    committed: &Committed,
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
            committed.group(group.len());
            *shared_head
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = head;
        } else {
            committed.failed();
            // Nothing was written: the chain continues from the stored head.
            head = *shared_head
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
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
/// pass (decided by `store::decide` on the guarded keys read here: the
/// committer is the only writer, so nothing changes them meanwhile), and
/// writes it.
fn write_group(
    db: &DB,
    group: &[Commit],
    opts: &WriteOptions,
    head: &mut Head,
) -> Result<Vec<UnitOutcomes>, Error> {
    let units = || group.iter().flat_map(|commit| commit.batch.units());
    let keys: Vec<(Table, &[u8])> = units()
        .flat_map(guarded)
        .collect::<std::collections::HashSet<_>>()
        .into_iter()
        .collect();
    let mut values = Vec::with_capacity(keys.len());
    for &(table, key) in &keys {
        values.push(db.get_cf(cf(db, table)?, key).map_err(classify)?);
    }
    let mut decision = Decision::new(
        keys.iter()
            .zip(&values)
            .filter_map(|(&key, value)| Some((key, value.as_deref()?))),
    );
    let outcomes: Vec<UnitOutcomes> = group
        .iter()
        .map(|commit| {
            commit
                .batch
                .units()
                .iter()
                .map(|unit| decision.apply(unit))
                .collect()
        })
        .collect();
    let mut wb = WriteBatch::default();
    for (table, key, value) in decision.written() {
        match value {
            Some(value) => wb.put_cf(cf(db, table)?, key, value),
            None => wb.delete_cf(cf(db, table)?, key),
        }
    }
    for event in decision.events() {
        let seq = head.seq + 1;
        let value = chain::encode(seq, &head.hash, event.payload);
        *head = Head {
            seq,
            hash: chain::hash(seq, &value),
        };
        wb.put_cf(cf(db, Table::Audit)?, chain::key(seq), value);
        for prefix in event.index {
            wb.put_cf(
                cf(db, Table::AuditIndex)?,
                chain::index_key(prefix, seq),
                [],
            );
        }
    }
    db.write_opt(wb, opts).map_err(classify)?;
    Ok(outcomes)
}
