//! Background jobs over every record (re-encryption after a data-key
//! rotation, re-indexing after a blind-index key rotation): one page per
//! step through the group committer, resumable after a restart, pausable,
//! with their progress kept in the store.

use super::{Error, Vault};
use crate::{
    audit::{AuditContext, Outcome},
    authz::{Permit, act},
    layout::{self, JobEntry, MasterWrapped},
    store::{Batch, KeyValues, Store, Table, Unit},
};

/// How often a page's conflicting records are read and tried again before
/// the step gives up on them.
const PAGE_ATTEMPTS: usize = 3;

/// A job that visits every record once after a key rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Job {
    /// Moves records to the newest data key.
    Reencrypt,
    /// Moves blind-index entries to the newest index key, then retires the
    /// older keys.
    Reindex,
}

impl Job {
    /// Every job.
    pub const ALL: [Job; 2] = [Job::Reencrypt, Job::Reindex];

    /// The job's name in logs, metrics and the CLI, and the prefix of its
    /// entries in the `meta` table ([`layout::job_key`]): on disk, so never
    /// rename a released job.
    pub fn name(self) -> &'static str {
        match self {
            Job::Reencrypt => "reencrypt",
            Job::Reindex => "reindex",
        }
    }

    /// Where the job keeps its place (the next record key); present while
    /// the job is due.
    fn cursor_key(self) -> Vec<u8> {
        layout::job_key(self.name(), JobEntry::Cursor)
    }

    /// Records visited, the record count when the job started, records it
    /// could not move in this pass.
    fn progress_key(self) -> Vec<u8> {
        layout::job_key(self.name(), JobEntry::Progress)
    }

    /// Present while an operator holds the job.
    fn paused_key(self) -> Vec<u8> {
        layout::job_key(self.name(), JobEntry::Paused)
    }
}

impl std::str::FromStr for Job {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Job::ALL
            .into_iter()
            .find(|j| j.name() == s)
            .ok_or_else(|| format!("unknown job {s:?}: expected reencrypt or reindex"))
    }
}

/// A job to hold or release.
#[derive(Debug, Clone, Copy)]
pub struct JobHold {
    /// The job.
    pub job: Job,
    /// Hold (true) or release.
    pub paused: bool,
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobStatus {
    /// The job.
    pub job: Job,
    /// Whether it has records left to visit.
    pub pending: bool,
    /// Whether an operator holds it (a job started later starts held too).
    pub paused: bool,
    /// Records visited in the current pass.
    pub done: u64,
    /// Records in the vault when the pass started (an estimate).
    pub total: u64,
}

/// What one step of a job did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobStep {
    /// Records rewritten in this step.
    pub moved: u64,
    /// Records a request kept changing, left for the next pass.
    pub raced: u64,
    /// Whether the job has nothing left to do (or had nothing).
    pub finished: bool,
    /// Whether the step did any work (false when idle or paused).
    pub ran: bool,
    /// Whether the job is held by an operator.
    pub paused: bool,
}

/// The progress value: visited, total, raced (big-endian u64s).
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    done: u64,
    total: u64,
    raced: u64,
}

impl Progress {
    fn decode(bytes: Option<&[u8]>) -> Self {
        let field = |i: usize| {
            bytes
                .and_then(|b| b.get(i * 8..i * 8 + 8))
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_be_bytes)
        };
        Self {
            done: field(0),
            total: field(1),
            raced: field(2),
        }
    }

    fn encode(self) -> Vec<u8> {
        [self.done, self.total, self.raced]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect()
    }
}

impl<S: Store> Vault<S> {
    /// Adds to `unit` what (re)starts `job` from the first record: a
    /// rotation writes it in the same write as the new key, so a key is
    /// never stored without its job.
    pub(super) fn start_job(&self, unit: &mut Unit, job: Job, total: u64) {
        let progress = Progress {
            total,
            ..Progress::default()
        };
        unit.put(Table::Meta, job.cursor_key(), Vec::new()).put(
            Table::Meta,
            job.progress_key(),
            progress.encode(),
        );
    }

    /// Where `job` stands.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn job_status(&self, job: Job) -> Result<JobStatus, Error> {
        let (cursor, progress, paused) = self.job_meta(job).await?;
        let pending = cursor.is_some();
        Ok(JobStatus {
            job,
            pending,
            paused,
            done: if pending { progress.done } else { 0 },
            total: if pending {
                progress.total.max(progress.done)
            } else {
                0
            },
        })
    }

    /// Where every job stands, for an operator (the query is audited).
    ///
    /// # Errors
    /// Storage or audit failures.
    pub async fn jobs(
        &self,
        permit: Permit<act::AdminKeys, ()>,
        audit: &AuditContext,
    ) -> Result<Vec<JobStatus>, Error> {
        permit.into_item();
        let mut statuses = Vec::with_capacity(Job::ALL.len());
        for job in Job::ALL {
            statuses.push(self.job_status(job).await?);
        }
        self.record(&audit.event(Outcome::Ok)).await?;
        Ok(statuses)
    }

    /// Holds or releases `job`. A held job keeps its place; a job started
    /// while held waits too. The change is audited.
    ///
    /// # Errors
    /// Storage or audit failures.
    pub async fn set_job_paused(
        &self,
        permit: Permit<act::AdminKeys, JobHold>,
        audit: &AuditContext,
    ) -> Result<JobStatus, Error> {
        let JobHold { job, paused } = permit.into_item();
        let mut batch = Batch::new();
        let unit = batch.unit();
        if paused {
            unit.put(Table::Meta, job.paused_key(), Vec::new());
        } else {
            unit.delete(Table::Meta, job.paused_key());
        }
        unit.append_audit(audit.event(Outcome::Ok).encode());
        self.store
            .commit(batch)
            .await
            .map_err(Error::AuditUnavailable)?;
        tracing::info!(
            job = job.name(),
            paused,
            "{}",
            if paused {
                "job held by an operator"
            } else {
                "job released"
            }
        );
        self.job_status(job).await
    }

    /// Runs `job` over up to `page` records from where it left off. Each
    /// record is replaced only if nobody changed it since it was read (a
    /// record that changed is read again and retried), so a job never
    /// overwrites a request's write and never holds the write path longer
    /// than one group commit.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn job_step(&self, job: Job, page: usize) -> Result<JobStep, Error> {
        // Rotations and steps take turns, so a step never works for a key
        // that a rotation has just replaced.
        let _turn = self.jobs.lock().await;
        let (Some(cursor), mut progress, paused) = self.job_meta(job).await? else {
            return Ok(JobStep {
                finished: true,
                ..JobStep::default()
            });
        };
        // A rotation through another replica sharing the store does not
        // take this process's turn: load the key it may have added (a
        // failure fails the step: it would redo its page forever), and let
        // the step's end fail if a newer one appears meanwhile, so the job
        // never finishes with records under a key it did not know.
        self.load_new_keys().await?;
        let newer_key = match job {
            Job::Reencrypt => MasterWrapped::DataKey.label(self.keyring.active().0 + 1),
            Job::Reindex => {
                MasterWrapped::BlindIndexKey.label(self.keyring.index_keys().version + 1)
            }
        };
        if paused {
            return Ok(JobStep {
                paused: true,
                ..JobStep::default()
            });
        }
        let records = self
            .store
            .scan_from(Table::Records, cursor.clone(), page)
            .await?;
        let finished = records.len() < page;
        progress.done += records.len() as u64;
        let next = records.last().map(|(last, _)| {
            let mut next = last.clone();
            next.push(0);
            next
        });
        let (moved, raced) = self.rewrite_page(job, records).await?;
        progress.raced += raced;

        let restart = finished && progress.raced > 0;
        // Another pass counts its records afresh.
        let total = if restart {
            self.store.estimated_len(Table::Records).await
        } else {
            0
        };
        let mut batch = Batch::new();
        let unit = batch.unit();
        unit.guard_unchanged(Table::Meta, job.cursor_key(), cursor)
            .guard_absent(Table::Keys, newer_key);
        match next {
            _ if restart => {
                // Some records kept changing: visit everything once more so
                // none is left on an old key.
                tracing::info!(
                    job = job.name(),
                    raced = progress.raced,
                    "records changed while the job ran; starting another pass"
                );
                self.start_job(unit, job, total);
            }
            Some(next) if !finished => {
                unit.put(Table::Meta, job.cursor_key(), next).put(
                    Table::Meta,
                    job.progress_key(),
                    progress.encode(),
                );
            }
            _ => {
                unit.delete(Table::Meta, job.cursor_key())
                    .delete(Table::Meta, job.progress_key());
            }
        }
        let outcomes = self.store.commit(batch).await?;
        // The cursor changed under the step, or a newer key appeared (a
        // rotation through another replica, restarting the job): the new
        // pass stands, and the next step loads the key.
        let restarted = outcomes.first().is_some_and(Result::is_err);
        let finished = finished && !restart && !restarted;
        if finished && job == Job::Reindex {
            self.keyring.retire_index_keys(&self.store).await?;
        }
        Ok(JobStep {
            moved,
            raced,
            finished,
            ran: true,
            paused: false,
        })
    }

    /// The job's cursor (present while it is due), progress, and whether it
    /// is held.
    async fn job_meta(&self, job: Job) -> Result<(Option<Vec<u8>>, Progress, bool), Error> {
        let mut meta = self
            .store
            .get_many(
                Table::Meta,
                vec![job.cursor_key(), job.progress_key(), job.paused_key()],
            )
            .await?
            .into_iter();
        let cursor = meta.next().flatten();
        let progress = Progress::decode(meta.next().flatten().as_deref());
        let paused = meta.next().flatten().is_some();
        Ok((cursor, progress, paused))
    }

    /// Rewrites one page's records for `job`, retrying the ones a request
    /// changed meanwhile. Returns (rewritten, still conflicting).
    async fn rewrite_page(&self, job: Job, mut records: KeyValues) -> Result<(u64, u64), Error> {
        let mut moved = 0;
        for _ in 0..PAGE_ATTEMPTS {
            let mut batch = Batch::new();
            let keys = match job {
                Job::Reencrypt => self.reencrypt_units(&records, &mut batch)?,
                Job::Reindex => self.reindex_units(&records, &mut batch).await?,
            };
            if keys.is_empty() {
                return Ok((moved, 0));
            }
            let outcomes = self.store.commit(batch).await?;
            let conflicted: Vec<Vec<u8>> = keys
                .into_iter()
                .zip(&outcomes)
                .filter_map(|(key, outcome)| outcome.is_err().then_some(key))
                .collect();
            moved += (outcomes.len() - conflicted.len()) as u64;
            if conflicted.is_empty() {
                return Ok((moved, 0));
            }
            let fresh = self
                .store
                .get_many(Table::Records, conflicted.clone())
                .await?;
            records = conflicted
                .into_iter()
                .zip(fresh)
                .filter_map(|(key, bytes)| Some((key, bytes?)))
                .collect();
        }
        Ok((moved, records.len() as u64))
    }
}
