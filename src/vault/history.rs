//! A data subject's access history: the audit events that name the subject
//! (every reveal, lookup, change, export and erasure of their values),
//! newest first, found through the subject index the committer writes in
//! the same write as each event (`Table::AuditIndex`), not by reading the
//! whole trail.

use super::{Error, SubjectId, Vault};
use crate::{
    audit::{AuditContext, AuditEvent, Outcome},
    authz::{Permit, act},
    layout,
    store::{Batch, Store, Table, chain},
};

/// How far back a `since` bound looks past the first older event, for
/// clocks of several replicas that disagree: events are in commit order,
/// their times in each writer's clock.
const CLOCK_SLACK_MS: u64 = 5 * 60 * 1000;

/// Index entries read per page of the index scan.
const INDEX_PAGE: usize = 256;

/// What an access history is asked for.
#[derive(Debug)]
pub struct HistoryQuery {
    /// Whose history.
    pub subject: SubjectId,
    /// Only events at or after this time, ms since the epoch.
    pub since_ms: Option<u64>,
    /// Only events at or before this time, ms since the epoch.
    pub until_ms: Option<u64>,
    /// Only events older than this sequence number (the previous page's
    /// cursor).
    pub before_seq: Option<u64>,
    /// At most this many events.
    pub limit: usize,
}

/// One event of a subject's history.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    /// Its sequence number in the audit chain.
    pub seq: u64,
    /// The event as it was recorded.
    pub event: AuditEvent,
    /// Whether a signed checkpoint covers it (see [`Coverage`]).
    pub checkpointed: bool,
    /// Its chain hash: what `audit verify --addr` computes for the event
    /// numbered `seq`, so an auditor can match the one with the other.
    pub hash: [u8; 32],
}

/// What a history answer is covered by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    /// The newest signed checkpoint, whose signature this answer verified:
    /// its sequence number and when it was signed (ms). Events up to it are
    /// fixed in the chain a signature covers, and `audit verify` proves the
    /// links offline.
    pub checkpoint: Option<(u64, u64)>,
    /// The first sequence number whose events are indexed by subject;
    /// events before it (written by an older release) are not in any
    /// history.
    pub indexed_from: u64,
    /// The newest sequence number when the history was read.
    pub head: u64,
}

/// A page of a subject's history.
#[derive(Debug, Clone)]
pub struct HistoryPage {
    /// Events, newest first.
    pub entries: Vec<HistoryEntry>,
    /// What they are covered by.
    pub coverage: Coverage,
    /// Where the next page starts, if there is one: pass it as
    /// [`HistoryQuery::before_seq`].
    pub next_before: Option<u64>,
}

impl<S: Store> Vault<S> {
    /// Records, once, from which sequence number on events are indexed by
    /// subject: the next one, as this is the first release to index them.
    pub(super) async fn mark_subject_index_start(&self) -> Result<(), Error> {
        let key = layout::AUDIT_SUBJECTS_INDEXED_FROM.to_vec();
        if self
            .store
            .get_many(Table::Meta, vec![key.clone()])
            .await?
            .pop()
            .flatten()
            .is_some()
        {
            return Ok(());
        }
        let from = self.store.audit_head().seq + 1;
        let mut batch = Batch::new();
        // Of replicas opening at once, the first one's number stands.
        batch.unit().guard_absent(Table::Meta, key.clone()).put(
            Table::Meta,
            key,
            chain::key(from).to_vec(),
        );
        self.store.commit(batch).await?;
        Ok(())
    }

    /// The events that name a data subject, newest first, one page at a
    /// time. Reading a history is itself audited (and names the subject, so
    /// it appears in the next read of the same history).
    ///
    /// # Errors
    /// Storage or audit failures; [`Error::AuditDamaged`] if an index entry
    /// points at an event that was changed or does not name the subject, or
    /// the newest checkpoint does not verify (the trail or its index was
    /// tampered with).
    pub async fn access_history(
        &self,
        permit: Permit<act::SubjectHistory, HistoryQuery>,
        audit: &AuditContext,
    ) -> Result<HistoryPage, Error> {
        let query = permit.into_item();
        if !self.index_subjects {
            return Err(Error::Storage(crate::store::Error::Unsupported(
                "this vault was opened without the subject index, so it keeps no access histories",
            )));
        }
        let form = self.audit_subject(&query.subject);
        let mut form_bytes = [0u8; 32];
        data_encoding::HEXLOWER
            .decode_mut(form.as_bytes(), &mut form_bytes)
            .map_err(|_| Error::CorruptKey("an audit form is not 32 bytes of hex".into()))?;
        let prefix = layout::audit_subject_prefix(&form_bytes);
        let coverage = self.coverage().await?;

        let mut entries = Vec::new();
        let mut more = false;
        let mut from = match query.before_seq {
            Some(0 | 1) => None,
            Some(before) => Some(chain::index_key(&prefix, before - 1)),
            None => Some(chain::index_key(&prefix, u64::MAX)),
        };
        'pages: while let Some(start) = from.take() {
            let page = self
                .store
                .scan_from(Table::AuditIndex, start, INDEX_PAGE)
                .await?;
            let full = page.len() == INDEX_PAGE;
            let seqs: Vec<u64> = page
                .iter()
                .map_while(|(key, _)| chain::seq_of_index_key(&prefix, key))
                .collect();
            if full && seqs.len() == page.len() {
                from = seqs.last().map(|&last| chain::index_key(&prefix, last - 1));
            }
            let stored = self
                .store
                .get_many(
                    Table::Audit,
                    seqs.iter().map(|&seq| chain::key(seq).to_vec()).collect(),
                )
                .await?;
            for (seq, value) in seqs.into_iter().zip(stored) {
                // Pruned since it was indexed (prune removes both, the
                // index entry last).
                let Some(value) = value else { continue };
                let event = indexed_event(seq, &value, &form)?;
                let time_ms = crate::audit::time_ms(&event.time);
                if query.until_ms.is_some_and(|until| time_ms > until) {
                    continue;
                }
                if let Some(since) = query.since_ms
                    && time_ms < since
                {
                    if time_ms.saturating_add(CLOCK_SLACK_MS) < since {
                        break 'pages;
                    }
                    continue;
                }
                if entries.len() == query.limit {
                    more = true;
                    break 'pages;
                }
                entries.push(HistoryEntry {
                    seq,
                    checkpointed: coverage.checkpoint.is_some_and(|(cp, _)| seq <= cp),
                    event,
                    hash: chain::hash(seq, &value),
                });
            }
        }
        let next_before = if more {
            entries.last().map(|e| e.seq)
        } else {
            None
        };
        let mut event = audit.event(Outcome::Ok);
        event.subjects.push(form);
        event.items = u32::try_from(entries.len()).unwrap_or(u32::MAX);
        self.record(&event).await?;
        Ok(HistoryPage {
            entries,
            coverage,
            next_before,
        })
    }

    /// The newest checkpoint (its signature checked), where indexing
    /// started, and the head.
    async fn coverage(&self) -> Result<Coverage, Error> {
        let head = self.store.audit_head().seq;
        let mut meta = self
            .store
            .get_many(
                Table::Meta,
                vec![
                    layout::AUDIT_LAST_CHECKPOINT.to_vec(),
                    layout::AUDIT_SUBJECTS_INDEXED_FROM.to_vec(),
                ],
            )
            .await?
            .into_iter();
        let checkpoint = meta
            .next()
            .flatten()
            .and_then(|bytes| super::audit::decode_last_checkpoint(&bytes));
        let indexed_from = meta
            .next()
            .flatten()
            .and_then(|bytes| chain::seq_of(&bytes))
            .unwrap_or(1);
        let checkpoint = match checkpoint {
            Some(cp) if cp.verifies(&self.audit_public_key()) => Some((cp.seq, cp.time_ms)),
            Some(cp) => {
                tracing::error!(
                    seq = cp.seq,
                    "the newest audit checkpoint's signature does not verify"
                );
                return Err(Error::AuditDamaged(format!(
                    "checkpoint {} does not verify under the vault's audit key",
                    cp.seq
                )));
            }
            None => None,
        };
        Ok(Coverage {
            checkpoint,
            indexed_from,
            head,
        })
    }
}

/// The event an index entry of the subject `form` points at, checked: the
/// chain entry is whole at its place, and the event names the subject.
fn indexed_event(seq: u64, value: &[u8], form: &str) -> Result<AuditEvent, Error> {
    let damaged = || {
        tracing::error!(
            seq,
            "an audit event the subject index points at is damaged or does not name the subject"
        );
        Error::AuditDamaged(format!(
            "event {seq} is damaged or does not match its index entry; run `tokenvault audit verify`"
        ))
    };
    let link = chain::decode(value).ok_or_else(damaged)?;
    if !link.is_intact(seq) {
        return Err(damaged());
    }
    let mut event = AuditEvent::decode(link.payload).ok_or_else(damaged)?;
    if !event.subjects.iter().any(|s| s == form) {
        return Err(damaged());
    }
    // The subject's own part of the call, nothing of the other subjects'
    // (their number, field types, forms; and, the call-wide ones telling
    // nothing apart, its tokens and its consent decision).
    let part = event.part_of(form);
    event.field_types = part.field_types;
    event.forms = part.forms;
    event.items = part.items;
    event.failed_items = part.failed_items;
    if event.subjects.len() > 1 || !event.parts.is_empty() {
        event.tokens.clear();
        event.consent = None;
    }
    event.subjects = vec![form.to_owned()];
    event.parts.clear();
    Ok(event)
}
