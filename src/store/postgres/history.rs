//! What this process has seen of the audit chain, and the check that the
//! database never goes back behind it.
//!
//! Replicas reconnect by themselves to whatever answers at their setting's
//! hosts. After a restore of the vault's database, or a failover to a
//! standby that lacked the last commits, that is a database that has lost
//! writes this process acknowledged (tokens, erasures, consent
//! withdrawals, audit events) and may serve again what was erased. Every
//! acknowledged write of the vault moves the audit chain's head, so the
//! head this process last saw is a mark the database must never fall
//! behind: its head must not be lower, and its chain must still hold the
//! event this process saw last, with the same hash (a chain that was
//! rolled back and has grown again past the mark is a fork, not a
//! continuation). Each transaction checks the head it reads; the server's
//! database watch checks every second, and moves the mark to the head it
//! found, so that a replica that has written nothing for a while still
//! knows how far the database had come.
//!
//! Once the database is found behind, the process refuses every write, and
//! so every reveal (each is audited first), for good: the server stops,
//! and the next start re-applies the erasure ledger to the database as it
//! is now and reads its keys and head afresh.

use std::sync::Mutex;

use super::super::{
    Error,
    chain::{self, Head},
};

/// The newest head this process has seen, and whether the database was
/// found behind it.
#[derive(Debug)]
pub(super) struct History {
    seen: Mutex<Head>,
    rewound: Mutex<Option<String>>,
}

impl History {
    /// A history that starts at `head`, the database's at open.
    pub(super) fn starting_at(head: Head) -> Self {
        Self {
            seen: Mutex::new(head),
            rewound: Mutex::new(None),
        }
    }

    /// The newest head seen.
    pub(super) fn seen(&self) -> Head {
        *self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records `head`, committed by this process, if it is newer than any
    /// seen (another committer may have moved it further already).
    pub(super) fn advance(&self, head: Head) {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if head.seq > seen.seq {
            *seen = head;
        }
    }

    /// The error every write hears once the database was found behind.
    pub(super) fn rewound(&self) -> Option<Error> {
        self.rewound
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .map(Error::Rewound)
    }

    /// Checks the database's head `found`, given `entry`, the database's
    /// audit event numbered as the head seen was (read in the same
    /// snapshot or under the head's lock). The first failed check is
    /// logged and kept: every later write hears it.
    pub(super) fn check(&self, seen: Head, found: Head, entry: Option<&[u8]>) -> Result<(), Error> {
        if let Some(rewound) = self.rewound() {
            return Err(rewound);
        }
        let behind = if found.seq < seen.seq {
            Some(format!(
                "its audit chain ends at event {}, but this replica has seen event {}",
                found.seq, seen.seq
            ))
        } else if found.seq == seen.seq && found.hash != seen.hash {
            Some(format!(
                "its audit chain forked at event {}: the database's event is not the one this replica saw",
                seen.seq
            ))
        } else if found.seq > seen.seq
            && seen.seq > 0
            && entry.is_none_or(|value| chain::hash(seen.seq, value) != seen.hash)
        {
            // Absent counts too: the head seen is at most a second old (the
            // watch moves it), far newer than anything retention prunes.
            Some(format!(
                "its audit chain no longer holds event {} as this replica saw it, and has grown since to event {}",
                seen.seq, found.seq
            ))
        } else {
            None
        };
        let Some(behind) = behind else {
            return Ok(());
        };
        Err(self.rewind(format!(
            "{behind} (restored from a backup, or failed over to a standby that lacked the last commits); writes acknowledged here may be lost and erased subjects may be back. Writes and reveals are refused; restart to re-apply the erasure ledger"
        )))
    }

    /// Records that the database went back (`why`), found here or by
    /// another check (the erasure ledger's); the first reason is logged
    /// and kept, and every later write hears it.
    pub(super) fn rewind(&self, why: String) -> Error {
        let mut rewound = self
            .rewound
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*rewound {
            Some(first) => Error::Rewound(first.clone()),
            None => {
                tracing::error!("the database went back in time: {why}");
                *rewound = Some(why.clone());
                Error::Rewound(why)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(seq: u64, value: &[u8]) -> Head {
        Head {
            seq,
            hash: chain::hash(seq, value),
        }
    }

    #[test]
    fn a_database_at_or_past_the_head_seen_is_in_step() {
        let seen = head(5, b"five");
        let history = History::starting_at(seen);
        assert!(history.check(seen, seen, Some(b"five")).is_ok());
        assert!(history.check(seen, head(9, b"nine"), Some(b"five")).is_ok());
        assert!(history.rewound().is_none());
    }

    #[test]
    fn a_database_behind_or_forked_is_refused_for_good() {
        let seen = head(5, b"five");
        for (found, entry) in [
            (head(3, b"three"), None),
            (head(5, b"another five"), Some(&b"another five"[..])),
            (head(9, b"nine"), Some(&b"another five"[..])),
            // Event 5 gone from a chain that has grown past it.
            (head(9, b"nine"), None),
        ] {
            let history = History::starting_at(seen);
            let refused = history.check(seen, found, entry).unwrap_err();
            assert!(matches!(refused, Error::Rewound(_)), "{refused:?}");
            // Later checks, even of a database in step, keep refusing.
            assert!(history.check(seen, seen, Some(b"five")).is_err());
            assert!(history.rewound().is_some());
        }
    }

    #[test]
    fn the_head_seen_only_moves_forward() {
        let history = History::starting_at(head(5, b"five"));
        history.advance(head(7, b"seven"));
        history.advance(head(6, b"six"));
        assert_eq!(history.seen().seq, 7);
    }
}
