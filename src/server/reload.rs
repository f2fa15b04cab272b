//! Reload without a restart: on SIGHUP, and when any watched file changes
//! (Kubernetes swaps a `..data` symlink, so files are compared by what they
//! resolve to, polled; no inotify needed).
//!
//! What reloads: the TLS certificate and key, client CAs, CRLs and
//! `tls.trust_domains`; the policy; the per-identity limits. Every other
//! setting takes effect only at start, so a new config file that changes one
//! is refused whole, with a log line naming the keys, rather than applied in
//! part while the log says "reloaded". The TLS files reload on their own
//! even when the config file is broken or refused, so a new CRL is never
//! held back by an unrelated mistake.
//!
//! After a reload, and at every poll, open connections whose client
//! certificate a new handshake would refuse (revoked, expired, from a CA no
//! longer trusted) are closed.

use std::{os::unix::fs::MetadataExt, path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::watch;

use super::tls::{Connections, TlsState, tls_state};
use crate::{
    api::Limiter,
    authz::SharedPolicy,
    config::{Config, RawConfig},
    shared::Shared,
};

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

/// The settings a reload puts in force, with the TOML paths they live at.
const RELOADABLE: [&[&str]; 6] = [
    &["tls"],
    &["policy"],
    // The purposes' declarations travel with the policy.
    &["purposes"],
    &["limits", "per_identity_concurrency"],
    &["limits", "per_identity_rate"],
    &["limits", "per_identity_burst"],
];

/// The keys whose change needs a restart: every setting outside
/// [`RELOADABLE`] that differs between `old` and `new`.
fn restart_only_changes(old: &RawConfig, new: &RawConfig) -> Vec<String> {
    let (Ok(mut old), Ok(mut new)) = (toml::Value::try_from(old), toml::Value::try_from(new))
    else {
        return vec!["(the configuration could not be compared)".into()];
    };
    for path in RELOADABLE {
        for value in [&mut old, &mut new] {
            remove_path(value, path);
        }
    }
    let mut changed = Vec::new();
    diff("", &old, &new, &mut changed);
    changed
}

fn remove_path(value: &mut toml::Value, path: &[&str]) {
    match path {
        [] => {}
        [last] => {
            if let Some(table) = value.as_table_mut() {
                table.remove(*last);
            }
        }
        [first, rest @ ..] => {
            if let Some(inner) = value.get_mut(*first) {
                remove_path(inner, rest);
            }
        }
    }
}

fn diff(prefix: &str, old: &toml::Value, new: &toml::Value, out: &mut Vec<String>) {
    match (old.as_table(), new.as_table()) {
        (Some(old), Some(new)) => {
            let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
            for key in keys {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                match (old.get(key), new.get(key)) {
                    (Some(a), Some(b)) => diff(&path, a, b, out),
                    _ => out.push(path),
                }
            }
        }
        _ if old != new => out.push(prefix.to_owned()),
        _ => {}
    }
}

/// What a reload replaces.
pub struct Reloadable {
    /// The TLS material and trust domains.
    pub tls: Arc<Shared<TlsState>>,
    /// The access policy.
    pub policy: Arc<SharedPolicy>,
    /// The per-identity limiter.
    pub limiter: Arc<Shared<Limiter>>,
    /// Open connections, closed when their certificate is no longer accepted.
    pub connections: Arc<Connections>,
}

impl Reloadable {
    /// Reloads the config file (if any) and the TLS files. Returns the
    /// configuration in force afterwards.
    fn reload(&self, current: &Config) -> Config {
        let accepted = match &current.source_file {
            Some(file) => match Config::load(Some(file)) {
                Ok(next) => {
                    let changed = restart_only_changes(&current.raw, &next.raw);
                    if changed.is_empty() {
                        Some(next)
                    } else {
                        tracing::error!(
                            keys = %changed.join(", "),
                            "refused the new configuration: these settings take effect only on restart; nothing from it was applied (the TLS files reload on their own)"
                        );
                        None
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "refused the new configuration; the policy and limits in force stay (the TLS files reload on their own)");
                    None
                }
            },
            None => None,
        };
        let in_force = accepted.as_ref().unwrap_or(current);
        match tls_state(&in_force.tls, &in_force.trust_domains) {
            Ok(state) => {
                self.tls.replace(state);
                tracing::info!("reloaded the TLS certificate, client CAs, CRLs and trust domains");
            }
            Err(e) => {
                tracing::error!(error = %e, "refused the new TLS files; the ones in force stay");
            }
        }
        if let Some(next) = &accepted {
            self.policy.replace(next.policy.clone());
            self.limiter.replace(Limiter::new(next.identity_limits));
            tracing::info!("reloaded the policy and per-identity limits");
        }
        let closed = self.connections.close_refused(&self.tls.current());
        if closed > 0 {
            tracing::warn!(
                connections = closed,
                "closed connections whose client certificate is no longer accepted"
            );
        }
        accepted.unwrap_or_else(|| current.clone())
    }
}

/// Starts listening for SIGHUP. Call it before the server says it is
/// ready: until a handler is installed, SIGHUP's default action ends the
/// process, so an operator's reload right after start would kill the vault.
pub fn listen_for_hangup() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading on file changes only");
            None
        }
    }
}

/// Reloads on `hangup` (see [`listen_for_hangup`]) and whenever a watched
/// file changes, until `stop`. At every poll, closes connections whose
/// certificate has expired since.
pub async fn watch_and_reload(
    config: Config,
    state: Reloadable,
    poll: Duration,
    mut hangup: Option<tokio::signal::unix::Signal>,
    mut stop: watch::Receiver<bool>,
) {
    let mut config = config;
    let mut paths = watched(&config);
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
            config = state.reload(&config);
            paths = watched(&config);
            seen = fingerprint(&paths);
        } else {
            let closed = state.connections.close_refused(&state.tls.current());
            if closed > 0 {
                tracing::warn!(
                    connections = closed,
                    "closed connections whose client certificate expired"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use figment::{
        Figment,
        providers::{Format, Serialized, Toml},
    };

    use super::*;

    fn raw(extra: &str) -> RawConfig {
        Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::string(extra))
            .extract()
            .unwrap()
    }

    #[test]
    fn only_settings_that_need_a_restart_are_reported() {
        let base = raw("[limits]\nper_identity_rate = 5.0\n");
        let reloadable = raw(
            "[limits]\nper_identity_rate = 50.0\n[tls]\ntrust_domains = [\"a.example\"]\n[[policy]]\nidentity = \"cn:x\"\n",
        );
        assert!(restart_only_changes(&base, &reloadable).is_empty());
        let restart = raw(
            "[limits]\nper_identity_rate = 5.0\nmax_message_bytes = 2048\n[server]\nlisten = \"127.0.0.1:1\"\n",
        );
        assert_eq!(
            restart_only_changes(&base, &restart),
            vec!["limits.max_message_bytes", "server.listen"]
        );
    }
}
