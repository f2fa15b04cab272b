//! The `tokenvault.v1.Admin` service: online backups, key rotation and the
//! jobs that follow it.

use std::path::PathBuf;

use tonic::{Request, Response, Status};

use super::{Call, Error, TokenVaultService, denied};
use crate::{
    authz::{Action, act},
    crypto::{MasterKeySetting, Pkcs11Setting},
    proto::v1::{self as pb, admin_server::Admin},
    store::Store,
    vault,
};

impl<S: Store> TokenVaultService<S> {
    async fn backup_inner(
        &self,
        call: &Call,
        request: pb::CreateBackupRequest,
    ) -> Result<pb::BackupInfo, Error> {
        let policy = self.settings.policy.current();
        let grants = policy.grants(&call.client);
        let path = std::path::PathBuf::from(&request.path);
        if !path.is_absolute() {
            return Err(Error::InvalidArgument("path must be absolute".into()));
        }
        // Authorised before the path is looked at: a caller without
        // admin:backup learns nothing about the server's files.
        let permit = grants
            .permit_global(act::AdminBackup, path)
            .map_err(denied)?;
        if permit.item().exists() {
            return Err(Error::InvalidArgument(
                "path exists already; a backup goes to a new directory".into(),
            ));
        }
        let backup = self.vault.backup(permit, &call.audit(1, 0)).await?;
        tracing::info!(
            path = %backup.path.display(),
            audit.seq = backup.audit_seq,
            bytes = backup.bytes,
            "backup written"
        );
        Ok(pb::BackupInfo {
            path: backup.path.display().to_string(),
            audit_seq: backup.audit_seq,
            bytes: backup.bytes,
        })
    }
}

impl<S: Store> TokenVaultService<S> {
    async fn report_inner(
        &self,
        call: &Call,
        request: pb::ProcessingReportRequest,
    ) -> Result<pb::ProcessingReportResponse, Error> {
        let policy = self.settings.policy.current();
        let grants = policy.grants(&call.client);
        let format = crate::report::Format::from_name(&request.format)
            .ok_or_else(|| Error::InvalidArgument("format must be json, md or html".into()))?;
        let bound = |name: &'static str, text: String| {
            crate::report::check_bound(name, (!text.is_empty()).then_some(text))
                .map_err(|e| Error::InvalidArgument(e.to_string()))
        };
        let period = crate::report::Period {
            since: bound("since", request.since)?,
            until: bound("until", request.until)?,
        };
        let permit = grants
            .permit_global(
                act::AuditRead,
                vault::ReportQuery {
                    period,
                    policy: std::sync::Arc::clone(&policy),
                },
            )
            .map_err(denied)?;
        let report = self
            .vault
            .processing_report(permit, &call.audit(1, 0))
            .await?;
        let (body, content_type) = format.render(&report);
        Ok(pb::ProcessingReportResponse {
            content_type: content_type.to_owned(),
            body,
        })
    }
}

impl<S: Store> TokenVaultService<S> {
    async fn rotate_inner(
        &self,
        call: &Call,
        _request: pb::RotateKeysRequest,
    ) -> Result<pb::RotateKeysResponse, Error> {
        let permit = self.keys_permit(call, ())?;
        let version = self
            .vault
            .rotate_data_key(permit, &call.audit(1, 0))
            .await?;
        Ok(pb::RotateKeysResponse { version })
    }
}

impl<S: Store> TokenVaultService<S> {
    async fn rotate_master_inner(
        &self,
        call: &Call,
        request: pb::RotateMasterKeyRequest,
    ) -> Result<pb::RotateMasterKeyResponse, Error> {
        let policy = self.settings.policy.current();
        let grants = policy.grants(&call.client);
        // Authorised before the request is looked at: a caller without
        // admin:keys learns nothing about the server's files or modules.
        grants.require_action(Action::AdminKeys).map_err(denied)?;
        let setting = self.new_master_key(request)?;
        let permit = grants
            .permit_global(act::AdminKeys, setting)
            .map_err(denied)?;
        let count = self
            .vault
            .rotate_master_key(permit, &call.audit(1, 0))
            .await?;
        Ok(pb::RotateMasterKeyResponse {
            keys_rewrapped: u32::try_from(count).unwrap_or(u32::MAX),
        })
    }
}

impl<S: Store> TokenVaultService<S> {
    /// Where a rotation's new master key is: a key file, or a key in a
    /// token of a module this vault may load.
    fn new_master_key(
        &self,
        request: pb::RotateMasterKeyRequest,
    ) -> Result<MasterKeySetting, Error> {
        let absolute = |field: &str, path: &str| {
            let path = PathBuf::from(path);
            if path.is_absolute() {
                Ok(path)
            } else {
                Err(Error::InvalidArgument(format!(
                    "{field} must be an absolute path on the server"
                )))
            }
        };
        match (request.new_key_file.is_empty(), request.new_pkcs11_key) {
            (false, None) => Ok(MasterKeySetting::File(absolute(
                "new_key_file",
                &request.new_key_file,
            )?)),
            (true, Some(key)) => {
                let module = absolute("new_pkcs11_key.module", &key.module)?;
                if !self.settings.pkcs11_modules.contains(&module) {
                    return Err(Error::InvalidArgument(
                        "new_pkcs11_key.module is not a module this vault may load: list it in keys.allowed_pkcs11_modules".into(),
                    ));
                }
                for (field, value) in [
                    ("new_pkcs11_key.token_label", &key.token_label),
                    ("new_pkcs11_key.key_label", &key.key_label),
                ] {
                    if value.trim().is_empty() {
                        return Err(Error::InvalidArgument(format!("{field} is required")));
                    }
                }
                Ok(MasterKeySetting::Pkcs11(Pkcs11Setting {
                    module,
                    token_label: key.token_label,
                    key_label: key.key_label,
                    pin_file: absolute("new_pkcs11_key.pin_file", &key.pin_file)?,
                }))
            }
            _ => Err(Error::InvalidArgument(
                "set exactly one of new_key_file and new_pkcs11_key".into(),
            )),
        }
    }

    async fn rotate_index_inner(
        &self,
        call: &Call,
        _request: pb::RotateIndexKeyRequest,
    ) -> Result<pb::RotateIndexKeyResponse, Error> {
        let permit = self.keys_permit(call, ())?;
        let version = self
            .vault
            .rotate_index_key(permit, &call.audit(1, 0))
            .await?;
        Ok(pb::RotateIndexKeyResponse { version })
    }

    async fn list_jobs_inner(
        &self,
        call: &Call,
        _request: pb::ListJobsRequest,
    ) -> Result<pb::ListJobsResponse, Error> {
        let permit = self.keys_permit(call, ())?;
        let jobs = self.vault.jobs(permit, &call.audit(1, 0)).await?;
        Ok(pb::ListJobsResponse {
            jobs: jobs.iter().map(job_status).collect(),
        })
    }

    async fn set_job_paused_inner(
        &self,
        call: &Call,
        request: pb::SetJobPausedRequest,
    ) -> Result<pb::JobStatus, Error> {
        let job = match pb::Job::try_from(request.job) {
            Ok(pb::Job::Reencrypt) => vault::Job::Reencrypt,
            Ok(pb::Job::Reindex) => vault::Job::Reindex,
            _ => {
                return Err(Error::InvalidArgument(
                    "job must be JOB_REENCRYPT or JOB_REINDEX".into(),
                ));
            }
        };
        let permit = self.keys_permit(
            call,
            vault::JobHold {
                job,
                paused: request.paused,
            },
        )?;
        let status = self.vault.set_job_paused(permit, &call.audit(1, 0)).await?;
        Ok(job_status(&status))
    }

    fn keys_permit<T>(
        &self,
        call: &Call,
        item: T,
    ) -> Result<crate::authz::Permit<act::AdminKeys, T>, Error> {
        self.settings
            .policy
            .current()
            .grants(&call.client)
            .permit_global(act::AdminKeys, item)
            .map_err(denied)
    }
}

fn job_status(status: &vault::JobStatus) -> pb::JobStatus {
    pb::JobStatus {
        job: match status.job {
            vault::Job::Reencrypt => pb::Job::Reencrypt,
            vault::Job::Reindex => pb::Job::Reindex,
        } as i32,
        pending: status.pending,
        paused: status.paused,
        visited: status.done,
        total: status.total,
    }
}

#[tonic::async_trait]
impl<S: Store> Admin for TokenVaultService<S> {
    async fn rotate_index_key(
        &self,
        request: Request<pb::RotateIndexKeyRequest>,
    ) -> Result<Response<pb::RotateIndexKeyResponse>, Status> {
        self.handle("RotateIndexKey", 1, request, async |call, r| {
            self.rotate_index_inner(call, r).await
        })
        .await
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.handle("ListJobs", 1, request, async |call, r| {
            self.list_jobs_inner(call, r).await
        })
        .await
    }

    async fn set_job_paused(
        &self,
        request: Request<pb::SetJobPausedRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        self.handle("SetJobPaused", 1, request, async |call, r| {
            self.set_job_paused_inner(call, r).await
        })
        .await
    }

    async fn processing_report(
        &self,
        request: Request<pb::ProcessingReportRequest>,
    ) -> Result<Response<pb::ProcessingReportResponse>, Status> {
        self.handle("ProcessingReport", 1, request, async |call, r| {
            self.report_inner(call, r).await
        })
        .await
    }

    async fn rotate_master_key(
        &self,
        request: Request<pb::RotateMasterKeyRequest>,
    ) -> Result<Response<pb::RotateMasterKeyResponse>, Status> {
        self.handle("RotateMasterKey", 1, request, async |call, r| {
            self.rotate_master_inner(call, r).await
        })
        .await
    }

    async fn rotate_keys(
        &self,
        request: Request<pb::RotateKeysRequest>,
    ) -> Result<Response<pb::RotateKeysResponse>, Status> {
        self.handle("RotateKeys", 1, request, async |call, r| {
            self.rotate_inner(call, r).await
        })
        .await
    }

    async fn create_backup(
        &self,
        request: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<pb::BackupInfo>, Status> {
        self.handle("CreateBackup", 1, request, async |call, r| {
            self.backup_inner(call, r).await
        })
        .await
    }
}
