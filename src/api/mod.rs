//! The gRPC API: decodes requests, checks them against the policy, calls the
//! vault, and encodes results.
//!
//! Only this module turns errors into `tonic::Status` (in [`status`]). Each
//! request is logged once, when it finishes, with the caller's identity,
//! method, item count, status code and latency: never a value or a token.

mod status;

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use tonic::{Code, Request, Response, Status};

pub use status::Error;
use status::{item_error, vault_item_error};

use crate::{
    authz::{Action, Denial, DenialReason, Permit, Policy},
    config::{FieldTypeSettings, Limits},
    crypto::SecretValue,
    identity::{ClientId, IdentityError, Peer},
    proto::v1::{self as pb, token_vault_server::TokenVault},
    store::Store,
    token::{FieldType, Token},
    vault::{NewValue, SubjectId, Vault},
};

/// What the API layer enforces besides the policy.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Request limits.
    pub limits: Limits,
    /// Known field types.
    pub field_types: BTreeMap<FieldType, FieldTypeSettings>,
    /// The access policy.
    pub policy: Policy,
}

/// The `tokenvault.v1.TokenVault` service.
pub struct TokenVaultService<S> {
    vault: Arc<Vault<S>>,
    settings: Arc<ApiSettings>,
}

impl<S> TokenVaultService<S> {
    /// A service over `vault`.
    pub fn new(vault: Arc<Vault<S>>, settings: ApiSettings) -> Self {
        Self {
            vault,
            settings: Arc::new(settings),
        }
    }
}

/// The identity of the connection a request came on.
fn caller<T>(request: &Request<T>) -> Result<ClientId, Error> {
    let peer = request
        .extensions()
        .get::<Peer>()
        .ok_or(Error::Unauthenticated(IdentityError::NoCertificate))?;
    peer.identity
        .as_ref()
        .clone()
        .map_err(Error::Unauthenticated)
}

/// Logs a denial once, with structured fields and no value.
fn log_denial(denial: &Denial) {
    let (scope, purpose) = match denial.reason() {
        DenialReason::MissingScope(scope) => (Some(scope.to_string()), None),
        DenialReason::NoScopeFor(action) => {
            (Some(format!("{action:?}").to_lowercase() + ":*"), None)
        }
        DenialReason::Purpose(purpose) => (None, Some(purpose.to_string())),
    };
    tracing::warn!(
        client.id = %denial.client(),
        scope = scope.as_deref().unwrap_or(""),
        purpose = purpose.as_deref().unwrap_or(""),
        "permission denied"
    );
}

/// One request's log line, written when it finishes.
struct CallLog {
    method: &'static str,
    client: Option<String>,
    items: usize,
    started: Instant,
}

impl CallLog {
    fn start(method: &'static str, items: usize) -> Self {
        Self {
            method,
            client: None,
            items,
            started: Instant::now(),
        }
    }

    fn finish<T>(self, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        tracing::info!(
            client.id = self.client.as_deref().unwrap_or("-"),
            method = self.method,
            items = self.items,
            code = ?code,
            latency_us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "request"
        );
    }
}

fn check_count(count: usize, limits: &Limits, what: &str) -> Result<(), Error> {
    if count == 0 {
        return Err(Error::InvalidArgument(format!("the request has no {what}")));
    }
    if count > limits.max_items_per_request {
        return Err(Error::InvalidArgument(format!(
            "the request has {count} {what}; the limit is {} (limits.max_items_per_request)",
            limits.max_items_per_request
        )));
    }
    Ok(())
}

impl<S: Store> TokenVaultService<S> {
    async fn tokenize_inner(
        &self,
        client: &ClientId,
        request: pb::TokenizeRequest,
    ) -> Result<pb::TokenizeResponse, Error> {
        let grants = self.settings.policy.grants(client);
        grants.require_action(Action::Tokenize).map_err(|d| {
            log_denial(&d);
            Error::Denied(d)
        })?;
        check_count(request.items.len(), &self.settings.limits, "items")?;

        let mut results: Vec<Option<pb::tokenize_result::Result>> =
            Vec::with_capacity(request.items.len());
        let mut permitted: Vec<Permit<NewValue>> = Vec::new();
        let mut positions = Vec::new();
        for (index, item) in request.items.into_iter().enumerate() {
            match self.parse_item(item).and_then(|value| {
                grants.permit_tokenize(value).map_err(|d| {
                    log_denial(&d);
                    item_error(Code::PermissionDenied, d.to_string())
                })
            }) {
                Ok(permit) => {
                    permitted.push(permit);
                    positions.push(index);
                    results.push(None);
                }
                Err(e) => results.push(Some(pb::tokenize_result::Result::Error(e))),
            }
        }
        if !permitted.is_empty() {
            let tokens = self.vault.tokenize(permitted).await?;
            for (index, token) in positions.into_iter().zip(tokens) {
                results[index] = Some(pb::tokenize_result::Result::Token(token.to_string()));
            }
        }
        Ok(pb::TokenizeResponse {
            results: results
                .into_iter()
                .map(|result| pb::TokenizeResult { result })
                .collect(),
        })
    }

    /// Validates one item; the error never contains the value.
    fn parse_item(&self, mut item: pb::TokenizeItem) -> Result<NewValue, pb::ItemError> {
        // Move the value out of the prost message at once, so the only copy
        // is the zeroizing one.
        let value = SecretValue::new(std::mem::take(&mut item.value));
        let field_type: FieldType = item
            .field_type
            .parse()
            .map_err(|e| item_error(Code::InvalidArgument, format!("{e}")))?;
        let settings = self.settings.field_types.get(&field_type).ok_or_else(|| {
            item_error(
                Code::InvalidArgument,
                format!("field type {field_type} is not configured"),
            )
        })?;
        if value.is_empty() {
            return Err(item_error(Code::InvalidArgument, "value is empty"));
        }
        if value.len() > settings.max_value_bytes {
            return Err(item_error(
                Code::InvalidArgument,
                format!(
                    "value is {} bytes; field type {field_type} allows at most {} (max_value_bytes)",
                    value.len(),
                    settings.max_value_bytes
                ),
            ));
        }
        let subject = if item.subject_id.is_empty() {
            None
        } else {
            Some(
                item.subject_id
                    .parse::<SubjectId>()
                    .map_err(|e| item_error(Code::InvalidArgument, e.to_string()))?,
            )
        };
        Ok(NewValue {
            field_type,
            value,
            subject,
        })
    }

    async fn detokenize_inner(
        &self,
        client: &ClientId,
        request: pb::DetokenizeRequest,
    ) -> Result<pb::DetokenizeResponse, Error> {
        let grants = self.settings.policy.grants(client);
        let purpose = request
            .purpose
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("{e}")))?;
        let deny = |d: Denial| {
            log_denial(&d);
            Error::Denied(d)
        };
        grants.require_action(Action::Detokenize).map_err(deny)?;
        let purpose = grants.allow_purpose(purpose).map_err(deny)?;
        check_count(request.tokens.len(), &self.settings.limits, "tokens")?;

        let mut results: Vec<Option<pb::detokenize_result::Result>> =
            Vec::with_capacity(request.tokens.len());
        let mut permitted: Vec<Permit<Token>> = Vec::new();
        let mut positions = Vec::new();
        for (index, text) in request.tokens.iter().enumerate() {
            let permit = text
                .parse::<Token>()
                .map_err(|e| item_error(Code::InvalidArgument, e.to_string()))
                .and_then(|token| {
                    grants.permit_detokenize(&purpose, token).map_err(|d| {
                        log_denial(&d);
                        item_error(Code::PermissionDenied, d.to_string())
                    })
                });
            match permit {
                Ok(permit) => {
                    permitted.push(permit);
                    positions.push(index);
                    results.push(None);
                }
                Err(e) => results.push(Some(pb::detokenize_result::Result::Error(e))),
            }
        }
        if !permitted.is_empty() {
            let revealed = self.vault.detokenize(permitted).await?;
            for (index, outcome) in positions.into_iter().zip(revealed) {
                results[index] = Some(match outcome {
                    Ok(r) => pb::detokenize_result::Result::Value(pb::RevealedValue {
                        field_type: r.field_type.to_string(),
                        value: r.value.into_response_string(),
                    }),
                    Err(e) => pb::detokenize_result::Result::Error(vault_item_error(e)),
                });
            }
        }
        Ok(pb::DetokenizeResponse {
            results: results
                .into_iter()
                .map(|result| pb::DetokenizeResult { result })
                .collect(),
        })
    }
}

#[tonic::async_trait]
impl<S: Store> TokenVault for TokenVaultService<S> {
    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let mut log = CallLog::start("Tokenize", request.get_ref().items.len());
        let result = match caller(&request) {
            Ok(client) => {
                log.client = Some(client.to_string());
                self.tokenize_inner(&client, request.into_inner()).await
            }
            Err(e) => Err(e),
        }
        .map(Response::new)
        .map_err(Status::from);
        log.finish(&result);
        result
    }

    async fn detokenize(
        &self,
        request: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let mut log = CallLog::start("Detokenize", request.get_ref().tokens.len());
        let result = match caller(&request) {
            Ok(client) => {
                log.client = Some(client.to_string());
                self.detokenize_inner(&client, request.into_inner()).await
            }
            Err(e) => Err(e),
        }
        .map(Response::new)
        .map_err(Status::from);
        log.finish(&result);
        result
    }
}
