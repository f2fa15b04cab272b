//! The records of processing activities (GDPR Art. 30), from the system
//! that enforces them: what the vault holds per field type, who may do what
//! and why (the policy and its purposes), and, from the audit trail over a
//! period, what was actually done: reveals per identity, field type and
//! purpose, refusals, exports, erasures, consent changes, key rotations and
//! policy loads. `tokenvault report processing` renders it as JSON,
//! Markdown or HTML (`render`).
//!
//! The aggregation ([`Tally`]) reads events one at a time and never sees a
//! value: events hold none.

mod render;
mod stored;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    audit::{AuditEvent, ConsentNote, Outcome},
    authz::Policy,
    fields::FieldRegistry,
};

pub use render::{html, markdown};
pub use stored::{DataKeyUsage, data_key_usage, records_decode};

/// The whole report. Its JSON form is the reference the other forms are
/// made from.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessingReport {
    /// When the report was made, RFC 3339 UTC.
    pub generated: String,
    /// The period the audit part covers.
    pub period: Period,
    /// The audit events read for it.
    pub audit: AuditSpan,
    /// Each configured field type.
    pub field_types: Vec<FieldTypeEntry>,
    /// Each declared purpose.
    pub purposes: Vec<PurposeEntry>,
    /// Each policy rule: an identity pattern with its scopes and purposes.
    pub identities: Vec<IdentityEntry>,
    /// Calls that revealed values, per identity, field type and purpose.
    pub reveals: Vec<RevealRow>,
    /// Values revealed per day and purpose (what the HTML chart shows).
    pub reveals_per_day: Vec<DayRow>,
    /// Refused calls per identity, method, outcome and purpose.
    pub refusals: Vec<RefusalRow>,
    /// Data subjects' rights served.
    pub rights: Rights,
    /// Consent decisions recorded, per purpose.
    pub consent_changes: Vec<ConsentRow>,
    /// Key rotations, in order.
    pub key_rotations: Vec<EventRef>,
    /// The keys the vault holds and how old they are.
    pub keys: Vec<KeyEntry>,
    /// Each time a policy was put in force, with its hash, in order.
    pub policy_loads: Vec<PolicyLoad>,
}

/// The period of the audit part.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Period {
    /// From (RFC 3339), if bounded.
    pub since: Option<String>,
    /// Until (RFC 3339), if bounded.
    pub until: Option<String>,
}

/// The audit events the report read.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct AuditSpan {
    /// The first sequence number read (0 if none).
    pub first_seq: u64,
    /// The last sequence number read (0 if none).
    pub last_seq: u64,
    /// Events in the period.
    pub events: u64,
}

/// One field type.
#[derive(Debug, Clone, Serialize)]
pub struct FieldTypeEntry {
    /// Its name.
    pub name: String,
    /// Its kind (`email`, `card_number`...).
    pub kind: String,
    /// How long values are kept, in days; `None` for as long as needed.
    pub retention_days: Option<u64>,
    /// Purposes that need the subject's consent.
    pub consent_purposes: Vec<String>,
    /// Values stored (records not yet removed, expired ones included until
    /// the retention sweep removes them).
    pub values_held: u64,
}

/// One declared purpose.
#[derive(Debug, Clone, Serialize)]
pub struct PurposeEntry {
    /// Its name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Its legal basis (GDPR Art. 6(1)).
    pub legal_basis: String,
}

/// One policy rule.
#[derive(Debug, Clone, Serialize)]
pub struct IdentityEntry {
    /// The identity pattern.
    pub identity: String,
    /// Its scopes.
    pub scopes: Vec<String>,
    /// The purposes it may state.
    pub purposes: Vec<String>,
}

/// Reveals of one identity, field type and purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RevealRow {
    /// The caller.
    pub identity: String,
    /// The field type.
    pub field_type: String,
    /// The purpose stated (`-` if none).
    pub purpose: String,
    /// Calls that revealed values of this field type (plain or masked).
    pub calls: u64,
}

/// Values revealed on one day for one purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DayRow {
    /// The day, `YYYY-MM-DD` (UTC).
    pub day: String,
    /// The purpose (`-` if none).
    pub purpose: String,
    /// Values revealed (items of allowed calls, less those that failed).
    pub values: u64,
}

/// Refusals of one identity, method, outcome and purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefusalRow {
    /// The caller (`-` if it had no usable identity).
    pub identity: String,
    /// The RPC.
    pub method: String,
    /// How it ended.
    pub outcome: String,
    /// The purpose stated (`-` if none).
    pub purpose: String,
    /// Calls refused.
    pub calls: u64,
}

/// Data subjects' rights served in the period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Rights {
    /// Exports (right of access and portability).
    pub exports: u64,
    /// Erasures.
    pub erasures: u64,
    /// Rectifications (value updates).
    pub rectifications: u64,
    /// Access histories answered.
    pub access_histories: u64,
}

/// Consent decisions for one purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsentRow {
    /// The purpose.
    pub purpose: String,
    /// Consents given.
    pub granted: u64,
    /// Consents withdrawn.
    pub withdrawn: u64,
}

/// An event the report lists one by one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventRef {
    /// Its sequence number.
    pub seq: u64,
    /// When.
    pub time: String,
    /// The RPC.
    pub method: String,
    /// Who.
    pub identity: String,
}

/// A policy put in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyLoad {
    /// The event's sequence number.
    pub seq: u64,
    /// When.
    pub time: String,
    /// SHA-256 of the policy and purpose declarations, hex.
    pub policy_hash: String,
}

/// A key the vault holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyEntry {
    /// Its label (`dek/0000000002`...).
    pub label: String,
    /// When it was made, RFC 3339.
    pub created: String,
    /// Its age at the report's time, in days.
    pub age_days: u64,
}

/// The audit part of the report, built one event at a time.
#[derive(Debug, Default)]
pub struct Tally {
    since_ms: Option<u64>,
    until_ms: Option<u64>,
    span: AuditSpan,
    reveals: BTreeMap<(String, String, String), u64>,
    per_day: BTreeMap<(String, String), u64>,
    refusals: BTreeMap<(String, String, String, String), u64>,
    rights: Rights,
    consent: BTreeMap<String, (u64, u64)>,
    rotations: Vec<EventRef>,
    policy_loads: Vec<PolicyLoad>,
}

/// The methods that reveal stored values.
const REVEALING: [&str; 1] = ["Detokenize"];

/// The methods that rotate keys.
const ROTATIONS: [&str; 3] = ["RotateKeys", "RotateIndexKey", "RotateMasterKey"];

impl Tally {
    /// A tally of the events between `since_ms` and `until_ms` (ms since
    /// the epoch, inclusive; `None`: unbounded).
    pub fn new(since_ms: Option<u64>, until_ms: Option<u64>) -> Self {
        Self {
            since_ms,
            until_ms,
            ..Self::default()
        }
    }

    /// Counts one event (outside the period: ignored).
    pub fn add(&mut self, seq: u64, event: &AuditEvent) {
        let time_ms = time_ms(&event.time);
        if self.since_ms.is_some_and(|s| time_ms < s) || self.until_ms.is_some_and(|u| time_ms > u)
        {
            return;
        }
        if self.span.events == 0 {
            self.span.first_seq = seq;
        }
        self.span.last_seq = seq;
        self.span.events += 1;
        let purpose = event.purpose.clone().unwrap_or_else(|| "-".into());
        let method = event.method.as_str();
        if event.outcome != Outcome::Ok {
            let calls = event.refusals.as_ref().map_or(1, |tally| tally.count);
            *self
                .refusals
                .entry((
                    event.identity.clone(),
                    event.method.clone(),
                    event.outcome.as_str().to_owned(),
                    purpose,
                ))
                .or_default() += calls;
            return;
        }
        if REVEALING.contains(&method) {
            let revealed = u64::from(event.items.saturating_sub(event.failed_items));
            if revealed > 0 {
                for field_type in &event.field_types {
                    *self
                        .reveals
                        .entry((event.identity.clone(), field_type.clone(), purpose.clone()))
                        .or_default() += 1;
                }
                let day = event.time.get(..10).unwrap_or("").to_owned();
                *self.per_day.entry((day, purpose)).or_default() += revealed;
            }
            return;
        }
        match method {
            "ExportSubject" => self.rights.exports += 1,
            "EraseSubject" => self.rights.erasures += 1,
            "UpdateValue" => self.rights.rectifications += 1,
            "AccessHistory" => self.rights.access_histories += 1,
            "SetConsent" => {
                let entry = self.consent.entry(purpose).or_default();
                match event.consent {
                    Some(ConsentNote::Granted) => entry.0 += 1,
                    Some(ConsentNote::Withdrawn) => entry.1 += 1,
                    Some(ConsentNote::Missing | ConsentNote::Unknown) | None => {}
                }
            }
            _ if ROTATIONS.contains(&method) => self.rotations.push(EventRef {
                seq,
                time: event.time.clone(),
                method: event.method.clone(),
                identity: event.identity.clone(),
            }),
            crate::audit::POLICY_LOAD_METHOD => {
                if let Some(hash) = &event.policy_hash {
                    self.policy_loads.push(PolicyLoad {
                        seq,
                        time: event.time.clone(),
                        policy_hash: hash.clone(),
                    });
                }
            }
            _ => {}
        }
    }

    /// The report: this tally with what the configuration and the store
    /// say (`values_held` per field type, `keys` as (label, created ms)).
    pub fn finish(
        self,
        fields: &FieldRegistry,
        policy: &Policy,
        period: Period,
        values_held: &BTreeMap<String, u64>,
        keys: &[(String, u64)],
        now_ms: u64,
    ) -> ProcessingReport {
        let field_types = fields
            .iter()
            .map(|spec| FieldTypeEntry {
                name: spec.name.to_string(),
                kind: spec.kind.name().to_owned(),
                retention_days: spec.retention.map(|r| r.as_secs() / 86_400),
                consent_purposes: spec.consent_purposes.iter().cloned().collect(),
                values_held: values_held.get(spec.name.as_str()).copied().unwrap_or(0),
            })
            .collect();
        let purposes = policy
            .declarations()
            .iter()
            .map(|(name, declared)| PurposeEntry {
                name: name.to_string(),
                description: declared.description.clone(),
                legal_basis: declared.legal_basis.to_string(),
            })
            .collect();
        let identities = policy
            .describe()
            .into_iter()
            .map(|(identity, scopes, purposes)| IdentityEntry {
                identity,
                scopes,
                purposes,
            })
            .collect();
        ProcessingReport {
            generated: rfc3339(now_ms),
            period,
            audit: self.span,
            field_types,
            purposes,
            identities,
            reveals: self
                .reveals
                .into_iter()
                .map(|((identity, field_type, purpose), calls)| RevealRow {
                    identity,
                    field_type,
                    purpose,
                    calls,
                })
                .collect(),
            reveals_per_day: self
                .per_day
                .into_iter()
                .map(|((day, purpose), values)| DayRow {
                    day,
                    purpose,
                    values,
                })
                .collect(),
            refusals: self
                .refusals
                .into_iter()
                .map(|((identity, method, outcome, purpose), calls)| RefusalRow {
                    identity,
                    method,
                    outcome,
                    purpose,
                    calls,
                })
                .collect(),
            rights: self.rights,
            consent_changes: self
                .consent
                .into_iter()
                .map(|(purpose, (granted, withdrawn))| ConsentRow {
                    purpose,
                    granted,
                    withdrawn,
                })
                .collect(),
            key_rotations: self.rotations,
            keys: keys
                .iter()
                .map(|(label, created_ms)| KeyEntry {
                    label: label.clone(),
                    created: rfc3339(*created_ms),
                    age_days: now_ms.saturating_sub(*created_ms) / 86_400_000,
                })
                .collect(),
            policy_loads: self.policy_loads,
        }
    }
}

/// A report's form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Markdown tables.
    Markdown,
    /// The JSON the other forms are made from.
    Json,
    /// One HTML page with the per-day chart as inline SVG.
    Html,
}

impl Format {
    /// `md`, `json` or `html` (empty: JSON, the Admin RPC's default).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "md" | "markdown" => Some(Format::Markdown),
            "json" | "" => Some(Format::Json),
            "html" => Some(Format::Html),
            _ => None,
        }
    }

    /// The report in this form, and its media type.
    pub fn render(self, report: &ProcessingReport) -> (String, &'static str) {
        match self {
            Format::Markdown => (markdown(report), "text/markdown; charset=utf-8"),
            // Serializing strings and numbers cannot fail.
            Format::Json => (
                serde_json::to_string_pretty(report).unwrap_or_default(),
                "application/json",
            ),
            Format::Html => (html(report), "text/html; charset=utf-8"),
        }
    }
}

/// A bound of the period that is not an RFC 3339 time (named by the
/// option or field that gave it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} must be an RFC 3339 time such as 2026-12-01T00:00:00Z")]
pub struct BoundError(pub &'static str);

/// An optional RFC 3339 bound named `name`, checked.
///
/// # Errors
/// [`BoundError`] if it is given and is not an RFC 3339 time.
pub fn check_bound(name: &'static str, text: Option<String>) -> Result<Option<String>, BoundError> {
    match text {
        Some(t) if time_ms(&t) == 0 => Err(BoundError(name)),
        other => Ok(other),
    }
}

pub use crate::audit::{rfc3339, time_ms};

/// What the stored tables add to the tally: values held per field type and
/// the keys' ages, read one entry at a time by [`offline`] and [`online`].
#[derive(Default)]
struct Holdings {
    values_held: BTreeMap<String, u64>,
    keys: Vec<(String, u64)>,
}

impl Holdings {
    fn record(&mut self, value: &[u8]) {
        if let Ok(record) = crate::layout::Record::decode(value) {
            *self
                .values_held
                .entry(record.field_type.to_string())
                .or_default() += 1;
        }
    }

    /// Keys the master key wraps (a subject's own keys are not listed: one
    /// per subject, and their age is the subject's).
    fn key(&mut self, label: &[u8], value: &[u8]) {
        if crate::layout::MasterWrapped::ALL
            .iter()
            .any(|family| family.version_of(label).is_some())
        {
            self.keys.push((
                String::from_utf8_lossy(label).into_owned(),
                crate::layout::wrapped_created_ms(value),
            ));
        }
    }
}

/// A stored audit entry's sequence number and event.
fn stored_event(key: &[u8], value: &[u8]) -> Result<(u64, AuditEvent), String> {
    use crate::store::chain;
    chain::seq_of(key)
        .zip(chain::decode(value))
        .and_then(|(seq, link)| AuditEvent::decode(link.payload).map(|e| (seq, e)))
        .ok_or_else(|| {
            format!(
                "audit entry {:?} does not decode; run `tokenvault audit verify`",
                chain::seq_of(key)
            )
        })
}

fn tally_of(period: &Period) -> Tally {
    let bound = |text: &Option<String>| text.as_deref().map(time_ms);
    Tally::new(bound(&period.since), bound(&period.until))
}

/// The report of a stopped vault, a copy or a backup (RocksDB), read
/// offline: the configuration says what is allowed, the data directory what
/// was held and done.
///
/// # Errors
/// The store cannot be read, or an audit entry does not decode.
pub fn offline(
    fields: &FieldRegistry,
    policy: &Policy,
    store: &impl crate::store::Snapshot,
    period: Period,
    now_ms: u64,
) -> Result<ProcessingReport, String> {
    use crate::store::Table;
    let mut tally = tally_of(&period);
    let mut failed = None;
    store
        .scan(Table::Audit, &[], |key, value| {
            match stored_event(key, value) {
                Ok((seq, event)) => {
                    tally.add(seq, &event);
                    true
                }
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        })
        .map_err(|e| e.to_string())?;
    if let Some(failed) = failed {
        return Err(failed);
    }
    let mut held = Holdings::default();
    store
        .scan(Table::Records, &[], |_, value| {
            held.record(value);
            true
        })
        .map_err(|e| e.to_string())?;
    store
        .scan(Table::Keys, &[], |key, value| {
            held.key(key, value);
            true
        })
        .map_err(|e| e.to_string())?;
    Ok(tally.finish(
        fields,
        policy,
        period,
        &held.values_held,
        &held.keys,
        now_ms,
    ))
}

/// Entries read per page by [`online`].
const PAGE: usize = 10_000;

/// The report of a running vault, from its store (any engine), a page at a
/// time.
///
/// # Errors
/// The store cannot be read, or an audit entry does not decode.
pub async fn online<S: crate::store::Store>(
    fields: &FieldRegistry,
    policy: &Policy,
    store: &S,
    period: Period,
    now_ms: u64,
) -> Result<ProcessingReport, String> {
    use crate::store::Table;
    let mut tally = tally_of(&period);
    let mut held = Holdings::default();
    for table in [Table::Audit, Table::Records, Table::Keys] {
        let mut from = Vec::new();
        loop {
            let page = store
                .scan_from(table, from.clone(), PAGE)
                .await
                .map_err(|e| e.to_string())?;
            for (key, value) in &page {
                match table {
                    Table::Audit => {
                        let (seq, event) = stored_event(key, value)?;
                        tally.add(seq, &event);
                    }
                    Table::Records => held.record(value),
                    _ => held.key(key, value),
                }
            }
            match page.last() {
                Some((last, _)) if page.len() == PAGE => {
                    from = last.clone();
                    from.push(0);
                }
                _ => break,
            }
        }
    }
    Ok(tally.finish(
        fields,
        policy,
        period,
        &held.values_held,
        &held.keys,
        now_ms,
    ))
}

#[cfg(test)]
mod tests;
