//! Offline verification and export of the audit chain.

use std::collections::BTreeMap;

use super::{AuditEvent, checkpoint_message, prune_message};
use crate::{
    crypto::verify_signature,
    store::{Snapshot, Table, chain},
};

const CHECKPOINT_FORMAT_V1: u8 = 1;

/// A signed statement that the chain's entry `seq` hashes to `head`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The sequence number signed.
    pub seq: u64,
    /// The entry's hash.
    pub head: [u8; 32],
    /// When it was signed, ms since the epoch.
    pub time_ms: u64,
    /// Ed25519 signature over [`checkpoint_message`].
    pub signature: [u8; 64],
}

impl Checkpoint {
    /// The stored value (the key is the sequence number).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 8 + 32 + 64);
        out.push(CHECKPOINT_FORMAT_V1);
        out.extend_from_slice(&self.time_ms.to_be_bytes());
        out.extend_from_slice(&self.head);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Parses a stored checkpoint.
    pub fn decode(seq: u64, value: &[u8]) -> Option<Self> {
        if value.len() != 1 + 8 + 32 + 64 || value[0] != CHECKPOINT_FORMAT_V1 {
            return None;
        }
        Some(Self {
            seq,
            time_ms: u64::from_be_bytes(value[1..9].try_into().ok()?),
            head: value[9..41].try_into().ok()?,
            signature: value[41..105].try_into().ok()?,
        })
    }

    /// Whether its signature verifies under `public_key`.
    pub fn verifies(&self, public_key: &[u8; 32]) -> bool {
        verify_signature(
            public_key,
            &checkpoint_message(self.seq, &self.head, self.time_ms),
            &self.signature,
        )
    }
}

const PRUNE_FORMAT_V1: u8 = 1;

/// A signed statement that the events up to `seq` were pruned on purpose
/// (`audit.retention_days`), anchored by the checkpoint at `seq`. Without
/// one, events missing at the start of the trail are a deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneMarker {
    /// The last sequence number pruned (the anchoring checkpoint's).
    pub seq: u64,
    /// The anchoring checkpoint's head hash.
    pub head: [u8; 32],
    /// When the pruning was decided, ms since the epoch.
    pub time_ms: u64,
    /// Ed25519 signature over [`prune_message`].
    pub signature: [u8; 64],
}

impl PruneMarker {
    /// The stored value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 8 + 32 + 8 + 64);
        out.push(PRUNE_FORMAT_V1);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.head);
        out.extend_from_slice(&self.time_ms.to_be_bytes());
        out.extend_from_slice(&self.signature);
        out
    }

    /// Parses a stored marker.
    pub fn decode(value: &[u8]) -> Option<Self> {
        if value.len() != 1 + 8 + 32 + 8 + 64 || value[0] != PRUNE_FORMAT_V1 {
            return None;
        }
        Some(Self {
            seq: u64::from_be_bytes(value[1..9].try_into().ok()?),
            head: value[9..41].try_into().ok()?,
            time_ms: u64::from_be_bytes(value[41..49].try_into().ok()?),
            signature: value[49..113].try_into().ok()?,
        })
    }

    fn verifies(&self, public_key: &[u8; 32]) -> bool {
        verify_signature(
            public_key,
            &prune_message(self.seq, &self.head, self.time_ms),
            &self.signature,
        )
    }
}

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The first sequence number checked.
    pub first_seq: u64,
    /// The last sequence number checked (0 if there were none).
    pub last_seq: u64,
    /// Events checked.
    pub events: u64,
    /// Checkpoints whose signature and chain hash were checked.
    pub checkpoints: u64,
    /// Events after the last checkpoint: linked, but not yet signed.
    pub unsigned_tail: u64,
}

/// The first problem found, by sequence number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit chain broken at sequence {seq}: {reason}")]
pub struct VerifyFailure {
    /// The first sequence number that is not what was written.
    pub seq: u64,
    /// What is wrong.
    pub reason: String,
}

fn fail(seq: u64, reason: impl Into<String>) -> VerifyFailure {
    VerifyFailure {
        seq,
        reason: reason.into(),
    }
}

/// Checks the chain from `from` (1 for all) and every checkpoint, with the
/// auditor's copy of the public key.
///
/// # Errors
/// The first bad sequence number: a changed or reordered event, a missing
/// one, a checkpoint that does not match or whose signature fails, or a
/// tail truncated below a signed checkpoint.
pub fn verify(
    store: &impl Snapshot,
    public_key: &[u8; 32],
    from: u64,
) -> Result<VerifyReport, VerifyFailure> {
    let from = from.max(1);
    let storage = |e: crate::store::Error| fail(from, format!("cannot read the store: {e}"));
    let mut checkpoints = BTreeMap::new();
    let mut bad_checkpoint = None;
    store
        .scan(Table::AuditCheckpoints, &chain::key(from), |key, value| {
            let cp = chain::seq_of(key).and_then(|seq| Checkpoint::decode(seq, value));
            match cp {
                Some(cp) if cp.verifies(public_key) => {
                    checkpoints.insert(cp.seq, cp);
                    true
                }
                _ => {
                    bad_checkpoint = Some(chain::seq_of(key).unwrap_or(0));
                    false
                }
            }
        })
        .map_err(storage)?;
    if let Some(seq) = bad_checkpoint {
        return Err(fail(
            seq,
            "checkpoint signature does not verify with this public key",
        ));
    }

    // A pruned trail starts after the checkpoint a signed prune marker
    // names; events up to it may be gone (or, if a pruning was cut short,
    // partly still there). Missing events that no marker covers were
    // deleted, not pruned.
    let marker = store
        .get(Table::Meta, crate::layout::AUDIT_PRUNE_MARKER)
        .map_err(storage)?
        .map(|value| {
            PruneMarker::decode(&value)
                .filter(|m| m.verifies(public_key))
                .ok_or_else(|| {
                    fail(
                        from,
                        "the prune marker's signature does not verify with this public key",
                    )
                })
        })
        .transpose()?;
    let mut first_stored = None;
    store
        .scan(Table::Audit, &chain::key(from), |key, _| {
            first_stored = chain::seq_of(key);
            false
        })
        .map_err(storage)?;
    let pruned_through = match (&marker, first_stored) {
        (Some(marker), _) if marker.seq >= from => {
            let anchor = checkpoints.get(&marker.seq).ok_or_else(|| {
                fail(
                    marker.seq,
                    "the prune marker names a checkpoint that is missing",
                )
            })?;
            if anchor.head != marker.head {
                return Err(fail(
                    marker.seq,
                    "the prune marker and its checkpoint disagree",
                ));
            }
            Some(marker.seq)
        }
        (_, Some(first)) if first > from => {
            return Err(fail(
                from,
                format!(
                    "events {from} to {} are missing and no signed prune marker covers them: they were deleted",
                    first - 1
                ),
            ));
        }
        _ => None,
    };
    let from = pruned_through.map_or(from, |seq| seq + 1);
    // The link into the first checked entry.
    let mut prev = if let Some(seq) = pruned_through {
        checkpoints.get(&seq).map_or(chain::GENESIS, |cp| cp.head)
    } else if from == 1 {
        chain::GENESIS
    } else {
        let value = store
            .get(Table::Audit, &chain::key(from - 1))
            .map_err(storage)?
            .ok_or_else(|| fail(from - 1, "the event before --from is missing"))?;
        chain::hash(from - 1, &value)
    };
    let mut expected = from;
    let mut failure = None;
    let mut checked_checkpoints = 0;
    store
        .scan(Table::Audit, &chain::key(from), |key, value| {
            let Some(seq) = chain::seq_of(key) else {
                failure = Some(fail(expected, "an audit key is not a sequence number"));
                return false;
            };
            if seq != expected {
                failure = Some(fail(
                    expected,
                    format!("event {expected} is missing (next stored is {seq})"),
                ));
                return false;
            }
            let Some(link) = chain::decode(value) else {
                failure = Some(fail(seq, "event is not in the chain format"));
                return false;
            };
            if !link.is_intact(seq) {
                failure = Some(fail(
                    seq,
                    "event was changed or moved from another position",
                ));
                return false;
            }
            if link.prev != prev {
                // This entry is intact, so the one before it was rewritten
                // (its digest recomputed) after this one linked to it.
                let culprit = seq.saturating_sub(1).max(from);
                failure = Some(fail(
                    culprit,
                    format!(
                        "event {seq} does not link to event {} as written: {} was rewritten",
                        seq - 1,
                        seq - 1
                    ),
                ));
                return false;
            }
            let hash = chain::hash(seq, value);
            if let Some(cp) = checkpoints.get(&seq) {
                if cp.head != hash {
                    failure = Some(fail(seq, "event does not match its signed checkpoint"));
                    return false;
                }
                checked_checkpoints += 1;
            }
            prev = hash;
            expected += 1;
            true
        })
        .map_err(storage)?;
    if let Some(failure) = failure {
        return Err(failure);
    }
    let last = expected - 1;
    if let Some((&signed, _)) = checkpoints.range(expected..).next() {
        return Err(fail(
            expected,
            format!(
                "the log ends at {last} but a checkpoint signs event {signed}: the tail was truncated"
            ),
        ));
    }
    let last_signed = checkpoints.keys().next_back().copied().unwrap_or(from - 1);
    Ok(VerifyReport {
        first_seq: from,
        last_seq: last,
        events: expected - from,
        checkpoints: checked_checkpoints,
        unsigned_tail: last.saturating_sub(last_signed.max(from - 1)),
    })
}

/// Writes every event from `from` as one JSON object per line (with its
/// sequence number and chain hash) to `out`, keeping those `keep` accepts.
///
/// # Errors
/// Storage or output failures, as text.
pub fn export(
    store: &impl Snapshot,
    from: u64,
    mut keep: impl FnMut(&AuditEvent) -> bool,
    out: &mut impl std::io::Write,
) -> Result<u64, String> {
    let mut written = 0;
    let mut error = None;
    store
        .scan(Table::Audit, &chain::key(from.max(1)), |key, value| {
            let (Some(seq), Some(link)) = (chain::seq_of(key), chain::decode(value)) else {
                error = Some("malformed audit entry".to_owned());
                return false;
            };
            let Some(event) = AuditEvent::decode(link.payload) else {
                error = Some(format!("event {seq} is not an audit event"));
                return false;
            };
            if !keep(&event) {
                return true;
            }
            let mut line = serde_json::json!({ "seq": seq, "hash": data_encoding::HEXLOWER.encode(&chain::hash(seq, value)) });
            if let (Some(obj), Ok(serde_json::Value::Object(fields))) = (line.as_object_mut(), serde_json::to_value(&event)) {
                obj.extend(fields);
            }
            if let Err(e) = writeln!(out, "{line}") {
                error = Some(e.to_string());
                return false;
            }
            written += 1;
            true
        })
        .map_err(|e| e.to_string())?;
    match error {
        Some(e) => Err(e),
        None => Ok(written),
    }
}
