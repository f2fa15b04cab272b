//! How a group of units is decided: the one place both engines take the
//! semantics of guards from.
//!
//! A group (the batches one RocksDB write or one PostgreSQL transaction
//! carries) is decided as if its units were applied one at a time, in
//! order. Each unit's guards are checked against the store as the units
//! before it left it: every earlier write counts, guarded or not, and an
//! earlier unit that only guarded a key changed nothing. A unit whose
//! guard fails changes nothing. So the outcome depends neither on the
//! engine nor on which batches happened to share a group.
//!
//! An engine reads the current value of every key the group guards
//! ([`guarded`]) while no other writer can change them (RocksDB: the
//! single committer; PostgreSQL: the key locks), hands them to
//! [`Decision::new`], applies the units, and writes the final state
//! ([`Decision::written`]) and the events ([`Decision::events`]).

use std::collections::HashMap;

use super::{Conflict, FailedGuard, Op, Table, Unit};

/// The keys `unit` guards (absent or unchanged): what an engine reads
/// before deciding.
pub(super) fn guarded(unit: &Unit) -> impl Iterator<Item = (Table, &[u8])> {
    let absent = unit.guards().iter().map(|(table, key)| (*table, &key[..]));
    let unchanged = unit
        .unchanged()
        .iter()
        .map(|(table, key, _)| (*table, &key[..]));
    absent.chain(unchanged)
}

/// An audit event a decided unit appends: its payload and index prefixes.
pub(super) struct Event<'u> {
    pub(super) payload: &'u [u8],
    pub(super) index: &'u [Vec<u8>],
}

/// A group being decided, borrowing the units' keys and values and the
/// stored values read (no copy per key).
pub(super) struct Decision<'u> {
    /// The guarded keys' values as the engine found them (absent: none).
    stored: HashMap<(Table, &'u [u8]), &'u [u8]>,
    /// The final state of every key the applied units write (`None`:
    /// deleted).
    written: HashMap<(Table, &'u [u8]), Option<&'u [u8]>>,
    /// The audit events of the applied units, in order.
    events: Vec<Event<'u>>,
}

impl<'u> Decision<'u> {
    /// A group whose guarded keys hold `stored` (a key not given is
    /// absent).
    pub(super) fn new(stored: impl IntoIterator<Item = ((Table, &'u [u8]), &'u [u8])>) -> Self {
        Self {
            stored: stored.into_iter().collect(),
            written: HashMap::new(),
            events: Vec::new(),
        }
    }

    /// Decides `unit`: its changes if every guard holds, else which failed.
    ///
    /// # Errors
    /// The first guard that does not hold, with the value found.
    pub(super) fn apply(&mut self, unit: &'u Unit) -> Result<(), Conflict> {
        if let Some(conflict) = self.failed_guard(unit) {
            return Err(conflict);
        }
        for op in unit.ops() {
            match op {
                Op::Put { table, key, value } => {
                    self.written.insert((*table, key), Some(value));
                }
                Op::Delete { table, key } => {
                    self.written.insert((*table, key), None);
                }
                Op::AppendAudit { payload, index } => self.events.push(Event { payload, index }),
            }
        }
        Ok(())
    }

    /// The value under `key` as the unit being decided sees it.
    fn current(&self, table: Table, key: &[u8]) -> Option<&'u [u8]> {
        match self.written.get(&(table, key)) {
            Some(decided) => *decided,
            None => self.stored.get(&(table, key)).copied(),
        }
    }

    /// Whether `key` was stored when the group was read.
    pub(super) fn was_stored(&self, table: Table, key: &[u8]) -> bool {
        self.stored.contains_key(&(table, key))
    }

    fn failed_guard(&self, unit: &Unit) -> Option<Conflict> {
        for (index, (table, key)) in unit.guards().iter().enumerate() {
            if let Some(existing) = self.current(*table, key) {
                return Some(Conflict {
                    guard: FailedGuard::Absent(index),
                    existing: existing.to_vec(),
                });
            }
        }
        for (index, (table, key, expected)) in unit.unchanged().iter().enumerate() {
            let current = self.current(*table, key);
            if current != Some(expected.as_slice()) {
                return Some(Conflict {
                    guard: FailedGuard::Unchanged(index),
                    existing: current.map(<[u8]>::to_vec).unwrap_or_default(),
                });
            }
        }
        None
    }

    /// The final state of every key the applied units write (`None`:
    /// deleted), in no particular order.
    pub(super) fn written(&self) -> impl Iterator<Item = (Table, &'u [u8], Option<&'u [u8]>)> {
        self.written
            .iter()
            .map(|(&(table, key), value)| (table, key, *value))
    }

    /// The audit events of the applied units, in order.
    pub(super) fn events(&self) -> &[Event<'u>] {
        &self.events
    }
}
