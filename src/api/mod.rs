//! The gRPC API: decodes requests, checks them against the policy, calls the
//! vault, and encodes results.
//!
//! Only this module turns errors into `tonic::Status` (in [`status`]). Each
//! request is logged once, when it finishes, with the caller's identity,
//! method, item count, status code and latency: never a value or a token.

mod admin;
mod admission;
mod audit;
mod limits;
mod refusals;
mod split;
mod status;
mod subjects;

pub use admission::{Admission, AdmissionLayer};
pub use limits::{IdentityLimits, Limited, Limiter, Limits};
pub use refusals::RefusalLog;

use std::{
    sync::{Arc, OnceLock},
    time::Instant,
};

use prost::Message;
use tonic::{Code, Request, Response, Status};

use split::Split;
pub use status::Error;
use status::item_error;

use crate::{
    audit::AuditContext,
    authz::{Action, Denial, DenialReason, Purpose, RevealForm, SharedPolicy, act},
    crypto::SecretValue,
    identity::{ClientId, IdentityError, Peer},
    metrics::Metrics,
    proto::v1::{self as pb, token_vault_server::TokenVault},
    store::{self, Store},
    token::{FieldType, Token},
    vault::{
        self, FirstAnswer, LookupValue, NewValue, Prior, Remember, RequestId, RequestKey,
        SubjectId, Vault,
    },
};

/// What the API layer enforces besides the policy.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Request limits.
    pub limits: Limits,
    /// The access policy, replaceable at run time.
    pub policy: Arc<SharedPolicy>,
    /// Where refused calls are counted (audited in aggregate).
    pub refusals: Arc<RefusalLog>,
    /// The PKCS#11 modules `RotateMasterKey` may load.
    pub pkcs11_modules: Vec<std::path::PathBuf>,
}

/// The vault's four gRPC services (`TokenVault`, `Subjects`, `Admin`,
/// `Audit`), over one vault. Per-identity limits are applied before a
/// request reaches it, by [`AdmissionLayer`].
pub struct TokenVaultService<S> {
    vault: Arc<Vault<S>>,
    settings: Arc<ApiSettings>,
    metrics: Arc<Metrics>,
}

impl<S> Clone for TokenVaultService<S> {
    fn clone(&self) -> Self {
        Self {
            vault: Arc::clone(&self.vault),
            settings: Arc::clone(&self.settings),
            metrics: Arc::clone(&self.metrics),
        }
    }
}

impl<S> TokenVaultService<S> {
    /// A service over `vault`, counting into `metrics`.
    pub fn new(vault: Arc<Vault<S>>, settings: ApiSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            vault,
            settings: Arc::new(settings),
            metrics,
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
pub(crate) fn log_denial(denial: &Denial) {
    let (scope, purpose) = match denial.reason() {
        DenialReason::MissingScope(scope) => (Some(scope.to_string()), None),
        DenialReason::NoScopeFor(action) => (Some(action.scope_name()), None),
        DenialReason::Purpose(purpose) => (None, Some(purpose.to_string())),
        DenialReason::ScopeNotForPurpose(scope, purpose) => {
            (Some(scope.to_string()), Some(purpose.to_string()))
        }
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
    request_id: String,
    client: Option<String>,
    items: usize,
    started: Instant,
}

impl CallLog {
    fn finish<T>(self, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        tracing::info!(
            request.id = %self.request_id,
            client.id = self.client.as_deref().unwrap_or("-"),
            method = self.method,
            items = self.items,
            code = ?code,
            latency_us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "request"
        );
    }
}

/// One authenticated call, as the handlers see it.
struct Call {
    client: ClientId,
    request_id: String,
    method: &'static str,
    /// The purpose stated, once parsed, for the audit event (also of a
    /// call refused after it was parsed).
    purpose: OnceLock<Purpose>,
}

impl Call {
    fn purpose(&self) -> Option<String> {
        self.purpose.get().map(|p| p.as_str().to_owned())
    }

    /// Notes the call's purpose, once it parsed: only a well-formed purpose
    /// reaches the audit trail.
    fn set_purpose(&self, purpose: &Purpose) {
        // A call states one purpose; it is set once.
        let _ = self.purpose.set(purpose.clone());
    }

    fn audit(&self, items: usize, failed_items: usize) -> AuditContext {
        AuditContext {
            request_id: self.request_id.clone(),
            identity: self.client.to_string(),
            method: self.method,
            purpose: self.purpose(),
            items: u32::try_from(items).unwrap_or(u32::MAX),
            failed_items: u32::try_from(failed_items).unwrap_or(u32::MAX),
        }
    }
}

/// A request id: 64 bits as hex, enough to tell requests apart in logs and
/// audit. It needs to be unique, not secret, so it is a random starting
/// point drawn once per process plus a counter: one system call per process
/// rather than one per request (`getrandom` had been ≈ 2 % of the server's
/// CPU under single-item load).
fn new_request_id() -> String {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let start = *START.get_or_init(|| {
        let mut bytes = [0u8; 8];
        // A failed random source only makes ids repeat across restarts.
        let _ = getrandom::fill(&mut bytes);
        u64::from_le_bytes(bytes)
    });
    let id = start.wrapping_add(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    format!("{id:016x}")
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

    /// The key of the caller's request id, if the request has one; `parts`
    /// are the fields that decide what the call does.
    fn request_key<'a>(
        &self,
        call: &Call,
        request_id: &str,
        parts: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Option<RequestKey>, Error> {
        let Some(id) =
            RequestId::parse(request_id).map_err(|e| Error::InvalidArgument(e.to_string()))?
        else {
            return Ok(None);
        };
        Ok(Some(self.vault.request_key(
            &id,
            &call.client.to_string(),
            call.method,
            parts,
        )))
    }

    /// What the vault holds for the caller's request id, if any.
    async fn prior(&self, key: Option<RequestKey>) -> Result<Option<Prior>, Error> {
        let Some(key) = key else {
            return Ok(None);
        };
        match self.vault.prior(key).await {
            Ok(prior) => Ok(Some(prior)),
            Err(e @ vault::Error::RequestIdReused) => Err(Error::InvalidArgument(e.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// The first answer to the caller's request id, decoded; the replay is
    /// audited.
    async fn replay<M: Message + Default>(
        &self,
        audit: &AuditContext,
        first: &FirstAnswer,
    ) -> Result<M, Error> {
        let answer = M::decode(first.answer.as_slice()).map_err(|_| {
            vault::Error::Storage(store::Error::Corruption(
                "a remembered request's answer does not decode".into(),
            ))
        })?;
        self.vault.record_replay(audit, first).await?;
        Ok(answer)
    }

    async fn tokenize_inner(
        &self,
        call: &Call,
        request: pb::TokenizeRequest,
    ) -> Result<pb::TokenizeResponse, Error> {
        let policy = self.settings.policy.current();
        let grants = policy.grants(&call.client);
        grants.require_action(Action::Tokenize).map_err(denied)?;
        check_count(request.items.len(), &self.settings.limits, "items")?;
        let ttls: Vec<[u8; 8]> = request
            .items
            .iter()
            .map(|item| item.ttl_seconds.to_be_bytes())
            .collect();
        let request_key = self.request_key(
            call,
            &request.request_id,
            request.items.iter().zip(&ttls).flat_map(|(item, ttl)| {
                [
                    item.field_type.as_bytes(),
                    item.value.as_bytes(),
                    item.subject_id.as_bytes(),
                    ttl.as_slice(),
                ]
            }),
        )?;

        let mut split = Split::with_capacity(request.items.len());
        for mut item in request.items {
            // Move the value out of the prost message at once, so the only
            // copy is the zeroizing one.
            let value = SecretValue::new(std::mem::take(&mut item.value));
            split.push(self.field_type(&item.field_type).and_then(|field_type| {
                let new = NewValue {
                    field_type,
                    value,
                    subject: parse_subject(&item.subject_id)?,
                    ttl_seconds: (item.ttl_seconds > 0).then_some(item.ttl_seconds),
                };
                grants.permit_tokenize(new).map_err(|d| denied_item(&d))
            }));
        }
        let (items, refused) = split.counts();
        // Called even when every item was refused here: the vault records
        // the call's audit event either way.
        // Handing back a deterministic value's existing token says which
        // token the value has: that is what lookup: grants.
        let existing = |field_type: &FieldType| {
            grants
                .permit_field(act::Lookup, field_type)
                .inspect_err(log_denial)
        };
        let audit = call.audit(items, refused);
        let new_request = match self.prior(request_key).await? {
            Some(Prior::Answered(first)) => {
                return self.replay(&audit, &first).await;
            }
            Some(Prior::New(request)) => Some(request),
            None => None,
        };
        let passed = split.take_passed();
        let answer = |results: &[Result<Token, vault::ItemError>]| {
            pb::TokenizeResponse {
                results: split.merge_ref(
                    results,
                    |token| tokenize_result(pb::tokenize_result::Result::Token(token.to_string())),
                    |e| tokenize_result(pb::tokenize_result::Result::Error(e)),
                ),
            }
            .encode_to_vec()
        };
        let remember = new_request.as_ref().map(|request| Remember {
            request,
            answer: &answer,
        });
        let stored = self
            .vault
            .tokenize(passed, existing, &audit, remember)
            .await?;
        let results = split.merge(
            stored,
            |token| tokenize_result(pb::tokenize_result::Result::Token(token.to_string())),
            |e| tokenize_result(pb::tokenize_result::Result::Error(e)),
        );
        Ok(pb::TokenizeResponse { results })
    }

    async fn detokenize_inner(
        &self,
        call: &Call,
        request: pb::DetokenizeRequest,
    ) -> Result<pb::DetokenizeResponse, Error> {
        let policy = self.settings.policy.current();
        let grants = policy.grants(&call.client);
        let purpose: Purpose = request
            .purpose
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("{e}")))?;
        // Only a well-formed purpose reaches the audit log.
        call.set_purpose(&purpose);
        grants
            .require_any(&[Action::Detokenize, Action::RevealMasked])
            .map_err(denied)?;
        let purpose = grants.allow_purpose(purpose).map_err(denied)?;
        check_count(request.tokens.len(), &self.settings.limits, "tokens")?;

        let mut split = Split::with_capacity(request.tokens.len());
        for text in &request.tokens {
            split.push(
                text.parse::<Token>()
                    .map_err(|e| item_error(Code::InvalidArgument, e.to_string())),
            );
        }
        let authorize = |field_type: &FieldType| {
            grants
                .permit_reveal(&purpose, field_type, request.masked)
                .inspect_err(log_denial)
        };
        let (items, refused) = split.counts();
        let tokens = split.take_passed();
        let revealed = self
            .vault
            .detokenize(
                &tokens,
                purpose.purpose(),
                authorize,
                &call.audit(items, refused),
            )
            .await?;
        let results = split.merge(
            revealed,
            |r| {
                let form = match r.form {
                    RevealForm::Plain => pb::RevealForm::Plain,
                    RevealForm::Masked => pb::RevealForm::Masked,
                };
                detokenize_result(pb::detokenize_result::Result::Value(pb::RevealedValue {
                    field_type: r.field_type.to_string(),
                    form: form as i32,
                    value: r.value.into_response_string(),
                }))
            },
            |e| detokenize_result(pb::detokenize_result::Result::Error(e)),
        );
        Ok(pb::DetokenizeResponse { results })
    }

    async fn lookup_inner(
        &self,
        call: &Call,
        request: pb::LookupTokensRequest,
    ) -> Result<pb::LookupTokensResponse, Error> {
        let policy = self.settings.policy.current();
        let grants = policy.grants(&call.client);
        grants.require_action(Action::Lookup).map_err(denied)?;
        check_count(request.items.len(), &self.settings.limits, "items")?;
        let mut split = Split::with_capacity(request.items.len());
        for mut item in request.items {
            let value = SecretValue::new(std::mem::take(&mut item.value));
            split.push(self.field_type(&item.field_type).and_then(|field_type| {
                let lookup = LookupValue {
                    field_type,
                    value,
                    subject: parse_subject(&item.subject_id)?,
                };
                grants.permit_lookup(lookup).map_err(|d| denied_item(&d))
            }));
        }
        let (items, refused) = split.counts();
        let found = self
            .vault
            .lookup(split.take_passed(), &call.audit(items, refused))
            .await?;
        let results = split.merge(
            found,
            |token| lookup_result(pb::lookup_result::Result::Token(token.to_string())),
            |e| lookup_result(pb::lookup_result::Result::Error(e)),
        );
        Ok(pb::LookupTokensResponse { results })
    }
}

fn tokenize_result(result: pb::tokenize_result::Result) -> pb::TokenizeResult {
    pb::TokenizeResult {
        result: Some(result),
    }
}

fn detokenize_result(result: pb::detokenize_result::Result) -> pb::DetokenizeResult {
    pb::DetokenizeResult {
        result: Some(result),
    }
}

fn lookup_result(result: pb::lookup_result::Result) -> pb::LookupResult {
    pb::LookupResult {
        result: Some(result),
    }
}

/// An optional subject id: empty means none.
fn parse_subject(id: &str) -> Result<Option<SubjectId>, pb::ItemError> {
    if id.is_empty() {
        return Ok(None);
    }
    id.parse()
        .map(Some)
        .map_err(|e: crate::vault::SubjectIdError| item_error(Code::InvalidArgument, e.to_string()))
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

impl<S: Store> TokenVaultService<S> {
    /// Runs one handler: identity, request id, the audit event of a refused
    /// call (an allowed one is audited by the vault, with its data), and the
    /// request's log line.
    async fn handle<T, R>(
        &self,
        method: &'static str,
        items: usize,
        request: Request<T>,
        handler: impl AsyncFnOnce(&Call, T) -> Result<R, Error>,
    ) -> Result<Response<R>, Status> {
        let request_id = new_request_id();
        let mut log = CallLog {
            method,
            request_id: request_id.clone(),
            client: None,
            items,
            started: Instant::now(),
        };
        let (result, call) = match caller(&request) {
            Ok(client) => {
                log.client = Some(client.to_string());
                let call = Call {
                    client,
                    request_id: request_id.clone(),
                    method,
                    purpose: OnceLock::new(),
                };
                (handler(&call, request.into_inner()).await, Some(call))
            }
            Err(e) => (Err(e), None),
        };
        // A refused call reveals and changes nothing: it is counted, and the
        // counts are audited in aggregate (see `refusals`), not synced one by
        // one before the answer.
        if let Err(e) = &result
            && let Some(outcome) = e.refusal_outcome()
        {
            let (identity, purpose) = match &call {
                Some(call) => (call.client.to_string(), call.purpose()),
                None => ("-".to_owned(), None),
            };
            self.settings
                .refusals
                .count(&identity, method, outcome, purpose.as_deref());
        }
        if let Err(e) = &result {
            match e {
                Error::Denied(_) => self.metrics.denial("policy"),
                Error::Unauthenticated(_) => self.metrics.denial("identity"),
                _ => {}
            }
        }
        let result = result.map(Response::new).map_err(Status::from);
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        self.metrics.request(
            method,
            crate::metrics::code_name(code),
            log.started.elapsed(),
        );
        log.finish(&result);
        result
    }
}

#[tonic::async_trait]
impl<S: Store> TokenVault for TokenVaultService<S> {
    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let items = request.get_ref().items.len();
        self.handle("Tokenize", items, request, async |call, r| {
            self.tokenize_inner(call, r).await
        })
        .await
    }

    async fn detokenize(
        &self,
        request: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let items = request.get_ref().tokens.len();
        self.handle("Detokenize", items, request, async |call, r| {
            self.detokenize_inner(call, r).await
        })
        .await
    }

    async fn lookup_tokens(
        &self,
        request: Request<pb::LookupTokensRequest>,
    ) -> Result<Response<pb::LookupTokensResponse>, Status> {
        let items = request.get_ref().items.len();
        self.handle("LookupTokens", items, request, async |call, r| {
            self.lookup_inner(call, r).await
        })
        .await
    }
}
