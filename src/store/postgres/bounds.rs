//! How long anything on the PostgreSQL path may take: the client's deadline
//! on every call, the server's timeouts on every session, and the TCP
//! keepalives on both ends.
//!
//! The bound that matters most is not this replica's own: a transaction
//! holds key locks and, to append its events, the audit chain's head row,
//! which every audited call of every replica needs next. A replica that
//! stops mid-transaction (frozen, paused, cut off from the database) must
//! not hold them for long, and the database is the only party that can end
//! its transaction. So every session asks the server to end a transaction
//! whose client has sent nothing for `idle_in_transaction`. A stopped
//! replica may have a transaction open on each of its committers, one
//! holding the head and the next queued for it, and the server ends them
//! one after the other: that is how long one stopped replica holds up the
//! others ([`Bounds::stopped_replica_hold`]). Writers wait longer than
//! that for a lock (`lock`), so a waiter outlasts a stopped holder instead
//! of failing, and the client's deadline (`call`) is longer again, so a
//! lock wait that does fail reaches the caller as the server's error, not
//! as a silent deadline.

use std::time::Duration;

use super::COMMITTERS;

/// The bounds of one database setting (`[storage.postgres]` or
/// `[subjects.erasure_ledger_database]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// The client's deadline on one call (a read, a write transaction, a
    /// health ping, a lease renewal), and the server's `statement_timeout`.
    /// A call past it fails `UNAVAILABLE` and its connection is made again.
    pub call: Duration,
    /// How long a writer waits for a lock another session holds (the
    /// server's `lock_timeout`).
    pub lock: Duration,
    /// How long the server keeps a transaction whose client has gone
    /// silent (`idle_in_transaction_session_timeout`): the longest a
    /// frozen or partitioned replica holds locks the others wait for.
    pub idle_in_transaction: Duration,
    /// How long the background-jobs lease outlives its holder's last
    /// renewal: the server ends the lease's session after this long
    /// without one (`idle_session_timeout`), and the holder finds it lost
    /// at its next check.
    pub lease: Duration,
    /// Idle time after which TCP keepalives probe the peer, on both ends
    /// (three probes a second apart then declare it dead).
    pub keepalive: Duration,
}

impl Default for Bounds {
    /// The defaults README's configuration table documents.
    fn default() -> Self {
        Self {
            call: Duration::from_secs(5),
            lock: Duration::from_secs(3),
            idle_in_transaction: Duration::from_secs(1),
            lease: Duration::from_secs(5),
            keepalive: Duration::from_secs(5),
        }
    }
}

/// Bounds that do not nest: which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundsError {
    /// The key out of order, e.g. `storage.postgres.lock_timeout_ms`.
    pub key: String,
    /// What it must be, and why.
    pub message: String,
}

/// How many TCP keepalive probes, a second apart, go unanswered before a
/// peer is declared dead.
pub(super) const KEEPALIVE_PROBES: u32 = 3;

/// The gap between TCP keepalive probes.
pub(super) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);

impl Bounds {
    /// Checks that the bounds nest as the module doc says they must.
    ///
    /// # Errors
    /// The key (under `table`) that is out of order, and why it matters.
    pub fn check(&self, table: &str) -> Result<(), BoundsError> {
        let ms = |d: Duration| d.as_millis();
        if self.stopped_replica_hold() >= self.lock {
            return Err(BoundsError {
                key: format!("{table}.idle_in_transaction_timeout_ms"),
                message: format!(
                    "{} ms times the {COMMITTERS} committers of a replica must be less than {table}.lock_timeout_ms ({} ms): a writer must outwait a stopped replica's transactions, not fail behind them",
                    ms(self.idle_in_transaction),
                    ms(self.lock)
                ),
            });
        }
        if self.lock >= self.call {
            return Err(BoundsError {
                key: format!("{table}.lock_timeout_ms"),
                message: format!(
                    "{} ms must be less than {table}.call_timeout_ms ({} ms): a lock wait must end on the server, with its error, before the client gives up",
                    ms(self.lock),
                    ms(self.call)
                ),
            });
        }
        Ok(())
    }

    /// The longest a stopped replica holds up the others' writes: each of
    /// its committers may be inside a transaction (one holding the audit
    /// head, the next queued for it, which the server hands the head to
    /// once the first is ended), and the server ends each after
    /// [`Bounds::idle_in_transaction`] of silence, one after the other.
    pub fn stopped_replica_hold(&self) -> Duration {
        self.idle_in_transaction * u32::try_from(COMMITTERS).unwrap_or(u32::MAX)
    }

    /// The statement that sets the server's side of these bounds on a
    /// session (one round trip when the session starts). The statement
    /// timeout never cancels a commit's wait for a synchronous standby
    /// (PostgreSQL lifts it before it commits; a cancelled wait would
    /// answer success unreplicated), so writers have it too: checked with a
    /// 1 s timeout and a stalled standby, under which every commit waited.
    pub(super) fn session_sql(&self) -> String {
        format!(
            "SET statement_timeout = {call}; SET lock_timeout = {lock}; \
             SET idle_in_transaction_session_timeout = {idle}; \
             SET tcp_keepalives_idle = {keepalive}; SET tcp_keepalives_interval = {interval}; \
             SET tcp_keepalives_count = {probes}; SET tcp_user_timeout = {call}",
            call = self.call.as_millis(),
            lock = self.lock.as_millis(),
            idle = self.idle_in_transaction.as_millis(),
            keepalive = self.keepalive.as_secs().max(1),
            interval = KEEPALIVE_INTERVAL.as_secs(),
            probes = KEEPALIVE_PROBES,
        )
    }

    /// The statement that makes the server end the lease's session once
    /// its holder has been silent for [`Bounds::lease`].
    pub(super) fn lease_sql(&self) -> String {
        format!("SET idle_session_timeout = {}", self.lease.as_millis())
    }

    /// How often a replica renews (or tries to take) the lease: often
    /// enough that a live holder never reaches [`Bounds::lease`].
    pub(super) fn lease_renewal(&self) -> Duration {
        self.lease / 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_nest() {
        assert_eq!(Bounds::default().check("storage.postgres"), Ok(()));
    }

    #[test]
    fn bounds_out_of_order_are_refused_with_the_keys_named() {
        // Two committers each held up for 1.5 s: 3 s, the lock timeout.
        let idle_past_lock = Bounds {
            idle_in_transaction: Duration::from_millis(1500),
            ..Bounds::default()
        };
        let refused = idle_past_lock.check("storage.postgres").unwrap_err();
        assert_eq!(
            refused.key,
            "storage.postgres.idle_in_transaction_timeout_ms"
        );
        assert!(
            refused
                .message
                .contains("1500 ms times the 2 committers of a replica must be less than storage.postgres.lock_timeout_ms (3000 ms)"),
            "{refused:?}"
        );
        let lock_past_call = Bounds {
            lock: Duration::from_secs(5),
            ..Bounds::default()
        };
        let refused = lock_past_call.check("storage.postgres").unwrap_err();
        assert_eq!(refused.key, "storage.postgres.lock_timeout_ms");
        assert!(
            refused
                .message
                .contains("5000 ms must be less than storage.postgres.call_timeout_ms (5000 ms)"),
            "{refused:?}"
        );
    }
}
