//! Tokenize and look up.
//!
//! A tokenize request is stored in one write, all of it or nothing: every
//! new record, index entry and the call's audit event go into a single unit
//! guarded by "absent" on the keys that must be new (a deterministic value's
//! index entry, a format-preserving token). If a concurrent request took one
//! of those keys first, nothing is written, and the request is resolved again
//! from what is stored now (its deterministic values then have their token;
//! its format-preserving tokens are drawn again) and written again.

use std::collections::{HashMap, HashSet};

use super::{
    Blind, ItemError, LookupValue, NewValue, Record, Vault,
    audit::Parts,
    erasure::ERASED_MEANWHILE,
    requests::{REMEMBER_KEYS, REQUEST_ID_IN_FLIGHT, Remember},
};
use crate::{
    audit::{AuditContext, Outcome},
    authz::{Denial, Permit, act},
    crypto::{self, DataKey, SecretValue},
    fields::FieldSpec,
    layout::{self, Binding, KeyVersion},
    store::{Batch, Conflict, FailedGuard, Store, Table},
    token::{FieldType, Token},
};

/// How often a request is resolved and written again after concurrent
/// requests took keys it needed, before it gives up (`ABORTED`, nothing
/// stored).
const MAX_ROUNDS: usize = 8;

/// How many format-preserving tokens are drawn for one value before it fails
/// (`RESOURCE_EXHAUSTED`): the space of its bucket is nearly full.
const MAX_DRAWS: usize = 8;

/// Draws after which a bucket is reported as filling up (with `p` of its
/// tokens taken, a value needs this many draws with probability `p²`).
const CROWDED_DRAWS: usize = 3;

/// One item on its way into the store.
struct Pending<'a> {
    /// Position in the request.
    index: usize,
    spec: &'a FieldSpec,
    value: SecretValue,
    subject_hash: Option<[u8; 32]>,
    /// The blind-index keys, for deterministic field types.
    blind: Option<Blind>,
    /// When the value expires.
    expires_ms: Option<u64>,
}

type ItemResult = Result<Token, ItemError>;

/// The distinct keys the write of `pending` will touch, as
/// `Vault::store_unit` builds it: each record, its index entries (every
/// index key in use), its subject-index and expiry entries, and the guard
/// on the next index key of each version hashed under.
fn keys_needed(pending: &[Pending<'_>]) -> usize {
    let mut versions = HashSet::new();
    let per_item: usize = pending
        .iter()
        .map(|p| {
            if let Some(blind) = &p.blind {
                versions.insert(blind.version);
            }
            1 + p.blind.as_ref().map_or(0, Blind::len)
                + usize::from(p.subject_hash.is_some())
                + usize::from(p.expires_ms.is_some())
        })
        .sum();
    per_item + versions.len()
}

/// The index key versions the deterministic values of `drawn` are hashed
/// under, distinct (one, unless a key was loaded while they were hashed).
fn index_versions(drawn: &[(Pending<'_>, Token)]) -> Vec<u32> {
    let mut versions: Vec<u32> = drawn
        .iter()
        .filter_map(|(p, _)| p.blind.as_ref().map(|b| b.version))
        .collect();
    versions.sort_unstable();
    versions.dedup();
    versions
}

/// One result per item of the request, in order, as the call answers if
/// the write of `drawn` applies: `results` so far, the tokens drawn, and
/// each repeat of a deterministic value with its first occurrence's.
fn answer(
    results: &[Option<ItemResult>],
    drawn: &[(Pending<'_>, Token)],
    repeats: &[(usize, usize)],
) -> Vec<ItemResult> {
    let mut answer = results.to_vec();
    for (p, token) in drawn {
        answer[p.index] = Some(Ok(token.clone()));
    }
    for &(index, first) in repeats {
        answer[index] = answer[first].clone();
    }
    answer
        .into_iter()
        .map(|r| r.unwrap_or(Err(ItemError::DataLoss)))
        .collect()
}

impl<S: Store> Vault<S> {
    /// Validates, normalises and encrypts every value, and stores them in one
    /// write. One result per item, in order.
    ///
    /// A deterministic value that already has a live token gets that token
    /// back only if `existing` permits it (the API asks for `lookup:` on the
    /// field type): handing back an existing token tells the caller which
    /// token the value has, which is what `lookup:` grants. Without it the
    /// item fails with [`ItemError::ExistingToken`]. Concurrent requests for
    /// one new value get one token between them.
    ///
    /// `ttl_seconds` longer than the field type's retention is cut to the
    /// retention.
    ///
    /// With `remember`, the answer is recorded with the write, under the
    /// caller's request id (`requests`).
    ///
    /// # Errors
    /// If the write fails, no item is stored. [`super::Error::Conflict`] if
    /// concurrent requests kept taking the keys this one needed, or another
    /// call with the request id was written first.
    pub async fn tokenize(
        &self,
        items: Vec<Permit<act::Tokenize, NewValue>>,
        existing: impl Fn(&FieldType) -> Result<Permit<act::Lookup, FieldType>, Denial>,
        audit: &AuditContext,
        remember: Option<Remember<'_, [ItemResult]>>,
    ) -> Result<Vec<ItemResult>, super::Error> {
        let mut event = audit.event(Outcome::Ok);
        let mut results: Vec<Option<ItemResult>> = (0..items.len()).map(|_| None).collect();
        let mut pending = Vec::new();
        // Repeats of one deterministic value inside this request share the
        // first occurrence's token.
        let mut first_of: HashMap<[u8; 32], usize> = HashMap::new();
        let mut repeats: Vec<(usize, usize)> = Vec::new();
        let now = self.now();
        // Per item, its subject and field type: each subject's part.
        let mut of_item = Vec::with_capacity(items.len());
        for (index, permit) in items.into_iter().enumerate() {
            let item = permit.into_item();
            event.field_types.push(item.field_type.to_string());
            of_item.push((
                item.subject.as_ref().map(|s| self.subject_hash(s)),
                item.field_type.to_string(),
            ));
            match self.prepare(index, item, now) {
                Ok(p) => {
                    if let Some(blind) = &p.blind {
                        if let Some(&first) = first_of.get(&blind.active) {
                            repeats.push((index, first));
                            continue;
                        }
                        first_of.insert(blind.active, index);
                    }
                    pending.push(p);
                }
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        event.field_types.sort();
        event.field_types.dedup();
        // Every subject the request names, stored or not: a remembered
        // call's record holds a keyed hash of its values, and an erasure
        // finds it by them.
        let mut named: Vec<[u8; 32]> = of_item.iter().filter_map(|(s, _)| *s).collect();
        named.sort_unstable();
        named.dedup();

        // Each subject's values are encrypted under the subject's own key.
        // Too large for the engine: refused before anything is written (not
        // even the subjects' new keys).
        if let Some(max) = self.store.max_keys_per_request() {
            let keys = keys_needed(&pending)
                + remember.as_ref().map_or(0, |_| REMEMBER_KEYS + named.len());
            if keys > max {
                return Err(super::Error::RequestTooLarge { keys, max });
            }
        }
        let mut subjects: Vec<[u8; 32]> = pending.iter().filter_map(|p| p.subject_hash).collect();
        subjects.sort_unstable();
        subjects.dedup();
        self.refuse_full_subjects(&subjects, &mut pending, &mut results)
            .await?;
        // Read before the keys, and guarded unchanged by the write: an
        // erasure of one of the subjects in between (which deletes the key
        // loaded here) makes the write fail instead of leaving values under
        // a destroyed key, and their index entries, behind.
        let marks = self.erasure_marks(&subjects).await?;
        let subject_keys = self.subject_keys_or_create(&subjects, &marks).await?;

        for _ in 0..MAX_ROUNDS {
            self.resolve_existing(&mut pending, &mut results, &existing)
                .await?;
            let drawn = self.draw_tokens(pending, &mut results).await?;
            let mut round_event = event.clone();
            round_event.tokens = results
                .iter()
                .flatten()
                .flatten()
                .chain(drawn.iter().map(|(_, token)| token))
                .map(|token| self.audit_token(token))
                .collect();
            round_event.failed_items +=
                u32::try_from(results.iter().flatten().filter(|r| r.is_err()).count())
                    .unwrap_or(u32::MAX);
            let mut parts = Parts::default();
            for ((subject, field_type), result) in of_item.iter().zip(&results) {
                parts.item(*subject, field_type, None, matches!(result, Some(Err(_))));
            }
            parts.finish(self, &mut round_event);
            let mut batch = Batch::new();
            let index_versions = index_versions(&drawn);
            let unit = self.store_unit(batch.unit(), &drawn, &subject_keys, &index_versions)?;
            for mark in &marks {
                mark.guard(unit);
            }
            self.append_event(unit, &round_event);
            let remembered = remember.as_ref().map(|r| {
                let answer = (r.answer)(&answer(&results, &drawn, &repeats));
                self.remember(unit, r.request, audit, answer, &named)
            });
            // A backstop for the estimate above (nothing written this round).
            if let (Some(max), Some(unit)) =
                (self.store.max_keys_per_request(), batch.units().first())
            {
                let keys = unit.keys_touched();
                if keys > max {
                    return Err(super::Error::RequestTooLarge { keys, max });
                }
            }
            let outcome = self
                .store
                .commit(batch)
                .await
                .map_err(super::Error::AuditUnavailable)?;
            if let (Some(Err(conflict)), Some(at)) = (outcome.first(), remembered)
                && at.lost_to(conflict)
            {
                return Err(super::Error::Conflict(REQUEST_ID_IN_FLIGHT));
            }
            if let Some(Err(Conflict {
                guard: FailedGuard::Absent(guard),
                ..
            })) = outcome.first()
                && *guard < index_versions.len()
            {
                // Another replica rotated the blind-index key: load it and
                // hash the values again.
                self.refresh_keys().await;
                pending = drawn.into_iter().map(|(p, _)| p).collect();
                for p in &mut pending {
                    if let Some(blind) = &mut p.blind {
                        *blind = self.blind_index(&p.spec.name, p.subject_hash.as_ref(), &p.value);
                    }
                }
                continue;
            }
            if outcome.first().is_none_or(Result::is_ok) {
                return Ok(answer(&results, &drawn, &repeats));
            }
            // A subject erased meanwhile: nothing was written, and the key
            // loaded is gone.
            if self.marks_moved(&marks, &subjects).await? {
                return Err(super::Error::Conflict(ERASED_MEANWHILE));
            }
            // A concurrent request took a key this one needed; nothing was
            // written. Resolve again from what is stored now.
            pending = drawn.into_iter().map(|(p, _)| p).collect();
        }
        Err(super::Error::Conflict(
            "concurrent requests kept taking the tokens this request needed; nothing was stored, retry",
        ))
    }

    /// Fails the items of every subject that would have more than
    /// `max_tokens_per_subject` tokens after this request. Concurrent
    /// requests for one subject may each pass the check, so the bound can be
    /// overshot by what they add together; it is there to stop a subject
    /// growing without limit, not to count exactly.
    ///
    /// A deterministic value that already has its token counts as new here,
    /// so a subject at the limit gets no tokens back from tokenize at all
    /// (lookup still answers).
    async fn refuse_full_subjects(
        &self,
        subjects: &[[u8; 32]],
        pending: &mut Vec<Pending<'_>>,
        results: &mut [Option<ItemResult>],
    ) -> Result<(), super::Error> {
        let max = self.max_tokens_per_subject;
        for hash in subjects {
            let adding = pending
                .iter()
                .filter(|p| p.subject_hash.as_ref() == Some(hash))
                .count();
            // Reads at most `max` index keys, whatever the subject holds.
            let held = self
                .store
                .scan_from(Table::SubjectIndex, hash.to_vec(), max)
                .await?
                .iter()
                .take_while(|(key, _)| key.starts_with(hash))
                .count();
            if held + adding > max {
                tracing::warn!(
                    held,
                    adding,
                    max,
                    "refused tokens for a data subject at subjects.max_tokens_per_subject"
                );
                pending.retain(|p| {
                    if p.subject_hash.as_ref() == Some(hash) {
                        results[p.index] = Some(Err(ItemError::SubjectFull(max)));
                        false
                    } else {
                        true
                    }
                });
            }
        }
        Ok(())
    }

    /// Normalises one value and works out its index keys and expiry.
    fn prepare(&self, index: usize, item: NewValue, now: u64) -> Result<Pending<'_>, ItemError> {
        let spec = self.spec(&item.field_type)?;
        let value = spec.normalize(&item.value)?;
        let subject_hash = item.subject.as_ref().map(|s| self.subject_hash(s));
        let blind = spec
            .deterministic
            .then(|| self.blind_index(&spec.name, subject_hash.as_ref(), &value));
        let retention_ms = spec
            .retention
            .map(|r| u64::try_from(r.as_millis()).unwrap_or(u64::MAX));
        let ttl_ms = match (
            item.ttl_seconds.map(|s| s.saturating_mul(1000)),
            retention_ms,
        ) {
            (Some(ttl), Some(retention)) => Some(ttl.min(retention)),
            (ttl, retention) => ttl.or(retention),
        };
        Ok(Pending {
            index,
            spec,
            value,
            subject_hash,
            blind,
            expires_ms: ttl_ms.map(|ttl| now.saturating_add(ttl)),
        })
    }

    /// Takes out of `pending` the deterministic values that have a live
    /// token now, answering each with that token if `existing` permits.
    async fn resolve_existing(
        &self,
        pending: &mut Vec<Pending<'_>>,
        results: &mut [Option<ItemResult>],
        existing: &impl Fn(&FieldType) -> Result<Permit<act::Lookup, FieldType>, Denial>,
    ) -> Result<(), super::Error> {
        let wanted: Vec<(usize, &Blind)> = pending
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.blind.as_ref().map(|b| (i, b)))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let found = self.find_indexed(&wanted).await?;
        let mut known = vec![false; pending.len()];
        for entry in self.live_retiring_dead(found).await? {
            let p = &pending[entry.position];
            results[p.index] = Some(entry.token.and_then(|token| {
                existing(&p.spec.name)
                    .map(|_| token)
                    .map_err(ItemError::ExistingToken)
            }));
            known[entry.position] = true;
        }
        let mut keep = known.iter().map(|k| !k);
        pending.retain(|_| keep.next().unwrap_or(true));
        Ok(())
    }

    /// A new token for each pending value. Format-preserving tokens come
    /// from a small space: each is drawn until it is free in the store and
    /// in this request, at most [`MAX_DRAWS`] times (then the item fails).
    async fn draw_tokens<'a>(
        &self,
        pending: Vec<Pending<'a>>,
        results: &mut [Option<ItemResult>],
    ) -> Result<Vec<(Pending<'a>, Token)>, super::Error> {
        let mut drawn = Vec::with_capacity(pending.len());
        let mut undecided = Vec::new();
        for p in pending {
            match p.spec.new_token(&p.value) {
                Ok(token) if p.spec.tokens_may_collide() => undecided.push((p, token, 1)),
                Ok(token) => drawn.push((p, token)),
                Err(crate::fields::TokenError::Random) => {
                    return Err(crypto::Error::Random(getrandom::Error::UNEXPECTED).into());
                }
                Err(e) => {
                    results[p.index] = Some(Err(ItemError::Unformattable(p.spec.name.clone(), e)));
                }
            }
        }
        let mut taken: HashSet<Token> = HashSet::new();
        while !undecided.is_empty() {
            let keys = undecided
                .iter()
                .map(|(_, token, _)| token.storage_key().to_vec())
                .collect();
            let stored = self.store.get_many(Table::Records, keys).await?;
            let mut again = Vec::new();
            for ((p, token, draws), stored) in undecided.into_iter().zip(stored) {
                if stored.is_none() && taken.insert(token.clone()) {
                    if draws >= CROWDED_DRAWS {
                        self.note_crowded(&p.spec.name, draws);
                    }
                    drawn.push((p, token));
                } else if draws >= MAX_DRAWS {
                    self.note_crowded(&p.spec.name, draws);
                    results[p.index] =
                        Some(Err(ItemError::TokenSpaceExhausted(p.spec.name.clone())));
                } else {
                    match p.spec.new_token(&p.value) {
                        Ok(token) => again.push((p, token, draws + 1)),
                        Err(_) => {
                            return Err(crypto::Error::Random(getrandom::Error::UNEXPECTED).into());
                        }
                    }
                }
            }
            undecided = again;
        }
        Ok(drawn)
    }

    /// Counts a format-preserving value that needed `draws` draws, and says
    /// so in the log (at most once a minute): its bucket of the token space
    /// (same kept digits and last four) is filling up.
    fn note_crowded(&self, field_type: &FieldType, draws: usize) {
        self.fpt_crowded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = self.now();
        let last = self
            .fpt_crowded_logged
            .load(std::sync::atomic::Ordering::Relaxed);
        if now.saturating_sub(last) >= 60_000
            && self
                .fpt_crowded_logged
                .compare_exchange(
                    last,
                    now,
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_ok()
        {
            tracing::warn!(
                field_type = %field_type,
                draws,
                "a format-preserving token needed several draws: its bucket (kept digits and last four) is filling up"
            );
        }
    }

    /// Adds the records of `drawn` to `unit`, with their index, subject and
    /// expiry entries and the guards that make the unit apply only if every
    /// key that must be new still is.
    fn store_unit<'u>(
        &self,
        unit: &'u mut crate::store::Unit,
        drawn: &[(Pending<'_>, Token)],
        subject_keys: &HashMap<[u8; 32], DataKey>,
        index_versions: &[u32],
    ) -> Result<&'u mut crate::store::Unit, super::Error> {
        // First, so that a failure of one of them is told apart: a value
        // indexed here under an index key another replica has already
        // replaced would get a second token through that replica (which
        // looks under the new key first). No newer index key may exist.
        for version in index_versions {
            unit.guard_absent(
                Table::Keys,
                layout::MasterWrapped::BlindIndexKey.label(version + 1),
            );
        }
        let (vault_key_version, vault_key) = self.keyring.active();
        let created_ms = self.now();
        for (p, token) in drawn {
            let (key_version, key) = match p.subject_hash.and_then(|h| subject_keys.get(&h)) {
                Some(key) => (KeyVersion::Subject, key),
                None => (KeyVersion::Vault(vault_key_version), &*vault_key),
            };
            let aad = Record::sealing_aad(
                token,
                key_version,
                p.subject_hash.as_ref(),
                &p.spec.name,
                p.expires_ms,
            );
            let sealed = key.seal(p.value.expose().as_bytes(), &aad)?;
            let record = Record {
                binding: Binding::WithFieldTypeAndExpiry,
                field_type: p.spec.name.clone(),
                key_version,
                nonce: sealed.nonce,
                created_ms,
                expires_ms: p.expires_ms,
                subject_hash: p.subject_hash,
                blind: p.blind.as_ref().map(|b| b.active),
                ciphertext: sealed.ciphertext,
            };
            if let Some(subject) = p.subject_hash {
                unit.put(
                    Table::SubjectIndex,
                    layout::subject_index_key(&subject, token.storage_key()),
                    Vec::new(),
                );
            }
            // The blind index under every index key still in use must be
            // free (deterministic), and so must the record key for formats
            // whose token space is small enough to collide.
            if let Some(blind) = &p.blind {
                for key in blind.all() {
                    unit.guard_absent(Table::Index, key.to_vec());
                }
                unit.put(
                    Table::Index,
                    blind.active.to_vec(),
                    token.as_str().as_bytes().to_vec(),
                );
            }
            if p.spec.tokens_may_collide() {
                unit.guard_absent(Table::Records, token.storage_key().to_vec());
            }
            if let Some(expires_ms) = p.expires_ms {
                unit.put(
                    Table::Expiry,
                    layout::expiry_key(expires_ms, token.storage_key()),
                    Vec::new(),
                );
            }
            unit.put(
                Table::Records,
                token.storage_key().to_vec(),
                record.encode(),
            );
        }
        Ok(unit)
    }

    /// The existing token of each value, for deterministic field types.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn lookup(
        &self,
        items: Vec<Permit<act::Lookup, LookupValue>>,
        audit: &AuditContext,
    ) -> Result<Vec<ItemResult>, super::Error> {
        let mut event = audit.event(Outcome::Ok);
        let mut results: Vec<ItemResult> = Vec::with_capacity(items.len());
        let mut wanted = Vec::new();
        let mut subjects = Vec::with_capacity(items.len());
        let mut field_types = Vec::with_capacity(items.len());
        for (index, permit) in items.into_iter().enumerate() {
            let item = permit.into_item();
            event.field_types.push(item.field_type.to_string());
            field_types.push(item.field_type.to_string());
            let subject = item.subject.as_ref().map(|s| self.subject_hash(s));
            subjects.push(subject);
            let blind = self.spec(&item.field_type).and_then(|spec| {
                if !spec.deterministic {
                    return Err(ItemError::NotDeterministic(spec.name.clone()));
                }
                let value = spec.normalize(&item.value)?;
                Ok(self.blind_index(&spec.name, subject.as_ref(), &value))
            });
            match blind {
                Ok(blind) => {
                    wanted.push((index, blind));
                    results.push(Err(ItemError::NotFound));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        if !wanted.is_empty() {
            let wanted: Vec<(usize, &Blind)> = wanted.iter().map(|(i, b)| (*i, b)).collect();
            let found = self.find_indexed(&wanted).await?;
            for existing in self.live_only(found).await? {
                results[existing.position] = existing.token;
            }
        }
        event.field_types.sort();
        event.field_types.dedup();
        // The subjects whose tokens the lookup found: it told the caller
        // that the vault holds this value of theirs.
        let mut parts = Parts::default();
        for ((result, subject), field_type) in results.iter().zip(subjects).zip(&field_types) {
            if result.is_ok() {
                parts.item(subject, field_type, None, false);
            }
        }
        event.failed_items +=
            u32::try_from(results.iter().filter(|r| r.is_err()).count()).unwrap_or(u32::MAX);
        event.tokens = results
            .iter()
            .flatten()
            .map(|t| self.audit_token(t))
            .collect();
        parts.finish(self, &mut event);
        self.record(&event).await?;
        Ok(results)
    }
}

/// A token the blind index holds for a value.
pub(super) struct Indexed {
    /// The value's position in the caller's list.
    pub(super) position: usize,
    /// The index key it is stored under.
    pub(super) key: [u8; 32],
    /// The token (an error if the entry holds none).
    pub(super) token: ItemResult,
}

impl<S: Store> Vault<S> {
    /// Reads the blind index for each `(position, keys)`: the token under the
    /// first key that has one, for the positions that have one. Whether its
    /// record is still live is for the caller to ask (`retention.rs`).
    async fn find_indexed(&self, wanted: &[(usize, &Blind)]) -> Result<Vec<Indexed>, super::Error> {
        let keys = wanted
            .iter()
            .flat_map(|(_, b)| b.all().map(|k| k.to_vec()))
            .collect();
        let mut found = self.store.get_many(Table::Index, keys).await?.into_iter();
        let mut out = Vec::new();
        for (position, blind) in wanted {
            let mut first = None;
            for (key, stored) in blind.all().zip(found.by_ref().take(blind.len())) {
                if first.is_none()
                    && let Some(token) = stored
                {
                    first = Some((*key, token));
                }
            }
            if let Some((key, token)) = first {
                out.push(Indexed {
                    position: *position,
                    key,
                    token: parse_stored_token(&token),
                });
            }
        }
        Ok(out)
    }
}

fn parse_stored_token(bytes: &[u8]) -> ItemResult {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| {
            tracing::error!("blind index entry holds no valid token");
            ItemError::DataLoss
        })
}
