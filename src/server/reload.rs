//! Certificate and policy reload without a restart: on SIGHUP, and when any
//! watched file changes (Kubernetes swaps a `..data` symlink, so files are
//! compared by what they resolve to, polled; no inotify needed). A new
//! certificate or policy that does not load is refused with a log line and
//! the old one stays in force. New connections use the new certificate;
//! existing ones finish on theirs.

use std::{
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::ServerConfig;
use tokio::sync::watch;

use super::tls::server_config;
use crate::{authz::SharedPolicy, config::Config};

/// The TLS configuration in force, replaceable at run time.
pub struct SharedTls(RwLock<Arc<ServerConfig>>);

impl SharedTls {
    /// Starts with `config`.
    pub fn new(config: Arc<ServerConfig>) -> Self {
        Self(RwLock::new(config))
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(
            &self
                .0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    fn replace(&self, config: Arc<ServerConfig>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
    }
}

/// Device, inode, size and mtime of what a path resolves to now (`None` if
/// it does not resolve): what identifies a file's content cheaply.
type FileId = Option<(u64, u64, u64, i64, i64)>;

fn fingerprint(paths: &[PathBuf]) -> Vec<FileId> {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
        })
        .collect()
}

fn watched(config: &Config) -> Vec<PathBuf> {
    let mut paths = vec![
        config.tls.cert.clone(),
        config.tls.key.clone(),
        config.tls.client_ca.clone(),
    ];
    paths.extend(config.tls.crls.iter().cloned());
    paths.extend(config.source_file.iter().cloned());
    paths
}

/// Reloads the config file (if any) and the TLS files, and puts them in
/// force if they all load. Returns whether anything was replaced.
fn reload(current: &Config, tls: &SharedTls, policy: &SharedPolicy) -> bool {
    let next = match &current.source_file {
        Some(file) => match Config::load(Some(file)) {
            Ok(mut next) => {
                next.source_file = Some(file.clone());
                next
            }
            Err(e) => {
                tracing::error!(error = %e, "refused the new configuration; the old certificate and policy stay in force");
                return false;
            }
        },
        None => current.clone(),
    };
    match server_config(&next.tls) {
        Ok(config) => {
            tls.replace(config);
            policy.replace(next.policy.clone());
            tracing::info!("reloaded the TLS certificate, client CAs, CRLs and policy");
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "refused the new certificate; the old one stays in force");
            false
        }
    }
}

/// Reloads on SIGHUP and whenever a watched file changes, until `stop`.
pub async fn watch_and_reload(
    config: Config,
    tls: Arc<SharedTls>,
    policy: Arc<SharedPolicy>,
    poll: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading on file changes only");
            None
        }
    };
    let paths = watched(&config);
    let mut seen = fingerprint(&paths);
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let signalled = tokio::select! {
            _ = ticker.tick() => false,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            _ = stop.changed() => return,
        };
        let now = fingerprint(&paths);
        if signalled || now != seen {
            seen = now;
            reload(&config, &tls, &policy);
        }
    }
}
