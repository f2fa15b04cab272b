//! Refused calls, counted and audited in aggregate.
//!
//! A refused call reveals and changes nothing, so it does not need its own
//! synced audit event before it is answered; giving it one let any
//! certificate holder fill the volume with refusals (after which the
//! fail-closed audit stops every call). Refusals are counted here instead,
//! per identity, method, outcome and purpose, and the server writes one
//! audit event per such key per interval with the count and the first and
//! last time. Nothing is dropped: a flush that cannot be written keeps its
//! counts for the next one.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
};

use crate::audit::{AuditEvent, Outcome, RefusalTally, now_rfc3339};

/// Distinct keys held between two flushes; past it, new keys are counted
/// under one key per outcome ([`OVERFLOW_IDENTITY`], [`OVERFLOW_METHOD`]), so
/// memory and the events of a flush stay bounded whatever a flood looks
/// like.
const MAX_KEYS: usize = 10_000;

/// The identity that refusals are counted under once [`MAX_KEYS`] is reached.
pub const OVERFLOW_IDENTITY: &str = "(other identities)";

/// The method that refusals are counted under once [`MAX_KEYS`] is reached.
pub const OVERFLOW_METHOD: &str = "(other)";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    identity: String,
    method: String,
    outcome: Outcome,
    purpose: Option<String>,
}

#[derive(Debug, Clone)]
struct Tally {
    count: u64,
    first: String,
    last: String,
}

/// Counts of refused calls since the last flush.
#[derive(Debug, Default)]
pub struct RefusalLog {
    counts: Mutex<HashMap<Key, Tally>>,
}

impl RefusalLog {
    /// Counts one refused call.
    pub fn count(&self, identity: &str, method: &str, outcome: Outcome, purpose: Option<&str>) {
        let now = now_rfc3339();
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let mut key = Key {
            identity: identity.to_owned(),
            method: method.to_owned(),
            outcome,
            purpose: purpose.map(str::to_owned),
        };
        if counts.len() >= MAX_KEYS && !counts.contains_key(&key) {
            key.identity = OVERFLOW_IDENTITY.to_owned();
            key.method = OVERFLOW_METHOD.to_owned();
            key.purpose = None;
        }
        let tally = counts.entry(key).or_insert_with(|| Tally {
            count: 0,
            first: now.clone(),
            last: now.clone(),
        });
        tally.count += 1;
        tally.last = now;
    }

    /// Takes every count as an audit event (one per key), leaving the log
    /// empty. Give them back with [`RefusalLog::restore`] if they cannot be
    /// written.
    pub fn take(&self) -> Vec<AuditEvent> {
        let counts =
            std::mem::take(&mut *self.counts.lock().unwrap_or_else(PoisonError::into_inner));
        let mut events: Vec<AuditEvent> = counts
            .into_iter()
            .map(|(key, tally)| AuditEvent {
                time: tally.last.clone(),
                request_id: String::new(),
                identity: key.identity,
                method: key.method,
                outcome: key.outcome,
                purpose: key.purpose,
                field_types: Vec::new(),
                tokens: Vec::new(),
                subjects: Vec::new(),
                forms: Vec::new(),
                items: 0,
                failed_items: 0,
                consent: None,
                refusals: Some(RefusalTally {
                    count: tally.count,
                    first: tally.first,
                    last: tally.last,
                }),
                policy_hash: None,
                lost_signed_head: None,
                parts: Vec::new(),
                replay_of: None,
            })
            .collect();
        events.sort_by(|a, b| {
            (&a.identity, &a.method, &a.outcome).cmp(&(&b.identity, &b.method, &b.outcome))
        });
        events
    }

    /// Puts back counts that [`RefusalLog::take`] took and that could not be
    /// written, adding them to whatever was counted since.
    pub fn restore(&self, events: Vec<AuditEvent>) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        for event in events {
            let Some(refused) = event.refusals else {
                continue;
            };
            let key = Key {
                identity: event.identity,
                method: event.method,
                outcome: event.outcome,
                purpose: event.purpose,
            };
            let tally = counts.entry(key).or_insert_with(|| Tally {
                count: 0,
                first: refused.first.clone(),
                last: refused.last.clone(),
            });
            tally.count += refused.count;
            if refused.first < tally.first {
                tally.first = refused.first;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_per_key_and_survive_a_failed_flush() {
        let log = RefusalLog::default();
        for _ in 0..1000 {
            log.count("spiffe://a/x", "Tokenize", Outcome::ResourceExhausted, None);
        }
        log.count(
            "spiffe://a/x",
            "Detokenize",
            Outcome::PermissionDenied,
            Some("marketing"),
        );
        log.count("-", "Tokenize", Outcome::Unauthenticated, None);
        let events = log.take();
        assert_eq!(events.len(), 3);
        let flood = events
            .iter()
            .find(|e| e.method == "Tokenize" && e.identity == "spiffe://a/x")
            .unwrap();
        assert_eq!(flood.refusals.as_ref().unwrap().count, 1000);
        assert!(log.take().is_empty(), "take empties the log");
        log.count("spiffe://a/x", "Tokenize", Outcome::ResourceExhausted, None);
        log.restore(events);
        let again = log.take();
        let flood = again
            .iter()
            .find(|e| e.method == "Tokenize" && e.identity == "spiffe://a/x")
            .unwrap();
        assert_eq!(flood.refusals.as_ref().unwrap().count, 1001);
        assert_eq!(again.len(), 3);
    }

    #[test]
    fn memory_is_bounded_whatever_the_flood() {
        let log = RefusalLog::default();
        for i in 0..(MAX_KEYS + 5000) {
            log.count(
                &format!("cn:client-{i}"),
                "Tokenize",
                Outcome::PermissionDenied,
                None,
            );
        }
        // Past the bound, a method of the caller's own making each time
        // (the admission layer names unknown paths, but the log must hold
        // whatever it is given) adds no key either.
        for i in 0..5000 {
            log.count(
                &format!("cn:late-{i}"),
                &format!("Made{i}"),
                Outcome::PermissionDenied,
                Some("marketing"),
            );
        }
        let events = log.take();
        assert_eq!(events.len(), MAX_KEYS + 1);
        let other = events
            .iter()
            .find(|e| e.identity == OVERFLOW_IDENTITY)
            .unwrap();
        assert_eq!(other.method, OVERFLOW_METHOD);
        assert_eq!(other.refusals.as_ref().unwrap().count, 10_000);
    }
}
