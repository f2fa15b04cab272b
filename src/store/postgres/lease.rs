//! The background-jobs lease: of the replicas on one database, the one that
//! holds a session-level advisory lock runs the jobs that one process at a
//! time runs (key-rotation jobs, retention sweeps, audit checkpoints and
//! pruning).
//!
//! The lock belongs to a connection kept for nothing else. PostgreSQL lets
//! it go when that connection ends, so a replica killed with SIGKILL (its
//! socket closed by the kernel) hands the lease on at once, and one cut off
//! from the database loses it when the server notices the connection is
//! dead (TCP keepalive). A replica checks its connection before each job
//! turn, and stops running jobs as soon as it finds it lost. The window in
//! which two replicas may both run a job (the old holder not yet aware)
//! costs work, not correctness: every job step is guarded writes.

use tokio::sync::Mutex;
use tokio_postgres::Client;

use super::Target;

/// The advisory lock's key. Any constant; never change it.
const JOBS_LEASE: i64 = 0x746f_6b65_6e6a_6f62;

/// This replica's session for the lease, and whether it holds it.
pub(super) struct Lease {
    target: Target,
    session: Mutex<Option<Session>>,
}

struct Session {
    client: Client,
    held: bool,
}

impl Lease {
    pub(super) fn new(target: Target) -> Self {
        Self {
            target,
            session: Mutex::new(None),
        }
    }

    /// Whether this replica holds the lease now, taking it if it is free.
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
            match self.target.connect().await {
                Ok(client) => {
                    *slot = Some(Session {
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
            if session.client.simple_query("SELECT 1").await.is_ok() {
                return true;
            }
            tracing::warn!(
                "lost the background-jobs lease (PostgreSQL does not answer); another replica may take it"
            );
            *slot = None;
            return false;
        }
        match session
            .client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&JOBS_LEASE])
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
}
