//! Test harness: a real `tokenvault` server process on port 0, over real
//! mTLS, with certificates made by the test and its log captured.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex, mpsc},
    time::Duration,
};

pub mod softhsm;

use time::OffsetDateTime;
use tokenvault::{
    client::{self, ClientTls, TokenVaultClient},
    pki::{Ca, ClientSpec, Issued},
    proto::v1::{DetokenizeRequest, DetokenizeResponse, TokenizeItem},
};
use tonic::transport::Channel;

/// How long a server may take to start (a debug build opening RocksDB).
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub const TRUST_DOMAIN: &str = "test.tokenvault.local";

/// The policy every test server runs with.
pub const POLICY: &str = r#"
[[policy]]
identity = "spiffe://test.tokenvault.local/support"
scopes = ["tokenize:*", "detokenize:*", "lookup:*"]
purposes = ["customer_support", "order_fulfilment", "marketing"]

[[policy]]
identity = "spiffe://test.tokenvault.local/privacy"
scopes = ["subject:export", "subject:erase", "subject:history", "consent:read", "consent:write", "update:*", "delete:*", "admin:backup", "admin:keys"]
purposes = ["subject_access_request"]

[[policy]]
identity = "spiffe://test.tokenvault.local/auditor"
scopes = ["audit:read"]

[[policy]]
identity = "spiffe://test.tokenvault.local/masked-reader"
scopes = ["reveal_masked:*"]
purposes = ["customer_support"]

[[policy]]
identity = "spiffe://test.tokenvault.local/checkout"
scopes = ["tokenize:*"]

[[policy]]
identity = "spiffe://test.tokenvault.local/email-reader"
scopes = ["tokenize:email", "tokenize:phone", "detokenize:email"]
purposes = ["customer_support"]

[[policy]]
identity = "dns:*.billing.internal"
scopes = ["tokenize:*"]
"#;

pub fn spiffe(name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/{name}")
}

/// A test CA and the client certificates tests use, written to a directory.
pub struct Pki {
    pub ca: Ca,
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Self {
        let ca = Ca::new("tokenvault test CA").unwrap();
        std::fs::create_dir_all(dir.join("clients")).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
        let server = ca
            .issue_server(&["localhost"], &["127.0.0.1".parse().unwrap()])
            .unwrap();
        write_issued(&dir.join("server"), &server);
        let pki = Self {
            ca,
            dir: dir.to_owned(),
        };
        for name in [
            "support",
            "checkout",
            "email-reader",
            "stranger",
            "masked-reader",
            "privacy",
            "auditor",
        ] {
            pki.client(name, &ClientSpec::spiffe(&spiffe(name)));
        }
        pki
    }

    /// Issues a client certificate `name` as `spec` says, signed by this CA.
    pub fn client(&self, name: &str, spec: &ClientSpec) -> ClientTls {
        let issued = self.ca.issue_client(spec).unwrap();
        self.save_client(name, &issued)
    }

    /// Writes an issued certificate as client `name`.
    pub fn save_client(&self, name: &str, issued: &Issued) -> ClientTls {
        write_issued(&self.dir.join("clients").join(name), issued);
        self.tls(name)
    }

    pub fn tls(&self, name: &str) -> ClientTls {
        ClientTls {
            ca: self.dir.join("ca.pem"),
            cert: self.dir.join("clients").join(format!("{name}.pem")),
            key: self.dir.join("clients").join(format!("{name}.key")),
            server_name: "localhost".into(),
        }
    }

    pub fn expired(&self, name: &str) -> ClientTls {
        let mut spec = ClientSpec::spiffe(&spiffe("support"));
        let now = OffsetDateTime::now_utc();
        spec.not_before = now - time::Duration::days(30);
        spec.not_after = now - time::Duration::days(1);
        self.client(name, &spec)
    }
}

fn write_issued(stem: &Path, issued: &Issued) {
    std::fs::write(stem.with_extension("pem"), &issued.cert_pem).unwrap();
    std::fs::write(stem.with_extension("key"), &issued.key_pem).unwrap();
}

/// A running `tokenvault serve` child process.
pub struct TestVault {
    pub root: tempfile::TempDir,
    pub pki: Pki,
    pub grpc_addr: SocketAddr,
    pub health_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    child: Option<Child>,
    /// The log lines so far, and a signal for each new one.
    logs: Arc<(Mutex<Vec<String>>, Condvar)>,
    /// The thread reading the server's stderr; it ends when the server exits.
    reader: Option<std::thread::JoinHandle<()>>,
    extra_config: String,
    extra_tls: String,
    /// Environment variables the server process gets.
    pub env: Vec<(String, String)>,
    /// Arguments after `serve --config <path>`.
    pub serve_args: Vec<String>,
    /// The body of the config's `[keys]` table (a master key file by
    /// default; an HSM key in the HSM tests).
    pub keys: String,
}

impl TestVault {
    /// Starts a vault with the standard policy.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Starts a vault with extra keys in its `[tls]` table.
    pub fn start_with_tls(extra_tls: &str) -> Self {
        let mut vault = Self::prepare("");
        vault.extra_tls = extra_tls.to_owned();
        vault.write_config();
        vault.spawn().expect("the test vault did not start");
        vault
    }

    /// Starts a vault with extra TOML in its config and extra keys in its
    /// `[tls]` table.
    pub fn start_with_config_and_tls(extra_config: &str, extra_tls: &str) -> Self {
        let mut vault = Self::prepare(extra_config);
        vault.extra_tls = extra_tls.to_owned();
        vault.write_config();
        vault.spawn().expect("the test vault did not start");
        vault
    }

    /// The server's resident memory now, in bytes (`VmRSS`).
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        kib * 1024
    }

    /// The server process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the vault is running").id()
    }

    /// Starts a vault with extra TOML appended to the generated config
    /// (before the policy, so top-level keys and tables both work).
    pub fn start_with(extra_config: &str) -> Self {
        let mut vault = Self::prepare(extra_config);
        vault.write_config();
        vault.spawn().expect("the test vault did not start");
        vault
    }

    /// Starts a vault after `setup` has prepared its directory (e.g. mounted
    /// a small filesystem where the data directory goes).
    pub fn start_after(setup: impl FnOnce(&TestVault)) -> Self {
        Self::start_with_after("", setup)
    }

    /// [`TestVault::start_with`] after `setup` has prepared its directory.
    pub fn start_with_after(extra_config: &str, setup: impl FnOnce(&TestVault)) -> Self {
        let mut vault = Self::prepare(extra_config);
        setup(&vault);
        vault.write_config();
        vault.spawn().expect("the test vault did not start");
        vault
    }

    /// A vault directory with certificates and a master key, not started:
    /// change it, then `write_config` and `spawn`.
    pub fn prepare(extra_config: &str) -> Self {
        let root = tempfile::tempdir().unwrap();
        let pki = Pki::new(&root.path().join("tls"));
        let master = root.path().join("master.key");
        tokenvault::crypto::MasterKey::create_file(&master).unwrap();
        Self {
            root,
            pki,
            grpc_addr: "0.0.0.0:0".parse().unwrap(),
            health_addr: "0.0.0.0:0".parse().unwrap(),
            metrics_addr: "0.0.0.0:0".parse().unwrap(),
            child: None,
            logs: Arc::new((Mutex::new(Vec::new()), Condvar::new())),
            reader: None,
            extra_config: extra_config.to_owned(),
            extra_tls: String::new(),
            env: Vec::new(),
            serve_args: Vec::new(),
            keys: "master_key_file = \"master.key\"\n".to_owned(),
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.root.path().join("tokenvault.toml")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// Writes the config file from the vault's settings.
    pub fn write_config(&self) {
        // The ledger setting joins a [subjects] table the test brings, if any.
        const LEDGER: &str = "erasure_ledger = \"ledger/erasures\"\n";
        let (extra, subjects) = if self
            .extra_config
            .contains("[subjects.erasure_ledger_database]")
        {
            // The test keeps the ledger in a database.
            (self.extra_config.clone(), String::new())
        } else if self.extra_config.contains("[subjects]\n") {
            (
                self.extra_config
                    .replacen("[subjects]\n", &format!("[subjects]\n{LEDGER}"), 1),
                String::new(),
            )
        } else {
            (self.extra_config.clone(), format!("[subjects]\n{LEDGER}"))
        };
        let config = format!(
            r#"data_dir = "data"
{extra}
[server]
listen = "127.0.0.1:0"
health_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
shutdown_grace_seconds = 10

[tls]
cert = "tls/server.pem"
key = "tls/server.key"
client_ca = "tls/ca.pem"
{extra_tls}

[keys]
{keys}
[log]
format = "json"
level = "info"
{POLICY}
{subjects}"#,
            extra_tls = self.extra_tls,
            keys = self.keys,
        );
        std::fs::write(self.config_path(), config).unwrap();
    }

    /// Starts the server process and waits for its "serving" log line.
    /// Returns the log lines so far if it exits first.
    pub fn spawn(&mut self) -> Result<(), String> {
        let mut child = tokenvault_command()
            .args(["serve", "--config"])
            .arg(self.config_path())
            .args(&self.serve_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (ready_tx, ready_rx) = mpsc::channel();
        let logs = Arc::clone(&self.logs);
        self.reader = Some(std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let ready = log_event(&line)
                    .filter(|event| event["message"] == "serving")
                    .map(|event| {
                        let addr = |key: &str| event[key].as_str().unwrap_or_default().to_owned();
                        (addr("grpc.addr"), addr("health.addr"), addr("metrics.addr"))
                    });
                // The line is in the log before the test hears that the
                // server serves, so a test can look for it at once.
                logs.0.lock().unwrap().push(line);
                logs.1.notify_all();
                if let Some(ready) = ready {
                    let _ = ready_tx.send(ready);
                }
            }
        }));
        self.child = Some(child);
        match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok((grpc, health, metrics)) => {
                self.grpc_addr = grpc.parse().unwrap();
                self.health_addr = health.parse().unwrap();
                self.metrics_addr = metrics.parse().unwrap();
                Ok(())
            }
            Err(_) => {
                // Exited, or still running but not serving (stopped here,
                // so that a test fails instead of waiting for it forever).
                let child = self.child.as_mut().unwrap();
                let exited = child.try_wait().ok().flatten();
                if exited.is_none() {
                    let _ = child.kill();
                }
                let status = child.wait().ok();
                self.child = None;
                let what = if exited.is_some() {
                    "server exited"
                } else {
                    "server did not serve within the start timeout and was killed"
                };
                Err(format!("{what} ({status:?}); log:\n{}", self.logs()))
            }
        }
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(status.success());
            let exit = child.wait().unwrap();
            self.join_reader();
            assert!(
                exit.success(),
                "server exited with {exit}; log:\n{}",
                self.logs()
            );
        }
    }

    /// Waits for the stderr reader to see end of file: after the server
    /// exits, the captured log is then complete.
    fn join_reader(&mut self) {
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
    }

    /// SIGKILL, no drain.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
            self.join_reader();
        }
    }

    /// Waits up to `within` for the server to exit by itself; its status,
    /// or `None` if it still runs. The log is complete once it has.
    pub async fn wait_for_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                self.join_reader();
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGSTOP: the process stops where it is, its sockets open, as a
    /// paused VM or a long stall would leave it.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`TestVault::freeze`].
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} failed");
    }

    /// Sends SIGHUP and waits for one more log line containing `outcome`.
    pub fn reload_and_wait(&self, outcome: &str) {
        let seen = self.count_log(outcome);
        assert!(
            Command::new("kill")
                .args(["-HUP", &self.pid().to_string()])
                .status()
                .unwrap()
                .success()
        );
        if !self.wait_for_more_logs(outcome, seen) {
            let alive = Command::new("kill")
                .args(["-0", &self.pid().to_string()])
                .status()
                .is_ok_and(|status| status.success());
            panic!(
                "no {outcome:?} after SIGHUP; the server {}",
                if alive { "still runs" } else { "is gone" }
            );
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn().expect("restart failed");
    }

    pub async fn client(&self, name: &str) -> TokenVaultClient<Channel> {
        self.client_with(&self.pki.tls(name)).await
    }

    pub async fn client_with(&self, tls: &ClientTls) -> TokenVaultClient<Channel> {
        client::connect(&self.grpc_addr.to_string(), tls)
            .await
            .unwrap()
    }

    pub async fn channel_with(&self, tls: &ClientTls) -> Result<Channel, client::ClientError> {
        client::channel(&self.grpc_addr.to_string(), tls).await
    }

    /// Everything the server logged so far.
    pub fn logs(&self) -> String {
        self.logs.0.lock().unwrap().join("\n")
    }

    /// How many log lines so far contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.logs
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits (up to 30 s) until more than `seen` log lines contain `needle`.
    pub fn wait_for_more_logs(&self, needle: &str, seen: usize) -> bool {
        let (lines, signal) = &*self.logs;
        let guard = lines.lock().unwrap();
        let count = |lines: &Vec<String>| lines.iter().filter(|l| l.contains(needle)).count();
        let (guard, _) = signal
            .wait_timeout_while(guard, Duration::from_secs(30), |lines| count(lines) <= seen)
            .unwrap();
        count(&guard) > seen
    }

    /// Waits (up to 30 s) until a log line contains `needle`.
    pub fn wait_for_log(&self, needle: &str) -> bool {
        let (lines, signal) = &*self.logs;
        let guard = lines.lock().unwrap();
        let (guard, _) = signal
            .wait_timeout_while(guard, Duration::from_secs(30), |lines| {
                !lines.iter().any(|l| l.contains(needle))
            })
            .unwrap();
        guard.iter().any(|l| l.contains(needle))
    }

    /// Stops the server (so its log is complete) and asserts that none of
    /// `secrets` appears anywhere in it.
    pub fn assert_log_free_of<S: AsRef<str>>(&mut self, secrets: &[S]) {
        self.stop();
        let logs = self.logs();
        assert!(!logs.is_empty(), "no log captured");
        for secret in secrets {
            assert!(
                !logs.contains(secret.as_ref()),
                "the server log contains a secret ({} bytes)",
                secret.as_ref().len()
            );
        }
    }
}

impl Drop for TestVault {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `tokenvault` binary, with a clean environment so no `TOKENVAULT_*`
/// variable of the developer's shell changes the test.
/// Rotates the running vault's master key to a new key file `name` in its
/// root (`keys rotate-master --new-key-file`); what the command printed.
pub async fn rotate_master_to_new_file(vault: &TestVault, name: &str) -> String {
    let new_key = vault.root.path().join(name);
    tokenvault::crypto::MasterKey::create_file(&new_key).unwrap();
    let (ok, out, err) = keys_cli(
        vault,
        &["rotate-master", "--new-key-file", new_key.to_str().unwrap()],
    )
    .await;
    assert!(ok, "{err}");
    out
}

/// The vault's audit public key (hex), as `tokenvault audit public-key`
/// reads it from the running vault's data: what an auditor or a data
/// subject checks signatures with.
pub fn vault_public_key(vault: &TestVault) -> String {
    let (ok, out) = run_cli(&[
        "audit",
        "public-key",
        "--config",
        vault.config_path().to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    out.lines().next().unwrap().trim().to_owned()
}

/// Points `vault`'s config at the master key file `file` (in its root)
/// instead of `master.key`, as an operator does after `keys rotate-master`.
pub fn switch_master_key_file(vault: &TestVault, file: &str) {
    let config = std::fs::read_to_string(vault.config_path()).unwrap();
    let old = "master_key_file = \"master.key\"";
    assert!(config.contains(old), "{config}");
    std::fs::write(
        vault.config_path(),
        config.replace(old, &format!("master_key_file = \"{file}\"")),
    )
    .unwrap();
}

pub fn tokenvault_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tokenvault"));
    command.env_clear();
    if let Ok(path) = std::env::var("PATH") {
        command.env("PATH", path);
    }
    command
}

/// Parses one JSON log line.
pub fn log_event(line: &str) -> Option<serde_json::Value> {
    serde_json::from_str(line).ok()
}

/// Copies a directory tree (a data directory, for backup/restore tests).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// Starts two replicas on database `name` of `cluster`, with their erasure
/// ledger in database `name_ledger` (created here) of the same cluster.
pub async fn postgres_replicas(
    cluster: &tokenvault::store::postgres::cluster::ThrowawayCluster,
    name: &str,
) -> (TestVault, TestVault) {
    let ledger = format!("{name}_ledger");
    cluster.create_database(&ledger).await;
    postgres_replicas_on(&cluster.conninfo(name), &cluster.conninfo(&ledger))
}

/// A client session on database `dbname` of `cluster`, for the test's own
/// reads and edits.
pub async fn pg_session(
    cluster: &tokenvault::store::postgres::cluster::ThrowawayCluster,
    dbname: &str,
) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(&cluster.conninfo(dbname), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    client
}

/// The config of a replica on the database `connection` names, with the
/// erasure ledger in database `ledger`, and `bounds` (keys of
/// `[storage.postgres]`, one per line) added.
pub fn postgres_replica_config(connection: &str, ledger: &str, bounds: &str) -> String {
    format!(
        "[storage]\nengine = \"postgres\"\n[storage.postgres]\nconnection = \"{connection}\"\n{bounds}\
         [subjects.erasure_ledger_database]\nconnection = \"{ledger}\"\n\
         [field_types.customer_email]\nkind = \"email\"\ndeterministic = true\n"
    )
}

/// Starts two replicas on the database `connection` names, the second with
/// the first's master key (the keys in the database are wrapped by it).
pub fn postgres_replicas_on(connection: &str, ledger: &str) -> (TestVault, TestVault) {
    let config = postgres_replica_config(connection, ledger, "");
    let first = TestVault::start_with(&config);
    let second = start_replica_of(&first, &config);
    (first, second)
}

/// Starts a vault with `config` and the master key of `first`.
pub fn start_replica_of(first: &TestVault, config: &str) -> TestVault {
    let key = first.root.path().join("master.key");
    TestVault::start_with_after(config, |second| {
        std::fs::copy(&key, second.root.path().join("master.key")).unwrap();
    })
}

/// What `tokenvault health` says of `vault` now (SERVING, NOT_SERVING, or
/// an error).
pub fn health(vault: &TestVault) -> String {
    // Bounded: a frozen server accepts the connection and never answers.
    let out = Command::new("timeout")
        .arg("10")
        .arg(env!("CARGO_BIN_EXE_tokenvault"))
        .args(["health", "--addr", &vault.health_addr.to_string()])
        .env_clear()
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Waits until `tokenvault health` says `wanted` of `vault`, for at most
/// `within`; returns how long it took, or what it said last.
pub async fn wait_for_health(
    vault: &TestVault,
    wanted: &str,
    within: Duration,
) -> Result<Duration, String> {
    let start = std::time::Instant::now();
    loop {
        let said = health(vault);
        if said == wanted {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            return Err(said);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Tokenize load in the background: each writer tokenizes one new e-mail
/// value at a time and records every acknowledged (token, value).
pub struct Writers {
    acked: Arc<Mutex<Vec<(String, String)>>>,
    /// When each write was acknowledged, in order.
    acked_at: Arc<Mutex<Vec<std::time::Instant>>>,
    failed: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    /// Starts `count` writers on `client`. With `must_succeed`, a failed call
    /// fails the test (for tests that promise no request fails); without, it
    /// ends that writer (for tests that kill the server under them).
    pub fn start(
        client: &TokenVaultClient<Channel>,
        count: usize,
        tag: &str,
        must_succeed: bool,
    ) -> Self {
        let on_failure = if must_succeed {
            OnFailure::Panic
        } else {
            OnFailure::Stop
        };
        Self::start_with(client, count, tag, on_failure)
    }

    /// Starts `count` writers that go on through failed calls (counted, and
    /// tried again after a pause): for tests of a failover under load.
    pub fn start_retrying(client: &TokenVaultClient<Channel>, count: usize, tag: &str) -> Self {
        Self::start_with(client, count, tag, OnFailure::Retry)
    }

    fn start_with(
        client: &TokenVaultClient<Channel>,
        count: usize,
        tag: &str,
        on_failure: OnFailure,
    ) -> Self {
        use tokenvault::proto::v1::{TokenizeItem, TokenizeRequest, tokenize_result};
        let acked = Arc::new(Mutex::new(Vec::new()));
        let acked_at = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handles = (0..count)
            .map(|w| {
                let (mut client, acked, acked_at, stop, failed) = (
                    client.clone(),
                    Arc::clone(&acked),
                    Arc::clone(&acked_at),
                    Arc::clone(&stop),
                    Arc::clone(&failed),
                );
                let tag = tag.to_owned();
                tokio::spawn(async move {
                    for i in 0.. {
                        if stop.load(std::sync::atomic::Ordering::SeqCst) {
                            break;
                        }
                        let value = format!("{tag}.w{w}.i{i}@example.com");
                        let item = TokenizeItem {
                            field_type: "email".into(),
                            value: value.clone(),
                            subject_id: String::new(),
                            ttl_seconds: 0,
                        };
                        // A call that hangs fails (and is retried), so a
                        // regression to unbounded waits fails the test
                        // instead of hanging it.
                        let mut request = tonic::Request::new(TokenizeRequest {
                            items: vec![item],
                            ..Default::default()
                        });
                        request.set_timeout(Duration::from_secs(30));
                        let response = match client.tokenize(request).await {
                            Ok(response) => response,
                            Err(status) => match on_failure {
                                OnFailure::Panic => panic!("a request failed: {status:?}"),
                                OnFailure::Stop => break,
                                OnFailure::Retry => {
                                    failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                    continue;
                                }
                            },
                        };
                        if let Some(tokenize_result::Result::Token(t)) =
                            response.into_inner().results.remove(0).result
                        {
                            // Both under one lock's turn, so the two lists
                            // stay in step.
                            let mut acked = acked.lock().unwrap();
                            acked.push((t, value));
                            acked_at.lock().unwrap().push(std::time::Instant::now());
                        }
                    }
                })
            })
            .collect();
        Self {
            acked,
            acked_at,
            failed,
            stop,
            handles,
        }
    }

    /// How many calls failed (for writers started with `start_retrying`).
    pub fn failed(&self) -> usize {
        self.failed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until at least `n` writes were acknowledged (a count, not a
    /// time); fails the test if that takes longer than two minutes.
    pub async fn wait_for(&self, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let acked = self.acked.lock().unwrap().len();
            if acked >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{acked} writes acknowledged after two minutes, {n} awaited ({} calls failed)",
                self.failed()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How many writes were acknowledged after `since`.
    pub fn acked_since(&self, since: std::time::Instant) -> usize {
        self.acked_at
            .lock()
            .unwrap()
            .iter()
            .filter(|&&t| t > since)
            .count()
    }

    /// When writes resumed after the longest stall since `since`: the
    /// acknowledgement that ended it (a stall still going on ends now).
    pub fn resumed_after_longest_stall(&self, since: std::time::Instant) -> std::time::Instant {
        let at = self.acked_at.lock().unwrap();
        let mut last = since;
        let (mut longest, mut resumed) = (Duration::ZERO, since);
        for &t in at.iter().filter(|&&t| t >= since) {
            if t - last > longest {
                (longest, resumed) = (t - last, t);
            }
            last = t;
        }
        let now = std::time::Instant::now();
        if now - last > longest {
            resumed = now;
        }
        resumed
    }

    /// The longest time between `since` and now in which no write was
    /// acknowledged.
    pub fn longest_stall_since(&self, since: std::time::Instant) -> Duration {
        let at = self.acked_at.lock().unwrap();
        let mut last = since;
        let mut longest = Duration::ZERO;
        for &t in at.iter().filter(|&&t| t >= since) {
            longest = longest.max(t - last);
            last = t;
        }
        longest.max(last.elapsed())
    }

    /// The writes acknowledged so far.
    pub fn acked(&self) -> Vec<(String, String)> {
        self.acked.lock().unwrap().clone()
    }

    /// Stops the writers and returns every acknowledged write; fails the
    /// test if a writer does not stop within a minute.
    pub async fn stop(self) -> Vec<(String, String)> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for handle in self.handles {
            tokio::time::timeout(Duration::from_secs(60), handle)
                .await
                .expect("a writer did not stop within a minute")
                .unwrap();
        }
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

/// What a writer does when a call fails.
#[derive(Clone, Copy)]
enum OnFailure {
    /// Fail the test.
    Panic,
    /// End that writer.
    Stop,
    /// Count it, pause, go on.
    Retry,
}

/// Asserts that every (token, value) detokenizes to its value.
pub async fn assert_all_detokenize(vault: &TestVault, pairs: &[(String, String)]) {
    use tokenvault::proto::v1::{DetokenizeRequest, detokenize_result};
    let mut support = vault.client("support").await;
    for chunk in pairs.chunks(500) {
        let response = support
            .detokenize(DetokenizeRequest {
                tokens: chunk.iter().map(|(t, _)| t.clone()).collect(),
                purpose: "customer_support".into(),
                masked: false,
            })
            .await
            .unwrap()
            .into_inner();
        for ((_, value), result) in chunk.iter().zip(response.results) {
            match result.result {
                Some(detokenize_result::Result::Value(v)) => assert_eq!(&v.value, value),
                other => panic!("an acknowledged write is missing: {other:?}"),
            }
        }
    }
}

/// Stops both sets of writers; every write either acknowledged.
pub async fn stop_writers(first: Writers, second: Writers) -> Vec<(String, String)> {
    let mut acked = first.stop().await;
    acked.extend(second.stop().await);
    acked
}

/// Asserts that every acknowledged write reads through each of `vaults`,
/// and that none of them found its database gone back in time (nothing
/// acknowledged was lost, so none may think so).
pub async fn assert_all_kept(vaults: &[&TestVault], acked: &[(String, String)]) {
    for vault in vaults {
        assert_all_detokenize(vault, acked).await;
        assert!(
            !vault.logs().contains("went back in time"),
            "{}",
            vault.logs()
        );
    }
}

/// The Prometheus text of a vault's metrics port.
pub async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    let (_, body) = response.split_once("\r\n\r\n").unwrap();
    body.to_owned()
}

/// The value of one sample (`name{labels}`) in scraped metrics text.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    find_metric(text, name_and_labels).unwrap_or_else(|| panic!("no {name_and_labels} in\n{text}"))
}

/// The value of one sample, if the text has it (yet).
pub fn find_metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

/// Where a test client installed by `scripts/install-deps.sh --test` is:
/// its virtual environment (`$TV_TOOLS_VENV`, default
/// `~/.cache/tokenvault-venv`), then `PATH`. A missing tool fails the test
/// with one line naming it and the command that installs it; no test is
/// skipped for want of one.
pub fn test_tool(name: &str) -> PathBuf {
    let venv = std::env::var_os("TV_TOOLS_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/tokenvault-venv"))
        });
    let candidates = venv
        .map(|venv| venv.join("bin").join(name))
        .into_iter()
        .chain(
            std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths)
                .map(|dir| dir.join(name))
                .collect::<Vec<_>>(),
        );
    for candidate in candidates {
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("{name} is missing: run `make test-deps` (scripts/install-deps.sh --test installs it)");
}

/// `PATH` with the directory of `tool` first, for shell commands that name
/// it (the README's grpcurl lines).
pub fn path_with(tool: &Path) -> std::ffi::OsString {
    let mut dirs = vec![tool.parent().unwrap().to_owned()];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).unwrap()
}

/// A tokenize item of `field_type` with no subject and no expiry.
pub fn item(field_type: &str, value: &str) -> TokenizeItem {
    subject_item(field_type, value, "")
}

/// A tokenize item of `field_type` that belongs to `subject`.
pub fn subject_item(field_type: &str, value: &str, subject: &str) -> TokenizeItem {
    TokenizeItem {
        field_type: field_type.into(),
        value: value.into(),
        subject_id: subject.into(),
        ttl_seconds: 0,
    }
}

/// Detokenizes `tokens` (plain, not masked) for `purpose`.
pub async fn detokenize(
    client: &mut TokenVaultClient<Channel>,
    tokens: &[String],
    purpose: &str,
) -> Result<DetokenizeResponse, tonic::Status> {
    client
        .detokenize(DetokenizeRequest {
            tokens: tokens.to_vec(),
            purpose: purpose.into(),
            masked: false,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Each result of a detokenize: the value, or the item error's code.
pub fn revealed(response: DetokenizeResponse) -> Vec<Result<String, tokenvault::proto::v1::Code>> {
    use tokenvault::proto::v1::detokenize_result;
    response
        .results
        .iter()
        .map(|r| match &r.result {
            Some(detokenize_result::Result::Value(v)) => Ok(v.value.clone()),
            Some(detokenize_result::Result::Error(e)) => Err(e.code()),
            None => panic!("an empty result"),
        })
        .collect()
}

/// Every event of the audit trail so far, as JSON, read through the Audit
/// service by the auditor.
pub async fn audit_events(vault: &TestVault) -> Vec<serde_json::Value> {
    use tokenvault::proto::v1::StreamEventsRequest;
    let channel = vault.channel_with(&vault.pki.tls("auditor")).await.unwrap();
    let mut stream = tokenvault::proto::v1::audit_client::AuditClient::new(channel)
        .stream_events(StreamEventsRequest {
            from_seq: 1,
            identity: String::new(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(record) = stream.message().await.unwrap() {
        let mut event: serde_json::Value = serde_json::from_str(&record.event_json).unwrap();
        event["seq"] = record.seq.into();
        events.push(event);
    }
    events
}

/// Every field ExportSubject streams for `subject` (for its own request),
/// exported by the `privacy` identity.
pub async fn export_subject(
    vault: &TestVault,
    subject: &str,
) -> Vec<tokenvault::proto::v1::SubjectField> {
    use tokenvault::proto::v1::{ExportSubjectRequest, subjects_client::SubjectsClient};
    let channel = vault.channel_with(&vault.pki.tls("privacy")).await.unwrap();
    let mut stream = SubjectsClient::new(channel)
        .export_subject(ExportSubjectRequest {
            subject_id: subject.into(),
            purpose: "subject_access_request".into(),
            recipient_public_key: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut fields = Vec::new();
    while let Some(field) = stream.message().await.unwrap() {
        fields.push(field);
    }
    fields
}

/// Compiles the C `source` of an `LD_PRELOAD` library (a fault the test
/// injects into the server) into `dir` as `lib<name>.so`, with the C
/// compiler that built RocksDB.
pub fn build_preload(dir: &Path, name: &str, source: &str) -> PathBuf {
    let source_file = dir.join(format!("{name}.c"));
    let library = dir.join(format!("lib{name}.so"));
    std::fs::write(&source_file, source).unwrap();
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&compiler)
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&library)
        .arg(&source_file)
        .arg("-ldl")
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run the C compiler {compiler:?} ({e}); scripts/install-deps.sh installs one"
            )
        });
    assert!(status.success(), "the {name} library did not compile");
    library
}

/// Runs the `tokenvault` binary with `args`: whether it succeeded, and its
/// stdout then stderr.
pub fn run_cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (bool, String) {
    let out = tokenvault_command().args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Tokenizes one value (no subject) and returns its token.
pub async fn tokenize_one(
    client: &mut TokenVaultClient<Channel>,
    field_type: &str,
    value: &str,
) -> String {
    use tokenvault::proto::v1::{TokenizeRequest, tokenize_result};
    let response = client
        .tokenize(TokenizeRequest {
            items: vec![item(field_type, value)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    match &response.results[0].result {
        Some(tokenize_result::Result::Token(token)) => token.clone(),
        other => panic!("tokenize failed: {other:?}"),
    }
}

/// Tokenizes one value of `subject` through `client`; its token.
pub async fn tokenize_one_for(
    client: &mut TokenVaultClient<Channel>,
    field_type: &str,
    value: &str,
    subject: &str,
) -> String {
    use tokenvault::proto::v1::TokenizeRequest;
    let response = client
        .tokenize(TokenizeRequest {
            items: vec![subject_item(field_type, value, subject)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    tokens_of(response).remove(0)
}

/// Erases `subject` through `vault` (as the privacy service): the tokens
/// erased.
pub async fn erase_subject(vault: &TestVault, subject: &str) -> u64 {
    use tokenvault::proto::v1::{EraseSubjectRequest, subjects_client::SubjectsClient};
    let channel = vault.channel_with(&vault.pki.tls("privacy")).await.unwrap();
    SubjectsClient::new(channel)
        .erase_subject(EraseSubjectRequest {
            subject_id: subject.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tokens_erased
}

/// The tokens of a tokenize response whose items all succeeded.
pub fn tokens_of(response: tokenvault::proto::v1::TokenizeResponse) -> Vec<String> {
    use tokenvault::proto::v1::tokenize_result;
    response
        .results
        .into_iter()
        .map(|r| match r.result {
            Some(tokenize_result::Result::Token(t)) => t,
            other => panic!("tokenize failed: {other:?}"),
        })
        .collect()
}

/// `tokenvault keys ARGS` against `vault` as the `privacy` identity (scope
/// admin:keys): whether it succeeded, its stdout and its stderr.
///
/// (See [`connection_args`] for the flags.)
pub async fn keys_cli<S: AsRef<std::ffi::OsStr>>(
    vault: &TestVault,
    args: &[S],
) -> (bool, String, String) {
    let mut command = tokenvault_command();
    command
        .arg("keys")
        .args(args)
        .args(connection_args(vault, "privacy"));
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The flags that point a CLI command at `vault` over mTLS as the test
/// client `identity`: `--addr`, `--ca`, `--cert`, `--key`.
pub fn connection_args(vault: &TestVault, identity: &str) -> Vec<String> {
    let tls = vault.pki.tls(identity);
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    vec![
        "--addr".into(),
        vault.grpc_addr.to_string(),
        "--ca".into(),
        path(&tls.ca),
        "--cert".into(),
        path(&tls.cert),
        "--key".into(),
        path(&tls.key),
    ]
}
