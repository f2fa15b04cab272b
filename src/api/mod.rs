//! The gRPC API: decodes requests, checks them against the policy, calls the
//! vault, and encodes results.
//!
//! Only this module turns errors into `tonic::Status` (in [`status`]). Each
//! request is logged once, when it finishes, with the caller's identity,
//! method, item count, status code and latency: never a value or a token.

mod status;

use std::{sync::Arc, time::Instant};

use tonic::{Code, Request, Response, Status};

pub use status::Error;
use status::{item_error, vault_item_error};

use crate::{
    authz::{Action, Denial, DenialReason, Policy, RevealForm},
    config::Limits,
    crypto::SecretValue,
    identity::{ClientId, IdentityError, Peer},
    proto::v1::{self as pb, token_vault_server::TokenVault},
    store::Store,
    token::{FieldType, Token},
    vault::{LookupValue, NewValue, SubjectId, Vault},
};

/// What the API layer enforces besides the policy.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Request limits.
    pub limits: Limits,
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
    /// The configured field type named by `name`, or the item error.
    fn field_type(&self, name: &str) -> Result<FieldType, pb::ItemError> {
        let field_type: FieldType = name
            .parse()
            .map_err(|e| item_error(Code::InvalidArgument, format!("{e}")))?;
        if !self.vault.fields().contains(&field_type) {
            return Err(item_error(
                Code::InvalidArgument,
                format!("field type {field_type} is not configured"),
            ));
        }
        Ok(field_type)
    }

    async fn tokenize_inner(
        &self,
        client: &ClientId,
        request: pb::TokenizeRequest,
    ) -> Result<pb::TokenizeResponse, Error> {
        let grants = self.settings.policy.grants(client);
        grants.require_action(Action::Tokenize).map_err(denied)?;
        check_count(request.items.len(), &self.settings.limits, "items")?;

        let mut results: Vec<Option<pb::ItemError>> = Vec::with_capacity(request.items.len());
        let mut permitted = Vec::new();
        for mut item in request.items {
            // Move the value out of the prost message at once, so the only
            // copy is the zeroizing one.
            let value = SecretValue::new(std::mem::take(&mut item.value));
            let parsed = self.field_type(&item.field_type).and_then(|field_type| {
                let subject = match item.subject_id.as_str() {
                    "" => None,
                    id => Some(
                        id.parse::<SubjectId>()
                            .map_err(|e| item_error(Code::InvalidArgument, e.to_string()))?,
                    ),
                };
                let new = NewValue {
                    field_type,
                    value,
                    subject,
                };
                grants.permit_tokenize(new).map_err(|d| denied_item(&d))
            });
            match parsed {
                Ok(permit) => {
                    permitted.push(permit);
                    results.push(None);
                }
                Err(e) => results.push(Some(e)),
            }
        }
        let mut stored = if permitted.is_empty() {
            Vec::new()
        } else {
            self.vault.tokenize(permitted).await?
        }
        .into_iter();
        let results = results
            .into_iter()
            .map(|early| {
                let result = match early {
                    Some(e) => pb::tokenize_result::Result::Error(e),
                    None => match stored.next() {
                        Some(Ok(token)) => pb::tokenize_result::Result::Token(token.to_string()),
                        Some(Err(e)) => pb::tokenize_result::Result::Error(vault_item_error(&e)),
                        None => pb::tokenize_result::Result::Error(item_error(
                            Code::Internal,
                            "internal error",
                        )),
                    },
                };
                pb::TokenizeResult {
                    result: Some(result),
                }
            })
            .collect();
        Ok(pb::TokenizeResponse { results })
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
        grants
            .require_any(&[Action::Detokenize, Action::RevealMasked])
            .map_err(denied)?;
        let purpose = grants.allow_purpose(purpose).map_err(denied)?;
        check_count(request.tokens.len(), &self.settings.limits, "tokens")?;

        let mut results: Vec<Option<pb::ItemError>> = Vec::with_capacity(request.tokens.len());
        let mut tokens = Vec::new();
        for text in &request.tokens {
            match text.parse::<Token>() {
                Ok(token) => {
                    tokens.push(token);
                    results.push(None);
                }
                Err(e) => results.push(Some(item_error(Code::InvalidArgument, e.to_string()))),
            }
        }
        let authorize = |field_type: &FieldType| {
            grants
                .permit_reveal(&purpose, field_type, request.masked)
                .inspect_err(log_denial)
        };
        let mut revealed = if tokens.is_empty() {
            Vec::new()
        } else {
            self.vault.detokenize(&tokens, authorize).await?
        }
        .into_iter();
        let results = results
            .into_iter()
            .map(|early| {
                let result = match early {
                    Some(e) => pb::detokenize_result::Result::Error(e),
                    None => match revealed.next() {
                        Some(Ok(r)) => pb::detokenize_result::Result::Value(pb::RevealedValue {
                            field_type: r.field_type.to_string(),
                            form: match r.form {
                                RevealForm::Plain => pb::RevealForm::Plain,
                                RevealForm::Masked => pb::RevealForm::Masked,
                            } as i32,
                            value: r.value.into_response_string(),
                        }),
                        Some(Err(e)) => pb::detokenize_result::Result::Error(vault_item_error(&e)),
                        None => pb::detokenize_result::Result::Error(item_error(
                            Code::Internal,
                            "internal error",
                        )),
                    },
                };
                pb::DetokenizeResult {
                    result: Some(result),
                }
            })
            .collect();
        Ok(pb::DetokenizeResponse { results })
    }

    async fn lookup_inner(
        &self,
        client: &ClientId,
        request: pb::LookupTokensRequest,
    ) -> Result<pb::LookupTokensResponse, Error> {
        let grants = self.settings.policy.grants(client);
        grants.require_action(Action::Lookup).map_err(denied)?;
        check_count(request.items.len(), &self.settings.limits, "items")?;
        let mut results: Vec<Option<pb::ItemError>> = Vec::with_capacity(request.items.len());
        let mut permitted = Vec::new();
        for mut item in request.items {
            let value = SecretValue::new(std::mem::take(&mut item.value));
            let parsed = self.field_type(&item.field_type).and_then(|field_type| {
                grants
                    .permit_lookup(LookupValue { field_type, value })
                    .map_err(|d| denied_item(&d))
            });
            match parsed {
                Ok(permit) => {
                    permitted.push(permit);
                    results.push(None);
                }
                Err(e) => results.push(Some(e)),
            }
        }
        let mut found = if permitted.is_empty() {
            Vec::new()
        } else {
            self.vault.lookup(permitted).await?
        }
        .into_iter();
        let results = results
            .into_iter()
            .map(|early| {
                let result = match early {
                    Some(e) => pb::lookup_result::Result::Error(e),
                    None => match found.next() {
                        Some(Ok(token)) => pb::lookup_result::Result::Token(token.to_string()),
                        Some(Err(e)) => pb::lookup_result::Result::Error(vault_item_error(&e)),
                        None => pb::lookup_result::Result::Error(item_error(
                            Code::Internal,
                            "internal error",
                        )),
                    },
                };
                pb::LookupResult {
                    result: Some(result),
                }
            })
            .collect();
        Ok(pb::LookupTokensResponse { results })
    }
}

/// A request-level denial, logged once.
fn denied(denial: Denial) -> Error {
    log_denial(&denial);
    Error::Denied(denial)
}

/// An item-level denial, logged once.
fn denied_item(denial: &Denial) -> pb::ItemError {
    log_denial(denial);
    item_error(Code::PermissionDenied, denial.to_string())
}

/// Runs one handler with its request log line.
async fn logged<T, R, F>(
    method: &'static str,
    items: usize,
    request: Request<T>,
    handler: F,
) -> Result<Response<R>, Status>
where
    F: AsyncFnOnce(ClientId, T) -> Result<R, Error>,
{
    let mut log = CallLog::start(method, items);
    let result = match caller(&request) {
        Ok(client) => {
            log.client = Some(client.to_string());
            handler(client, request.into_inner()).await
        }
        Err(e) => Err(e),
    }
    .map(Response::new)
    .map_err(Status::from);
    log.finish(&result);
    result
}

#[tonic::async_trait]
impl<S: Store> TokenVault for TokenVaultService<S> {
    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let items = request.get_ref().items.len();
        logged("Tokenize", items, request, async |client, r| {
            self.tokenize_inner(&client, r).await
        })
        .await
    }

    async fn detokenize(
        &self,
        request: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let items = request.get_ref().tokens.len();
        logged("Detokenize", items, request, async |client, r| {
            self.detokenize_inner(&client, r).await
        })
        .await
    }

    async fn lookup_tokens(
        &self,
        request: Request<pb::LookupTokensRequest>,
    ) -> Result<Response<pb::LookupTokensResponse>, Status> {
        let items = request.get_ref().items.len();
        logged("LookupTokens", items, request, async |client, r| {
            self.lookup_inner(&client, r).await
        })
        .await
    }
}
