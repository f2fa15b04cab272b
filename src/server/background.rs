//! The vault's background loops: signing audit checkpoints, writing the
//! counts of refused calls, pruning old audit events, purging expired
//! values, and running key-rotation jobs. Each runs on a timer until the
//! server stops, logs what it did, and never takes the server down.
//!
//! Replicas sharing a database each flush their own refusal counts and load
//! keys the others added; the jobs that touch the whole vault (checkpoints,
//! pruning, key-rotation jobs, retention sweeps) run only in the replica
//! that [leads](Store::leads_background_jobs) at that turn.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinHandle};

use crate::{
    api::RefusalLog,
    authz::SharedPolicy,
    config::Config,
    metrics::{JobState, Metrics},
    store::Store,
    vault::{self, Vault},
};

/// How often the key-rotation jobs get a turn.
const JOB_TICK: Duration = Duration::from_secs(1);

/// Records one job step visits at most (one write through the committer).
const JOB_PAGE: usize = 1000;

/// Steps a job takes per turn before the other jobs get theirs.
const JOB_STEPS_PER_TURN: usize = 20;

/// How often keys added by other processes sharing the store (rotations
/// through another replica) are loaded, so that new values here use them too.
const KEY_REFRESH_EVERY: Duration = Duration::from_secs(5);

/// How often the policy in force is compared with the one last recorded in
/// the audit trail (a reload puts a new one in force).
const POLICY_CHECK_EVERY: Duration = Duration::from_secs(1);

/// How often old audit events are pruned, when `audit.retention_days` is set.
const AUDIT_PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The loops of one running server; [`Background::stop`] waits for them.
pub struct Background {
    tasks: Vec<JoinHandle<()>>,
}

impl Background {
    /// Starts every loop; they stop when `stop` changes. The policy in
    /// force must have been recorded already (`Vault::record_policy_load`):
    /// the loop records the ones reloads bring.
    pub fn start<S: Store>(
        vault: &Arc<Vault<S>>,
        metrics: &Arc<Metrics>,
        refusals: &Arc<RefusalLog>,
        policy: &Arc<SharedPolicy>,
        config: &Config,
        stop: &watch::Receiver<bool>,
    ) -> Self {
        let mut tasks = Vec::new();
        // Records each policy a reload puts in force (every replica records
        // its own).
        let (v, p) = (Arc::clone(vault), Arc::clone(policy));
        let recorded = Arc::new(std::sync::Mutex::new(Some(policy.current().hash())));
        tasks.push(every(POLICY_CHECK_EVERY, stop.clone(), move || {
            record_policy(Arc::clone(&v), Arc::clone(&p), Arc::clone(&recorded))
        }));
        // Signs the audit chain's head now and then.
        let v = Arc::clone(vault);
        tasks.push(every(
            config.audit_checkpoint_interval,
            stop.clone(),
            move || sign_checkpoint(Arc::clone(&v)),
        ));
        // Loads keys another replica added.
        let v = Arc::clone(vault);
        tasks.push(every(KEY_REFRESH_EVERY, stop.clone(), move || {
            let vault = Arc::clone(&v);
            async move { vault.refresh_keys().await }
        }));
        // Writes the counts of refused calls, one event per identity, method,
        // outcome and purpose.
        let (v, r) = (Arc::clone(vault), Arc::clone(refusals));
        tasks.push(every(
            config.audit_refusal_interval,
            stop.clone(),
            move || {
                let (vault, refusals) = (Arc::clone(&v), Arc::clone(&r));
                async move { flush_refusals(&vault, &refusals).await }
            },
        ));
        // Prunes audit events past their retention, up to a signed checkpoint.
        if let Some(retention) = config.audit_retention {
            let v = Arc::clone(vault);
            tasks.push(every(AUDIT_PRUNE_EVERY, stop.clone(), move || {
                prune_audit(Arc::clone(&v), retention)
            }));
        }
        // Runs the key-rotation jobs (re-encryption, re-indexing) a page at a
        // time, from where they stopped (also across restarts), unless held.
        let (v, m) = (Arc::clone(vault), Arc::clone(metrics));
        tasks.push(every(JOB_TICK, stop.clone(), move || {
            run_jobs(Arc::clone(&v), Arc::clone(&m))
        }));
        // Purges expired values, and forgets request ids past their window.
        let (v, m) = (Arc::clone(vault), Arc::clone(metrics));
        tasks.push(every(
            config.retention_sweep_interval,
            stop.clone(),
            move || sweep(Arc::clone(&v), Arc::clone(&m)),
        ));
        Self { tasks }
    }

    /// Waits for every loop to finish (after `stop` changed).
    pub async fn stop(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Records the policy in force if a reload changed it since `recorded`.
async fn record_policy<S: Store>(
    vault: Arc<Vault<S>>,
    policy: Arc<SharedPolicy>,
    recorded: Arc<std::sync::Mutex<Option<[u8; 32]>>>,
) {
    let hash = policy.current().hash();
    let last = *recorded
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if last == Some(hash) {
        return;
    }
    match vault.record_policy_load(&hash).await {
        Ok(()) => {
            *recorded
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(hash);
        }
        Err(e) => tracing::error!(error = %e, "cannot record the policy in force; retrying"),
    }
}

/// Signs the audit chain's head, on the replica that leads.
async fn sign_checkpoint<S: Store>(vault: Arc<Vault<S>>) {
    if !vault.store().leads_background_jobs().await {
        return;
    }
    if let Err(e) = vault.checkpoint_audit().await {
        tracing::error!(error = %e, "cannot sign an audit checkpoint");
    }
}

/// Prunes audit events older than `retention`, on the replica that leads.
async fn prune_audit<S: Store>(vault: Arc<Vault<S>>, retention: Duration) {
    if !vault.store().leads_background_jobs().await {
        return;
    }
    match vault.prune_audit(retention).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(events = n, "pruned audit events past audit.retention_days"),
        Err(e) => tracing::error!(error = %e, "audit pruning failed; retrying later"),
    }
}

/// Runs a page of each key-rotation job, on the replica that leads.
async fn run_jobs<S: Store>(vault: Arc<Vault<S>>, metrics: Arc<Metrics>) {
    if !vault.store().leads_background_jobs().await {
        return;
    }
    for job in vault::Job::ALL {
        run_job(&vault, &metrics, job).await;
    }
}

/// Purges expired values (they are NOT_FOUND already) and forgets request
/// ids past their window, on the replica that leads.
async fn sweep<S: Store>(vault: Arc<Vault<S>>, metrics: Arc<Metrics>) {
    if !vault.store().leads_background_jobs().await {
        return;
    }
    match vault.sweep_expired().await {
        Ok(0) => {}
        Ok(n) => {
            metrics.purged(n);
            tracing::info!(purged = n, "purged expired values");
        }
        Err(e) => tracing::error!(error = %e, "retention sweep failed"),
    }
    match vault.sweep_requests().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            forgotten = n,
            "forgot request ids past limits.request_id_hours"
        ),
        Err(e) => tracing::error!(error = %e, "sweep of request ids failed"),
    }
}

/// Writes the refusals counted since the last flush as audit events; if
/// they cannot be written, they are kept for the next flush.
pub async fn flush_refusals<S: Store>(vault: &Vault<S>, refusals: &RefusalLog) {
    let mut events = refusals.take();
    while !events.is_empty() {
        let rest = events.split_off(events.len().min(REFUSAL_FLUSH_CHUNK));
        if let Err(e) = vault.record_all(&events).await {
            tracing::error!(error = %e, "cannot write the counts of refused calls; kept for the next try");
            events.extend(rest);
            refusals.restore(events);
            return;
        }
        events = rest;
    }
}

/// How many refusal events one write carries at most: a flush of the
/// log's 10,000 keys is twenty writes of a bounded size, not one that is
/// too large to commit and so kept in memory, growing, for ever.
const REFUSAL_FLUSH_CHUNK: usize = 500;

/// Runs `job` every `interval` (the first run at once) until `stop` changes.
fn every<F, Fut>(interval: Duration, mut stop: watch::Receiver<bool>, job: F) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => return,
            }
            job().await;
        }
    })
}

/// Runs up to [`JOB_STEPS_PER_TURN`] pages of `job` (then yields to the
/// other jobs until the next tick), logging and counting what it did.
async fn run_job<S: Store>(vault: &Vault<S>, metrics: &Metrics, job: vault::Job) {
    for _ in 0..JOB_STEPS_PER_TURN {
        let step = match vault.job_step(job, JOB_PAGE).await {
            Ok(step) => step,
            Err(e) => {
                tracing::error!(job = job.name(), error = %e, "key-rotation job step failed; retrying later");
                return;
            }
        };
        if let Ok(status) = vault.job_status(job).await {
            metrics.job(
                job.name(),
                JobState {
                    running: status.pending && !status.paused,
                    paused: status.paused,
                    done: status.done,
                    total: status.total,
                },
                step.moved,
            );
            if step.moved > 0 || step.raced > 0 {
                tracing::info!(
                    job = job.name(),
                    moved = step.moved,
                    raced = step.raced,
                    visited = status.done,
                    total = status.total,
                    "key-rotation job progress"
                );
            }
        }
        if step.finished && step.ran {
            tracing::info!(
                job = job.name(),
                "{}",
                match job {
                    vault::Job::Reencrypt =>
                        "re-encryption finished: every record uses the newest data key",
                    vault::Job::Reindex =>
                        "re-indexing finished: every index entry uses the newest index key",
                }
            );
        }
        if step.finished || !step.ran {
            return;
        }
    }
}
