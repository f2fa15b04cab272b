//! Consent: a data subject's decision per purpose, which detokenization
//! for a consent purpose of the value's field type checks.

use super::{Error, SubjectId, Vault, erasure::ERASED_MEANWHILE};
use crate::{
    audit::{AuditContext, ConsentNote, Outcome},
    authz::{Permit, Purpose, act},
    layout::{self, ConsentState},
    store::{Batch, Store, Table},
};

/// A subject's consent decision for a purpose, to record.
#[derive(Debug)]
pub struct ConsentDecision {
    /// The data subject.
    pub subject: SubjectId,
    /// The purpose consented to or withdrawn.
    pub purpose: Purpose,
    /// Granted (true) or withdrawn.
    pub granted: bool,
}

/// Which consent decision to read: a subject's, for a purpose.
#[derive(Debug)]
pub struct ConsentQuery {
    /// The data subject.
    pub subject: SubjectId,
    /// The purpose.
    pub purpose: Purpose,
}

impl<S: Store> Vault<S> {
    /// Records a subject's consent decision for a purpose.
    ///
    /// # Errors
    /// Storage or audit failures.
    pub async fn set_consent(
        &self,
        permit: Permit<act::ConsentWrite, ConsentDecision>,
        audit: &AuditContext,
    ) -> Result<ConsentState, Error> {
        let ConsentDecision {
            subject,
            purpose,
            granted,
        } = permit.into_item();
        let hash = self.subject_hash(&subject);
        // Recorded with the subject's erasure number, so that an erasure
        // applied again after a restore keeps it by number (it came after).
        let mark = self.erasure_marks(&[hash]).await?.remove(0);
        let state = ConsentState {
            granted,
            updated_ms: self.now(),
            erased_through: Some(mark.number()),
        };
        let mut event = audit.event(Outcome::Ok);
        event.subjects.push(self.audit_subject(&subject));
        event.consent = Some(if granted {
            ConsentNote::Granted
        } else {
            ConsentNote::Withdrawn
        });
        let mut batch = Batch::new();
        let unit = batch.unit();
        unit.put(
            Table::Consent,
            layout::consent_key(&hash, purpose.as_str()),
            state.encode(),
        );
        mark.guard(unit);
        self.append_event(unit, &event);
        let outcome = self
            .store
            .commit(batch)
            .await
            .map_err(Error::AuditUnavailable)?;
        if outcome.first().is_some_and(Result::is_err) {
            return Err(Error::Conflict(ERASED_MEANWHILE));
        }
        Ok(state)
    }

    /// Reads a subject's consent decision for a purpose.
    ///
    /// # Errors
    /// Storage or audit failures.
    pub async fn get_consent(
        &self,
        permit: Permit<act::ConsentRead, ConsentQuery>,
        audit: &AuditContext,
    ) -> Result<ConsentState, Error> {
        let ConsentQuery { subject, purpose } = permit.into_item();
        let hash = self.subject_hash(&subject);
        let state = self
            .consents(&[(hash, purpose.as_str().to_owned())])
            .await?
            .pop()
            .unwrap_or(ConsentState::NEVER);
        let mut event = audit.event(Outcome::Ok);
        event.subjects.push(self.audit_subject(&subject));
        self.record(&event).await?;
        Ok(state)
    }

    pub(super) async fn consents(
        &self,
        wanted: &[([u8; 32], String)],
    ) -> Result<Vec<ConsentState>, Error> {
        // Most detokenizes need no consent: skip the read (and its possible
        // hop to a reader thread) entirely.
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let keys = wanted
            .iter()
            .map(|(h, p)| layout::consent_key(h, p))
            .collect();
        Ok(self
            .store
            .get_many(Table::Consent, keys)
            .await?
            .into_iter()
            .map(|v| ConsentState::decode(v.as_deref()))
            .collect())
    }
}
