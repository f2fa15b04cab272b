//! The audit trail: what an event records, the signed checkpoints over the
//! chain, and offline verification and export.
//!
//! Events are appended to a hash chain in the store (see
//! [`crate::store::chain`]) by the committer, in the same write as the data
//! change they describe (tokenize) or before any plaintext leaves the server
//! (detokenize). Tokens and subject ids appear only as HMACs under the audit
//! key, so the log can be searched for a token by someone who holds it,
//! without the log revealing it. Values and keys never appear.

mod verify;

use serde::{Deserialize, Serialize};

pub use verify::{
    Checkpoint, PruneMarker, StreamVerifier, StreamedEvent, VerifyFailure, VerifyReport, export,
    verify,
};

/// One audited RPC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// When the vault decided, RFC 3339 UTC.
    pub time: String,
    /// The request id, also in the request's log line.
    pub request_id: String,
    /// The caller's identity (`-` if it had none).
    pub identity: String,
    /// The RPC method, e.g. `Detokenize`.
    pub method: String,
    /// How the call ended: a gRPC status code name, e.g. `OK`,
    /// `PERMISSION_DENIED`.
    pub outcome: Outcome,
    /// The purpose the caller stated, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// The field types involved, sorted and distinct.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub field_types: Vec<String>,
    /// HMAC-SHA256 (audit key) of each token read, hex.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<String>,
    /// HMAC-SHA256 (audit key) of each data subject involved, hex: the
    /// subjects a call names, and those whose stored values it read or
    /// changed. The vault indexes events by them (a subject's access
    /// history).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subjects: Vec<String>,
    /// The forms values were revealed in (`plain`, `masked`), sorted and
    /// distinct; empty when none was revealed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forms: Vec<String>,
    /// Items in the request.
    pub items: u32,
    /// Items that failed.
    pub failed_items: u32,
    /// The consent decision, where one was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent: Option<ConsentNote>,
    /// For refused calls, which are audited in aggregate: how many calls of
    /// this identity, method, outcome and purpose were refused, and when the
    /// first and last were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusals: Option<RefusalTally>,
    /// For [`POLICY_LOAD_METHOD`] events: SHA-256 (hex) of the policy put
    /// in force (`authz::Policy::hash`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_hash: Option<String>,
    /// For [`CHAIN_ROLLBACK_METHOD`] events: the newest head that had been
    /// signed, which the chain no longer holds, as `<seq>:<hash hex>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_signed_head: Option<String>,
    /// Each subject's own part of the call, in the order of `subjects`,
    /// when the call was not one subject's alone (several subjects'
    /// values, or values of no subject beside one's): a subject's access
    /// history shows its part, not the whole call. Empty otherwise, and in
    /// events of earlier releases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<SubjectPart>,
    /// For a call answered from a first call with the same caller request
    /// id (nothing was done again): the first call's `request_id`, whose
    /// event says what was done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<String>,
}

/// What an audit event says of consent ([`AuditEvent::consent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsentNote {
    /// A reveal for a purpose that needs consent found none (or a
    /// withdrawal) for some subject: those values were refused.
    Missing,
    /// Consent was found for every subject (a reveal), or given (SetConsent).
    Granted,
    /// Consent was withdrawn (SetConsent).
    Withdrawn,
    /// A note this release does not know (written by a later one): read,
    /// never written.
    #[serde(other)]
    Unknown,
}

impl ConsentNote {
    /// As the event's JSON spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ConsentNote::Missing => "missing",
            ConsentNote::Granted => "granted",
            ConsentNote::Withdrawn => "withdrawn",
            ConsentNote::Unknown => "unknown",
        }
    }
}

/// One subject's part of a call ([`AuditEvent::parts`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectPart {
    /// The field types of the subject's items, sorted and distinct.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub field_types: Vec<String>,
    /// The forms the subject's values were revealed in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forms: Vec<String>,
    /// The subject's items.
    pub items: u32,
    /// Those that failed.
    #[serde(default)]
    pub failed_items: u32,
}

impl AuditEvent {
    /// What the event says of the subject whose audit form is `subject`:
    /// its own part if the event has parts, else the whole call.
    pub fn part_of(&self, subject: &str) -> SubjectPart {
        let own = self
            .subjects
            .iter()
            .position(|s| s == subject)
            .and_then(|at| self.parts.get(at));
        match own {
            Some(part) => part.clone(),
            None => SubjectPart {
                field_types: self.field_types.clone(),
                forms: self.forms.clone(),
                items: self.items,
                failed_items: self.failed_items,
            },
        }
    }
}

/// The method of the event a vault records when it puts a policy in force
/// (at start and at each reload that changes it).
pub const POLICY_LOAD_METHOD: &str = "LoadPolicy";

/// The method of the event a vault records when it opens a chain that no
/// longer holds the newest head it signed: the database was restored, or
/// failed over to a standby that lacked the last commits. The events after
/// the chain's head up to that signed head are lost; no head is signed
/// again for their numbers.
pub const CHAIN_ROLLBACK_METHOD: &str = "ChainRolledBack";

/// How a call ended, as the audit trail records it. Stored as the gRPC
/// status code name; never rename a released value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum Outcome {
    /// Allowed and done (items may still have failed one by one).
    Ok,
    /// No usable client identity.
    Unauthenticated,
    /// The policy refused the call.
    PermissionDenied,
    /// The request was malformed.
    InvalidArgument,
    /// A limit refused the call.
    ResourceExhausted,
    /// Storage or the audit failed; nothing was revealed or changed.
    Unavailable,
    /// A single-item call whose item failed (e.g. `UpdateValue` of an
    /// unknown token).
    ItemError,
    /// A concurrent change won; nothing was changed.
    Aborted,
}

impl Outcome {
    /// The name stored in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "OK",
            Outcome::Unauthenticated => "UNAUTHENTICATED",
            Outcome::PermissionDenied => "PERMISSION_DENIED",
            Outcome::InvalidArgument => "INVALID_ARGUMENT",
            Outcome::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Outcome::Unavailable => "UNAVAILABLE",
            Outcome::ItemError => "ITEM_ERROR",
            Outcome::Aborted => "ABORTED",
        }
    }
}

/// How many calls an aggregated refusal event stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalTally {
    /// Calls refused.
    pub count: u64,
    /// When the first was refused, RFC 3339 UTC.
    pub first: String,
    /// When the last was refused, RFC 3339 UTC.
    pub last: String,
}

impl AuditEvent {
    /// The stored form: JSON with the fields in declaration order.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing a struct of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The event a stored payload holds, if it is one ([`AuditEvent::encode`]'s
    /// inverse; events of older releases lack later fields, which default).
    pub fn decode(payload: &[u8]) -> Option<Self> {
        serde_json::from_slice(payload).ok()
    }
}

/// What the API layer knows of a call when the vault records it.
#[derive(Debug, Clone)]
pub struct AuditContext {
    /// The request id.
    pub request_id: String,
    /// The caller's identity.
    pub identity: String,
    /// The RPC method.
    pub method: &'static str,
    /// The purpose stated, if any.
    pub purpose: Option<String>,
    /// Items in the request.
    pub items: u32,
    /// Items the API layer already refused (malformed, not permitted).
    pub failed_items: u32,
}

impl AuditContext {
    /// An event for this call with `outcome`; the vault adds what it knows.
    pub fn event(&self, outcome: Outcome) -> AuditEvent {
        AuditEvent {
            time: now_rfc3339(),
            request_id: self.request_id.clone(),
            identity: self.identity.clone(),
            method: self.method.to_owned(),
            outcome,
            purpose: self.purpose.clone(),
            field_types: Vec::new(),
            tokens: Vec::new(),
            subjects: Vec::new(),
            forms: Vec::new(),
            items: self.items,
            failed_items: self.failed_items,
            consent: None,
            refusals: None,
            policy_hash: None,
            lost_signed_head: None,
            parts: Vec::new(),
            replay_of: None,
        }
    }
}

/// An RFC 3339 time (as events record it) in ms since the epoch; 0 if it
/// does not parse.
pub fn time_ms(text: &str) -> u64 {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|t| u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0))
        .unwrap_or(0)
}

/// ms since the epoch as RFC 3339 UTC.
pub fn rfc3339(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Now, RFC 3339 UTC, as events record time.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The message a prune marker's signature covers: events up to `seq` were
/// pruned on purpose, and the checkpoint at `seq` (hashing to `head`)
/// anchors what is left.
pub fn prune_message(seq: u64, head: &[u8; 32], time_ms: u64) -> Vec<u8> {
    let mut message = Vec::with_capacity(64);
    message.extend_from_slice(b"tokenvault-audit-pruned/v1\0");
    message.extend_from_slice(&seq.to_be_bytes());
    message.extend_from_slice(head);
    message.extend_from_slice(&time_ms.to_be_bytes());
    message
}

/// The message a checkpoint's signature covers.
pub fn checkpoint_message(seq: u64, head: &[u8; 32], time_ms: u64) -> Vec<u8> {
    let mut message = Vec::with_capacity(64);
    message.extend_from_slice(b"tokenvault-audit-checkpoint/v1\0");
    message.extend_from_slice(&seq.to_be_bytes());
    message.extend_from_slice(head);
    message.extend_from_slice(&time_ms.to_be_bytes());
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events written before the consent note was a type spelled it as
    /// these strings; they still read, and new events spell it the same.
    #[test]
    fn consent_notes_keep_their_spelling() {
        for (note, text) in [
            (ConsentNote::Missing, "missing"),
            (ConsentNote::Granted, "granted"),
            (ConsentNote::Withdrawn, "withdrawn"),
        ] {
            let json = format!(r#""{text}""#);
            assert_eq!(serde_json::from_str::<ConsentNote>(&json).unwrap(), note);
            assert_eq!(serde_json::to_string(&note).unwrap(), json);
            assert_eq!(note.as_str(), text);
        }
        // A later release's note reads, so its events still verify and
        // report here.
        assert_eq!(
            serde_json::from_str::<ConsentNote>(r#""maybe""#).unwrap(),
            ConsentNote::Unknown
        );
    }
}
