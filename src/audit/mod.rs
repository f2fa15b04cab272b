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

pub use verify::{Checkpoint, VerifyFailure, VerifyReport, export, verify};

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
    /// The gRPC status code name of the call, e.g. `OK`, `PERMISSION_DENIED`.
    pub outcome: String,
    /// The purpose the caller stated, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// The field types involved, sorted and distinct.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub field_types: Vec<String>,
    /// HMAC-SHA256 (audit key) of each token read, hex.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<String>,
    /// HMAC-SHA256 (audit key) of each data subject involved, hex.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subjects: Vec<String>,
    /// Items in the request.
    pub items: u32,
    /// Items that failed.
    pub failed_items: u32,
    /// The consent decision, where one was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent: Option<String>,
}

impl AuditEvent {
    /// The stored form: JSON with the fields in declaration order.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing a struct of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
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
    pub fn event(&self, outcome: &str) -> AuditEvent {
        AuditEvent {
            time: now_rfc3339(),
            request_id: self.request_id.clone(),
            identity: self.identity.clone(),
            method: self.method.to_owned(),
            outcome: outcome.to_owned(),
            purpose: self.purpose.clone(),
            field_types: Vec::new(),
            tokens: Vec::new(),
            subjects: Vec::new(),
            items: self.items,
            failed_items: self.failed_items,
            consent: None,
        }
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
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
