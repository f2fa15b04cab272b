//! The `tokenvault.v1.Audit` service: the audit trail, streamed.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{Call, Error, TokenVaultService, denied};
use crate::{
    authz::act,
    proto::v1::{self as pb, audit_server::Audit},
    store::Store,
};

/// The most events one call returns.
const MAX_EVENTS: usize = 10_000;

/// The stream of StreamEvents.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::AuditRecord, Status>> + Send>>;

impl<S: Store> TokenVaultService<S> {
    async fn events_inner(
        &self,
        call: &Call,
        request: pb::StreamEventsRequest,
    ) -> Result<EventStream, Error> {
        let policy = self.settings.policy.current();
        let grants = policy.grants(&call.client);
        let limit = match request.limit {
            0 => MAX_EVENTS,
            n => usize::try_from(n).unwrap_or(MAX_EVENTS).min(MAX_EVENTS),
        };
        let identity = (!request.identity.is_empty()).then_some(request.identity);
        let permit = grants
            .permit_global(
                act::AuditRead,
                crate::vault::EventsQuery {
                    from_seq: request.from_seq,
                    identity,
                    limit,
                },
            )
            .map_err(denied)?;
        let events = self.vault.audit_events(permit, &call.audit(1, 0)).await?;
        let records: Vec<Result<pb::AuditRecord, Status>> = events
            .into_iter()
            .map(|e| {
                let hex = |bytes: &[u8]| data_encoding::HEXLOWER.encode(bytes);
                Ok(pb::AuditRecord {
                    seq: e.seq,
                    hash: hex(&e.hash),
                    event_json: e.json,
                    prev: e.prev.map(|prev| hex(&prev)).unwrap_or_default(),
                    checkpoint: e.checkpoint.map(|cp| pb::AuditCheckpoint {
                        time_ms: cp.time_ms,
                        signature: hex(&cp.signature),
                    }),
                    pruned: e.pruned.map(|marker| pb::AuditPruned {
                        seq: marker.seq,
                        head: hex(&marker.head),
                        time_ms: marker.time_ms,
                        signature: hex(&marker.signature),
                    }),
                    newest_checkpoint: e.newest_checkpoint.map(|cp| pb::AuditNewestCheckpoint {
                        seq: cp.seq,
                        head: hex(&cp.head),
                        time_ms: cp.time_ms,
                        signature: hex(&cp.signature),
                    }),
                })
            })
            .collect();
        Ok(Box::pin(tokio_stream::iter(records)))
    }
}

#[tonic::async_trait]
impl<S: Store> Audit for TokenVaultService<S> {
    type StreamEventsStream = EventStream;

    async fn stream_events(
        &self,
        request: Request<pb::StreamEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.handle("StreamEvents", 1, request, async |call, r| {
            self.events_inner(call, r).await
        })
        .await
    }
}
