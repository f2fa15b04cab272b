//! Reading and keeping the audit trail: pages of stored events for the
//! Audit service, pruning past the retention up to a signed checkpoint,
//! and the records of processing made from it.

use super::{Error, Vault, audit::subject_prefixes};
use crate::{
    audit::{AuditEvent, Checkpoint, Outcome},
    authz::act,
    layout,
    store::{Batch, KeyValues, Store, Table, chain},
};

/// One stored audit event, as the Audit service streams it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// Sequence number.
    pub seq: u64,
    /// Chain hash.
    pub hash: [u8; 32],
    /// The chain hash of the event before it, which it links to; `None`
    /// for an entry that is not in the chain format (sent all the same, so
    /// that a client checking the chain fails on it, not past it).
    pub prev: Option<[u8; 32]>,
    /// The event JSON, as chained.
    pub json: String,
    /// The caller identity recorded in it.
    pub identity: String,
    /// The signed checkpoint over it, if any.
    pub checkpoint: Option<Checkpoint>,
    /// On the first event of a page that starts at or before the first
    /// event kept: the signed prune marker, if events were pruned.
    pub pruned: Option<crate::audit::PruneMarker>,
    /// On the last event of a page: the newest checkpoint signed, so that
    /// a client can tell a trail that ends before it (its tail withheld).
    pub newest_checkpoint: Option<Checkpoint>,
}

/// Which audit events to read: up to `limit` from `from_seq` on, those of
/// `identity` only if given.
#[derive(Debug, Clone)]
pub struct EventsQuery {
    /// The first sequence number.
    pub from_seq: u64,
    /// Only this identity's events, if given.
    pub identity: Option<String>,
    /// The most events.
    pub limit: usize,
}

/// A processing report to make: the period, and the policy it reports
/// (the one in force).
#[derive(Debug, Clone)]
pub struct ReportQuery {
    /// The period.
    pub period: crate::report::Period,
    /// The policy.
    pub policy: std::sync::Arc<crate::authz::Policy>,
}

impl<S: Store> Vault<S> {
    /// Up to `limit` audit events from `from` on (those of `identity` only,
    /// if given). Reading the trail is audited too.
    ///
    /// # Errors
    /// Storage or audit failures.
    pub async fn audit_events(
        &self,
        permit: crate::authz::Permit<act::AuditRead, EventsQuery>,
        audit: &crate::audit::AuditContext,
    ) -> Result<Vec<StoredEvent>, Error> {
        let EventsQuery {
            from_seq: from,
            identity,
            limit,
        } = permit.into_item();
        let marker = self
            .store
            .get_many(Table::Meta, vec![layout::AUDIT_PRUNE_MARKER.to_vec()])
            .await?
            .pop()
            .flatten()
            .and_then(|value| crate::audit::PruneMarker::decode(&value));
        // A page that starts at or before the first event kept starts just
        // after the marker, with it: events under it may still be there
        // while a pruning is under way, or after one was cut short.
        let (from, mut pruned) = match marker {
            Some(marker) if from.max(1) <= marker.seq + 1 => (marker.seq + 1, Some(marker)),
            _ => (from.max(1), None),
        };
        let newest_checkpoint = self.newest_checkpoint().await?;
        let page = self
            .store
            .scan_from(Table::Audit, chain::key(from).to_vec(), limit)
            .await?;
        let last = page
            .last()
            .and_then(|(key, _)| chain::seq_of(key))
            .unwrap_or(from);
        // Checkpoints are sparse: at most one per event of the page.
        let mut checkpoints: std::collections::HashMap<u64, Checkpoint> = self
            .store
            .scan_from(Table::AuditCheckpoints, chain::key(from).to_vec(), limit)
            .await?
            .into_iter()
            .filter_map(|(key, value)| Checkpoint::decode(chain::seq_of(&key)?, &value))
            .filter(|cp| cp.seq <= last)
            .map(|cp| (cp.seq, cp))
            .collect();
        // Every entry goes out, one that does not decode too: dropped, it
        // would make a page short, which a client takes for the end.
        let mut events: Vec<StoredEvent> = page
            .into_iter()
            .filter_map(|(key, value)| {
                let seq = chain::seq_of(&key)?;
                let link = chain::decode(&value);
                let payload = link.map_or(value.as_slice(), |l| l.payload);
                Some(StoredEvent {
                    seq,
                    hash: chain::hash(seq, &value),
                    prev: link.map(|l| l.prev),
                    json: String::from_utf8_lossy(payload).into_owned(),
                    identity: AuditEvent::decode(payload)
                        .map(|e| e.identity)
                        .unwrap_or_default(),
                    checkpoint: checkpoints.remove(&seq),
                    pruned: pruned.take(),
                    newest_checkpoint: None,
                })
            })
            .filter(|e| identity.as_ref().is_none_or(|id| &e.identity == id))
            .collect();
        if let Some(last) = events.last_mut() {
            last.newest_checkpoint = newest_checkpoint;
        }
        self.record(&audit.event(Outcome::Ok)).await?;
        Ok(events)
    }
}

impl<S: Store> Vault<S> {
    /// Deletes audit events older than `retention`, but only up to a signed
    /// checkpoint, which is kept: it anchors the first remaining event, so
    /// the trail stays verifiable from there. Nothing newer than the last
    /// checkpoint is ever deleted. Returns how many events were deleted.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn prune_audit(&self, retention: std::time::Duration) -> Result<u64, Error> {
        let cutoff = self
            .now()
            .saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        let checkpoints = self
            .store
            .scan_prefix(Table::AuditCheckpoints, Vec::new())
            .await?;
        let anchor = checkpoints
            .iter()
            .filter_map(|(key, value)| Checkpoint::decode(chain::seq_of(key)?, value))
            .filter(|cp| cp.time_ms < cutoff)
            .map(|cp| cp.seq)
            .max();
        let Some(anchor) = anchor else { return Ok(0) };
        // First the signed statement that events up to the anchor go on
        // purpose: `audit verify` accepts missing events under it only.
        let anchor_head = checkpoints
            .iter()
            .filter_map(|(key, value)| Checkpoint::decode(chain::seq_of(key)?, value))
            .find(|cp| cp.seq == anchor)
            .map(|cp| cp.head)
            .ok_or_else(|| Error::CorruptKey("the anchoring checkpoint vanished".into()))?;
        let time_ms = self.now();
        let marker = crate::audit::PruneMarker {
            seq: anchor,
            head: anchor_head,
            time_ms,
            signature: self
                .keyring
                .audit_signer()
                .sign(&crate::audit::prune_message(anchor, &anchor_head, time_ms)),
        };
        let mut batch = Batch::new();
        batch.put(
            Table::Meta,
            crate::layout::AUDIT_PRUNE_MARKER.to_vec(),
            marker.encode(),
        );
        self.store.commit(batch).await?;
        let mut pruned = 0;
        loop {
            let page = self
                .store
                .scan_from(Table::Audit, Vec::new(), 10_000)
                .await?;
            let doomed: KeyValues = page
                .into_iter()
                .take_while(|(key, _)| chain::seq_of(key).is_some_and(|seq| seq <= anchor))
                .collect();
            if doomed.is_empty() {
                break;
            }
            let mut batch = Batch::new();
            for (key, value) in &doomed {
                // The event's index entries go with it.
                if let Some(seq) = chain::seq_of(key) {
                    for prefix in subject_prefixes(value) {
                        batch.delete(Table::AuditIndex, chain::index_key(&prefix, seq));
                    }
                }
                batch.delete(Table::Audit, key.clone());
            }
            pruned += doomed.len() as u64;
            self.store.commit(batch).await?;
        }
        let mut batch = Batch::new();
        for (key, _) in checkpoints {
            if chain::seq_of(&key).is_some_and(|seq| seq < anchor) {
                batch.delete(Table::AuditCheckpoints, key);
            }
        }
        if !batch.is_empty() {
            self.store.commit(batch).await?;
        }
        Ok(pruned)
    }
}

impl<S: Store> Vault<S> {
    /// The records of processing over `period`, with the policy the caller
    /// passes (the one in force). Reading the trail for it is audited.
    ///
    /// # Errors
    /// Storage or audit failures; [`Error::AuditDamaged`] if an audit
    /// entry does not decode.
    pub async fn processing_report(
        &self,
        permit: crate::authz::Permit<act::AuditRead, ReportQuery>,
        audit: &crate::audit::AuditContext,
    ) -> Result<crate::report::ProcessingReport, Error> {
        let ReportQuery { period, policy } = permit.into_item();
        let report = crate::report::online(&self.fields, &policy, &self.store, period, self.now())
            .await
            .map_err(Error::AuditDamaged)?;
        self.record(&audit.event(Outcome::Ok)).await?;
        Ok(report)
    }
}
