//! Vault replicas on one PostgreSQL database: two server processes with the
//! same master key and `storage.engine = "postgres"`, over real mTLS, on a
//! throwaway cluster the test starts.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::{
    TestVault, Writers, audit_events, detokenize, erase_subject as erase, export_subject, item,
    postgres_replicas as replicas, revealed, subject_item, tokenize_one, tokens_of,
};
use tokenvault::{proto::v1::TokenizeRequest, store::postgres::cluster::ThrowawayCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_database_serve_the_same_vault() {
    let cluster = ThrowawayCluster::start();
    cluster.create_database("vault").await;
    let (mut a, mut b) = replicas(&cluster, "vault").await;

    // A token minted through one replica is read through the other.
    let mut through_a = a.client("support").await;
    let mut through_b = b.client("support").await;
    let token = tokenize_one(&mut through_a, "email", "replicated@example.com").await;
    let read = detokenize(&mut through_b, &[token], "customer_support")
        .await
        .unwrap();
    assert_eq!(revealed(read), [Ok("replicated@example.com".to_owned())]);

    // One new deterministic value asked for 64 times at once, half through
    // each replica: one token.
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let mut client = if i % 2 == 0 {
                through_a.clone()
            } else {
                through_b.clone()
            };
            tokio::spawn(async move {
                tokens_of(
                    client
                        .tokenize(TokenizeRequest {
                            items: vec![item("customer_email", "once@example.com")],
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner(),
                )
                .remove(0)
            })
        })
        .collect();
    let mut tokens = Vec::new();
    for task in tasks {
        tokens.push(task.await.unwrap());
    }
    tokens.dedup();
    assert_eq!(tokens.len(), 1, "{tokens:?}");

    // A subject's values tokenized through one are exported through the
    // other.
    tokens_of(
        through_a
            .tokenize(TokenizeRequest {
                items: vec![
                    subject_item("email", "ada@example.com", "cust-ada"),
                    subject_item("phone", "+44 20 7946 0958", "cust-ada"),
                ],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner(),
    );
    let mut exported: Vec<String> = export_subject(&b, "cust-ada")
        .await
        .iter()
        .map(|field| field.value.clone())
        .collect();
    exported.sort();
    assert_eq!(exported, ["+442079460958", "ada@example.com"]);

    // The events of both replicas are one chain, read through either.
    let events = audit_events(&a).await;
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "one chain without gaps");
    let method = |e: &serde_json::Value, m: &str| e["method"] == m;
    assert!(events.iter().filter(|e| method(e, "Tokenize")).count() >= 66);
    assert!(events.iter().any(|e| method(e, "ExportSubject")));

    // Online backups are PostgreSQL's business: the call says so.
    let admin = a.channel_with(&a.pki.tls("privacy")).await.unwrap();
    let refused = tokenvault::proto::v1::admin_client::AdminClient::new(admin)
        .create_backup(tokenvault::proto::v1::CreateBackupRequest {
            path: a.root.path().join("backup").display().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("pg_basebackup"), "{refused:?}");
    // Refused before anything is recorded: the trail shows no backup made.
    let backups: Vec<_> = audit_events(&a)
        .await
        .into_iter()
        .filter(|e| e["method"] == "CreateBackup")
        .collect();
    assert!(backups.iter().all(|e| e["outcome"] != "OK"), "{backups:?}");

    a.stop();
    b.stop();
    a.assert_log_free_of(&["replicated@example.com", "ada@example.com"]);
    b.assert_log_free_of(&["replicated@example.com", "ada@example.com"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_in_the_connection_setting_is_refused() {
    let vault = TestVault::start();
    let config = std::fs::read_to_string(vault.config_path()).unwrap();
    let bad = vault.root.path().join("with-password.toml");
    std::fs::write(
        &bad,
        config.replacen(
            "data_dir = \"data\"\n",
            "data_dir = \"data\"\n[storage]\nengine = \"postgres\"\n[storage.postgres]\nconnection = \"host=db user=vault password=hunter2\"\n",
            1,
        ),
    )
    .unwrap();
    let out = common::tokenvault_command()
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("storage.postgres.connection"), "{stderr}");
    assert!(stderr.contains("password_file"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// A vault process killed with SIGKILL mid-load loses nothing it
/// acknowledged: the other process reads every acknowledged token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_load_loses_nothing_it_acknowledged() {
    let cluster = ThrowawayCluster::start();
    cluster.create_database("vault").await;
    let (mut a, b) = replicas(&cluster, "vault").await;
    let writers = Writers::start(&a.client("checkout").await, 8, "killed", false);
    writers.wait_for(300).await;
    a.kill();
    let acked = writers.stop().await;
    assert!(acked.len() >= 300);
    common::assert_all_detokenize(&b, &acked).await;
    // The chain both wrote, one killed mid-transaction, verifies.
    let config = b.config_path();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        common::run_cli(&["audit", "verify", "--config", config.to_str().unwrap()])
    })
    .await
    .unwrap();
    assert!(ok && out.contains("ok: events 1.."), "{out}");
    eprintln!(
        "replica killed: {} acknowledged writes, all read through the other",
        acked.len()
    );
}

/// A data-key rotation through one replica: a value the rotated replica
/// encrypts with the new key is read through the other, which loads the
/// key it did not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_through_one_replica_is_seen_by_the_other() {
    use tokenvault::proto::v1::{RotateKeysRequest, admin_client::AdminClient};
    let cluster = ThrowawayCluster::start();
    cluster.create_database("vault").await;
    let (a, b) = replicas(&cluster, "vault").await;
    let before = tokenize_one(&mut a.client("support").await, "email", "old@example.com").await;
    let admin = a.channel_with(&a.pki.tls("privacy")).await.unwrap();
    let rotated = AdminClient::new(admin)
        .rotate_keys(RotateKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.version, 2);
    let after = tokenize_one(&mut a.client("support").await, "email", "new@example.com").await;
    let read = detokenize(
        &mut b.client("support").await,
        &[before, after],
        "customer_support",
    )
    .await
    .unwrap();
    assert_eq!(
        revealed(read),
        [
            Ok("old@example.com".to_owned()),
            Ok("new@example.com".to_owned())
        ]
    );
    assert!(
        b.wait_for_log("loaded keys another replica added"),
        "{}",
        b.logs()
    );
}

/// The offline tools read a PostgreSQL vault from its config, running or
/// stopped, as they read a RocksDB directory: `audit verify` checks the
/// chain both replicas wrote (and fails on an edited event), `audit
/// export`, `report processing` and `keys list` read the database, and a
/// database that holds no vault is named as such in one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offline_tools_read_a_postgres_vault() {
    let cluster = ThrowawayCluster::start();
    cluster.create_database("vault").await;
    let (mut a, mut b) = replicas(&cluster, "vault").await;
    let mut through_a = a.client("support").await;
    let mut through_b = b.client("support").await;
    let mut tokens = Vec::new();
    for i in 0..5 {
        let client = if i % 2 == 0 {
            &mut through_a
        } else {
            &mut through_b
        };
        tokens.push(
            common::tokenize_one_for(client, "email", &format!("p{i}@example.com"), "cust-off")
                .await,
        );
    }
    detokenize(&mut through_b, &tokens, "customer_support")
        .await
        .unwrap();
    erase(&a, "cust-off").await;
    let config = a.config_path();
    let config = config.to_str().unwrap();

    // On the running vault: one snapshot, whatever the replicas do meanwhile.
    let (ok, out) = tokio::task::spawn_blocking({
        let config = config.to_owned();
        move || common::run_cli(&["audit", "verify", "--config", &config])
    })
    .await
    .unwrap();
    assert!(ok, "{out}");

    a.stop();
    b.stop();
    let (ok, out) = common::run_cli(&["audit", "public-key", "--config", config]);
    assert!(ok, "{out}");
    let public_key = out.lines().next().unwrap().to_owned();
    assert_eq!(public_key.len(), 64, "{out}");
    let (ok, out) = common::run_cli(&[
        "audit",
        "verify",
        "--config",
        config,
        "--public-key",
        &public_key,
    ]);
    assert!(ok, "{out}");
    let events: u64 = out
        .split_once(" events)")
        .and_then(|(before, _)| before.rsplit_once('(')?.1.parse().ok())
        .unwrap_or_else(|| panic!("no event count in {out}"));

    let (ok, out) = common::run_cli(&["audit", "export", "--config", config]);
    assert!(ok, "{out}");
    let exported: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    assert_eq!(exported.len() as u64, events, "{out}");
    let seqs: Vec<u64> = exported
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=events).collect::<Vec<_>>());
    let count = |method: &str| exported.iter().filter(|e| e["method"] == method).count();
    assert_eq!(count("Tokenize"), 5, "{out}");
    assert_eq!(count("EraseSubject"), 1, "{out}");

    let (ok, out) = common::run_cli(&[
        "report",
        "processing",
        "--config",
        config,
        "--format",
        "json",
    ]);
    assert!(ok, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["audit"]["events"].as_u64(), Some(events), "{out}");
    assert_eq!(report["rights"]["erasures"], 1, "{out}");
    let revealed: u64 = report["reveals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["calls"].as_u64().unwrap())
        .sum();
    assert_eq!(revealed, 1, "{out}");

    let (ok, out) = common::run_cli(&["keys", "list", "--config", config]);
    assert!(ok, "{out}");
    assert!(out.contains("(active)"), "{out}");

    // An event edited in the database: the chain no longer verifies there.
    let db = common::pg_session(&cluster, "vault").await;
    let edited = db
        .execute(
            "UPDATE tokenvault_kv SET value = value || '\\x00'::bytea \
             WHERE tbl = 'audit' AND key = $1",
            &[&&3u64.to_be_bytes()[..]],
        )
        .await
        .unwrap();
    assert_eq!(edited, 1);
    let (ok, out) = common::run_cli(&["audit", "verify", "--config", config]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAILED: audit chain broken at sequence 3"),
        "{out}"
    );

    // A database without a vault in it is named, not read as an empty one.
    cluster.create_database("empty").await;
    let empty = a.root.path().join("empty.toml");
    std::fs::write(
        &empty,
        common::postgres_replica_config(&cluster.conninfo("empty"), &cluster.conninfo("empty"), ""),
    )
    .unwrap();
    let (ok, out) = common::run_cli(&["audit", "verify", "--config", empty.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(out.contains("holds no tokenvault vault"), "{out}");
}

/// A master-key rotation through one replica: the other still holds the
/// retired master key, so it must wrap nothing more under it (a data key
/// it made would unwrap on no replica once the configuration names the new
/// one). Its RotateKeys is refused, naming the cause; with both on the new
/// key file every token reads and a rotation through either works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_master_key_rotation_through_one_replica_the_other_wraps_nothing_under_the_old_key()
{
    use tokenvault::proto::v1::{RotateKeysRequest, admin_client::AdminClient};
    let cluster = ThrowawayCluster::start();
    cluster.create_database("vault").await;
    let (mut a, mut b) = replicas(&cluster, "vault").await;
    let before = tokenize_one(&mut a.client("support").await, "email", "kek@example.com").await;
    let out = common::rotate_master_to_new_file(&a, "master-2.key").await;
    assert!(out.contains("re-wrapped"), "{out}");

    async fn admin(vault: &TestVault) -> AdminClient<tonic::transport::Channel> {
        AdminClient::new(vault.channel_with(&vault.pki.tls("privacy")).await.unwrap())
    }
    let refused = admin(&b)
        .await
        .rotate_keys(RotateKeysRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused
            .message()
            .contains("rotated through another replica"),
        "{refused:?}"
    );
    assert!(
        b.wait_for_log("rotated through another replica"),
        "{}",
        b.logs()
    );

    // Both switched to the new key file, as the operator does next.
    a.stop();
    b.stop();
    std::fs::copy(
        a.root.path().join("master-2.key"),
        b.root.path().join("master-2.key"),
    )
    .unwrap();
    for vault in [&mut a, &mut b] {
        common::switch_master_key_file(vault, "master-2.key");
        vault.spawn().unwrap();
    }
    let rotated = admin(&b)
        .await
        .rotate_keys(RotateKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.version, 2);
    let after = tokenize_one(&mut b.client("support").await, "email", "new@example.com").await;
    let pairs = [
        (before, "kek@example.com".to_owned()),
        (after, "new@example.com".to_owned()),
    ];
    for vault in [&a, &b] {
        common::assert_all_detokenize(vault, &pairs).await;
    }
}

/// A replica of `first` on the vault database `vault` with its erasure
/// ledger at `ledger`, started with `args`: the lines it logged if it
/// refused to start.
fn start_on_ledger(
    first: &TestVault,
    vault: &str,
    ledger: &str,
    args: &[&str],
) -> Result<TestVault, String> {
    let mut replica = TestVault::prepare(&common::postgres_replica_config(vault, ledger, ""));
    std::fs::copy(
        first.root.path().join("master.key"),
        replica.root.path().join("master.key"),
    )
    .unwrap();
    replica.serve_args = args.iter().map(|a| (*a).to_owned()).collect();
    replica.write_config();
    replica.spawn().map(|()| replica)
}

/// A replica never starts on an erasure ledger that is not its vault's: on
/// a new, empty one (a wrong dbname) it would serve erased subjects and
/// its next erasure would stop every correctly configured replica. Each
/// case is refused in one line: a ledger other than the one the vault is
/// bound to, another vault's ledger, a ledger in the vault's own database
/// (named another way than the vault's setting). A ledger lost for good
/// is adopted only on purpose, with --accept-restored-ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_refuses_an_erasure_ledger_that_is_not_its_vaults() {
    let cluster = ThrowawayCluster::start();
    cluster.create_database("vault").await;
    let (a, mut b) = replicas(&cluster, "vault").await;
    b.stop();
    let vault = cluster.conninfo("vault");

    cluster.create_database("new_ledger").await;
    let refused = start_on_ledger(&a, &vault, &cluster.conninfo("new_ledger"), &[])
        .err()
        .expect("a replica started on a new, empty ledger");
    assert!(refused.contains("is not this vault's ledger"), "{refused}");
    assert!(refused.contains("--accept-restored-ledger"), "{refused}");

    // Another vault (its own database and master key) on this vault's ledger.
    cluster.create_database("other_vault").await;
    let mut other = TestVault::prepare(&common::postgres_replica_config(
        &cluster.conninfo("other_vault"),
        &cluster.conninfo("vault_ledger"),
        "",
    ));
    other.write_config();
    let refused = other
        .spawn()
        .expect_err("another vault started on this vault's ledger");
    assert!(refused.contains("belongs to another vault"), "{refused}");

    // The vault's own database, named so that the settings differ.
    // (a link to the socket directory: another host to the setting's eyes).
    let link = a.root.path().join("socket-link");
    std::os::unix::fs::symlink(cluster.socket_dir(), &link).unwrap();
    let dir = cluster.socket_dir().display().to_string();
    let same = vault.replacen(&dir, &link.display().to_string(), 1);
    assert_ne!(same, vault);
    let refused = start_on_ledger(&a, &vault, &same, &[])
        .err()
        .expect("a replica started with its ledger in the vault's database");
    assert!(refused.contains("also holds a vault's tables"), "{refused}");
    let db = common::pg_session(&cluster, "vault").await;
    let untouched: bool = db
        .query_one(
            "SELECT to_regclass('tokenvault_erasure_ledger') IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        untouched,
        "ledger tables were created in the vault's database"
    );

    // Data from before vault ids (a restored backup of an earlier
    // release): the ledger's entries must prove whose it is.
    let forget_id = || async {
        db.execute(
            "DELETE FROM tokenvault_kv WHERE tbl = 'meta' AND key = $1",
            &[&&b"vault-id"[..]],
        )
        .await
        .unwrap()
    };
    assert_eq!(forget_id().await, 1);
    let refused = b
        .spawn()
        .expect_err("a vault without an id started on a bound, empty ledger");
    assert!(refused.contains("has no id yet"), "{refused}");
    let mut through_a = a.client("support").await;
    common::tokenize_one_for(&mut through_a, "email", "gone@example.com", "cust-gone").await;
    erase(&a, "cust-gone").await;
    assert_eq!(forget_id().await, 0, "the refused start wrote nothing");
    b.spawn()
        .expect("the ledger's erasure proves it is this vault's");
    b.stop();
    let ledger_db = common::pg_session(&cluster, "vault_ledger").await;
    let bound: Vec<u8> = ledger_db
        .query_one("SELECT vault_id FROM tokenvault_ledger_schema", &[])
        .await
        .unwrap()
        .get(0);
    let recorded: Vec<u8> = db
        .query_one(
            "SELECT value FROM tokenvault_kv WHERE tbl = 'meta' AND key = $1",
            &[&&b"vault-id"[..]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, bound, "the vault took back the ledger's id");

    // Adopted on purpose: the vault is bound to the new ledger from now on.
    let mut adopted = start_on_ledger(
        &a,
        &vault,
        &cluster.conninfo("new_ledger"),
        &["--accept-restored-ledger"],
    )
    .expect("an adopted ledger");
    assert!(
        adopted.wait_for_log("adopting another erasure ledger"),
        "{}",
        adopted.logs()
    );
    adopted.stop();
    let refused = b
        .spawn()
        .expect_err("the old ledger is no longer this vault's");
    assert!(refused.contains("is not this vault's ledger"), "{refused}");
}

/// Two replicas of a new vault started at the same moment on a new
/// database and a new ledger agree on the vault's id and bind the ledger
/// to it (neither refuses the other's binding), three times over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_a_new_vault_starting_at_once_bind_one_ledger() {
    let cluster = ThrowawayCluster::start();
    for round in 0..3 {
        let (vault_db, ledger_db) = (format!("vault{round}"), format!("ledger{round}"));
        cluster.create_database(&vault_db).await;
        cluster.create_database(&ledger_db).await;
        let config = common::postgres_replica_config(
            &cluster.conninfo(&vault_db),
            &cluster.conninfo(&ledger_db),
            "",
        );
        let mut a = TestVault::prepare(&config);
        let mut b = TestVault::prepare(&config);
        std::fs::copy(
            a.root.path().join("master.key"),
            b.root.path().join("master.key"),
        )
        .unwrap();
        a.write_config();
        b.write_config();
        std::thread::scope(|scope| {
            let first = scope.spawn(|| a.spawn());
            let second = scope.spawn(|| b.spawn());
            first.join().unwrap().expect("replica a did not start");
            second.join().unwrap().expect("replica b did not start");
        });
        let vault = common::pg_session(&cluster, &vault_db).await;
        let recorded: Vec<u8> = vault
            .query_one(
                "SELECT value FROM tokenvault_kv WHERE tbl = 'meta' AND key = $1",
                &[&&b"vault-id"[..]],
            )
            .await
            .unwrap()
            .get(0);
        let ledger = common::pg_session(&cluster, &ledger_db).await;
        let bound: Vec<u8> = ledger
            .query_one("SELECT vault_id FROM tokenvault_ledger_schema", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(recorded, bound, "round {round}");
        a.stop();
        b.stop();
    }
}

/// A blind-index key rotation through one replica, while the other has not
/// loaded the new key yet (it loads keys every 5 s): a new deterministic
/// value tokenized through the rotated replica, then through the other,
/// gets one token, and so do 64 concurrent requests for another value
/// through both. Without the guard on the next index key, the second
/// replica looked under the old key only, found nothing and minted a
/// second token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_key_rotation_through_one_replica_never_gives_a_value_two_tokens() {
    use tokenvault::proto::v1::{RotateIndexKeyRequest, admin_client::AdminClient};
    let cluster = ThrowawayCluster::start();
    cluster.create_database("vault").await;
    let (a, b) = replicas(&cluster, "vault").await;
    let mut through_a = a.client("support").await;
    let mut through_b = b.client("support").await;
    let one = |client: &mut tokenvault::client::TokenVaultClient<tonic::transport::Channel>,
               value: &'static str| {
        let mut client = client.clone();
        async move {
            tokens_of(
                client
                    .tokenize(TokenizeRequest {
                        items: vec![item("customer_email", value)],
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner(),
            )
            .remove(0)
        }
    };
    // Indexed under version 1 before the rotation.
    let before = one(&mut through_a, "before@example.com").await;

    let admin = b.channel_with(&b.pki.tls("privacy")).await.unwrap();
    let rotated = AdminClient::new(admin)
        .rotate_index_key(RotateIndexKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.version, 2);
    let mut pairs = Vec::new();
    for value in ["n1@example.com", "n2@example.com", "n3@example.com"] {
        let first = one(&mut through_b, value).await;
        let second = one(&mut through_a, value).await;
        pairs.push((value, first, second));
    }
    for (value, first, second) in &pairs {
        assert_eq!(first, second, "{value} got two tokens");
    }
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let client = if i % 2 == 0 {
                &mut through_a
            } else {
                &mut through_b
            };
            tokio::spawn(one(client, "concurrent@example.com"))
        })
        .collect();
    let mut tokens = Vec::new();
    for task in tasks {
        tokens.push(task.await.unwrap());
    }
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    // A value indexed before the rotation keeps its token through both.
    assert_eq!(one(&mut through_b, "before@example.com").await, before);
    assert_eq!(one(&mut through_a, "before@example.com").await, before);
}

/// A Tokenize whose one write would lock more keys than a transaction
/// takes without locking out every other writer of every replica (1,000
/// deterministic values of one subject: three keys each) is refused with
/// RESOURCE_EXHAUSTED, saying to send fewer items, before anything is
/// written (not even the subject's key); 500 go through. So is a
/// DeleteTokens of as many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokenize_too_large_to_share_the_database_is_refused() {
    let cluster = ThrowawayCluster::start();
    cluster.create_database("vault").await;
    let (a, _b) = replicas(&cluster, "vault").await;
    let mut client = a.client("support").await;
    let items = |n: usize, tag: &str| -> Vec<_> {
        (0..n)
            .map(|i| {
                subject_item(
                    "customer_email",
                    &format!("{tag}{i}@example.com"),
                    "cust-big",
                )
            })
            .collect()
    };
    let db = common::pg_session(&cluster, "vault").await;
    let rows = || async {
        db.query_one(
            "SELECT count(*) FROM tokenvault_kv WHERE tbl <> 'audit' AND tbl <> 'audit_index'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    let before = rows().await;
    let refused = match client
        .tokenize(TokenizeRequest {
            items: items(1000, "big"),
            ..Default::default()
        })
        .await
    {
        Ok(taken) => panic!(
            "a 1,000-item tokenize was taken ({} results)",
            taken.into_inner().results.len()
        ),
        Err(status) => status,
    };
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("send fewer items per request"),
        "{refused:?}"
    );
    assert!(!refused.message().contains("big0@example.com"));
    assert_eq!(rows().await, before, "the refused request wrote something");
    let stored = tokens_of(
        client
            .tokenize(TokenizeRequest {
                items: items(500, "fits"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(stored.len(), 500);

    // Deleting as many at once (a record, a subject-index and an index
    // entry each): refused, nothing deleted.
    let more = tokens_of(
        client
            .tokenize(TokenizeRequest {
                items: items(500, "more"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner(),
    );
    let channel = a.channel_with(&a.pki.tls("privacy")).await.unwrap();
    let mut subjects = tokenvault::proto::v1::subjects_client::SubjectsClient::new(channel);
    let before = rows().await;
    let refused = subjects
        .delete_tokens(tokenvault::proto::v1::DeleteTokensRequest {
            tokens: stored.iter().chain(&more).cloned().collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert_eq!(rows().await, before, "the refused delete changed something");
}

/// What detokenizing each of `tokens` through `vault` gives.
async fn read_all(
    vault: &TestVault,
    tokens: &[String],
) -> Vec<Result<String, tokenvault::proto::v1::Code>> {
    revealed(
        detokenize(
            &mut vault.client("support").await,
            tokens,
            "customer_support",
        )
        .await
        .unwrap(),
    )
}

/// Replicas keep one erasure ledger, in a database of its own: erasures
/// through both at once chain into it (each replica restarts without
/// complaint, which a ledger file per replica did not allow), and after
/// the vault's database is restored from a dump taken before them, the
/// first replica to start erases those subjects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasures_through_replicas_survive_a_restore_of_the_database() {
    use tokenvault::proto::v1::Code;
    let cluster = ThrowawayCluster::start();
    cluster.create_database("vault").await;
    let (mut a, mut b) = replicas(&cluster, "vault").await;
    let mut through_a = a.client("support").await;
    let mut tokens = Vec::new();
    for i in 0..8 {
        let response = through_a
            .tokenize(TokenizeRequest {
                items: vec![subject_item(
                    "email",
                    &format!("person{i}@example.com"),
                    &format!("cust-{i}"),
                )],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        tokens.extend(tokens_of(response));
    }
    let backup = cluster.dump_database("vault");

    // Six subjects erased at once, three through each replica.
    let (erased_a, erased_b) = tokio::join!(
        async {
            let mut n = 0;
            for i in [0, 2, 4] {
                n += erase(&a, &format!("cust-{i}")).await;
            }
            n
        },
        async {
            let mut n = 0;
            for i in [1, 3, 5] {
                n += erase(&b, &format!("cust-{i}")).await;
            }
            n
        }
    );
    assert_eq!((erased_a, erased_b), (3, 3));
    let erased_and_kept = |read: Vec<Result<String, Code>>| {
        let erased = read[..6].iter().all(|r| *r == Err(Code::NotFound));
        let kept = read[6..]
            == [
                Ok("person6@example.com".to_owned()),
                Ok("person7@example.com".to_owned()),
            ];
        (erased, kept)
    };
    assert_eq!(erased_and_kept(read_all(&b, &tokens).await), (true, true));

    // Both restart: the one ledger agrees with the database.
    a.restart();
    b.restart();
    assert_eq!(erased_and_kept(read_all(&a, &tokens).await), (true, true));

    // The database goes back to before the erasures; the ledger does not.
    a.stop();
    b.stop();
    cluster.restore_database("vault", &backup).await;
    a.spawn().unwrap();
    assert!(
        a.wait_for_log("re-applied the erasure ledger"),
        "{}",
        a.logs()
    );
    b.spawn().unwrap();
    assert_eq!(erased_and_kept(read_all(&b, &tokens).await), (true, true));
    a.assert_log_free_of(&["person0@example.com", "person7@example.com"]);
}

/// One replica runs the background jobs; when it is killed, the other
/// takes them over and finishes a re-encryption the first would have run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_background_jobs_are_taken_over() {
    use tokenvault::proto::v1::{
        Job, ListJobsRequest, RotateKeysRequest, SetJobPausedRequest, admin_client::AdminClient,
    };
    let cluster = ThrowawayCluster::start();
    cluster.create_database("vault").await;
    let (mut a, b) = replicas(&cluster, "vault").await;
    const LEASE: &str = "took the background-jobs lease";
    assert!(a.wait_for_log(LEASE), "{}", a.logs());
    assert!(!b.logs().contains(LEASE), "both lead:\n{}", b.logs());

    // Values under the first data key, then a rotation that leaves them to
    // the re-encryption job; the leader is killed before it runs much.
    let mut through_b = b.client("support").await;
    let mut tokens = Vec::new();
    for i in 0..50 {
        tokens.push(tokenize_one(&mut through_b, "email", &format!("old{i}@example.com")).await);
    }
    a.kill();
    let mut admin = AdminClient::new(b.channel_with(&b.pki.tls("privacy")).await.unwrap());
    // Held while the rotation starts it: the pass's total is the records
    // the database holds, counted on this engine too.
    let hold = |paused| SetJobPausedRequest {
        job: Job::Reencrypt.into(),
        paused,
    };
    admin.set_job_paused(hold(true)).await.unwrap();
    admin.rotate_keys(RotateKeysRequest {}).await.unwrap();
    let jobs = admin
        .list_jobs(ListJobsRequest {})
        .await
        .unwrap()
        .into_inner();
    let held = jobs
        .jobs
        .iter()
        .find(|j| j.job() == Job::Reencrypt)
        .unwrap();
    assert!(held.pending && held.paused, "{held:?}");
    assert_eq!(held.total, 50, "{held:?}");
    admin.set_job_paused(hold(false)).await.unwrap();
    assert!(b.wait_for_log(LEASE), "{}", b.logs());
    assert!(
        b.wait_for_log("re-encryption finished"),
        "the job did not finish on the survivor:\n{}",
        b.logs()
    );
    let jobs = admin
        .list_jobs(ListJobsRequest {})
        .await
        .unwrap()
        .into_inner();
    let reencrypt = jobs
        .jobs
        .iter()
        .find(|j| j.job() == Job::Reencrypt)
        .expect("a re-encryption job");
    assert!(!reencrypt.pending, "{reencrypt:?}");
    let read = read_all(&b, &tokens).await;
    assert!(read.iter().all(Result::is_ok), "{read:?}");
}

/// A base for the two-replica script's six ports (base+1, +2, +11, +12,
/// +21, +22), all free now and below the kernel's ephemeral range, where
/// no outgoing connection meanwhile is given one of them (the script's
/// default, 50060, is inside it: a test run once found 50072 taken).
fn free_port_base() -> u16 {
    let start = 20_000 + (std::process::id() % 400) as u16 * 30;
    (0..400)
        .map(|i| 20_000 + (start - 20_000 + i * 30) % 12_000)
        .find(|base| {
            [1, 2, 11, 12, 21, 22]
                .iter()
                .all(|offset| std::net::TcpListener::bind(("127.0.0.1", base + offset)).is_ok())
        })
        .expect("no free ports for the two replicas")
}

/// The README's two-replica trial: `scripts/two-replicas.sh` starts two
/// PostgreSQL clusters (the vault's, the ledger's) and two replicas of the
/// dev vault on them; a token
/// tokenized through one is read through the other with the CLI client;
/// stopping the script stops everything and deletes the cluster.
#[test]
fn the_two_replica_script_serves_one_vault_on_two_ports() {
    use std::{io::BufRead, process::Stdio};
    let dev = tempfile::tempdir().unwrap();
    let dev_dir = dev.path().join("dev");
    let base = free_port_base();
    let mut script = std::process::Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/two-replicas.sh"
        ))
        .env("TV_BIN", env!("CARGO_BIN_EXE_tokenvault"))
        .env("TV_DEV_DIR", &dev_dir)
        .env("TV_PORT_BASE", base.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(script.stdout.take().unwrap()).lines();
    let mut cluster = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix(
            "two replicas of the dev vault on PostgreSQL (vault and ledger clusters in ",
        ) {
            cluster = Some(std::path::PathBuf::from(rest.trim_end_matches("):")));
        }
        if line.contains("Ctrl-C stops them") {
            break;
        }
    }
    let cluster = cluster.expect("the script said where its cluster is");
    // The ledger in a cluster of its own (restored apart from the vault's).
    let config = std::fs::read_to_string(dev_dir.join("replica-1.toml")).unwrap();
    let port_of = |table: &str| {
        let section = config.split(table).nth(1).unwrap();
        let connection = section
            .lines()
            .find(|l| l.starts_with("connection"))
            .unwrap();
        connection.split_once("port=").unwrap().1[..4].to_owned()
    };
    assert_ne!(
        port_of("[storage.postgres]"),
        port_of("[subjects.erasure_ledger_database]"),
        "{config}"
    );
    let client = |args: &[&str]| {
        let out = common::tokenvault_command()
            .arg("client")
            .arg("--dev-dir")
            .arg(&dev_dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let token = client(&[
        "--as",
        "checkout",
        "--addr",
        &format!("localhost:{}", base + 1),
        "tokenize",
        "email",
        "replica@example.com",
    ]);
    let value = client(&[
        "--addr",
        &format!("localhost:{}", base + 2),
        "detokenize",
        "--purpose",
        "customer_support",
        &token,
    ]);
    assert_eq!(value, "replica@example.com");

    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &script.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(script.wait().unwrap().code().is_some());
    assert!(!cluster.exists(), "the cluster was left behind");
}

/// The least-privilege layout (deploy/README.md, "Database roles"): the
/// schemas made by `tokenvault migrate` as the owner, which grants the app
/// role its part; a vault running as that role tokenizes, reveals and
/// erases, and the role can neither delete, rewrite nor empty the erasure
/// ledger, nor change or drop the vault's tables. Before, a vault started
/// as such a role failed at its first `CREATE TABLE IF NOT EXISTS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vault_runs_as_an_app_role_that_cannot_empty_the_ledger() {
    let cluster = ThrowawayCluster::start();
    cluster.create_database("vault").await;
    cluster.create_database("ledger").await;
    let owner = common::pg_session(&cluster, "vault").await;
    owner
        .batch_execute("CREATE ROLE tv_app LOGIN")
        .await
        .unwrap();
    let as_owner = common::postgres_replica_config(
        &cluster.conninfo("vault"),
        &cluster.conninfo("ledger"),
        "",
    );
    let app = |conninfo: String| conninfo.replace("user=tokenvault", "user=tv_app");
    let as_app = format!(
        "{}[audit]\ncheckpoint_interval_seconds = 1\n",
        common::postgres_replica_config(
            &app(cluster.conninfo("vault")),
            &app(cluster.conninfo("ledger")),
            "",
        )
    );

    // Before the migration the role can create nothing: the vault says
    // what to run.
    let mut early = TestVault::prepare(&as_app);
    early.write_config();
    let refused = early.spawn().unwrap_err();
    assert!(refused.contains("run `tokenvault migrate"), "{refused}");

    // Migrated by the owner, then the vault as the app role.
    let migrating = TestVault::prepare(&as_owner);
    migrating.write_config();
    let (ok, out) = common::run_cli(&[
        "migrate",
        "--config",
        migrating.config_path().to_str().unwrap(),
        "--grant-to",
        "tv_app",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("granted tv_app"), "{out}");
    let (ok, out) = common::run_cli(&[
        "migrate",
        "--config",
        migrating.config_path().to_str().unwrap(),
        "--grant-to",
        "tv_app; DROP TABLE tokenvault_kv",
    ]);
    assert!(!ok && out.contains("not a plain role name"), "{out}");
    for every in ["public", "pg_monitor"] {
        let (ok, out) = common::run_cli(&[
            "migrate",
            "--config",
            migrating.config_path().to_str().unwrap(),
            "--grant-to",
            every,
        ]);
        assert!(
            !ok && out.contains("not a role of the vault's own"),
            "{out}"
        );
    }
    let vault = common::start_replica_of(&migrating, &as_app);
    let mut client = vault.client("support").await;
    let token = common::tokenize_one_for(&mut client, "email", "app@example.com", "cust-app").await;
    let response = detokenize(
        &mut client,
        std::slice::from_ref(&token),
        "customer_support",
    )
    .await
    .unwrap();
    assert_eq!(revealed(response), [Ok("app@example.com".to_owned())]);
    assert_eq!(erase(&vault, "cust-app").await, 1);

    // What the app role cannot do.
    let session = |db: &str| {
        let conninfo = app(cluster.conninfo(db));
        async move {
            let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            client
        }
    };
    // The grants: what --grant-to gives beyond a plain role's (DROP,
    // ALTER and CREATE need the owner anyway).
    let ledger = session("ledger").await;
    for refused in [
        "DELETE FROM tokenvault_erasure_ledger",
        "TRUNCATE tokenvault_erasure_ledger",
        "UPDATE tokenvault_erasure_ledger SET entry = ''",
        "UPDATE tokenvault_ledger_schema SET ledger_id = NULL",
        "UPDATE tokenvault_ledger_schema SET version = 1",
    ] {
        let e = ledger.batch_execute(refused).await.unwrap_err();
        assert!(
            e.as_db_error()
                .is_some_and(|db| db.code().code() == "42501"),
            "{refused}: {e:?}"
        );
    }
    let data = session("vault").await;
    for refused in [
        "TRUNCATE tokenvault_kv",
        "UPDATE tokenvault_schema SET version = 1",
        "DELETE FROM tokenvault_audit_head",
    ] {
        let e = data.batch_execute(refused).await.unwrap_err();
        assert!(
            e.as_db_error()
                .is_some_and(|db| db.code().code() == "42501"),
            "{refused}: {e:?}"
        );
    }
    let rows: i64 = ledger
        .query_one("SELECT count(*) FROM tokenvault_erasure_ledger", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "the erasure is in the ledger");
    // Checkpoints are signed as the role: the witness columns it may set.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let signed: Option<i64> = ledger
            .query_one("SELECT signed_seq FROM tokenvault_ledger_schema", &[])
            .await
            .unwrap()
            .get(0);
        if signed.is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint signed as the app role:\n{}",
            vault.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let checkpoints: i64 = data
        .query_one(
            "SELECT count(*) FROM tokenvault_kv WHERE tbl = 'audit_checkpoints'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(checkpoints > 0);
}
