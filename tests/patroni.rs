//! The failover under a real HA manager: Patroni with etcd (both from the
//! distribution's packages, installed by `scripts/install-deps.sh
//! --test`), three PostgreSQL members on loopback in synchronous mode,
//! and two vault replicas under load through them. The leader's whole
//! process tree (Patroni and every PostgreSQL process) is killed at once;
//! Patroni elects and promotes the synchronous standby by itself, with no
//! manual promote. Every acknowledged token reads afterwards, and the test
//! prints the time from the kill to the first write acknowledged after it.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{TestVault, Writers, postgres_replica_config, start_replica_of};
use tokenvault::store::postgres::cluster::{server_bin, server_pids};

/// Patroni's leader key lives this long without a renewal: the longest
/// the cluster goes without a leader after its leader dies, before the
/// election. Short, for the test; `loop_wait + 2 × retry_timeout` must
/// stay below it.
const TTL_SECONDS: u32 = 10;

/// A free loopback port for a server started later (PostgreSQL binds its
/// port only after initdb or a base backup, seconds on). Drawn below the
/// kernel's ephemeral range, so that no outgoing connection meanwhile
/// (Patroni to etcd, to its peers) is given it.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Spread over runs by the process id; one range per process.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % 1_000) as u16 * 10;
    loop {
        // 20000 to 31999: below 32768, where the ephemeral range starts.
        let port = 20_000 + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The uid of the `postgres` user, which the members run as (PostgreSQL
/// refuses root), if this test runs as root.
fn postgres_uid() -> Option<u32> {
    if !rustix::process::geteuid().is_root() {
        return None;
    }
    let out = Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .unwrap();
    assert!(out.status.success(), "no 'postgres' user");
    Some(String::from_utf8_lossy(&out.stdout).trim().parse().unwrap())
}

/// A program the test starts, in a process group of its own, killed with
/// the group when dropped; its output goes to `log`.
struct Spawned {
    child: Child,
    log: PathBuf,
}

impl Spawned {
    fn start(command: &mut Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let child = command
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The group's pid, for kill.
    fn group(&self) -> String {
        format!("-{}", self.child.id())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &self.group()])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

/// One Patroni member: its process and its PostgreSQL data directory.
struct Member {
    patroni: Spawned,
    data: PathBuf,
    port: u16,
}

impl Member {
    /// Kills Patroni and every process of its PostgreSQL at once (Patroni
    /// starts PostgreSQL in a session of its own, so its group alone would
    /// leave the database running).
    fn crash(&self) {
        let pids = server_pids(&self.data);
        let postmaster = *pids.first().expect("the leader's PostgreSQL runs");
        let mut targets: Vec<String> = pids.iter().map(u32::to_string).collect();
        targets.push(self.patroni.group());
        // A short-lived backend may be gone before the signal: kill then
        // fails for it alone, so what counts is checked below.
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg("--")
            .args(&targets)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        let gone = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |stat| stat.contains(") Z "))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !(gone(postmaster) && gone(self.patroni.child.id())) {
            assert!(Instant::now() < deadline, "the leader survived SIGKILL");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        // A crashed member's pid file is stale: its pid may be another
        // process's now.
        let is_postgres = |pid: &u32| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains("postgres"))
        };
        let pids: Vec<String> = server_pids(&self.data)
            .iter()
            .filter(|pid| is_postgres(pid))
            .map(u32::to_string)
            .collect();
        if !pids.is_empty() {
            // Some may be gone already (a crashed member's stale pid file).
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(&pids)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// etcd and three Patroni members on loopback, synchronous mode.
struct PatroniCluster {
    members: Vec<Member>,
    // Dropped after the members: they stop before their store does.
    _etcd: Spawned,
    dir: tempfile::TempDir,
}

impl PatroniCluster {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uid = postgres_uid();
        if let Some(uid) = uid {
            std::os::unix::fs::chown(dir.path(), Some(uid), None).unwrap();
        }
        let (client, peer) = (free_port(), free_port());
        let etcd = Spawned::start(
            Command::new("etcd")
                .arg("--data-dir")
                .arg(dir.path().join("etcd"))
                .args(["--name", "etcd0"])
                .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
                .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
                ))
                .arg(format!("--initial-cluster=etcd0=http://127.0.0.1:{peer}")),
            dir.path().join("etcd.log"),
        );
        let members = (0..3)
            .map(|n| Self::member(dir.path(), n, client, uid))
            .collect();
        let cluster = Self {
            members,
            _etcd: etcd,
            dir,
        };
        cluster.wait_until_synchronous().await;
        cluster
    }

    /// Writes member `n`'s configuration and starts its Patroni.
    fn member(dir: &Path, n: usize, etcd: u16, uid: Option<u32>) -> Member {
        let home = dir.join(format!("pg{n}"));
        std::fs::create_dir(&home).unwrap();
        if let Some(uid) = uid {
            std::os::unix::fs::chown(&home, Some(uid), None).unwrap();
        }
        let (port, api) = (free_port(), free_port());
        let data = home.join("data");
        let config = format!(
            r#"scope: tokenvault-test
name: pg{n}
restapi:
  listen: 127.0.0.1:{api}
  connect_address: 127.0.0.1:{api}
etcd3:
  hosts: 127.0.0.1:{etcd}
bootstrap:
  dcs:
    ttl: {TTL_SECONDS}
    loop_wait: 1
    retry_timeout: 3
    synchronous_mode: true
    postgresql:
      use_pg_rewind: false
      parameters:
        synchronous_commit: "on"
        wal_level: replica
        max_wal_senders: 10
        max_replication_slots: 10
        hot_standby: "on"
  initdb:
    - encoding: UTF8
    - no-sync
  pg_hba:
    - local all all trust
    - local replication all trust
    - host all all 127.0.0.1/32 trust
    - host replication all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:{port}
  connect_address: 127.0.0.1:{port}
  data_dir: {data}
  bin_dir: {bin}
  pgpass: {home}/pgpass
  authentication:
    superuser:
      username: tokenvault
      password: not-used-trust-auth
    replication:
      username: replicator
      password: not-used-trust-auth
  parameters:
    unix_socket_directories: {home}
    fsync: "on"
"#,
            data = data.display(),
            bin = server_bin().display(),
            home = home.display(),
        );
        let path = home.join("patroni.yml");
        std::fs::write(&path, config).unwrap();
        let mut command = if uid.is_some() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--", "patroni"]);
            command
        } else {
            Command::new("patroni")
        };
        command.arg(&path);
        Member {
            patroni: Spawned::start(&mut command, dir.join(format!("patroni{n}.log"))),
            data,
            port,
        }
    }

    /// A connection string to `dbname` naming every member, for the one
    /// that takes writes.
    fn conninfo(&self, dbname: &str) -> String {
        let ports: Vec<String> = self.members.iter().map(|m| m.port.to_string()).collect();
        format!(
            "host={} port={} user=tokenvault dbname={dbname} target_session_attrs=read-write sslmode=disable",
            vec!["127.0.0.1"; self.members.len()].join(","),
            ports.join(",")
        )
    }

    async fn connect(&self, dbname: &str) -> Option<tokio_postgres::Client> {
        let (client, connection) =
            tokio_postgres::connect(&self.conninfo(dbname), tokio_postgres::NoTls)
                .await
                .ok()?;
        tokio::spawn(connection);
        Some(client)
    }

    /// Waits (up to two minutes) until a leader takes writes and both
    /// other members stream from it, one of them synchronous.
    async fn wait_until_synchronous(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut states = Vec::new();
        while Instant::now() < deadline {
            if let Some(client) = self.connect("postgres").await
                && let Ok(rows) = client
                    .query(
                        "SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'",
                        &[],
                    )
                    .await
            {
                states = rows.iter().map(|r| r.get::<_, String>(0)).collect();
                states.sort();
                if states == ["async", "sync"] || states == ["potential", "sync"] {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "no leader with a synchronous standby after two minutes (streaming: {states:?}):\n{}",
            self.logs()
        );
    }

    /// The member that takes writes now.
    async fn leader(&self) -> &Member {
        for member in &self.members {
            let conninfo = format!(
                "host=127.0.0.1 port={} user=tokenvault dbname=postgres",
                member.port
            );
            if let Ok((client, connection)) =
                tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await
            {
                tokio::spawn(connection);
                let row = client
                    .query_one("SELECT pg_is_in_recovery()", &[])
                    .await
                    .unwrap();
                if !row.get::<_, bool>(0) {
                    return member;
                }
            }
        }
        panic!("no member takes writes:\n{}", self.logs());
    }

    async fn create_database(&self, name: &str) {
        self.connect("postgres")
            .await
            .unwrap()
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for (n, member) in self.members.iter().enumerate() {
            let log = member.patroni.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            out.push_str(&format!("--- patroni pg{n} (last lines, newest first)\n"));
            out.push_str(&tail.join("\n"));
            out.push('\n');
        }
        out.push_str(&format!("(directory {})", self.dir.path().display()));
        out
    }
}

/// Patroni in synchronous mode; the leader's whole process tree killed
/// under load through two vault replicas; Patroni promotes the
/// synchronous standby by itself. Every acknowledged token reads through
/// both replicas, neither finds the database gone back, and the time from
/// the kill to the first acknowledged write after it is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroni_fails_over_under_load_and_nothing_acknowledged_is_lost() {
    let cluster = PatroniCluster::start().await;
    cluster.create_database("vault").await;
    cluster.create_database("ledger").await;
    let config =
        postgres_replica_config(&cluster.conninfo("vault"), &cluster.conninfo("ledger"), "");
    let a = TestVault::start_with(&config);
    let b = start_replica_of(&a, &config);
    let wa = Writers::start_retrying(&a.client("checkout").await, 4, "a");
    let wb = Writers::start_retrying(&b.client("checkout").await, 4, "b");
    wa.wait_for(100).await;
    wb.wait_for(100).await;

    // Still synchronous when the leader dies.
    cluster.wait_until_synchronous().await;
    let leader = cluster.leader().await;
    let killed_at = Instant::now();
    leader.crash();
    let before = (wa.acked().len(), wb.acked().len());
    wa.wait_for(before.0 + 50).await;
    wb.wait_for(before.1 + 50).await;
    // Writes in flight when the leader died may still be answered just
    // after; the failover is the stall that follows, ended by the first
    // write the new leader acknowledges.
    let resumed = [&wa, &wb]
        .iter()
        .map(|w| w.resumed_after_longest_stall(killed_at))
        .max()
        .unwrap();
    let failed = wa.failed() + wb.failed();
    let acked = common::stop_writers(wa, wb).await;
    eprintln!(
        "Patroni failover: writes through both replicas resumed {:?} after the leader was killed \
         (ttl {TTL_SECONDS} s); {} writes acknowledged, {failed} calls refused meanwhile, \
         all read after it",
        resumed - killed_at,
        acked.len()
    );
    // The leader key's ttl, then an election and a promotion.
    assert!(
        resumed - killed_at < Duration::from_secs(u64::from(TTL_SECONDS) + 10),
        "writes resumed {:?} after the kill",
        resumed - killed_at
    );
    common::assert_all_kept(&[&a, &b], &acked).await;
    assert_ne!(
        cluster.leader().await.port,
        leader.port,
        "the dead leader leads again?"
    );
}
