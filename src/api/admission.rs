//! Admission: whether a request is read at all.
//!
//! A tower layer in front of every service on the mTLS port. It runs before
//! tonic decodes a message, so a caller without a usable identity, over its
//! limits, or arriving while the server is full costs the vault a header
//! parse, not a 4 MiB decode and a durable write:
//!
//! 1. the connection's identity (a certificate without one is refused,
//!    `UNAUTHENTICATED`);
//! 2. `limits.max_concurrent_requests` for the whole server, then the
//!    identity's own rate and concurrency (`RESOURCE_EXHAUSTED`, with
//!    `retry-after-ms`);
//! 3. while the body streams in, `limits.max_request_buffer_mib`: request
//!    bytes received but not yet decoded, across every request. A request
//!    that would go over is refused (`RESOURCE_EXHAUSTED`) rather than
//!    waited for, so large requests cannot deadlock each other.
//!
//! Refusals are counted in the [`RefusalLog`], which writes one audit event
//! per identity, method, outcome and purpose per interval: a flood of
//! refused calls cannot fill the volume with synced events.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Status, body::Body};

use super::{Limited, Limiter, refusals::RefusalLog};
use crate::{audit::Outcome, identity::Peer, metrics::Metrics, shared::Shared};

/// Bytes per unit of the request buffer budget (a semaphore counts `u32`s).
const BUDGET_UNIT: usize = 1024;

/// What admission checks against, shared by every connection.
pub struct Admission {
    /// The per-identity limits in force (replaced on reload).
    pub limiter: Arc<Shared<Limiter>>,
    /// Requests in flight on the whole server.
    concurrent: Arc<Semaphore>,
    max_concurrent: usize,
    /// Request bytes received and not yet decoded, in [`BUDGET_UNIT`]s.
    buffer: Arc<Semaphore>,
    buffer_units: usize,
    /// Where refusals are counted.
    pub refusals: Arc<RefusalLog>,
    metrics: Arc<Metrics>,
}

impl Admission {
    /// Admission with these limits.
    pub fn new(
        limiter: Arc<Shared<Limiter>>,
        max_concurrent: usize,
        buffer_bytes: usize,
        refusals: Arc<RefusalLog>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let buffer_units = (buffer_bytes / BUDGET_UNIT).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            limiter,
            concurrent: Arc::new(Semaphore::new(max_concurrent)),
            max_concurrent,
            buffer: Arc::new(Semaphore::new(buffer_units)),
            buffer_units,
            refusals,
            metrics,
        }
    }

    /// Decides on one request from its headers and connection alone.
    fn admit(&self, request: &http::Request<Body>) -> Result<Admitted, Status> {
        let method = method_name(request.uri().path());
        let peer = request.extensions().get::<Peer>();
        let identity = match peer.map(|p| p.identity.as_ref()) {
            Some(Ok(identity)) => identity.clone(),
            Some(Err(e)) => {
                self.refuse("-", method, Outcome::Unauthenticated, "identity");
                return Err(super::status::unauthenticated(Some(e)));
            }
            None => {
                self.refuse("-", method, Outcome::Unauthenticated, "identity");
                return Err(super::status::unauthenticated(None));
            }
        };
        let Ok(server_slot) = Arc::clone(&self.concurrent).try_acquire_owned() else {
            self.refuse(
                &identity.to_string(),
                method,
                Outcome::ResourceExhausted,
                "server_busy",
            );
            return Err(limited(Limited {
                message: format!(
                    "the server has {} requests in flight (limits.max_concurrent_requests); retry shortly",
                    self.max_concurrent
                ),
                retry_after_ms: 50,
            }));
        };
        let identity_slot = match self.limiter.current().admit(&identity.to_string()) {
            Ok(slot) => slot,
            Err(refused) => {
                self.refuse(
                    &identity.to_string(),
                    method,
                    Outcome::ResourceExhausted,
                    "rate_limit",
                );
                return Err(limited(refused));
            }
        };
        Ok(Admitted {
            _server_slot: server_slot,
            _identity_slot: identity_slot,
        })
    }

    fn refuse(&self, identity: &str, method: &str, outcome: Outcome, reason: &'static str) {
        self.metrics.denial(reason);
        self.refusals.count(identity, method, outcome, None);
    }
}

/// The permits an admitted request holds until its response is ready.
struct Admitted {
    _server_slot: OwnedSemaphorePermit,
    _identity_slot: Option<OwnedSemaphorePermit>,
}

fn limited(refused: Limited) -> Status {
    super::status::limited_status(refused)
}

/// The RPC method of a gRPC path (`/tokenvault.v1.TokenVault/Tokenize` →
/// `Tokenize`); paths are not attacker-sized here (h2 bounds headers), and
/// only known methods reach a handler.
/// What refusals count a request's `:path` as: the method's name if the
/// server answers that RPC, else [`UNKNOWN_METHOD`]. The path is the
/// caller's to choose, before any routing: counted as written, each new
/// path would be a new key in the refusal log and a new audit event.
fn method_name(path: &str) -> &str {
    if known_methods().contains(path) {
        path.rsplit('/').next().unwrap_or(UNKNOWN_METHOD)
    } else {
        UNKNOWN_METHOD
    }
}

/// The method name refusals of paths the server does not answer count under.
pub const UNKNOWN_METHOD: &str = "(unknown)";

/// Every RPC this port answers, as `/package.Service/Method`: read once
/// from the descriptor sets the server registers (its own services, health
/// and reflection), so the list cannot drift from the services.
fn known_methods() -> &'static std::collections::HashSet<String> {
    static KNOWN: std::sync::OnceLock<std::collections::HashSet<String>> =
        std::sync::OnceLock::new();
    KNOWN.get_or_init(|| {
        use prost::Message;
        [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ]
        .into_iter()
        .filter_map(|bytes| prost_types::FileDescriptorSet::decode(bytes).ok())
        .flat_map(|set| set.file)
        .flat_map(|file| {
            let package = file.package().to_owned();
            file.service.into_iter().flat_map(move |service| {
                let prefix = format!("/{package}.{}/", service.name());
                service
                    .method
                    .into_iter()
                    .map(move |method| format!("{prefix}{}", method.name()))
            })
        })
        .collect()
    })
}

/// The tower layer that puts [`Admission`] in front of a service.
#[derive(Clone)]
pub struct AdmissionLayer(pub Arc<Admission>);

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = AdmissionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdmissionService {
            inner,
            admission: Arc::clone(&self.0),
        }
    }
}

/// See [`AdmissionLayer`].
#[derive(Clone)]
pub struct AdmissionService<S> {
    inner: S,
    admission: Arc<Admission>,
}

impl<S> tower::Service<http::Request<Body>> for AdmissionService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let admitted = match self.admission.admit(&request) {
            Ok(admitted) => admitted,
            Err(status) => return Box::pin(std::future::ready(Ok(status.into_http()))),
        };
        let (parts, body) = request.into_parts();
        let body = Body::new(Budgeted {
            inner: body,
            buffer: Arc::clone(&self.admission.buffer),
            buffer_units: self.admission.buffer_units,
            held: None,
        });
        // The service that was polled ready serves this call; a clone takes
        // its place for the next (the usual tower pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = inner.call(http::Request::from_parts(parts, body)).await;
            drop(admitted);
            response
        })
    }
}

/// A request body that takes each data frame's size from the shared buffer
/// budget as it arrives, and gives it back when the body is dropped (tonic
/// drops it once the message is decoded).
struct Budgeted {
    inner: Body,
    buffer: Arc<Semaphore>,
    buffer_units: usize,
    held: Option<OwnedSemaphorePermit>,
}

impl HttpBody for Budgeted {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref() {
            let units = data.len().div_ceil(BUDGET_UNIT);
            let permit = u32::try_from(units)
                .ok()
                .and_then(|n| Arc::clone(&self.buffer).try_acquire_many_owned(n).ok());
            let Some(permit) = permit else {
                return Poll::Ready(Some(Err(super::status::buffer_full(
                    (self.buffer_units * BUDGET_UNIT) >> 20,
                ))));
            };
            match &mut self.held {
                Some(held) => held.merge(permit),
                None => self.held = Some(permit),
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_served_methods_and_nothing_a_caller_makes_up() {
        assert_eq!(
            method_name("/tokenvault.v1.TokenVault/Tokenize"),
            "Tokenize"
        );
        assert_eq!(
            method_name("/tokenvault.v1.Subjects/EraseSubject"),
            "EraseSubject"
        );
        assert_eq!(method_name("/grpc.health.v1.Health/Check"), "Check");
        assert_eq!(
            method_name("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            "ServerReflectionInfo"
        );
        let long = format!("/x/{}", "a".repeat(8192));
        for made_up in [
            "/tokenvault.v1.TokenVault/Tokenize2",
            "/x/Tokenize",
            "/Tokenize",
            "",
            long.as_str(),
        ] {
            assert_eq!(method_name(made_up), UNKNOWN_METHOD, "{made_up:.40}");
        }
    }
}
