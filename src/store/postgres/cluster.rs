//! A throwaway PostgreSQL cluster: initialised in a temporary directory,
//! listening on a unix socket there only, stopped and deleted when dropped.
//! For the tests and `tokenvault bench`, which need a real database and
//! must not depend on one started by hand.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{path::PathBuf, process::Command};

/// The directory of PostgreSQL's server programs, or a panic that says how
/// to install them.
pub fn server_bin() -> PathBuf {
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

/// The process ids of the PostgreSQL server whose data directory is
/// `data`: its postmaster (from `postmaster.pid`) and every process the
/// postmaster started (backends, writers, WAL senders and receivers);
/// empty if none runs there.
pub fn server_pids(data: &std::path::Path) -> Vec<u32> {
    let Some(postmaster) = std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|text| text.lines().next()?.trim().parse::<u32>().ok())
    else {
        return Vec::new();
    };
    let parent_of = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The parent is the second field after the parenthesised name.
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse::<u32>()
            .ok()
    };
    let mut pids = vec![postmaster];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok())
            && parent_of(pid) == Some(postmaster)
        {
            pids.push(pid);
        }
    }
    pids
}

/// A PostgreSQL cluster of its own, stopped when dropped.
pub struct ThrowawayCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// The port of its TCP listener on 127.0.0.1, if it has one.
    tcp_port: Option<u16>,
}

impl ThrowawayCluster {
    /// Creates and starts a cluster in a new temporary directory.
    ///
    /// # Panics
    /// If PostgreSQL is not installed or does not start: this is for tests
    /// and benchmarks, which cannot go on without it.
    pub fn start() -> Self {
        Self::initdb_and_start(&[])
    }

    /// A primary that can stream to standbys (see
    /// [`ThrowawayCluster::standby_of`]); its commits wait for one once
    /// [`ThrowawayCluster::require_synchronous_standby`] says so.
    ///
    /// # Panics
    /// As [`ThrowawayCluster::start`].
    pub fn start_primary() -> Self {
        Self::initdb_and_start(&["-c wal_level=replica", "-c max_wal_senders=4"])
    }

    /// From now on a commit on this primary is acknowledged only once a
    /// standby has it on disk. (Set after the standby is up: before, every
    /// commit would wait for a standby that does not exist.)
    ///
    /// # Panics
    /// If the primary refuses.
    pub async fn require_synchronous_standby(&self) {
        let admin = super::connect(&self.conninfo("postgres")).await.unwrap();
        // One statement each: ALTER SYSTEM refuses to run in a transaction.
        admin
            .batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            .await
            .unwrap();
        admin
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .unwrap();
    }

    /// A streaming standby of `primary`: copied from it (pg_basebackup,
    /// with the settings to follow it) and started.
    ///
    /// # Panics
    /// As [`ThrowawayCluster::start`].
    pub fn standby_of(primary: &ThrowawayCluster) -> Self {
        let cluster = Self::new_dir();
        cluster.run(
            Command::new(cluster.bin.join("pg_basebackup"))
                .args([
                    "-R",
                    "-X",
                    "stream",
                    "--checkpoint=fast",
                    "--no-sync",
                    "-U",
                    "tokenvault",
                    "-h",
                ])
                .arg(primary.dir.path())
                .arg("-D")
                .arg(cluster.data()),
        );
        cluster.pg_ctl_start(&["-c hot_standby=on"]);
        cluster
    }

    fn new_dir() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Self {
            dir,
            bin: server_bin(),
            tcp_port: None,
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
        cluster
    }

    /// A cluster that also listens on 127.0.0.1 (a free port) with TLS,
    /// presenting `cert_pem` (whose key is `key_pem`).
    ///
    /// # Panics
    /// As [`ThrowawayCluster::start`].
    pub fn start_with_tls(cert_pem: &str, key_pem: &str) -> Self {
        let mut cluster = Self::new_dir();
        cluster.run(
            Command::new(cluster.bin.join("initdb"))
                .args(["--auth=trust", "--username=tokenvault", "--no-sync", "-D"])
                .arg(cluster.data()),
        );
        let owner = std::fs::metadata(cluster.data()).unwrap();
        for (name, content) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = cluster.data().join(name);
            std::fs::write(&path, content).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            std::os::unix::fs::chown(
                &path,
                Some(std::os::unix::fs::MetadataExt::uid(&owner)),
                Some(std::os::unix::fs::MetadataExt::gid(&owner)),
            )
            .unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let port_setting = format!("-p {port}");
        cluster.pg_ctl_start(&[
            "-c listen_addresses=127.0.0.1",
            &port_setting,
            "-c ssl=on",
            "-c ssl_cert_file=server.crt",
            "-c ssl_key_file=server.key",
        ]);
        cluster.tcp_port = Some(port);
        cluster
    }

    /// The port of the TCP listener of a cluster made by
    /// [`ThrowawayCluster::start_with_tls`].
    ///
    /// # Panics
    /// If it has none.
    pub fn tcp_port(&self) -> u16 {
        self.tcp_port
            .expect("this cluster listens on a unix socket only")
    }

    fn initdb_and_start(settings: &[&str]) -> Self {
        let cluster = Self::new_dir();
        cluster.run(
            Command::new(cluster.bin.join("initdb"))
                .args(["--auth=trust", "--username=tokenvault", "--no-sync", "-D"])
                .arg(cluster.data()),
        );
        cluster.pg_ctl_start(settings);
        cluster
    }

    fn pg_ctl_start(&self, settings: &[&str]) {
        self.run(
            Command::new(self.bin.join("pg_ctl"))
                .args(["-w", "-s", "-D"])
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.path().join("server.log"))
                .arg("-o")
                .arg(format!(
                    "-k {} -c listen_addresses='' -c fsync=on -c synchronous_commit=on {}",
                    self.dir.path().display(),
                    settings.join(" ")
                ))
                .arg("start"),
        );
    }

    /// The median round trip, in ms, of `n` sequential `SELECT 1`s over a
    /// connection made with `conninfo` (this cluster's, or a proxy's in
    /// front of it).
    ///
    /// # Errors
    /// If it cannot connect or a query fails.
    pub async fn median_round_trip(&self, conninfo: &str, n: usize) -> Result<f64, String> {
        let client = super::connect(conninfo).await.map_err(|e| e.to_string())?;
        let mut trips = Vec::with_capacity(n);
        for _ in 0..n {
            let start = std::time::Instant::now();
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| e.to_string())?;
            trips.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        trips.sort_by(f64::total_cmp);
        Ok(trips.get(n / 2).copied().unwrap_or(f64::NAN))
    }

    /// What the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The directory of the cluster's unix socket (its `host`).
    pub fn socket_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Kills the cluster's postmaster with SIGKILL, as a crash of its
    /// machine would stop it (its backends exit when they notice).
    pub fn kill(&self) {
        let pid_file = std::fs::read_to_string(self.data().join("postmaster.pid")).unwrap();
        let pid = pid_file.lines().next().unwrap().trim().to_owned();
        let status = Command::new("kill").args(["-KILL", &pid]).status().unwrap();
        assert!(status.success(), "cannot kill the postmaster {pid}");
    }

    /// Kills every process of the cluster at once with SIGKILL (the
    /// postmaster and all its children: backends, WAL writer and WAL
    /// senders), as a crash of its machine would stop them. Killing the
    /// postmaster alone would leave its WAL senders shipping WAL for a
    /// while, so even an asynchronous standby would rarely lose anything.
    pub fn crash(&self) {
        // Stopped first, so it starts no process between the listing and
        // the kill; a child that exits meanwhile only makes kill complain.
        let Some(&postmaster) = self.server_pids().first() else {
            panic!("the cluster is not running");
        };
        let _ = Command::new("kill")
            .args(["-STOP", &postmaster.to_string()])
            .status();
        let pids: Vec<String> = self.server_pids().iter().map(u32::to_string).collect();
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(&pids)
            .stderr(std::process::Stdio::null())
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read_to_string(format!("/proc/{postmaster}/stat"))
            .is_ok_and(|stat| !stat.contains(") Z "))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the postmaster survived SIGKILL"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Stops every process of the cluster with SIGSTOP (a standby stalled:
    /// it receives and replays nothing until [`ThrowawayCluster::thaw`]).
    pub fn freeze(&self) {
        self.signal_all("-STOP");
    }

    /// SIGCONT after [`ThrowawayCluster::freeze`].
    pub fn thaw(&self) {
        self.signal_all("-CONT");
    }

    fn signal_all(&self, signal: &str) {
        let pids: Vec<String> = self.server_pids().iter().map(u32::to_string).collect();
        assert!(!pids.is_empty(), "the cluster is not running");
        let status = Command::new("kill")
            .arg(signal)
            .args(&pids)
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pids:?} failed");
    }

    /// The `sync_state` of each standby streaming from this primary
    /// (`sync`, `async`, `potential`, `quorum`).
    ///
    /// # Panics
    /// If the primary does not answer.
    pub async fn sync_states(&self) -> Vec<String> {
        let admin = super::connect(&self.conninfo("postgres")).await.unwrap();
        admin
            .query("SELECT sync_state FROM pg_stat_replication", &[])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    /// Promotes a standby to primary and waits until it takes writes.
    pub fn promote(&self) {
        self.run(
            Command::new(self.bin.join("pg_ctl"))
                .args(["-w", "-s", "-D"])
                .arg(self.data())
                .arg("promote"),
        );
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs `command` as the cluster's owner; panics if it fails.
    fn run(&self, command: &mut Command) {
        let (ok, output) = self.try_run(command);
        assert!(ok, "{command:?} failed: {output}");
    }

    /// Runs `command` as the cluster's owner: whether it succeeded, and
    /// what it printed.
    fn try_run(&self, command: &mut Command) -> (bool, String) {
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
        (
            output.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        )
    }

    /// The connection string of database `name`.
    pub fn conninfo(&self, name: &str) -> String {
        let port = self
            .tcp_port
            .map(|p| format!(" port={p}"))
            .unwrap_or_default();
        format!(
            "host={}{port} user=tokenvault dbname={name}",
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

    /// Backs up database `name` with `pg_dump` (a consistent snapshot, taken
    /// while it is in use); returns the file for
    /// [`ThrowawayCluster::restore_database`].
    ///
    /// # Panics
    /// If `pg_dump` fails.
    pub fn dump_database(&self, name: &str) -> PathBuf {
        let file = self.dir.path().join(format!("{name}.dump"));
        self.run(
            Command::new(self.bin.join("pg_dump"))
                .args(["--format=custom", "--username=tokenvault", "--host"])
                .arg(self.dir.path())
                .args(self.port_args())
                .arg("--file")
                .arg(&file)
                .arg(name),
        );
        file
    }

    /// Replaces database `name` with what `dump` holds: dropped (its
    /// connections ended), created again, restored with `pg_restore`.
    ///
    /// # Panics
    /// If a step fails.
    pub async fn restore_database(&self, name: &str, dump: &std::path::Path) {
        let admin = super::connect(&self.conninfo("postgres")).await.unwrap();
        // Two statements, each its own transaction: neither may run in one.
        for statement in [
            format!("DROP DATABASE {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            admin.batch_execute(&statement).await.unwrap();
        }
        self.run(
            Command::new(self.bin.join("pg_restore"))
                .args(["--single-transaction", "--username=tokenvault", "--host"])
                .arg(self.dir.path())
                .args(self.port_args())
                .args(["--dbname", name])
                .arg(dump),
        );
    }

    /// The process ids of the running server: the postmaster and every
    /// process it started (backends, writers, WAL senders), for measuring
    /// the CPU the database spends.
    pub fn server_pids(&self) -> Vec<u32> {
        server_pids(&self.data())
    }

    fn port_args(&self) -> Vec<String> {
        self.tcp_port
            .map(|port| vec!["--port".to_owned(), port.to_string()])
            .unwrap_or_default()
    }
}

impl Drop for ThrowawayCluster {
    fn drop(&mut self) {
        // A cluster a test stalled (SIGSTOP) must run to be stopped.
        let pids: Vec<String> = self.server_pids().iter().map(u32::to_string).collect();
        if !pids.is_empty() {
            let _ = Command::new("kill")
                .arg("-CONT")
                .args(&pids)
                .stderr(std::process::Stdio::null())
                .status();
        }
        // A cluster a test killed is stopped already.
        let data = self.data();
        let _ = self.try_run(
            Command::new(self.bin.join("pg_ctl"))
                .args(["-s", "-m", "immediate", "-D"])
                .arg(&data)
                .arg("stop"),
        );
    }
}
