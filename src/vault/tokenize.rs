//! Tokenize and look up.

use std::collections::HashMap;

use super::{
    Blind, ItemError, LookupValue, NewValue, Record, Vault, record::SUBJECT_KEY,
    retention::expiry_key, subjects::subject_index_key,
};
use crate::{
    audit::AuditContext,
    authz::Permit,
    crypto::{self, DataKey, SecretValue},
    fields::FieldSpec,
    store::{Batch, Store, Table},
    token::Token,
};

/// How often a format-preserving token is drawn again after a collision.
const MAX_ATTEMPTS: usize = 8;

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

impl<S: Store> Vault<S> {
    /// Validates, normalises and encrypts every value, and stores them in one
    /// write. One result per item, in order.
    ///
    /// Deterministic field types return the existing token of a value that
    /// is already stored; concurrent requests for one new value get one
    /// token between them (the blind-index entry is created under a guard).
    ///
    /// # Errors
    /// If the write fails, no item is stored.
    pub async fn tokenize(
        &self,
        items: Vec<Permit<NewValue>>,
        audit: &AuditContext,
    ) -> Result<Vec<ItemResult>, super::Error> {
        let mut event = audit.event("OK");
        let mut results: Vec<Option<ItemResult>> = (0..items.len()).map(|_| None).collect();
        let mut pending = Vec::new();
        // Repeats of one deterministic value inside this request share the
        // first occurrence's token.
        let mut first_of: HashMap<[u8; 32], usize> = HashMap::new();
        let mut repeats: Vec<(usize, usize)> = Vec::new();
        for (index, permit) in items.into_iter().enumerate() {
            let item = permit.into_item();
            event.field_types.push(item.field_type.to_string());
            if let Some(subject) = &item.subject {
                event.subjects.push(self.audit_subject(subject));
            }
            let now = self.now();
            let prepared = self.spec(&item.field_type).and_then(|spec| {
                let value = spec.normalize(&item.value)?;
                let subject_hash = item.subject.as_ref().map(|s| self.subject_hash(s));
                let blind = spec
                    .deterministic
                    .then(|| self.blind_index(&spec.name, subject_hash.as_ref(), &value));
                let ttl_ms = item
                    .ttl_seconds
                    .map(|s| s.saturating_mul(1000))
                    .or_else(|| {
                        spec.retention
                            .map(|r| u64::try_from(r.as_millis()).unwrap_or(u64::MAX))
                    });
                Ok(Pending {
                    index,
                    spec,
                    value,
                    subject_hash,
                    blind,
                    expires_ms: ttl_ms.map(|ttl| now.saturating_add(ttl)),
                })
            });
            match prepared {
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
                Err(e) => {
                    event.failed_items += 1;
                    results[index] = Some(Err(e));
                }
            }
        }
        event.field_types.sort();
        event.field_types.dedup();
        event.subjects.sort();
        event.subjects.dedup();
        // The event goes into the first write, with the data it describes;
        // if nothing is written, on its own.
        let mut audit_payload = Some(event.encode());

        // Deterministic values that already have a live token.
        let lookups: Vec<(usize, &Blind)> = pending
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.blind.as_ref().map(|b| (i, b)))
            .collect();
        if !lookups.is_empty() {
            let found = self.find_indexed(&lookups).await?;
            let mut known = vec![false; pending.len()];
            for existing in self.live_retiring_dead(found).await? {
                results[pending[existing.position].index] = Some(existing.token);
                known[existing.position] = true;
            }
            let mut keep = known.iter().map(|k| !k);
            pending.retain(|_| keep.next().unwrap_or(true));
        }

        // Each subject's values are encrypted under the subject's own key.
        let mut subjects: Vec<[u8; 32]> = pending.iter().filter_map(|p| p.subject_hash).collect();
        subjects.sort_unstable();
        subjects.dedup();
        let subject_keys = self.subject_keys(&subjects, true).await?;

        for _ in 0..MAX_ATTEMPTS {
            if pending.is_empty() {
                break;
            }
            pending = self
                .store_new(pending, &mut results, audit_payload.take(), &subject_keys)
                .await?;
        }
        if audit_payload.is_some() {
            self.record(&event).await?;
        }
        for p in pending {
            results[p.index] = Some(Err(ItemError::TokenSpaceExhausted(p.spec.name.clone())));
        }
        for (index, first) in repeats {
            results[index] = results[first].clone();
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or(Err(ItemError::DataLoss)))
            .collect())
    }

    /// One write of new records; returns the items to try again (format-
    /// preserving tokens that collided with an existing one).
    async fn store_new<'a>(
        &self,
        pending: Vec<Pending<'a>>,
        results: &mut [Option<ItemResult>],
        audit_payload: Option<Vec<u8>>,
        subject_keys: &HashMap<[u8; 32], DataKey>,
    ) -> Result<Vec<Pending<'a>>, super::Error> {
        let (vault_key_version, vault_key) = self.keyring.active();
        let created_ms = self.now();
        let mut batch = Batch::new();
        let mut tokens = Vec::with_capacity(pending.len());
        let mut in_batch = Vec::with_capacity(pending.len());
        for p in pending {
            let token = match p.spec.new_token(&p.value) {
                Ok(token) => token,
                Err(crate::fields::TokenError::Random) => {
                    return Err(crypto::Error::Random(getrandom::Error::UNEXPECTED).into());
                }
                Err(e) => {
                    results[p.index] = Some(Err(ItemError::Unformattable(p.spec.name.clone(), e)));
                    continue;
                }
            };
            let (key_version, key) = match p.subject_hash.and_then(|h| subject_keys.get(&h)) {
                Some(key) => (SUBJECT_KEY, key),
                None => (vault_key_version, &*vault_key),
            };
            let aad = Record::aad(&token, key_version, p.subject_hash.as_ref());
            let sealed = key.seal(p.value.expose().as_bytes(), &aad)?;
            let record = Record {
                field_type: p.spec.name.clone(),
                key_version,
                nonce: sealed.nonce,
                created_ms,
                expires_ms: p.expires_ms,
                subject_hash: p.subject_hash,
                blind: p.blind.as_ref().map(|b| b.active),
                ciphertext: sealed.ciphertext,
            };
            let unit = batch.unit();
            if let Some(subject) = p.subject_hash {
                unit.put(
                    Table::SubjectIndex,
                    subject_index_key(&subject, token.storage_key()),
                    Vec::new(),
                );
            }
            // First guards: the blind index under every index key still in
            // use (deterministic); then the record key for formats whose
            // token space is small enough to collide.
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
                    expiry_key(expires_ms, token.storage_key()),
                    Vec::new(),
                );
            }
            unit.put(
                Table::Records,
                token.storage_key().to_vec(),
                record.encode(),
            );
            tokens.push(token);
            in_batch.push(p);
        }
        let audited = audit_payload.is_some();
        if let Some(payload) = audit_payload {
            batch.unit().append_audit(payload);
        }
        if in_batch.is_empty() && !audited {
            return Ok(Vec::new());
        }
        let outcomes = self.store.commit(batch).await.map_err(|e| {
            if audited {
                super::Error::AuditUnavailable(e)
            } else {
                super::Error::Storage(e)
            }
        })?;
        let mut retry = Vec::new();
        for ((p, token), outcome) in in_batch.into_iter().zip(tokens).zip(outcomes) {
            match outcome {
                Ok(()) => results[p.index] = Some(Ok(token)),
                // Another request stored this value first: its token wins.
                Err(conflict) if p.blind.as_ref().is_some_and(|b| conflict.guard < b.len()) => {
                    results[p.index] = Some(parse_stored_token(&conflict.existing));
                }
                // The random token is taken: draw another.
                Err(_) => retry.push(p),
            }
        }
        Ok(retry)
    }

    /// The existing token of each value, for deterministic field types.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn lookup(
        &self,
        items: Vec<Permit<LookupValue>>,
        audit: &AuditContext,
    ) -> Result<Vec<ItemResult>, super::Error> {
        let mut event = audit.event("OK");
        let mut results: Vec<ItemResult> = Vec::with_capacity(items.len());
        let mut wanted = Vec::new();
        for (index, permit) in items.into_iter().enumerate() {
            let item = permit.into_item();
            event.field_types.push(item.field_type.to_string());
            let blind = self.spec(&item.field_type).and_then(|spec| {
                if !spec.deterministic {
                    return Err(ItemError::NotDeterministic(spec.name.clone()));
                }
                let value = spec.normalize(&item.value)?;
                let subject = item.subject.as_ref().map(|s| self.subject_hash(s));
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
        event.failed_items +=
            u32::try_from(results.iter().filter(|r| r.is_err()).count()).unwrap_or(u32::MAX);
        event.tokens = results
            .iter()
            .flatten()
            .map(|t| self.audit_token(t))
            .collect();
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
