//! Detokenize: read, authorise by the record's field type, decrypt, mask.

use super::{ItemError, Record, Vault};
use crate::{
    audit::AuditContext,
    authz::{Denial, Permit, RevealForm},
    crypto::SecretValue,
    store::{Store, Table},
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
    /// decrypted without its permit. A missing, refused or corrupted record
    /// fails only its own item.
    ///
    /// # Errors
    /// Storage failures fail the whole call.
    ///
    /// The audit event (which tokens, which field types, how many failed) is
    /// written durably before this returns: if it cannot be, the call fails
    /// with [`super::Error::AuditUnavailable`] and every revealed value is
    /// dropped (and zeroized) unseen.
    pub async fn detokenize(
        &self,
        tokens: &[Token],
        authorize: impl Fn(&FieldType) -> Result<Permit<RevealForm>, Denial>,
        audit: &AuditContext,
    ) -> Result<Vec<Result<Revealed, ItemError>>, super::Error> {
        let keys = tokens.iter().map(|t| t.storage_key().to_vec()).collect();
        let stored = self.store.get_many(Table::Records, keys).await?;
        let mut event = audit.event("OK");
        let results: Vec<_> = tokens
            .iter()
            .zip(stored)
            .map(|(token, bytes)| {
                let record = decode(bytes.ok_or(ItemError::NotFound)?)?;
                event.field_types.push(record.field_type.to_string());
                let form = authorize(&record.field_type).map_err(ItemError::Denied)?;
                self.reveal(token, record, form)
            })
            .collect();
        event.field_types.sort();
        event.field_types.dedup();
        event.tokens = tokens.iter().map(|t| self.audit_token(t)).collect();
        event.failed_items +=
            u32::try_from(results.iter().filter(|r| r.is_err()).count()).unwrap_or(u32::MAX);
        self.record(&event).await?;
        Ok(results)
    }

    fn reveal(
        &self,
        token: &Token,
        record: Record,
        form: Permit<RevealForm>,
    ) -> Result<Revealed, ItemError> {
        let field_type = &record.field_type;
        let key = self.keyring.data_key(record.key_version).ok_or_else(|| {
            tracing::error!(field_type = %field_type, key_version = record.key_version, "stored record names an unknown key version");
            ItemError::DataLoss
        })?;
        let aad = Record::aad(token, record.key_version, record.subject_hash.as_ref());
        let plaintext = key.open(&record.nonce, &record.ciphertext, &aad).map_err(|_| {
            tracing::error!(field_type = %field_type, "stored record failed authentication (corrupted or moved)");
            ItemError::DataLoss
        })?;
        let value = SecretValue::from_decrypted(plaintext).ok_or_else(|| {
            tracing::error!(field_type = %field_type, "decrypted value is not UTF-8");
            ItemError::DataLoss
        })?;
        let form = form.into_item();
        let value = match form {
            RevealForm::Plain => value,
            RevealForm::Masked => SecretValue::new(match self.fields.get(field_type) {
                Some(spec) => spec.masked(&value),
                // A field type removed from the config: hide everything.
                None => "********".into(),
            }),
        };
        Ok(Revealed {
            field_type: record.field_type,
            value,
            form,
        })
    }
}

fn decode(bytes: Vec<u8>) -> Result<Record, ItemError> {
    Record::decode(&bytes).map_err(|e| {
        tracing::error!(error = %e, "stored record cannot be decoded");
        ItemError::DataLoss
    })
}
