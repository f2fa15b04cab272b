//! Detokenize: read, authorise by the record's field type, check consent,
//! decrypt, mask.

use std::collections::HashMap;

use super::{ItemError, Record, Vault, audit::Parts};
use crate::{
    audit::{AuditContext, ConsentNote, Outcome},
    authz::{Denial, Permit, Purpose, RevealForm, act},
    crypto::{DataKey, SecretValue},
    layout::{KeyVersion, SubjectHash},
    store::Store,
    token::{FieldType, Token},
};

/// A value read back from the vault.
#[derive(Debug)]
pub struct Revealed {
    /// Its field type.
    pub field_type: FieldType,
    /// The plaintext, or its masked form (see `form`).
    pub value: SecretValue,
    /// Which form `value` is in.
    pub form: RevealForm,
}

impl<S: Store> Vault<S> {
    /// Reads and reveals the value behind each token; one result per token,
    /// in order. `authorize` is asked, with the field type stored in each
    /// record, whether and in which form the caller may see it; nothing is
    /// decrypted without its permit. A subject's value of a field type whose
    /// `consent_purposes` include `purpose` is revealed only if the subject
    /// consented. A missing, expired, refused or corrupted record fails only
    /// its own item.
    ///
    /// The audit event (which tokens, which field types, how many failed,
    /// the consent decision) is written durably before this returns: if it
    /// cannot be, the call fails with [`super::Error::AuditUnavailable`] and
    /// every revealed value is dropped (and zeroized) unseen.
    ///
    /// # Errors
    /// Storage and audit failures fail the whole call.
    pub async fn detokenize(
        &self,
        tokens: &[Token],
        purpose: &Purpose,
        authorize: impl Fn(&FieldType) -> Result<Permit<act::Reveal, RevealForm>, Denial>,
        audit: &AuditContext,
    ) -> Result<Vec<Result<Revealed, ItemError>>, super::Error> {
        let stored = self.stored_records(tokens).await?;
        let now = self.now();
        let records: Vec<Result<Record, ItemError>> = stored
            .into_iter()
            .map(|bytes| {
                let record = Record::decode(&bytes.ok_or(ItemError::NotFound)?).map_err(|e| {
                    tracing::error!(error = %e, "stored record cannot be decoded");
                    ItemError::DataLoss
                })?;
                if record.expired(now) {
                    return Err(ItemError::NotFound);
                }
                Ok(record)
            })
            .collect();

        let unknown = records.iter().flatten().any(|r| self.lacks_key(r));
        if unknown {
            self.refresh_keys().await;
        }

        // Subject keys and consent decisions, each in one read.
        let mut subjects: Vec<[u8; 32]> = records
            .iter()
            .flatten()
            .filter(|r| r.key_version == KeyVersion::Subject)
            .filter_map(|r| r.subject_hash)
            .collect();
        subjects.sort_unstable();
        subjects.dedup();
        let subject_keys = self.subject_keys(&subjects).await?;
        let needs_consent = |r: &Record| {
            r.subject_hash.is_some()
                && self
                    .fields
                    .get(&r.field_type)
                    .is_some_and(|spec| spec.consent_purposes.contains(purpose.as_str()))
        };
        let mut wanted: Vec<([u8; 32], String)> = records
            .iter()
            .flatten()
            .filter(|r| needs_consent(r))
            .filter_map(|r| r.subject_hash.map(|h| (h, purpose.as_str().to_owned())))
            .collect();
        wanted.sort();
        wanted.dedup();
        let consent: HashMap<[u8; 32], bool> = wanted
            .iter()
            .map(|(h, _)| *h)
            .zip(self.consents(&wanted).await?.into_iter().map(|c| c.granted))
            .collect();

        let mut event = audit.event(Outcome::Ok);
        let mut consent_missing = false;
        // Per token, the subject and field type of the record read.
        let mut read: Vec<Option<(Option<SubjectHash>, String)>> = vec![None; tokens.len()];
        let results: Vec<_> = tokens
            .iter()
            .zip(records)
            .zip(&mut read)
            .map(|((token, record), read)| {
                let record = record?;
                event.field_types.push(record.field_type.to_string());
                *read = Some((record.subject_hash, record.field_type.to_string()));
                let form = authorize(&record.field_type).map_err(ItemError::Denied)?;
                let consented = record
                    .subject_hash
                    .is_some_and(|h| consent.get(&h) == Some(&true));
                if needs_consent(&record) && !consented {
                    consent_missing = true;
                    return Err(ItemError::ConsentMissing(purpose.as_str().to_owned()));
                }
                let subject_key = record.subject_hash.and_then(|h| subject_keys.get(&h));
                let value = self.decrypt(token, &record, subject_key)?;
                let form = form.into_item();
                event.forms.push(form.name().to_owned());
                let value = match form {
                    RevealForm::Plain => value,
                    RevealForm::Masked => {
                        SecretValue::new(match self.fields.get(&record.field_type) {
                            Some(spec) => spec.masked(&value),
                            // A field type removed from the config: hide everything.
                            None => "********".into(),
                        })
                    }
                };
                Ok(Revealed {
                    field_type: record.field_type,
                    value,
                    form,
                })
            })
            .collect();
        event.field_types.sort();
        event.field_types.dedup();
        event.forms.sort();
        event.forms.dedup();
        event.tokens = tokens.iter().map(|t| self.audit_token(t)).collect();
        event.failed_items +=
            u32::try_from(results.iter().filter(|r| r.is_err()).count()).unwrap_or(u32::MAX);
        let mut parts = Parts::default();
        for (result, read) in results.iter().zip(read) {
            if let Some((subject, field_type)) = read {
                let form = result.as_ref().ok().map(|r| r.form.name());
                parts.item(subject, &field_type, form, result.is_err());
            }
        }
        parts.finish(self, &mut event);
        if !wanted.is_empty() {
            event.consent = Some(if consent_missing {
                ConsentNote::Missing
            } else {
                ConsentNote::Granted
            });
        }
        self.record(&event).await?;
        Ok(results)
    }
}

impl<S: Store> Vault<S> {
    /// Decrypts a record with the vault key it names, or its subject's key.
    pub(super) fn decrypt(
        &self,
        token: &Token,
        record: &Record,
        subject_key: Option<&DataKey>,
    ) -> Result<SecretValue, ItemError> {
        let vault_key;
        let key = match record.key_version {
            // The subject's key is gone: the subject was erased.
            KeyVersion::Subject => subject_key.ok_or(ItemError::NotFound)?,
            KeyVersion::Vault(version) => {
                vault_key = self.keyring.data_key(version).ok_or_else(|| {
                    tracing::error!(field_type = %record.field_type, key_version = version, "stored record names an unknown key version");
                    ItemError::DataLoss
                })?;
                &*vault_key
            }
        };
        // A record moved under a token of another field type (opaque tokens
        // name theirs) is not this token's.
        if token
            .field_type()
            .is_some_and(|ft| *ft != record.field_type)
        {
            tracing::error!(field_type = %record.field_type, "stored record's field type differs from its token's");
            return Err(ItemError::DataLoss);
        }
        let aad = record.aad(token);
        let plaintext = key.open(&record.nonce, &record.ciphertext, &aad).map_err(|_| {
            tracing::error!(field_type = %record.field_type, "stored record failed authentication (corrupted or moved)");
            ItemError::DataLoss
        })?;
        SecretValue::from_decrypted(plaintext).ok_or_else(|| {
            tracing::error!(field_type = %record.field_type, "decrypted value is not UTF-8");
            ItemError::DataLoss
        })
    }

    /// Whether `record` names a vault data key this process does not hold
    /// (one another replica added by a rotation).
    pub(super) fn lacks_key(&self, record: &Record) -> bool {
        matches!(record.key_version, KeyVersion::Vault(v) if self.keyring.data_key(v).is_none())
    }

    /// Loads keys other processes sharing the store have added; a failure
    /// is logged (the records that need them then answer DATA_LOSS).
    pub async fn refresh_keys(&self) {
        if let Err(e) = self.load_new_keys().await {
            tracing::error!(error = %e, "cannot load the keys another replica added");
        }
    }

    /// Loads keys other processes sharing the store have added, saying so.
    ///
    /// # Errors
    /// Storage failures, a new key that does not unwrap, or a master key
    /// rotated elsewhere ([`super::Error::MasterKeyMoved`]).
    pub(super) async fn load_new_keys(&self) -> Result<(), super::Error> {
        let loaded = self.keyring.refresh(&self.store).await?;
        if loaded > 0 {
            tracing::info!(keys = loaded, "loaded keys another replica added");
        }
        Ok(())
    }
}
