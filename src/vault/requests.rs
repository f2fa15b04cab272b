//! Retries that are safe: a caller's request id, remembered with the write
//! its call made, so that the call sent again gets the first answer.
//!
//! A call's answer can be lost after its write was made (on PostgreSQL, the
//! connection drops after COMMIT was sent; on any engine, the client's
//! deadline passes). Sent again, a Tokenize would mint a second token and
//! leave the first an orphan; an UpdateValue would overwrite a later
//! update; an EraseSubject would report nothing erased.
//!
//! A call that carries a request id writes, in the same unit as its effect,
//! a record under a key derived from the caller's identity, the method and
//! the id: a keyed hash of the request (the fingerprint), the vault's id of
//! the first call (which its audit event carries), when the record
//! expires, and the answer, encoded by the API. The unit guards the key, so
//! of two calls with one id, at most one takes effect. The same id with
//! another request is refused: the fingerprint differs. Records expire
//! after the configured window and are swept with the expired values.
//!
//! A record holds no value: the fingerprint is a keyed hash, and answers
//! hold tokens, item errors, field type names and erasure receipts. Each
//! record has an entry per subject its call named, by which an erasure
//! finds and deletes it.

use super::{Error, Vault};
use crate::{
    audit::{AuditContext, Outcome},
    layout::{self, SubjectHash},
    store::{Batch, Conflict, FailedGuard, Store, Table, Unit},
};

/// The longest request id, in bytes.
pub const MAX_REQUEST_ID_LEN: usize = 255;

/// How many records a sweep, or an erasure's forgetting, reads and deletes
/// per write (a handful in unit tests, so that they cross pages).
const SWEEP_PAGE: usize = if cfg!(test) { 4 } else { 1000 };

/// The current layout of a remembered request.
const RECORD_VERSION: u8 = 1;

/// A caller's request id, checked: 1 to [`MAX_REQUEST_ID_LEN`] printable
/// ASCII characters, no spaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(String);

/// Why a request id was refused. The message never repeats the id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestIdError {
    /// Longer than [`MAX_REQUEST_ID_LEN`].
    #[error("request_id is {0} bytes; the most is 255")]
    TooLong(usize),
    /// A character outside printable ASCII, or a space.
    #[error(
        "request_id may hold printable ASCII characters only, no spaces (a UUID is a good choice)"
    )]
    Characters,
}

impl RequestId {
    /// The id in `text`; `None` for an empty one (the call is not
    /// remembered).
    ///
    /// # Errors
    /// If it is too long or holds other characters.
    pub fn parse(text: &str) -> Result<Option<Self>, RequestIdError> {
        if text.is_empty() {
            return Ok(None);
        }
        if text.len() > MAX_REQUEST_ID_LEN {
            return Err(RequestIdError::TooLong(text.len()));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(RequestIdError::Characters);
        }
        Ok(Some(Self(text.to_owned())))
    }
}

/// A call with a request id, before the vault has looked it up.
#[derive(Debug)]
pub struct RequestKey {
    key: [u8; 32],
    fingerprint: [u8; 32],
}

/// What the vault holds for a request id.
#[derive(Debug)]
pub enum Prior {
    /// Nothing (or a record that has expired): the call is new, and is
    /// remembered with its write.
    New(NewRequest),
    /// The answer of the first call with this id and this request.
    Answered(FirstAnswer),
}

/// A call to remember with its write ([`Vault::remember`]).
#[derive(Debug)]
pub struct NewRequest {
    key: [u8; 32],
    fingerprint: [u8; 32],
    /// An expired record still under the key, replaced by the write.
    stale: Option<(Vec<u8>, u64)>,
}

/// The first answer to a request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstAnswer {
    /// The vault's id of the first call (its audit event's `request_id`).
    pub first_call: String,
    /// The answer, as the API encoded it.
    pub answer: Vec<u8>,
}

/// A call to remember with its write, and how its answer (a `T`) is
/// encoded for the record.
pub struct Remember<'a, T: ?Sized> {
    /// The call, as [`Vault::prior`] found it new.
    pub request: &'a NewRequest,
    /// Encodes the answer the call gives if its write applies.
    pub answer: &'a (dyn Fn(&T) -> Vec<u8> + Send + Sync),
}

impl<T: ?Sized> std::fmt::Debug for Remember<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remember")
            .field("request", &self.request)
            .finish_non_exhaustive()
    }
}

/// The keys a remembered call adds to its unit: the record, its expiry
/// entry, and an expired record's entry.
pub(super) const REMEMBER_KEYS: usize = 3;

/// Where a remembered call's guard sits in its unit, to tell its conflict
/// from the others'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RememberedAt(FailedGuard);

impl RememberedAt {
    /// Whether `conflict` is another call with the same request id, written
    /// first.
    pub fn lost_to(self, conflict: &Conflict) -> bool {
        conflict.guard == self.0
    }
}

/// The message of a call that lost to another call with its request id.
pub const REQUEST_ID_IN_FLIGHT: &str = "another call with this request_id was written first; send the request again to get that call's answer";

/// A remembered request, as stored.
struct Stored {
    expires_ms: u64,
    fingerprint: [u8; 32],
    /// The subjects the call named (their hashes), each with an entry that
    /// an erasure finds the record by.
    subjects: Vec<SubjectHash>,
    first_call: String,
    answer: Vec<u8>,
}

impl Stored {
    fn encode(&self) -> Vec<u8> {
        let id = self.first_call.as_bytes();
        let id_len = u8::try_from(id.len()).unwrap_or(u8::MAX);
        let id = &id[..usize::from(id_len)];
        // A request names at most `limits.max_items_per_request` subjects,
        // far below the bound of the count.
        let count = u16::try_from(self.subjects.len()).unwrap_or(u16::MAX);
        let subjects = &self.subjects[..usize::from(count)];
        let mut out = Vec::with_capacity(
            1 + 8 + 32 + 2 + 32 * subjects.len() + 1 + id.len() + self.answer.len(),
        );
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.expires_ms.to_be_bytes());
        out.extend_from_slice(&self.fingerprint);
        out.extend_from_slice(&count.to_be_bytes());
        for subject in subjects {
            out.extend_from_slice(subject);
        }
        out.push(id_len);
        out.extend_from_slice(id);
        out.extend_from_slice(&self.answer);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let (&version, rest) = bytes.split_first()?;
        if version != RECORD_VERSION {
            return None;
        }
        let (expires, rest) = rest.split_first_chunk::<8>()?;
        let (fingerprint, rest) = rest.split_first_chunk::<32>()?;
        let (count, mut rest) = rest.split_first_chunk::<2>()?;
        let mut subjects = Vec::with_capacity(usize::from(u16::from_be_bytes(*count)));
        for _ in 0..u16::from_be_bytes(*count) {
            let (subject, after) = rest.split_first_chunk::<32>()?;
            subjects.push(*subject);
            rest = after;
        }
        let (&id_len, rest) = rest.split_first()?;
        let (id, answer) = rest.split_at_checked(usize::from(id_len))?;
        Some(Self {
            expires_ms: u64::from_be_bytes(*expires),
            fingerprint: *fingerprint,
            subjects,
            first_call: String::from_utf8(id.to_vec()).ok()?,
            answer: answer.to_vec(),
        })
    }
}

impl<S: Store> Vault<S> {
    /// The key of `id` sent by `identity` to `method`, for a request whose
    /// parts (every field that decides what the call does, in order) are
    /// `parts`: the vault's keyed hash of them, never the parts themselves.
    pub fn request_key<'a>(
        &self,
        id: &RequestId,
        identity: &str,
        method: &str,
        parts: impl IntoIterator<Item = &'a [u8]>,
    ) -> RequestKey {
        let key_hash = self.keyring.subject_key();
        let mut key = key_hash.hasher(b"request/key");
        key.part(identity.as_bytes())
            .part(method.as_bytes())
            .part(id.0.as_bytes());
        let mut fingerprint = key_hash.hasher(b"request/fingerprint");
        fingerprint.part(method.as_bytes());
        for part in parts {
            fingerprint.part(part);
        }
        RequestKey {
            key: key.finish(),
            fingerprint: fingerprint.finish(),
        }
    }

    /// What the vault holds for `request`.
    ///
    /// # Errors
    /// [`Error::RequestIdReused`] if the id was used with another request
    /// within the window; storage failures.
    pub async fn prior(&self, request: RequestKey) -> Result<Prior, Error> {
        let Some(bytes) = self.stored_request(&request.key).await? else {
            return Ok(Prior::New(NewRequest {
                key: request.key,
                fingerprint: request.fingerprint,
                stale: None,
            }));
        };
        // A record that does not decode (only damage makes one) is treated
        // as expired: replaced, never answered from.
        let decoded = Stored::decode(&bytes);
        match decoded {
            Some(stored) if stored.expires_ms > self.now() => {
                if stored.fingerprint != request.fingerprint {
                    return Err(Error::RequestIdReused);
                }
                Ok(Prior::Answered(FirstAnswer {
                    first_call: stored.first_call,
                    answer: stored.answer,
                }))
            }
            stored => Ok(Prior::New(NewRequest {
                key: request.key,
                fingerprint: request.fingerprint,
                stale: Some((bytes, stored.map_or(0, |s| s.expires_ms))),
            })),
        }
    }

    /// Adds to `unit` the record of `request`, answered by `answer`, made by
    /// the call `audit` describes, which named `subjects`; guarded, so that
    /// the unit applies only if no other call with the id was written
    /// meanwhile. Returns where the guard sits: a conflict on it means the
    /// id was taken.
    pub(super) fn remember(
        &self,
        unit: &mut Unit,
        request: &NewRequest,
        audit: &AuditContext,
        answer: Vec<u8>,
        subjects: &[SubjectHash],
    ) -> RememberedAt {
        let expires_ms = self.now().saturating_add(self.request_window_ms);
        let key = layout::request_key(&request.key);
        let at = match &request.stale {
            Some((bytes, stale_expiry)) => {
                let at = RememberedAt(FailedGuard::Unchanged(unit.unchanged().len()));
                unit.guard_unchanged(Table::Meta, key.clone(), bytes.clone());
                unit.delete(
                    Table::Meta,
                    layout::request_expiry_key(*stale_expiry, &request.key),
                );
                forget_subjects(unit, bytes, &request.key);
                at
            }
            None => {
                let at = RememberedAt(FailedGuard::Absent(unit.guards().len()));
                unit.guard_absent(Table::Meta, key.clone());
                at
            }
        };
        let mut subjects = subjects.to_vec();
        subjects.sort_unstable();
        subjects.dedup();
        for subject in &subjects {
            unit.put(
                Table::Meta,
                layout::request_subject_key(subject, &request.key),
                Vec::new(),
            );
        }
        let stored = Stored {
            expires_ms,
            fingerprint: request.fingerprint,
            subjects,
            first_call: audit.request_id.clone(),
            answer,
        };
        unit.put(Table::Meta, key, stored.encode());
        unit.put(
            Table::Meta,
            layout::request_expiry_key(expires_ms, &request.key),
            Vec::new(),
        );
        at
    }

    /// Whether `request` is still new: no other call with its id was
    /// written since [`Vault::prior`] found it. Asked when a write that
    /// carried it failed on another guard, to tell the caller the truth.
    ///
    /// # Errors
    /// Storage failures.
    pub(super) async fn still_new(&self, request: &NewRequest) -> Result<bool, Error> {
        let stored = self.stored_request(&request.key).await?;
        Ok(stored.as_ref() == request.stale.as_ref().map(|(bytes, _)| bytes))
    }

    /// The record stored under a request key, if any.
    async fn stored_request(&self, key: &[u8; 32]) -> Result<Option<Vec<u8>>, Error> {
        Ok(self
            .store
            .get_many(Table::Meta, vec![layout::request_key(key)])
            .await?
            .pop()
            .flatten())
    }

    /// Records that the call `audit` describes was answered with the first
    /// answer of the call `first`: nothing was changed, and the trail says
    /// which call's answer was given.
    ///
    /// # Errors
    /// If the audit event cannot be written (the answer is then withheld).
    pub async fn record_replay(
        &self,
        audit: &AuditContext,
        first: &FirstAnswer,
    ) -> Result<(), Error> {
        let mut event = audit.event(Outcome::Ok);
        event.replay_of = Some(first.first_call.clone());
        self.record(&event).await
    }

    /// Deletes the remembered requests whose window has passed. Returns
    /// how many.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn sweep_requests(&self) -> Result<u64, Error> {
        let now = self.now();
        let mut swept = 0;
        loop {
            let page = self
                .store
                .scan_from(
                    Table::Meta,
                    layout::REQUEST_EXPIRY_PREFIX.to_vec(),
                    SWEEP_PAGE,
                )
                .await?;
            let due: Vec<_> = page
                .iter()
                .map(|(key, _)| key)
                .take_while(|key| key.starts_with(layout::REQUEST_EXPIRY_PREFIX))
                .map(|key| (key, layout::split_request_expiry_key(key)))
                .take_while(|(_, parsed)| parsed.is_none_or(|(time, _)| time <= now))
                .collect();
            if due.is_empty() {
                return Ok(swept);
            }
            let records = self
                .store
                .get_many(
                    Table::Meta,
                    due.iter()
                        .map(|(_, parsed)| {
                            parsed.map_or_else(Vec::new, |(_, hash)| layout::request_key(&hash))
                        })
                        .collect(),
                )
                .await?;
            let mut batch = Batch::new();
            let mut record_units = Vec::new();
            for ((entry, parsed), record) in due.iter().zip(records) {
                batch.unit().delete(Table::Meta, (*entry).clone());
                let Some((time, hash)) = parsed else { continue };
                // The record goes only if it is the one this entry is for
                // (not one written again since), and stays as read: a
                // record replaced meanwhile stays, for its own entry.
                if let Some(bytes) = record
                    && Stored::decode(&bytes).is_none_or(|s| s.expires_ms == *time)
                {
                    let key = layout::request_key(hash);
                    record_units.push(batch.units().len());
                    let unit = batch.unit();
                    forget_subjects(unit, &bytes, hash);
                    unit.guard_unchanged(Table::Meta, key.clone(), bytes)
                        .delete(Table::Meta, key);
                }
            }
            let outcomes = self.store.commit(batch).await?;
            swept += record_units
                .iter()
                .filter(|&&unit| outcomes.get(unit).is_some_and(Result::is_ok))
                .count() as u64;
            if due.len() < SWEEP_PAGE {
                return Ok(swept);
            }
        }
    }
}

/// Adds to `unit` the deletion of the subject entries of the record
/// `bytes` under `key`.
fn forget_subjects(unit: &mut Unit, bytes: &[u8], key: &[u8; 32]) {
    for subject in Stored::decode(bytes)
        .map(|s| s.subjects)
        .unwrap_or_default()
    {
        unit.delete(Table::Meta, layout::request_subject_key(&subject, key));
    }
}

impl<S: Store> Vault<S> {
    /// Deletes every remembered request whose call named the subject
    /// `hash` (but the call `except`, the erasure's own), with their
    /// entries; returns the keys to purge from the files. An erasure does
    /// this once its own write is made, a page at a time, each record in a
    /// unit of its own guarded as read: how many calls named a subject
    /// never makes the erasure's write large. A record that changed
    /// meanwhile stays (its window ends it).
    ///
    /// # Errors
    /// Storage failures.
    pub(super) async fn forget_requests_of(
        &self,
        hash: &SubjectHash,
        except: Option<&NewRequest>,
    ) -> Result<Vec<(Table, Vec<u8>)>, Error> {
        let prefix = layout::request_subject_prefix(hash);
        let (mut from, mut purge) = (prefix.clone(), Vec::new());
        loop {
            let page: Vec<_> = self
                .store
                .scan_from(Table::Meta, from.clone(), SWEEP_PAGE)
                .await?
                .into_iter()
                .take_while(|(entry, _)| entry.starts_with(&prefix))
                .collect();
            let Some((last, _)) = page.last() else {
                return Ok(purge);
            };
            from = [last.as_slice(), &[0]].concat();
            let keys: Vec<[u8; 32]> = page
                .iter()
                .filter_map(|(entry, _)| layout::request_of_subject_key(entry))
                .filter(|key| except.is_none_or(|own| own.key != *key))
                .collect();
            let records = self
                .store
                .get_many(Table::Meta, keys.iter().map(layout::request_key).collect())
                .await?;
            let mut batch = Batch::new();
            let mut planned = Vec::new();
            for (key, record) in keys.iter().zip(records) {
                let unit = batch.unit();
                let record_key = layout::request_key(key);
                let mut keys = vec![(Table::Meta, layout::request_subject_key(hash, key))];
                unit.delete(Table::Meta, layout::request_subject_key(hash, key));
                if let Some(bytes) = record {
                    forget_subjects(unit, &bytes, key);
                    if let Some(stored) = Stored::decode(&bytes) {
                        unit.delete(
                            Table::Meta,
                            layout::request_expiry_key(stored.expires_ms, key),
                        );
                    }
                    unit.guard_unchanged(Table::Meta, record_key.clone(), bytes)
                        .delete(Table::Meta, record_key.clone());
                    keys.push((Table::Meta, record_key));
                }
                planned.push(keys);
            }
            let outcomes = self.store.commit(batch).await?;
            for (outcome, keys) in outcomes.iter().zip(planned) {
                if outcome.is_ok() {
                    purge.extend(keys);
                }
            }
            if page.len() < SWEEP_PAGE {
                return Ok(purge);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_checked_and_never_repeated_in_the_error() {
        assert_eq!(RequestId::parse("").unwrap(), None);
        assert!(
            RequestId::parse("0b6f1a5e-8c1f-4c1e-9d8e-0f1b2c3d4e5f")
                .unwrap()
                .is_some()
        );
        let long = "x".repeat(256);
        assert_eq!(
            RequestId::parse(&long).unwrap_err(),
            RequestIdError::TooLong(256)
        );
        assert!(RequestId::parse(&"x".repeat(255)).unwrap().is_some());
        for bad in ["a b", "a\nb", "né", "a\u{0}b"] {
            let err = RequestId::parse(bad).unwrap_err();
            assert_eq!(err, RequestIdError::Characters);
            assert!(!err.to_string().contains(bad));
        }
    }

    #[test]
    fn a_stored_request_decodes_as_written() {
        let stored = Stored {
            expires_ms: 42,
            fingerprint: [7; 32],
            subjects: vec![[1; 32], [2; 32]],
            first_call: "00ff00ff00ff00ff".into(),
            answer: b"answer".to_vec(),
        };
        let decoded = Stored::decode(&stored.encode()).unwrap();
        assert_eq!(decoded.expires_ms, 42);
        assert_eq!(decoded.fingerprint, [7; 32]);
        assert_eq!(decoded.subjects, [[1; 32], [2; 32]]);
        assert_eq!(decoded.first_call, "00ff00ff00ff00ff");
        assert_eq!(decoded.answer, b"answer");
        assert!(Stored::decode(&[2]).is_none());
        assert!(Stored::decode(&stored.encode()[..20]).is_none());
    }
}
