//! The one place errors become gRPC statuses.
//!
//! Request-level failures become a [`Status`]; item-level failures become an
//! `ItemError` inside the response. Internal failures are logged here with
//! their detail and reach the caller as a bare `INTERNAL`.

use tonic::{Code, Status};

use crate::{
    audit::Outcome, authz::Denial, crypto, identity::IdentityError, proto::v1 as pb, store, vault,
};

/// A failure of a whole request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable client identity.
    #[error("{0}")]
    Unauthenticated(IdentityError),
    /// The policy refused the whole request.
    #[error("{0}")]
    Denied(Denial),
    /// The request is malformed; the message says how.
    #[error("{0}")]
    InvalidArgument(String),
    /// The vault failed.
    #[error(transparent)]
    Vault(#[from] vault::Error),
    /// A single-item call failed with this item error (already audited).
    #[error("{}", .0.message)]
    Item(pb::ItemError),
}

impl Error {
    /// How the audit trail records this failure if the request was refused
    /// before the vault acted on it (refusals are counted by the API layer
    /// and audited in aggregate); `None` for failures the vault recorded.
    pub fn refusal_outcome(&self) -> Option<Outcome> {
        match self {
            Error::Unauthenticated(_) => Some(Outcome::Unauthenticated),
            Error::Denied(_) => Some(Outcome::PermissionDenied),
            Error::InvalidArgument(_) => Some(Outcome::InvalidArgument),
            Error::Vault(_) | Error::Item(_) => None,
        }
    }
}

/// The answer to a request a limit refused: `RESOURCE_EXHAUSTED` naming the
/// limit, with a `retry-after-ms` trailer.
pub fn limited_status(limited: super::Limited) -> Status {
    let mut status = Status::resource_exhausted(limited.message);
    if let Ok(value) = limited.retry_after_ms.to_string().parse() {
        status.metadata_mut().insert("retry-after-ms", value);
    }
    status
}

/// The answer to a request with no usable client identity: `error` says
/// why, or no certificate was presented at all.
pub fn unauthenticated(error: Option<&IdentityError>) -> Status {
    match error {
        Some(e) => Status::unauthenticated(e.to_string()),
        None => Status::unauthenticated("no client certificate was presented"),
    }
}

/// The answer to a request whose body would take the server's request
/// buffer past its bound (`mib`).
pub fn buffer_full(mib: usize) -> Status {
    Status::resource_exhausted(format!(
        "the server is receiving {mib} MiB of requests (limits.max_request_buffer_mib); retry shortly"
    ))
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Unauthenticated(e) => Status::unauthenticated(e.to_string()),
            Error::Denied(d) => Status::permission_denied(d.to_string()),
            Error::InvalidArgument(m) => Status::invalid_argument(m),
            Error::Vault(e) => vault_status(e),
            Error::Item(e) => Status::new(Code::from_i32(e.code), e.message),
        }
    }
}

fn vault_status(err: vault::Error) -> Status {
    match err {
        vault::Error::Storage(store::Error::NoSpace(detail)) => {
            tracing::error!(error = %detail, "write refused: storage is full");
            Status::resource_exhausted("storage is full; the write was not applied")
        }
        vault::Error::Storage(store::Error::Unsupported(what)) => Status::failed_precondition(what),
        vault::Error::Storage(store::Error::Closed) => {
            Status::unavailable("the vault is shutting down; retry on another instance")
        }
        vault::Error::Storage(store::Error::Rewound(detail))
        | vault::Error::AuditUnavailable(store::Error::Rewound(detail)) => {
            tracing::error!(error = %detail, "request refused: the database went back in time");
            Status::unavailable(
                "the vault's database went back in time (a restore or a lossy failover), so nothing was revealed or changed; this replica restarts to re-apply the erasure ledger; retry",
            )
        }
        vault::Error::Storage(store::Error::Indeterminate(detail))
        | vault::Error::AuditUnavailable(store::Error::Indeterminate(detail)) => {
            tracing::error!(error = %detail, "the answer to a commit was lost; the write may have been applied");
            Status::unavailable(
                "the storage did not confirm the write, which may have been applied: send the call again with the same request_id to get its answer (without one, a retried Tokenize may make a second token)",
            )
        }
        vault::Error::AuditUnavailable(store::Error::NoSpace(detail)) => {
            tracing::error!(error = %detail, "audit log cannot be written: storage is full");
            Status::resource_exhausted(
                "storage is full: the audit log cannot be written, so nothing was revealed or changed",
            )
        }
        vault::Error::AuditUnavailable(detail) => {
            tracing::error!(error = %detail, "audit log cannot be written; request refused");
            Status::unavailable(
                "the audit log cannot be written, so nothing was revealed or changed; retry later",
            )
        }
        vault::Error::Conflict(message) => Status::aborted(message),
        err @ vault::Error::RequestTooLarge { .. } => Status::resource_exhausted(err.to_string()),
        err @ vault::Error::AuditDamaged(_) => {
            tracing::error!(error = %err, "audit trail damaged");
            Status::data_loss(err.to_string())
        }
        // Paths, modes and token labels, for the admin who asked: no secret.
        err @ (vault::Error::NewMasterKey(_) | vault::Error::MasterKeyMoved) => {
            Status::failed_precondition(err.to_string())
        }
        vault::Error::Crypto(crypto::Error::Hsm(detail)) => {
            tracing::error!(error = %detail, "the HSM holding the master key failed");
            Status::unavailable(
                "the HSM holding the master key is unavailable; nothing was changed; retry later",
            )
        }
        vault::Error::Ledger(detail) => {
            tracing::error!(error = %detail, "erasure refused: the erasure ledger cannot be written");
            Status::unavailable(
                "the erasure ledger cannot be written, so nothing was erased; retry later",
            )
        }
        vault::Error::Storage(detail @ store::Error::Backend(_)) => {
            tracing::error!(error = %detail, "storage write failed");
            Status::unavailable("storage is unavailable; nothing was changed; retry later")
        }
        other => {
            tracing::error!(error = %other, "internal error");
            Status::internal("internal error")
        }
    }
}

/// An item-level error for the response.
pub fn item_error(code: Code, message: impl Into<String>) -> pb::ItemError {
    pb::ItemError {
        code: code_to_proto(code) as i32,
        message: message.into(),
    }
}

/// The item-level error for a vault item failure.
pub fn vault_item_error(err: &vault::ItemError) -> pb::ItemError {
    use vault::ItemError as E;
    let code = match err {
        E::NotFound => Code::NotFound,
        E::DataLoss => Code::DataLoss,
        E::Invalid(_) | E::UnknownFieldType(_) | E::Unformattable(..) => Code::InvalidArgument,
        E::Denied(_) | E::ExistingToken(_) => Code::PermissionDenied,
        E::NotDeterministic(_) => Code::FailedPrecondition,
        E::TokenSpaceExhausted(_) | E::SubjectFull(_) => Code::ResourceExhausted,
        E::ConsentMissing(_) => Code::FailedPrecondition,
        E::ValueTaken(_) => Code::AlreadyExists,
    };
    item_error(code, err.to_string())
}

fn code_to_proto(code: Code) -> pb::Code {
    match code {
        Code::Ok => pb::Code::Ok,
        Code::Cancelled => pb::Code::Cancelled,
        Code::Unknown => pb::Code::Unknown,
        Code::InvalidArgument => pb::Code::InvalidArgument,
        Code::DeadlineExceeded => pb::Code::DeadlineExceeded,
        Code::NotFound => pb::Code::NotFound,
        Code::AlreadyExists => pb::Code::AlreadyExists,
        Code::PermissionDenied => pb::Code::PermissionDenied,
        Code::ResourceExhausted => pb::Code::ResourceExhausted,
        Code::FailedPrecondition => pb::Code::FailedPrecondition,
        Code::Aborted => pb::Code::Aborted,
        Code::OutOfRange => pb::Code::OutOfRange,
        Code::Unimplemented => pb::Code::Unimplemented,
        Code::Internal => pb::Code::Internal,
        Code::Unavailable => pb::Code::Unavailable,
        Code::DataLoss => pb::Code::DataLoss,
        Code::Unauthenticated => pb::Code::Unauthenticated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_codes_have_grpc_numbers() {
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::PermissionDenied,
            Code::DataLoss,
            Code::Unauthenticated,
        ] {
            assert_eq!(code_to_proto(code) as i32, code as i32);
        }
    }

    #[test]
    fn a_database_gone_back_is_unavailable_and_says_so() {
        for error in [
            vault::Error::Storage(store::Error::Rewound(
                "its audit chain ends at event 3".into(),
            )),
            vault::Error::AuditUnavailable(store::Error::Rewound("it lacks erasure 2".into())),
        ] {
            let status = Status::from(Error::Vault(error));
            assert_eq!(status.code(), Code::Unavailable);
            assert!(
                status.message().contains("went back in time"),
                "{}",
                status.message()
            );
            // The detail (event numbers) stays in the log.
            assert!(
                !status.message().contains("event 3"),
                "{}",
                status.message()
            );
        }
    }

    #[test]
    fn internal_errors_carry_no_detail() {
        let status = Status::from(Error::Vault(vault::Error::Storage(
            store::Error::Corruption("block checksum mismatch in /data/000123.sst".into()),
        )));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
        let status = Status::from(Error::Vault(vault::Error::AuditUnavailable(
            store::Error::Backend("IO error: /data/000123.log".into()),
        )));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("/data"));
    }

    #[test]
    fn full_disk_is_resource_exhausted_and_says_storage() {
        let status = Status::from(Error::Vault(vault::Error::Storage(store::Error::NoSpace(
            "x".into(),
        ))));
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("storage"));
    }
}
