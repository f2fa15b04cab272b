//! A throwaway PostgreSQL cluster: initialised in a temporary directory,
//! listening on a unix socket there only, stopped and deleted when dropped.
//! For the tests and `tokenvault bench`, which need a real database and
//! must not depend on one started by hand.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{path::PathBuf, process::Command};

/// The directory of PostgreSQL's server programs, or a panic that says how
/// to install them.
fn server_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/initdb); scripts/install-deps.sh --test installs it"
        )
    })
}

/// A PostgreSQL cluster of its own, stopped when dropped.
pub struct ThrowawayCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl ThrowawayCluster {
    /// Creates and starts a cluster in a new temporary directory.
    ///
    /// # Panics
    /// If PostgreSQL is not installed or does not start: this is for tests
    /// and benchmarks, which cannot go on without it.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Self {
            dir,
            bin: server_bin(),
        };
        if rustix::process::geteuid().is_root() {
            // PostgreSQL refuses to run as root: its own user owns the
            // cluster (the distribution's package creates it).
            let owner = Command::new("id")
                .args(["-u", "postgres"])
                .output()
                .unwrap();
            assert!(
                owner.status.success(),
                "running as root needs the 'postgres' user (created by the postgresql package)"
            );
            let uid: u32 = String::from_utf8_lossy(&owner.stdout)
                .trim()
                .parse()
                .unwrap();
            std::os::unix::fs::chown(cluster.dir.path(), Some(uid), None).unwrap();
        }
        let data = cluster.data();
        cluster.run(
            Command::new(cluster.bin.join("initdb"))
                .args(["--auth=trust", "--username=tokenvault", "--no-sync", "-D"])
                .arg(&data),
        );
        cluster.run(
            Command::new(cluster.bin.join("pg_ctl"))
                .args(["-w", "-s", "-D"])
                .arg(&data)
                .arg("-l")
                .arg(cluster.dir.path().join("server.log"))
                .arg("-o")
                .arg(format!(
                    "-k {} -c listen_addresses='' -c fsync=on -c synchronous_commit=on",
                    cluster.dir.path().display()
                ))
                .arg("start"),
        );
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs `command` as the cluster's owner.
    fn run(&self, command: &mut Command) {
        let mut command = if rustix::process::geteuid().is_root() {
            let mut as_postgres = Command::new("runuser");
            as_postgres
                .args(["-u", "postgres", "--"])
                .arg(command.get_program())
                .args(command.get_args());
            as_postgres
        } else {
            std::mem::replace(command, Command::new("true"))
        };
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The connection string of database `name`.
    pub fn conninfo(&self, name: &str) -> String {
        format!(
            "host={} user=tokenvault dbname={name}",
            self.dir.path().display()
        )
    }

    /// Creates database `name`.
    ///
    /// # Panics
    /// If the cluster refuses.
    pub async fn create_database(&self, name: &str) {
        let admin = super::connect(&self.conninfo("postgres")).await.unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
    }
}

impl Drop for ThrowawayCluster {
    fn drop(&mut self) {
        let data = self.data();
        self.run(
            Command::new(self.bin.join("pg_ctl"))
                .args(["-s", "-m", "immediate", "-D"])
                .arg(&data)
                .arg("stop"),
        );
    }
}
