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

/// Where a check of the chain is, event by event in order: the next event
/// expected and the hash it must link to. Offline over a snapshot and
/// over the network alike.
struct Cursor {
    first: u64,
    expected: u64,
    prev: [u8; 32],
    checkpoints: u64,
    last_signed: Option<u64>,
}

impl Cursor {
    /// A check that starts at event `first`, which must link to `prev`.
    fn new(first: u64, prev: [u8; 32]) -> Self {
        Self {
            first,
            expected: first,
            prev,
            checkpoints: 0,
            last_signed: None,
        }
    }

    /// Checks that event `seq` is the next one.
    fn expect(&self, seq: u64) -> Result<(), VerifyFailure> {
        let expected = self.expected;
        if seq == expected {
            Ok(())
        } else {
            Err(fail(
                expected,
                format!("event {expected} is missing (next stored is {seq})"),
            ))
        }
    }

    /// Checks that event `seq`, the next one, links to `link_prev`: the
    /// one before as it was.
    fn link(&self, seq: u64, link_prev: &[u8; 32]) -> Result<(), VerifyFailure> {
        if *link_prev != self.prev {
            // This entry is intact, so the one before it was rewritten
            // (its digest recomputed) after this one linked to it.
            let culprit = seq.saturating_sub(1).max(self.first);
            return Err(fail(
                culprit,
                format!(
                    "event {seq} does not link to event {} as written: {} was rewritten",
                    seq - 1,
                    seq - 1
                ),
            ));
        }
        Ok(())
    }

    /// Moves past the event just linked, whose hash is `hash`, and which
    /// the checkpoint `signed` signs if there is one (`Some(false)`: it
    /// signs another hash).
    fn advance(&mut self, hash: [u8; 32], signed: Option<bool>) -> Result<(), VerifyFailure> {
        let seq = self.expected;
        match signed {
            Some(false) => return Err(fail(seq, "event does not match its signed checkpoint")),
            Some(true) => {
                self.checkpoints += 1;
                self.last_signed = Some(seq);
            }
            None => {}
        }
        self.prev = hash;
        self.expected += 1;
        Ok(())
    }

    fn report(&self) -> VerifyReport {
        let last = self.expected - 1;
        VerifyReport {
            first_seq: self.first,
            last_seq: last,
            events: self.expected - self.first,
            checkpoints: self.checkpoints,
            unsigned_tail: last.saturating_sub(self.last_signed.unwrap_or(self.first - 1)),
        }
    }
}

/// Checks the chain as the Audit service streams it (`tokenvault audit
/// verify --addr`): each event's stored entry is rebuilt from its link and
/// its JSON, so its hash is computed here, never taken from the server;
/// each checkpoint's signature is checked over that hash with the
/// auditor's copy of the public key; a trail that starts after event 1
/// needs a prune marker that verifies and links to it.
pub struct StreamVerifier {
    public_key: [u8; 32],
    from: u64,
    cursor: Option<Cursor>,
    /// The numbers of the checkpoints verified over events sent.
    signed: std::collections::BTreeSet<u64>,
    /// The newest checkpoint the vault said it signed (its signature
    /// checked): the trail sent must reach it.
    newest: Option<u64>,
}

/// One event as streamed, for [`StreamVerifier::event`].
pub struct StreamedEvent<'a> {
    /// Its sequence number.
    pub seq: u64,
    /// The hash of the event it links to.
    pub prev: [u8; 32],
    /// The event JSON as chained.
    pub payload: &'a [u8],
    /// The hash the server says it has.
    pub hash: [u8; 32],
    /// The checkpoint over it, if any: when signed, and the signature.
    pub checkpoint: Option<(u64, [u8; 64])>,
    /// The prune marker sent with the first event of a page, if any.
    pub pruned: Option<PruneMarker>,
    /// The newest checkpoint signed, sent with the last event of a page.
    pub newest_checkpoint: Option<Checkpoint>,
}

impl StreamVerifier {
    /// A check of the events from `from` on (1: the whole trail), with the
    /// auditor's copy of the public key. From a later event, the first
    /// event's link is taken as given.
    pub fn new(public_key: [u8; 32], from: u64) -> Self {
        Self {
            public_key,
            from: from.max(1),
            cursor: None,
            signed: std::collections::BTreeSet::new(),
            newest: None,
        }
    }

    /// Checks the next event.
    ///
    /// # Errors
    /// The first bad sequence number, as [`verify`] names it.
    pub fn event(&mut self, event: StreamedEvent<'_>) -> Result<(), VerifyFailure> {
        let seq = event.seq;
        let cursor = match &mut self.cursor {
            Some(cursor) => cursor,
            None => {
                let start = match &event.pruned {
                    _ if seq == self.from && self.from > 1 => event.prev,
                    _ if seq == 1 => chain::GENESIS,
                    Some(marker)
                        if marker.seq + 1 == seq
                            && marker.seq + 1 >= self.from
                            && marker.verifies(&self.public_key) =>
                    {
                        marker.head
                    }
                    Some(_) => {
                        return Err(fail(
                            self.from,
                            "the prune marker does not verify with this public key, or does not lead to the first event kept",
                        ));
                    }
                    None => {
                        return Err(fail(
                            self.from,
                            format!(
                                "events {} to {} are missing and no signed prune marker covers them: they were deleted",
                                self.from,
                                seq - 1
                            ),
                        ));
                    }
                };
                self.cursor.insert(Cursor::new(seq, start))
            }
        };
        // A pruning between two pages: the next page starts after its
        // marker, which must verify and link on from what was checked.
        if let Some(marker) = event.pruned.as_ref().filter(|m| {
            seq > cursor.expected && m.seq + 1 == seq && m.seq >= cursor.expected.saturating_sub(1)
        }) {
            if !marker.verifies(&self.public_key) {
                return Err(fail(
                    marker.seq,
                    "the prune marker does not verify with this public key",
                ));
            }
            cursor.expected = seq;
            cursor.prev = marker.head;
        }
        cursor.expect(seq)?;
        cursor.link(seq, &event.prev)?;
        let entry = chain::encode(seq, &event.prev, event.payload);
        let hash = chain::hash(seq, &entry);
        if hash != event.hash {
            return Err(fail(
                seq,
                "the hash the server sent is not the event's: it was changed on the way",
            ));
        }
        let signed = event.checkpoint.map(|(time_ms, signature)| {
            Checkpoint {
                seq,
                head: hash,
                time_ms,
                signature,
            }
            .verifies(&self.public_key)
        });
        if signed == Some(false) {
            return Err(fail(
                seq,
                "checkpoint signature does not verify with this public key over this event",
            ));
        }
        cursor.advance(hash, signed)?;
        if signed == Some(true) {
            self.signed.insert(seq);
        }
        if let Some(newest) = event.newest_checkpoint {
            if !newest.verifies(&self.public_key) {
                return Err(fail(
                    newest.seq,
                    "the newest checkpoint the vault sent does not verify with this public key",
                ));
            }
            self.newest = self.newest.max(Some(newest.seq));
        }
        Ok(())
    }

    /// What was checked, once every event was: refused if no event was,
    /// or if no checkpoint signed with the key covers any of them (the
    /// server may have left every checkpoint out, and then nothing
    /// streamed is more than its word).
    ///
    /// # Errors
    /// As above.
    pub fn finish(&self) -> Result<VerifyReport, VerifyFailure> {
        let report = self
            .cursor
            .as_ref()
            .map(Cursor::report)
            .ok_or_else(|| fail(self.from, "the vault sent no event"))?;
        if report.checkpoints == 0 {
            return Err(fail(
                report.first_seq,
                "no checkpoint signed with this public key covers any event sent: the vault left them out, or has signed none yet (its checkpoints come every audit.checkpoint_interval_seconds); nothing here is more than its word",
            ));
        }
        let Some(newest) = self.newest else {
            return Err(fail(
                report.last_seq + 1,
                "the vault sent no newest checkpoint with its last page, so a withheld tail cannot be told: a vault of an earlier release, or its record of the newest checkpoint was removed",
            ));
        };
        if newest > report.last_seq {
            return Err(fail(
                report.last_seq + 1,
                format!(
                    "the vault's newest checkpoint signs event {newest}, but the events sent end at {}: the tail was withheld or deleted",
                    report.last_seq
                ),
            ));
        }
        if newest >= report.first_seq && !self.signed.contains(&newest) {
            return Err(fail(
                newest,
                "the vault's newest checkpoint was not sent with its event",
            ));
        }
        Ok(report)
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
    let prev = if let Some(seq) = pruned_through {
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
    let mut cursor = Cursor::new(from, prev);
    let mut failure = None;
    store
        .scan(
            Table::Audit,
            &chain::key(from),
            |key, value| match check_stored(&mut cursor, &checkpoints, key, value) {
                Ok(()) => true,
                Err(e) => {
                    failure = Some(e);
                    false
                }
            },
        )
        .map_err(storage)?;
    if let Some(failure) = failure {
        return Err(failure);
    }
    let expected = cursor.expected;
    if let Some((&signed, _)) = checkpoints.range(expected..).next() {
        return Err(fail(
            expected,
            format!(
                "the log ends at {} but a checkpoint signs event {signed}: the tail was truncated",
                expected - 1
            ),
        ));
    }
    Ok(cursor.report())
}

/// Checks the stored entry `value` under `key` as the next event.
fn check_stored(
    cursor: &mut Cursor,
    checkpoints: &BTreeMap<u64, Checkpoint>,
    key: &[u8],
    value: &[u8],
) -> Result<(), VerifyFailure> {
    let seq = chain::seq_of(key)
        .ok_or_else(|| fail(cursor.expected, "an audit key is not a sequence number"))?;
    cursor.expect(seq)?;
    let link = chain::decode(value).ok_or_else(|| fail(seq, "event is not in the chain format"))?;
    if !link.is_intact(seq) {
        return Err(fail(
            seq,
            "event was changed or moved from another position",
        ));
    }
    cursor.link(seq, &link.prev)?;
    let hash = chain::hash(seq, value);
    cursor.advance(hash, checkpoints.get(&seq).map(|cp| cp.head == hash))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{AuditSigningKey, HashKey};

    /// A streamed event: seq, link, payload, hash, checkpoint.
    type Streamed = (u64, [u8; 32], Vec<u8>, [u8; 32], Option<(u64, [u8; 64])>);

    /// `n` events as the Audit service streams them, the last signed by
    /// `signer`.
    fn stream(signer: &AuditSigningKey, n: u64) -> Vec<Streamed> {
        let mut prev = chain::GENESIS;
        (1..=n)
            .map(|seq| {
                let payload = format!("{{\"event\":{seq}}}").into_bytes();
                let hash = chain::hash(seq, &chain::encode(seq, &prev, &payload));
                let checkpoint = (seq == n).then(|| {
                    (
                        77,
                        signer.sign(&super::super::checkpoint_message(seq, &hash, 77)),
                    )
                });
                let event = (seq, prev, payload, hash, checkpoint);
                prev = hash;
                event
            })
            .collect()
    }

    /// As the vault streams them: the newest checkpoint among `events`
    /// sent with the last one.
    fn check(key: [u8; 32], events: &[Streamed]) -> Result<VerifyReport, VerifyFailure> {
        let newest = events
            .iter()
            .rev()
            .find_map(|(seq, _, _, hash, checkpoint)| {
                checkpoint.map(|(time_ms, signature)| Checkpoint {
                    seq: *seq,
                    head: *hash,
                    time_ms,
                    signature,
                })
            });
        check_with_newest(key, events, newest)
    }

    /// As [`check`], with `newest` sent on the last event.
    fn check_with_newest(
        key: [u8; 32],
        events: &[Streamed],
        newest: Option<Checkpoint>,
    ) -> Result<VerifyReport, VerifyFailure> {
        let mut verifier = StreamVerifier::new(key, 1);
        for (n, (seq, prev, payload, hash, checkpoint)) in events.iter().enumerate() {
            verifier.event(StreamedEvent {
                seq: *seq,
                prev: *prev,
                payload,
                hash: *hash,
                checkpoint: *checkpoint,
                pruned: None,
                newest_checkpoint: newest.clone().filter(|_| n + 1 == events.len()),
            })?;
        }
        verifier.finish()
    }

    fn signer() -> AuditSigningKey {
        AuditSigningKey::from_seed(&HashKey::generate().unwrap())
    }

    #[test]
    fn a_streamed_chain_verifies_only_as_it_was_signed() {
        let signer = signer();
        let key = signer.public_key();
        let events = stream(&signer, 5);
        let report = check(key, &events).unwrap();
        assert_eq!(
            (report.first_seq, report.last_seq, report.checkpoints),
            (1, 5, 1)
        );

        // A payload changed on the way, the server's hash kept: the hash
        // is computed here, not taken.
        let mut changed = events.clone();
        changed[2].2 = b"{\"event\":99}".to_vec();
        let e = check(key, &changed).unwrap_err();
        assert_eq!(e.seq, 3);
        assert!(e.reason.contains("changed on the way"), "{e}");

        // The last event rewritten with a hash to match: its checkpoint
        // no longer verifies over it.
        let mut rewritten = events.clone();
        let (seq, prev, _, _, checkpoint) = rewritten[4].clone();
        let payload = b"{\"event\":\"other\"}".to_vec();
        let hash = chain::hash(seq, &chain::encode(seq, &prev, &payload));
        rewritten[4] = (seq, prev, payload, hash, checkpoint);
        let e = check(key, &rewritten).unwrap_err();
        assert_eq!(e.seq, 5);
        assert!(e.reason.contains("signature"), "{e}");

        // An event left out.
        let mut gap = events.clone();
        gap.remove(1);
        let e = check(key, &gap).unwrap_err();
        assert_eq!(e.seq, 2);
        assert!(e.reason.contains("missing"), "{e}");

        // Every checkpoint left out: nothing is signed.
        let unsigned: Vec<Streamed> = events
            .iter()
            .cloned()
            .map(|(seq, prev, payload, hash, _)| (seq, prev, payload, hash, None))
            .collect();
        let e = check(key, &unsigned).unwrap_err();
        assert!(e.reason.contains("no checkpoint"), "{e}");

        // Another key.
        let e = check(self::signer().public_key(), &events).unwrap_err();
        assert!(e.reason.contains("signature"), "{e}");

        // The tail withheld: the newest checkpoint, sent with the last
        // page, signs an event past the end.
        let (seq, _, _, head, checkpoint) = events[4].clone();
        let (time_ms, signature) = checkpoint.unwrap();
        let newest = Checkpoint {
            seq,
            head,
            time_ms,
            signature,
        };
        let mut signed_early = events[..3].to_vec();
        signed_early[2].4 = Some((
            1,
            signer.sign(&super::super::checkpoint_message(3, &events[2].3, 1)),
        ));
        assert!(check(key, &signed_early).is_ok());
        let e = check_with_newest(key, &signed_early, Some(newest.clone())).unwrap_err();
        assert!(e.reason.contains("tail was withheld"), "{e}");
        assert!(check_with_newest(key, &events, Some(newest)).is_ok());
        // No newest checkpoint sent at all (its record removed).
        let e = check_with_newest(key, &events, None).unwrap_err();
        assert!(e.reason.contains("no newest checkpoint"), "{e}");
    }
}
