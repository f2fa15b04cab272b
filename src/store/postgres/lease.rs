//! The background-jobs lease: of the replicas on one database, the one that
//! holds a session-level advisory lock runs the jobs that one process at a
//! time runs (key-rotation jobs, retention sweeps, audit checkpoints and
//! pruning).
//!
//! The lock belongs to a connection kept for nothing else. PostgreSQL lets
//! it go when that connection ends, so a replica killed with SIGKILL (its
//! socket closed by the kernel) hands the lease on at once. A replica that
//! is frozen or cut off from the database keeps its socket open, so the
//! lease's session also asks the server to end it after
//! [`Bounds::lease`](super::Bounds::lease) without a word from its client
//! (`idle_session_timeout`), and every replica renews or tries to take the
//! lease four times in that span ([`Lease::held`], from a task of the
//! store's own): a live holder keeps it, a silent one loses it within that
//! bound, and another replica takes it within a renewal more. A replica
//! checks its session (with a query, bounded by the call deadline) before
//! each job turn, and runs no further turn once it finds it lost; a turn
//! under way when the holder froze finishes when it thaws. That window, in
//! which two replicas may both run a job, costs work, not correctness:
//! every job step is guarded writes.

use tokio::sync::Mutex;

use super::{Session, Target};

/// The advisory lock's key. Any constant; never change it.
const JOBS_LEASE: i64 = 0x746f_6b65_6e6a_6f62;

/// This replica's session for the lease, and whether it holds it.
pub(super) struct Lease {
    target: Target,
    session: Mutex<Option<LeaseSession>>,
}

struct LeaseSession {
    client: Session,
    held: bool,
}

impl Lease {
    pub(super) fn new(target: Target) -> Self {
        Self {
            target,
            session: Mutex::new(None),
        }
    }

    /// Whether this replica holds the lease now: renews it if it does (a
    /// query proves the session lives), takes it if it is free; every call
    /// bounded by the call deadline.
    pub(super) async fn held(&self) -> bool {
        let mut slot = self.session.lock().await;
        if let Some(session) = slot.as_ref()
            && session.client.is_closed()
        {
            if session.held {
                tracing::warn!(
                    "lost the background-jobs lease (the connection to PostgreSQL ended); another replica may take it"
                );
            }
            *slot = None;
        }
        if slot.is_none() {
            match self.connect().await {
                Ok(client) => {
                    *slot = Some(LeaseSession {
                        client,
                        held: false,
                    })
                }
                Err(_) => return false,
            }
        }
        let Some(session) = slot.as_mut() else {
            return false;
        };
        if session.held {
            // Still ours while the session lives: a query proves it does.
            if self
                .target
                .bounded(session.client.simple_query("SELECT 1"))
                .await
                .is_ok()
            {
                return true;
            }
            tracing::warn!(
                "lost the background-jobs lease (PostgreSQL does not answer); another replica may take it"
            );
            *slot = None;
            return false;
        }
        match self
            .target
            .bounded(
                session
                    .client
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&JOBS_LEASE]),
            )
            .await
        {
            Ok(row) if row.get::<_, bool>(0) => {
                session.held = true;
                tracing::info!(
                    "took the background-jobs lease: this replica runs key-rotation jobs, retention sweeps and audit checkpoints"
                );
                true
            }
            Ok(_) => false,
            Err(_) => {
                *slot = None;
                false
            }
        }
    }

    /// A session for the lease, which the server ends once its client has
    /// been silent for the lease's span.
    async fn connect(&self) -> Result<Session, super::Error> {
        let client = self.target.connect().await?;
        // A statement of its own after the session's bounds: a server that
        // refuses it (before 14) leaves those in place.
        if let Err(e) = self
            .target
            .bounded(client.batch_execute(&self.target.bounds.lease_sql()))
            .await
        {
            // PostgreSQL before 14 has no idle_session_timeout.
            tracing::warn!(error = %e, "PostgreSQL cannot end a silent session: a frozen lease holder keeps the lease until its connection dies");
        }
        Ok(client)
    }
}

/// The task that keeps renewing a lease (or trying to take it), stopped
/// when dropped: a store dropped without closing must not hold the lease.
pub(super) struct Renewal(tokio::task::JoinHandle<()>);

impl Renewal {
    /// Renews `lease` every `every`.
    pub(super) fn start(lease: std::sync::Arc<Lease>, every: std::time::Duration) -> Self {
        Self(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                lease.held().await;
            }
        }))
    }
}

impl Drop for Renewal {
    fn drop(&mut self) {
        self.0.abort();
    }
}
