//! The `tokenvault.v1.Subjects` service: data subjects' rights and consent.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use prost::Message;

use super::{
    Call, Error, TokenVaultService, check_count, denied, split::Split, status::item_error,
    status::vault_item_error,
};
use crate::{
    authz::{Action, Purpose, act},
    crypto::SecretValue,
    proto::v1::{self as pb, subjects_server::Subjects},
    store::Store,
    token::{FieldType, Token},
    vault::{ConsentDecision, ConsentQuery, ErasureReceipt, ItemError, Prior, Remember, SubjectId},
};

/// The one purpose an export is made for: answering the data subject's own
/// request (access, GDPR Art. 15; portability, Art. 20).
pub const EXPORT_PURPOSE: &str = "subject_access_request";

fn subject(id: &str) -> Result<SubjectId, Error> {
    id.parse()
        .map_err(|e: crate::vault::SubjectIdError| Error::InvalidArgument(e.to_string()))
}

fn receipt_message(receipt: &ErasureReceipt) -> pb::ErasureReceipt {
    pb::ErasureReceipt {
        subject_hash: receipt.subject_hash.clone(),
        tokens_erased: receipt.tokens_erased,
        erased_ms: receipt.erased_ms,
    }
}

fn purpose(text: &str) -> Result<Purpose, Error> {
    text.parse()
        .map_err(|e: crate::authz::PurposeError| Error::InvalidArgument(e.to_string()))
}

fn token(text: &str) -> Result<Token, Error> {
    text.parse()
        .map_err(|e: crate::token::TokenError| Error::InvalidArgument(e.to_string()))
}

/// Who asked for a sealed export, for its signed end record.
struct ExportOf<'a> {
    subject_id: &'a str,
    request_id: &'a str,
}

/// An export's fields as records sealed to its recipient, followed by the
/// end record that says how many there were and carries the vault's
/// signature over the whole export (`sign`: the audit key); the first
/// message carries the encapsulated key. Nothing in clear but the message
/// boundaries.
fn seal_export(
    fields: Vec<pb::SubjectField>,
    encapsulated: &[u8],
    mut sealer: crate::crypto::ExportSealer,
    of: &ExportOf<'_>,
    sign: impl FnOnce(&crate::crypto::ExportStatement<'_>) -> [u8; 64],
) -> Result<Vec<Result<pb::SubjectField, Status>>, Error> {
    use prost::Message;
    let crypto = |e| Error::Vault(crate::vault::Error::Crypto(e));
    let total = fields.len() as u64;
    let mut sealed_records = Vec::with_capacity(fields.len() + 1);
    for (index, field) in fields.into_iter().enumerate() {
        let record = pb::SealedRecord {
            field: Some(field),
            index: index as u64,
            ..pb::SealedRecord::default()
        };
        let plain = zeroize::Zeroizing::new(record.encode_to_vec());
        drop(record);
        sealed_records.push(sealer.seal(&plain).map_err(crypto)?);
    }
    let subject_digest = crate::crypto::subject_digest(of.subject_id);
    let exported_ms = crate::vault::now_ms();
    let signature = sign(&crate::crypto::ExportStatement {
        encapsulated,
        records: &sealed_records,
        subject_digest: &subject_digest,
        request_id: of.request_id,
        exported_ms,
    });
    let end = pb::SealedRecord {
        field: None,
        index: total,
        total,
        end: true,
        signature: signature.to_vec(),
        request_id: of.request_id.to_owned(),
        exported_ms,
        subject_digest: subject_digest.to_vec(),
    };
    sealed_records.push(sealer.seal(&end.encode_to_vec()).map_err(crypto)?);
    let mut out = Vec::new();
    for (n, sealed) in sealed_records.into_iter().enumerate() {
        out.push(Ok(pb::SubjectField {
            token: String::new(),
            field_type: String::new(),
            value: String::new(),
            created_ms: 0,
            expires_ms: 0,
            purposes: Vec::new(),
            sealed,
            encapsulated_key: if n == 0 {
                encapsulated.to_vec()
            } else {
                Vec::new()
            },
        }));
    }
    Ok(out)
}

/// The stream of an export.
pub type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::SubjectField, Status>> + Send>>;

impl<S: Store> TokenVaultService<S> {
    async fn export_inner(
        &self,
        call: &Call,
        request: pb::ExportSubjectRequest,
    ) -> Result<ExportStream, Error> {
        let policy = self.settings.policy.current();
        let grants = policy.grants(&call.client);
        let stated = purpose(&request.purpose)?;
        call.set_purpose(&stated);
        // An export goes to the data subject: it has one purpose, which the
        // rule granting subject:export must allow. Consent to other
        // purposes does not apply, and neither do per-field scopes.
        if stated.as_str() != EXPORT_PURPOSE {
            return Err(Error::InvalidArgument(format!(
                "ExportSubject answers the data subject's own request: its purpose must be {EXPORT_PURPOSE}"
            )));
        }
        let stated = grants.allow_purpose(stated).map_err(denied)?;
        let permit = grants
            .permit_global_for(act::SubjectExport, &stated, subject(&request.subject_id)?)
            .map_err(denied)?;
        // A sealed export's key is checked before anything is exported.
        let sealer = match request.recipient_public_key.len() {
            0 => None,
            crate::crypto::EXPORT_KEY_LEN => Some(
                crate::crypto::ExportSealer::new(&request.recipient_public_key).map_err(|_| {
                    Error::InvalidArgument(
                        "recipient_public_key is not a usable X25519 public key".into(),
                    )
                })?,
            ),
            other => {
                return Err(Error::InvalidArgument(format!(
                    "recipient_public_key must be an X25519 public key of 32 bytes, not {other}"
                )));
            }
        };
        let fields = self.vault.export_subject(permit, &call.audit(1, 0)).await?;
        let plain: Vec<pb::SubjectField> = fields
            .into_iter()
            .map(|f| pb::SubjectField {
                token: f.token.to_string(),
                purposes: self.why_held(&policy, &f.field_type),
                field_type: f.field_type.to_string(),
                value: f.value.into_response_string(),
                created_ms: f.created_ms,
                expires_ms: f.expires_ms.unwrap_or(0),
                sealed: Vec::new(),
                encapsulated_key: Vec::new(),
            })
            .collect();
        let items = match sealer {
            None => plain.into_iter().map(Ok).collect(),
            Some((encapsulated, sealer)) => seal_export(
                plain,
                &encapsulated,
                sealer,
                &ExportOf {
                    subject_id: &request.subject_id,
                    request_id: &call.request_id,
                },
                |statement| self.vault.sign_export(statement),
            )?,
        };
        Ok(Box::pin(tokio_stream::iter(items)))
    }

    /// The purposes values of `field_type` may be revealed for, as the
    /// answer to "why do you hold this".
    fn why_held(
        &self,
        policy: &crate::authz::Policy,
        field_type: &crate::token::FieldType,
    ) -> Vec<pb::PurposeDeclaration> {
        let consent = self
            .vault
            .fields()
            .get(field_type)
            .map(|spec| &spec.consent_purposes);
        policy
            .reveal_purposes(field_type)
            .into_iter()
            .map(|reveal| {
                let name = reveal
                    .purpose
                    .as_ref()
                    .map_or_else(|| "*".to_owned(), ToString::to_string);
                pb::PurposeDeclaration {
                    needs_consent: consent.is_some_and(|c| c.contains(&name)),
                    description: reveal
                        .declaration
                        .as_ref()
                        .map(|d| d.description.clone())
                        .unwrap_or_default(),
                    legal_basis: reveal
                        .declaration
                        .map(|d| d.legal_basis.to_string())
                        .unwrap_or_default(),
                    purpose: name,
                }
            })
            .collect()
    }

    async fn erase_inner(
        &self,
        call: &Call,
        request: pb::EraseSubjectRequest,
    ) -> Result<pb::ErasureReceipt, Error> {
        let policy = self.settings.policy.current();
        let grants = policy.grants(&call.client);
        let permit = grants
            .permit_global(act::SubjectErase, subject(&request.subject_id)?)
            .map_err(denied)?;
        let request_key =
            self.request_key(call, &request.request_id, [request.subject_id.as_bytes()])?;
        let audit = call.audit(1, 0);
        let new_request = match self.prior(request_key).await? {
            Some(Prior::Answered(first)) => return self.replay(&audit, &first).await,
            Some(Prior::New(request)) => Some(request),
            None => None,
        };
        let answer = |receipt: &ErasureReceipt| receipt_message(receipt).encode_to_vec();
        let remember = new_request.as_ref().map(|request| Remember {
            request,
            answer: &answer,
        });
        let receipt = self.vault.erase_subject(permit, &audit, remember).await?;
        tracing::info!(subject.hash = %receipt.subject_hash, tokens = receipt.tokens_erased, "erased a data subject");
        Ok(receipt_message(&receipt))
    }

    async fn update_inner(
        &self,
        call: &Call,
        mut request: pb::UpdateValueRequest,
    ) -> Result<pb::UpdateValueResponse, Error> {
        let policy = self.settings.policy.current();
        let grants = policy.grants(&call.client);
        grants.require_action(Action::Update).map_err(denied)?;
        let request_key = self.request_key(
            call,
            &request.request_id,
            [request.token.as_bytes(), request.value.as_bytes()],
        )?;
        let value = SecretValue::new(std::mem::take(&mut request.value));
        let token = token(&request.token)?;
        let audit = call.audit(1, 0);
        let new_request = match self.prior(request_key).await? {
            Some(Prior::Answered(first)) => return self.replay(&audit, &first).await,
            Some(Prior::New(request)) => Some(request),
            None => None,
        };
        let answer = |field_type: &FieldType| {
            pb::UpdateValueResponse {
                field_type: field_type.to_string(),
            }
            .encode_to_vec()
        };
        let remember = new_request.as_ref().map(|request| Remember {
            request,
            answer: &answer,
        });
        let authorize = |ft: &crate::token::FieldType| {
            grants
                .permit_field(act::Update, ft)
                .inspect_err(super::log_denial)
        };
        match self
            .vault
            .update_value(&token, value, authorize, &audit, remember)
            .await?
        {
            Ok(field_type) => Ok(pb::UpdateValueResponse {
                field_type: field_type.to_string(),
            }),
            Err(e) => Err(item_status(&e)),
        }
    }

    async fn delete_inner(
        &self,
        call: &Call,
        request: pb::DeleteTokensRequest,
    ) -> Result<pb::DeleteTokensResponse, Error> {
        let policy = self.settings.policy.current();
        let grants = policy.grants(&call.client);
        grants.require_action(Action::Delete).map_err(denied)?;
        check_count(request.tokens.len(), &self.settings.limits, "tokens")?;
        let mut split = Split::with_capacity(request.tokens.len());
        for text in &request.tokens {
            split.push(
                text.parse::<Token>()
                    .map_err(|e| item_error(Code::InvalidArgument, e.to_string())),
            );
        }
        let authorize = |ft: &crate::token::FieldType| {
            grants
                .permit_field(act::Delete, ft)
                .inspect_err(super::log_denial)
        };
        let (items, refused) = split.counts();
        let tokens = split.take_passed();
        let deleted = self
            .vault
            .delete_tokens(&tokens, authorize, &call.audit(items, refused))
            .await?;
        let results = split.merge(deleted, |()| item_error(Code::Ok, "deleted"), |e| e);
        Ok(pb::DeleteTokensResponse { results })
    }

    async fn set_consent_inner(
        &self,
        call: &Call,
        request: pb::SetConsentRequest,
    ) -> Result<pb::ConsentState, Error> {
        let policy = self.settings.policy.current();
        let grants = policy.grants(&call.client);
        let stated = purpose(&request.purpose)?;
        let permit = grants
            .permit_global(
                act::ConsentWrite,
                ConsentDecision {
                    subject: subject(&request.subject_id)?,
                    purpose: stated.clone(),
                    granted: request.granted,
                },
            )
            .map_err(denied)?;
        let state = self.vault.set_consent(permit, &call.audit(1, 0)).await?;
        Ok(pb::ConsentState {
            purpose: stated.to_string(),
            granted: state.granted,
            updated_ms: state.updated_ms,
        })
    }

    async fn get_consent_inner(
        &self,
        call: &Call,
        request: pb::GetConsentRequest,
    ) -> Result<pb::ConsentState, Error> {
        let policy = self.settings.policy.current();
        let grants = policy.grants(&call.client);
        let stated = purpose(&request.purpose)?;
        let permit = grants
            .permit_global(
                act::ConsentRead,
                ConsentQuery {
                    subject: subject(&request.subject_id)?,
                    purpose: stated.clone(),
                },
            )
            .map_err(denied)?;
        let state = self.vault.get_consent(permit, &call.audit(1, 0)).await?;
        Ok(pb::ConsentState {
            purpose: stated.to_string(),
            granted: state.granted,
            updated_ms: state.updated_ms,
        })
    }
}

/// An access history page when the request names none.
const DEFAULT_HISTORY_PAGE: usize = 100;

/// The largest access history page.
const MAX_HISTORY_PAGE: usize = 1000;

/// The stream of an access history.
pub type HistoryStream =
    Pin<Box<dyn Stream<Item = Result<pb::AccessHistoryRecord, Status>> + Send>>;

impl<S: Store> TokenVaultService<S> {
    async fn history_inner(
        &self,
        call: &Call,
        request: pb::AccessHistoryRequest,
    ) -> Result<HistoryStream, Error> {
        let policy = self.settings.policy.current();
        let grants = policy.grants(&call.client);
        let since_ms = time_bound("since", &request.since)?;
        let until_ms = time_bound("until", &request.until)?;
        if let (Some(since), Some(until)) = (since_ms, until_ms)
            && since > until
        {
            return Err(Error::InvalidArgument("since is later than until".into()));
        }
        let limit = match usize::try_from(request.page_size).unwrap_or(usize::MAX) {
            0 => DEFAULT_HISTORY_PAGE,
            n if n > MAX_HISTORY_PAGE => {
                return Err(Error::InvalidArgument(format!(
                    "page_size is at most {MAX_HISTORY_PAGE}"
                )));
            }
            n => n,
        };
        let before_seq = match request.page_token.as_str() {
            "" => None,
            token => Some(token.parse::<u64>().map_err(|_| {
                Error::InvalidArgument(
                    "page_token is not one this vault issued; pass next_page_token as it came"
                        .into(),
                )
            })?),
        };
        let permit = grants
            .permit_global(
                act::SubjectHistory,
                crate::vault::HistoryQuery {
                    subject: subject(&request.subject_id)?,
                    since_ms,
                    until_ms,
                    before_seq,
                    limit,
                },
            )
            .map_err(denied)?;
        let page = self.vault.access_history(permit, &call.audit(1, 0)).await?;
        let coverage = pb::HistoryCoverage {
            checkpoint_seq: page.coverage.checkpoint.map_or(0, |(seq, _)| seq),
            checkpoint_time: page
                .coverage
                .checkpoint
                .map(|(_, ms)| crate::audit::rfc3339(ms))
                .unwrap_or_default(),
            indexed_from_seq: page.coverage.indexed_from,
            head_seq: page.coverage.head,
        };
        let record = |record| {
            Ok(pb::AccessHistoryRecord {
                record: Some(record),
            })
        };
        let mut records = vec![record(pb::access_history_record::Record::Coverage(
            coverage,
        ))];
        records.extend(page.entries.into_iter().map(|entry| {
            let event = entry.event;
            record(pb::access_history_record::Record::Event(pb::AccessEvent {
                seq: entry.seq,
                time: event.time,
                identity: event.identity,
                method: event.method,
                purpose: event.purpose.unwrap_or_default(),
                field_types: event.field_types,
                forms: event.forms,
                outcome: event.outcome.as_str().to_owned(),
                items: event.items,
                failed_items: event.failed_items,
                consent: event
                    .consent
                    .map(|c| c.as_str().to_owned())
                    .unwrap_or_default(),
                checkpointed: entry.checkpointed,
                request_id: event.request_id,
                hash: data_encoding::HEXLOWER.encode(&entry.hash),
            }))
        }));
        if let Some(before) = page.next_before {
            records.push(record(pb::access_history_record::Record::NextPageToken(
                before.to_string(),
            )));
        }
        Ok(Box::pin(tokio_stream::iter(records)))
    }
}

/// An optional RFC 3339 bound, in ms since the epoch.
fn time_bound(name: &str, text: &str) -> Result<Option<u64>, Error> {
    if text.is_empty() {
        return Ok(None);
    }
    match crate::audit::time_ms(text) {
        0 => Err(Error::InvalidArgument(format!(
            "{name} must be an RFC 3339 time such as 2026-12-01T00:00:00Z"
        ))),
        ms => Ok(Some(ms)),
    }
}

/// A single-item call's item error, as the call's status. The vault has
/// already audited the call.
fn item_status(e: &ItemError) -> Error {
    Error::Item(vault_item_error(e))
}

#[tonic::async_trait]
impl<S: Store> Subjects for TokenVaultService<S> {
    type ExportSubjectStream = ExportStream;

    async fn export_subject(
        &self,
        request: Request<pb::ExportSubjectRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        self.handle("ExportSubject", 1, request, async |call, r| {
            self.export_inner(call, r).await
        })
        .await
    }

    async fn erase_subject(
        &self,
        request: Request<pb::EraseSubjectRequest>,
    ) -> Result<Response<pb::ErasureReceipt>, Status> {
        self.handle("EraseSubject", 1, request, async |call, r| {
            self.erase_inner(call, r).await
        })
        .await
    }

    async fn update_value(
        &self,
        request: Request<pb::UpdateValueRequest>,
    ) -> Result<Response<pb::UpdateValueResponse>, Status> {
        self.handle("UpdateValue", 1, request, async |call, r| {
            self.update_inner(call, r).await
        })
        .await
    }

    async fn delete_tokens(
        &self,
        request: Request<pb::DeleteTokensRequest>,
    ) -> Result<Response<pb::DeleteTokensResponse>, Status> {
        let items = request.get_ref().tokens.len();
        self.handle("DeleteTokens", items, request, async |call, r| {
            self.delete_inner(call, r).await
        })
        .await
    }

    async fn set_consent(
        &self,
        request: Request<pb::SetConsentRequest>,
    ) -> Result<Response<pb::ConsentState>, Status> {
        self.handle("SetConsent", 1, request, async |call, r| {
            self.set_consent_inner(call, r).await
        })
        .await
    }

    async fn get_consent(
        &self,
        request: Request<pb::GetConsentRequest>,
    ) -> Result<Response<pb::ConsentState>, Status> {
        self.handle("GetConsent", 1, request, async |call, r| {
            self.get_consent_inner(call, r).await
        })
        .await
    }

    type AccessHistoryStream = HistoryStream;

    async fn access_history(
        &self,
        request: Request<pb::AccessHistoryRequest>,
    ) -> Result<Response<HistoryStream>, Status> {
        self.handle("AccessHistory", 1, request, async |call, r| {
            self.history_inner(call, r).await
        })
        .await
    }
}
