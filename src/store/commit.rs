//! What both engines' committers share: a caller's batch waiting in the
//! queue, the bounds of the queue and of a group, and one set of counters
//! of what was committed: batches, and the groups they went in (a RocksDB
//! write, a PostgreSQL transaction). What a group decides is
//! `store::decide`'s.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::oneshot;

use super::{Batch, CommitGroups, Error, UnitOutcomes};

/// How many batches may wait for the committers before callers wait to
/// enqueue.
pub(super) const COMMIT_QUEUE_DEPTH: usize = 4096;

/// How many queued batches one group may carry at most. Bounds the
/// latency a batch can add to the others in its group.
pub(super) const MAX_GROUP_BATCHES: usize = 256;

/// One caller's batch waiting for a committer, and where its outcome goes.
pub(super) struct Commit {
    pub(super) batch: Batch,
    pub(super) done: oneshot::Sender<Result<UnitOutcomes, Error>>,
}

/// What the committers committed since the engine opened, and the groups
/// that failed (nothing of them was written).
#[derive(Debug, Default)]
pub struct Committed {
    batches: AtomicU64,
    groups: AtomicU64,
    failed: AtomicU64,
}

impl Committed {
    /// Counts one group, of `batches` batches, written.
    pub(super) fn group(&self, batches: usize) {
        self.batches.fetch_add(
            u64::try_from(batches).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.groups.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one group that failed.
    pub(super) fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn counts(&self) -> CommitGroups {
        CommitGroups {
            batches: self.batches.load(Ordering::Relaxed),
            groups: self.groups.load(Ordering::Relaxed),
            failed_groups: self.failed.load(Ordering::Relaxed),
        }
    }
}
