//! The PostgreSQL engine against a real PostgreSQL: a throwaway cluster per
//! test, in a temporary directory, listening on a unix socket only.

use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

use super::{cluster::ThrowawayCluster as Cluster, *};
use crate::store::{
    Snapshot,
    conformance::{Engine, conformance_tests},
};

/// A fresh database of its own cluster for each store the suite opens.
struct Postgres {
    cluster: Cluster,
    databases: AtomicU32,
}

impl Postgres {
    fn start() -> Self {
        Self {
            cluster: Cluster::start(),
            databases: AtomicU32::new(0),
        }
    }
}

impl Engine for Postgres {
    type Store = PgStore;

    async fn open(&self) -> PgStore {
        let name = format!("vault{}", self.databases.fetch_add(1, Ordering::SeqCst));
        self.cluster.create_database(&name).await;
        PgStore::connect(&self.cluster.conninfo(&name))
            .await
            .unwrap()
    }

    async fn reopen(&self, store: PgStore) -> PgStore {
        store.close().await;
        let name = format!("vault{}", self.databases.load(Ordering::SeqCst) - 1);
        PgStore::connect(&self.cluster.conninfo(&name))
            .await
            .unwrap()
    }
}

conformance_tests!(Postgres::start());

/// The committers count what they commit, for the metrics: every batch
/// of the conformance suite's concurrent run, and the transactions they
/// shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committers_count_batches_and_their_transactions() {
    let engine = Postgres::start();
    let store = crate::store::conformance::concurrent_commits_all_land(&engine).await;
    let commits = store.stats().commits;
    assert_eq!(commits.batches, 200);
    // Shared: fewer than half as many transactions as batches (in
    // practice a handful; one transaction per batch fails it).
    assert!(
        (1..100).contains(&commits.groups),
        "{} transactions for 200 batches",
        commits.groups
    );
}

#[test]
fn a_connection_setting_without_a_password_is_accepted() {
    check_connection(
        "storage.postgres",
        "host=/run/postgresql user=vault dbname=vault",
        false,
    )
    .unwrap();
    check_connection(
        "storage.postgres",
        "postgres://vault@db.internal:5432/vault",
        true,
    )
    .unwrap();
    // Over TCP, TLS (a CA to check the server with) or, said plainly, none.
    for tcp in [
        "postgres://vault@db.internal:5432/vault",
        "host=db user=vault",
    ] {
        let err = check_connection("storage.postgres", tcp, false).unwrap_err();
        assert!(
            err.contains("ca_file") && err.contains("sslmode=disable"),
            "{err}"
        );
        assert!(!in_the_clear(tcp, false));
        let clear = if tcp.contains("://") {
            format!("{tcp}?sslmode=disable")
        } else {
            format!("{tcp} sslmode=disable")
        };
        check_connection("storage.postgres", &clear, false).unwrap();
        assert!(in_the_clear(&clear, false), "{clear}");
        assert!(!in_the_clear(&clear, true), "a CA forces TLS: {clear}");
    }
    assert!(!in_the_clear(
        "host=/run/postgresql user=vault sslmode=disable",
        false
    ));
    // A socket directory with a hostaddr connects over TCP to the address.
    let err = check_connection(
        "storage.postgres",
        "host=/run/postgresql hostaddr=203.0.113.5 user=vault",
        false,
    )
    .unwrap_err();
    assert!(err.contains("over TCP without TLS"), "{err}");
    for with_password in [
        "host=db user=vault password=hunter2",
        "postgres://vault:hunter2@db.internal/vault",
    ] {
        let err = check_connection("storage.postgres", with_password, true).unwrap_err();
        assert!(err.contains("password_file"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
    assert!(check_connection("storage.postgres", "user=vault dbname=vault", false).is_err());
    let err = check_connection("storage.postgres", "host=db sslmode=require", false).unwrap_err();
    assert!(err.contains("ca_file"), "{err}");
    check_connection("storage.postgres", "host=db sslmode=require", true).unwrap();
    let err = check_connection(
        "storage.postgres",
        "host='unterminated password=hunter2",
        false,
    )
    .unwrap_err();
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn prefix_ends_skip_trailing_ff_bytes() {
    assert_eq!(prefix_end(b"dek/"), Some(b"dek0".to_vec()));
    assert_eq!(prefix_end(b"a\xff\xff"), Some(b"b".to_vec()));
    assert_eq!(prefix_end(b"\xff\xff"), None);
    assert_eq!(prefix_end(b""), None);
}

/// Two stores on one database stand for two vault replicas: of 64
/// concurrent writers of one new key spread over both, exactly one wins,
/// and the audit events of both land in one chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_database_agree() {
    let cluster = Cluster::start();
    cluster.create_database("shared").await;
    let conninfo = cluster.conninfo("shared");
    let replicas = [
        Arc::new(PgStore::connect(&conninfo).await.unwrap()),
        Arc::new(PgStore::connect(&conninfo).await.unwrap()),
    ];
    let tasks: Vec<_> = (0..64u8)
        .map(|i| {
            let store = Arc::clone(&replicas[usize::from(i % 2)]);
            tokio::spawn(async move {
                let mut batch = Batch::new();
                batch
                    .unit()
                    .guard_absent(Table::Index, b"one value".to_vec())
                    .put(Table::Index, b"one value".to_vec(), vec![i])
                    .append_audit(vec![i]);
                store.commit(batch).await.unwrap().remove(0)
            })
        })
        .collect();
    let mut winners = 0;
    for task in tasks {
        if task.await.unwrap().is_ok() {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
    // Each replica then appends events; the chain is one, in commit order.
    for i in 0..20u8 {
        let mut batch = Batch::new();
        batch.unit().append_audit(vec![i]);
        replicas[usize::from(i % 2)].commit(batch).await.unwrap();
    }
    let entries = replicas[0]
        .scan_from(Table::Audit, Vec::new(), 1000)
        .await
        .unwrap();
    assert_eq!(entries.len(), 21);
    let mut prev = chain::GENESIS;
    for (i, (key, value)) in entries.iter().enumerate() {
        let seq = i as u64 + 1;
        assert_eq!(chain::seq_of(key), Some(seq));
        let link = chain::decode(value).unwrap();
        assert_eq!(link.prev, prev, "entry {seq}");
        prev = chain::hash(seq, value);
    }
    // The head each replica reports is as of its own last commit.
    let last = replicas[1].audit_head();
    assert_eq!((last.seq, last.hash), (21, prev));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_newer_than_the_binary_is_refused_with_one_clear_line() {
    let cluster = Cluster::start();
    cluster.create_database("newer").await;
    let conninfo = cluster.conninfo("newer");
    PgStore::connect(&conninfo).await.unwrap().close().await;
    let admin = connect(&conninfo).await.unwrap();
    admin
        .execute(
            "UPDATE tokenvault_schema SET version = $1",
            &[&(SCHEMA_VERSION + 1)],
        )
        .await
        .unwrap();
    let err = PgStore::connect(&conninfo).await.err().unwrap().to_string();
    assert!(
        err.contains(&format!("schema is version {}", SCHEMA_VERSION + 1)),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_is_created_once_and_reopened() {
    let cluster = Cluster::start();
    cluster.create_database("once").await;
    let conninfo = cluster.conninfo("once");
    // Two replicas starting together create it once.
    let (a, b) = tokio::join!(PgStore::connect(&conninfo), PgStore::connect(&conninfo));
    let (a, b) = (a.unwrap(), b.unwrap());
    let admin = connect(&conninfo).await.unwrap();
    let rows = admin
        .query("SELECT version FROM tokenvault_schema", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i32>(0), SCHEMA_VERSION);
    a.close().await;
    b.close().await;
}

/// With a CA configured, the connection is TLS, and a server whose
/// certificate does not chain to that CA, or does not name the host
/// connected to, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database_is_encrypted_and_verified() {
    let ca = crate::pki::Ca::new("database CA").unwrap();
    let issued = ca.issue_server(&["localhost"], &[]).unwrap();
    let cluster = Cluster::start_with_tls(&issued.cert_pem, &issued.key_pem);
    let port = cluster.tcp_port();
    let by_name = format!("host=localhost port={port} user=tokenvault dbname=postgres");
    let store = PgStore::connect_with(
        &by_name,
        None,
        Some(ca.cert_pem().as_bytes()),
        Bounds::default(),
    )
    .await
    .unwrap();
    let answers = store
        .reads
        .on_each("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await
        .unwrap();
    for rows in answers {
        assert!(rows[0].get::<_, bool>(0), "a connection is not encrypted");
    }
    store.close().await;

    let other = crate::pki::Ca::new("another CA").unwrap();
    assert!(
        PgStore::connect_with(
            &by_name,
            None,
            Some(other.cert_pem().as_bytes()),
            Bounds::default()
        )
        .await
        .is_err(),
        "a server certificate from another CA was accepted"
    );
    let by_address = format!("host=127.0.0.1 port={port} user=tokenvault dbname=postgres");
    assert!(
        PgStore::connect_with(
            &by_address,
            None,
            Some(ca.cert_pem().as_bytes()),
            Bounds::default()
        )
        .await
        .is_err(),
        "a certificate that does not name the host was accepted"
    );
}

/// Of two stores on one database one leads the background jobs; when it is
/// gone (its connections closed, as when its process dies), the other
/// takes the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_store_leads_and_another_takes_over_when_it_is_gone() {
    let cluster = Cluster::start();
    cluster.create_database("vault").await;
    let first = PgStore::connect(&cluster.conninfo("vault")).await.unwrap();
    let second = PgStore::connect(&cluster.conninfo("vault")).await.unwrap();
    assert!(first.leads_background_jobs().await);
    assert!(!second.leads_background_jobs().await);
    assert!(first.leads_background_jobs().await, "still the leader");
    assert!(!second.leads_background_jobs().await);
    first.close().await;
    let mut took = false;
    for _ in 0..50 {
        took = second.leads_background_jobs().await;
        if took {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(took, "the lease was not handed on");
}

/// The ledger table takes an entry under a number once: a second writer
/// of the same number hears `Taken` and nothing of its batch is written;
/// what is there reads back in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_number_is_taken_once() {
    use super::ledger::{Appended, LedgerTable};
    let cluster = Cluster::start();
    cluster.create_database("ledger").await;
    let one = LedgerTable::connect_with(&cluster.conninfo("ledger"), None, None, Bounds::default())
        .await
        .unwrap();
    let other =
        LedgerTable::connect_with(&cluster.conninfo("ledger"), None, None, Bounds::default())
            .await
            .unwrap();
    assert_eq!(
        one.append(&[(1, b"a".to_vec()), (2, b"b".to_vec())])
            .await
            .unwrap(),
        Appended::Written
    );
    assert_eq!(
        other
            .append(&[(3, b"c".to_vec()), (2, b"x".to_vec())])
            .await
            .unwrap(),
        Appended::Taken
    );
    assert_eq!(
        other.entries_after(0).await.unwrap(),
        [(1, b"a".to_vec()), (2, b"b".to_vec())],
        "the losing batch left nothing"
    );
    assert_eq!(
        other.append(&[(3, b"c".to_vec())]).await.unwrap(),
        Appended::Written
    );
    assert_eq!(one.entries_after(2).await.unwrap(), [(3, b"c".to_vec())]);
    assert!(one.place().contains("database ledger"), "{}", one.place());
}

/// A ledger whose id changes under a running vault (what a reconnect that
/// lands on another database sees) answers for nothing: appends write
/// nothing, and reads and the newest number are refused. A ledger of
/// schema version 1 (no ids) gets its id when it is opened, and keeps its
/// entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_is_checked_to_be_the_one_bound_and_an_old_one_gets_an_id() {
    use super::ledger::{Appended, LedgerTable};
    let cluster = Cluster::start();
    cluster.create_database("ledger").await;
    let admin = connect(&cluster.conninfo("ledger")).await.unwrap();
    // Version 1, as an earlier release left it: entries, no ids.
    admin
        .batch_execute(
            "CREATE TABLE tokenvault_ledger_schema (singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), version integer NOT NULL);
             INSERT INTO tokenvault_ledger_schema (version) VALUES (1);
             CREATE TABLE tokenvault_erasure_ledger (seq bigint PRIMARY KEY CHECK (seq > 0), entry bytea NOT NULL);
             INSERT INTO tokenvault_erasure_ledger VALUES (1, '\\x61');",
        )
        .await
        .unwrap();
    let ledger =
        LedgerTable::connect_with(&cluster.conninfo("ledger"), None, None, Bounds::default())
            .await
            .unwrap();
    let identity = ledger.identity().await.unwrap();
    assert_eq!(identity.ledger_id.len(), 16);
    assert_eq!(identity.vault_id, None);
    let version: i32 = admin
        .query_one("SELECT version FROM tokenvault_ledger_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, 3);
    assert_eq!(ledger.entries_after(0).await.unwrap(), [(1, b"a".to_vec())]);

    ledger.expect(identity.ledger_id.clone());
    // The signed-head witness takes only a higher number: never a second
    // head for one number, whichever replica asks.
    assert_eq!(ledger.signed_head().await.unwrap(), None);
    assert!(ledger.witness(5, &[1; 32]).await.unwrap());
    assert!(!ledger.witness(5, &[2; 32]).await.unwrap());
    assert!(!ledger.witness(4, &[3; 32]).await.unwrap());
    assert!(ledger.witness(6, &[4; 32]).await.unwrap());
    assert_eq!(ledger.signed_head().await.unwrap(), Some((6, vec![4; 32])));
    assert_eq!(
        ledger.append(&[(2, b"b".to_vec())]).await.unwrap(),
        Appended::Written
    );
    assert_eq!(ledger.newest().await.unwrap(), Some(2));
    admin
        .execute(
            "UPDATE tokenvault_ledger_schema SET ledger_id = $1",
            &[&&[0u8; 16][..]],
        )
        .await
        .unwrap();
    let refused = ledger.append(&[(3, b"c".to_vec())]).await.unwrap_err();
    assert!(
        refused.to_string().contains("no longer the erasure ledger"),
        "{refused}"
    );
    assert!(ledger.newest().await.is_err());
    assert!(ledger.entries_after(0).await.is_err());
    assert!(ledger.signed_head().await.is_err());
    assert!(ledger.witness(7, &[5; 32]).await.is_err());
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM tokenvault_erasure_ledger", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 2, "the refused append wrote something");
}

/// A database of schema version 1 (the same tables; its writers did not
/// take key locks) is moved to this binary's version when a replica opens
/// it, so a release that knows only version 1 refuses it from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_schema_is_migrated_to_this_version() {
    let (_cluster, conninfo, store) = store_on_a_new_database("old").await;
    let mut batch = Batch::new();
    batch.put(Table::Records, b"kept".to_vec(), b"value".to_vec());
    store.commit(batch).await.unwrap();
    store.close().await;
    let admin = connect(&conninfo).await.unwrap();
    admin
        .execute("UPDATE tokenvault_schema SET version = 1", &[])
        .await
        .unwrap();
    let store = PgStore::connect(&conninfo).await.unwrap();
    let version: i32 = admin
        .query_one("SELECT version FROM tokenvault_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, SCHEMA_VERSION);
    assert_eq!(
        store
            .get_many(Table::Records, vec![b"kept".to_vec()])
            .await
            .unwrap(),
        [Some(b"value".to_vec())]
    );
    store.close().await;
}

/// Transactions on different keys run at once: while one waits for a key
/// another session holds, a write of another key commits and appends its
/// event; the first then commits after it, and the chain follows that
/// commit order. With one transaction at a time per process, the second
/// write would wait behind the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waiting_for_a_key_does_not_hold_up_writes_of_other_keys() {
    let (_cluster, conninfo, store) = store_on_a_new_database("lanes").await;
    let store = Arc::new(store);
    let holder = connect(&conninfo).await.unwrap();
    let busy = group::lock_id(Table::Index, b"busy");
    holder
        .execute(
            "SELECT pg_advisory_lock($1::int4, $2::int4)",
            &[&group::KEY_LOCK_CLASS, &busy],
        )
        .await
        .unwrap();
    let write = |key: &'static [u8], event: &'static [u8]| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut batch = Batch::new();
            batch
                .unit()
                .guard_absent(Table::Index, key.to_vec())
                .put(Table::Index, key.to_vec(), b"token".to_vec())
                .append_audit(event.to_vec());
            store.commit(batch).await.unwrap().remove(0)
        })
    };
    let waiting = write(b"busy", b"first sent");
    assert!(
        an_advisory_lock_is_awaited(&holder).await,
        "the first write never waited for its key"
    );
    let other = write(b"free", b"second sent");
    tokio::time::timeout(std::time::Duration::from_secs(30), other)
        .await
        .expect("a write of another key waited behind the blocked one")
        .unwrap()
        .unwrap();
    assert!(!waiting.is_finished(), "the key's lock was not respected");
    holder
        .execute(
            "SELECT pg_advisory_unlock($1::int4, $2::int4)",
            &[&group::KEY_LOCK_CLASS, &busy],
        )
        .await
        .unwrap();
    waiting.await.unwrap().unwrap();
    let entries = store.scan_from(Table::Audit, Vec::new(), 10).await.unwrap();
    let payloads: Vec<&[u8]> = entries
        .iter()
        .map(|(_, value)| chain::decode(value).unwrap().payload)
        .collect();
    assert_eq!(payloads, [&b"second sent"[..], b"first sent"]);
    let link = chain::decode(&entries[1].1).unwrap();
    assert_eq!(link.prev, chain::hash(1, &entries[0].1));
    assert_eq!(store.audit_head().seq, 2);
}

/// Large values (a batch's audit event) are compressed with LZ4, not
/// pglz, which cost 4 % of all CPU under tokenize-batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_are_compressed_with_lz4() {
    let (_cluster, conninfo, store) = store_on_a_new_database("toast").await;
    let mut batch = Batch::new();
    batch.put(Table::Meta, b"large".to_vec(), b"field type ".repeat(1000));
    batch.unit().append_audit(b"email ".repeat(1000));
    store.commit(batch).await.unwrap();
    let admin = connect(&conninfo).await.unwrap();
    let methods: Vec<Option<String>> = admin
        .query(
            "SELECT pg_column_compression(value) FROM tokenvault_kv ORDER BY tbl",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(methods, [Some("lz4".to_owned()), Some("lz4".to_owned())]);
    store.close().await;
}

/// An audit entry is written only where there is none: a head row moved
/// back (a restore of that row alone, or a hand edit) makes the next
/// append fail rather than overwrite the entry after it. The process that
/// saw the later head refuses to write at all (the database went back);
/// one that opens after the edit knows no better, and its append fails
/// on the entry that is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_entry_is_never_overwritten() {
    let (_cluster, conninfo, store) = store_on_a_new_database("chain").await;
    for event in [b"first", b"other"] {
        let mut batch = Batch::new();
        batch.unit().append_audit(event.to_vec());
        store.commit(batch).await.unwrap();
    }
    let entries = store.scan_from(Table::Audit, Vec::new(), 10).await.unwrap();
    let admin = connect(&conninfo).await.unwrap();
    admin
        .execute(
            "UPDATE tokenvault_audit_head SET seq = 1, hash = $1",
            &[&chain::hash(1, &entries[0].1).as_slice()],
        )
        .await
        .unwrap();
    let over = || {
        let mut batch = Batch::new();
        batch.unit().append_audit(b"over".to_vec());
        batch
    };
    let err = store.commit(over()).await.unwrap_err();
    assert!(matches!(err, Error::Rewound(_)), "{err}");
    let opened_after = PgStore::connect(&conninfo).await.unwrap();
    let err = opened_after.commit(over()).await.unwrap_err().to_string();
    assert!(err.contains("23505"), "{err}");
    let after = store.scan_from(Table::Audit, Vec::new(), 10).await.unwrap();
    assert_eq!(after, entries, "an audit entry was overwritten");
    store.close().await;
    opened_after.close().await;
}

/// The database's chain rewritten under a process (a fork: the event it
/// saw last replaced, the chain grown past it, as a restore followed by
/// other replicas' writes leaves it): its next write is refused before
/// anything is written, and so is every write after, and its check says
/// the same; a process opened on that database afterwards writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forked_chain_is_refused_before_anything_is_written() {
    let (_cluster, conninfo, store) = store_on_a_new_database("fork").await;
    let event = |payload: &[u8]| {
        let mut batch = Batch::new();
        batch.unit().append_audit(payload.to_vec());
        batch
    };
    store.commit(event(b"first")).await.unwrap();
    store.commit(event(b"second")).await.unwrap();
    assert!(store.check_history().await.is_ok());
    // Another history: event 2 replaced and a third after it.
    let admin = connect(&conninfo).await.unwrap();
    let entries = store.scan_from(Table::Audit, Vec::new(), 10).await.unwrap();
    let first_hash = chain::hash(1, &entries[0].1);
    let other_two = chain::encode(2, &first_hash, b"another second");
    let other_three = chain::encode(3, &chain::hash(2, &other_two), b"third");
    admin
        .execute(
            "UPDATE tokenvault_kv SET value = $1 WHERE tbl = 'audit' AND key = $2",
            &[&other_two, &chain::key(2).as_slice()],
        )
        .await
        .unwrap();
    admin
        .execute(
            "INSERT INTO tokenvault_kv VALUES ('audit', $1, $2)",
            &[&chain::key(3).as_slice(), &other_three],
        )
        .await
        .unwrap();
    admin
        .execute(
            "UPDATE tokenvault_audit_head SET seq = 3, hash = $1",
            &[&chain::hash(3, &other_three).as_slice()],
        )
        .await
        .unwrap();
    let mut write = Batch::new();
    write
        .unit()
        .put(Table::Records, b"after".to_vec(), b"v".to_vec());
    let refused = store.commit(write).await.unwrap_err();
    assert!(matches!(refused, Error::Rewound(_)), "{refused}");
    assert!(matches!(
        store.check_history().await,
        Err(Error::Rewound(_))
    ));
    assert_eq!(
        store
            .get_many(Table::Records, vec![b"after".to_vec()])
            .await
            .unwrap(),
        [None],
        "written to a forked database"
    );
    let opened_after = PgStore::connect(&conninfo).await.unwrap();
    opened_after.commit(event(b"fourth")).await.unwrap();
    store.close().await;
    opened_after.close().await;
}

/// A unit with more keys than PostgreSQL's lock table holds (the erasure
/// of a subject with 10,000 tokens deletes about 40,000) commits: it takes
/// the writers' lock exclusively, not a lock per key, so it waits for the
/// writers holding it shared and runs alone, while writes of a few keys
/// run beside each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_of_more_keys_than_the_lock_table_runs_alone() {
    let (_cluster, conninfo, store) = store_on_a_new_database("large").await;
    let store = Arc::new(store);
    let holder = connect(&conninfo).await.unwrap();
    holder
        .execute(
            "SELECT pg_advisory_lock_shared($1::int4, 0)",
            &[&group::WRITERS_LOCK_CLASS],
        )
        .await
        .unwrap();
    // A small write shares the writers' lock with the holder.
    let mut small = Batch::new();
    small.put(Table::Records, b"small".to_vec(), b"value".to_vec());
    tokio::time::timeout(std::time::Duration::from_secs(30), store.commit(small))
        .await
        .expect("a small write waited for a shared holder of the writers' lock")
        .unwrap();
    let large = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut batch = Batch::new();
            let unit = batch.unit();
            for i in 0..20_000u32 {
                unit.put(Table::Records, i.to_be_bytes().to_vec(), b"v".to_vec());
            }
            store.commit(batch).await
        })
    };
    assert!(
        an_advisory_lock_is_awaited(&holder).await,
        "the large unit did not wait for the writers' lock"
    );
    holder
        .execute(
            "SELECT pg_advisory_unlock_shared($1::int4, 0)",
            &[&group::WRITERS_LOCK_CLASS],
        )
        .await
        .unwrap();
    let outcomes = large.await.unwrap().unwrap();
    assert!(outcomes[0].is_ok());
    let read = store
        .get_many(Table::Records, vec![19_999u32.to_be_bytes().to_vec()])
        .await
        .unwrap();
    assert_eq!(read, [Some(b"v".to_vec())]);
}

/// Whether a session comes to wait for an advisory lock within about six
/// seconds (polled: PostgreSQL does not announce it).
async fn an_advisory_lock_is_awaited(client: &Client) -> bool {
    for _ in 0..300 {
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                &[],
            )
            .await
            .unwrap();
        if row.get::<_, i64>(0) > 0 {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    false
}

/// A throwaway cluster (stopped when dropped) with database `name`, its
/// connection setting, and a store on it.
async fn store_on_a_new_database(name: &str) -> (Cluster, String, PgStore) {
    let cluster = Cluster::start();
    cluster.create_database(name).await;
    let conninfo = cluster.conninfo(name);
    let store = PgStore::connect(&conninfo).await.unwrap();
    (cluster, conninfo, store)
}

/// The offline tools' snapshot is one point in time however many pages it
/// reads: events appended and rows deleted by a running store after the
/// first page are not seen, and no key is read twice or skipped at a page
/// boundary. A database with a newer schema, or none, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_reads_one_point_in_time_across_pages() {
    let engine = Postgres::start();
    let store = engine.open().await;
    let name = format!("vault{}", engine.databases.load(Ordering::SeqCst) - 1);
    let conninfo = engine.cluster.conninfo(&name);
    // 2,500 records (three pages) and as many audit events.
    for chunk in 0..5u32 {
        let mut batch = Batch::new();
        for i in chunk * 500..(chunk + 1) * 500 {
            batch
                .unit()
                .put(Table::Records, i.to_be_bytes().to_vec(), b"v".to_vec())
                .append_audit(format!("event {i}").into_bytes());
        }
        store.commit(batch).await.unwrap();
    }
    let open = |conninfo: String| {
        tokio::task::spawn_blocking(move || {
            PgSnapshot::open(&conninfo, None, None, Bounds::default())
        })
    };
    let snapshot = open(conninfo.clone()).await.unwrap().unwrap();
    let snapshot = Arc::new(snapshot);
    // A first read, then the store changes, then a whole scan.
    let first_page = {
        let snapshot = Arc::clone(&snapshot);
        tokio::task::spawn_blocking(move || {
            let mut first = Vec::new();
            snapshot
                .scan(Table::Records, &[], |key, _| {
                    first.push(key.to_vec());
                    first.len() < 1000
                })
                .unwrap();
            first
        })
        .await
        .unwrap()
    };
    assert_eq!(first_page.len(), 1000);
    let mut batch = Batch::new();
    batch.delete(Table::Records, 0u32.to_be_bytes().to_vec());
    batch.put(
        Table::Records,
        9_999u32.to_be_bytes().to_vec(),
        b"v".to_vec(),
    );
    store.commit(batch).await.unwrap();
    let (records, events) = tokio::task::spawn_blocking(move || {
        let mut records = Vec::new();
        snapshot
            .scan(Table::Records, &[], |key, _| {
                records.push(u32::from_be_bytes(key.try_into().unwrap()));
                true
            })
            .unwrap();
        let mut events = 0;
        snapshot
            .scan(Table::Audit, &[], |_, _| {
                events += 1;
                true
            })
            .unwrap();
        (records, events)
    })
    .await
    .unwrap();
    // Every key of the first moment once, in order: 0 still there, 9,999
    // not yet, none twice at a page boundary.
    assert_eq!(
        (records.len(), records.first(), records.last()),
        (2500, Some(&0), Some(&2499))
    );
    assert!(records.windows(2).all(|w| w[0] + 1 == w[1]));
    assert_eq!(events, 2500);

    // A newer schema, and a database without the vault's tables.
    let admin = connect(&conninfo).await.unwrap();
    admin
        .batch_execute("UPDATE tokenvault_schema SET version = version + 1")
        .await
        .unwrap();
    let refused = open(conninfo).await.unwrap().err().unwrap();
    assert!(
        refused.to_string().contains("newer than this binary"),
        "{refused}"
    );
    engine.cluster.create_database("empty").await;
    let refused = open(engine.cluster.conninfo("empty"))
        .await
        .unwrap()
        .err()
        .unwrap();
    assert!(
        refused.to_string().contains("holds no tokenvault vault"),
        "{refused}"
    );
    let empty = connect(&engine.cluster.conninfo("empty")).await.unwrap();
    let untouched: bool = empty
        .query_one("SELECT to_regclass('tokenvault_kv') IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(untouched, "the snapshot created tables");
}

/// Two queued batches that each fit beside other writers never make one
/// group that must run alone: the second waits for the next group.
#[tokio::test]
async fn a_group_never_grows_past_the_key_locks_by_taking_one_more_batch() {
    let batch_of = |n: u32, tag: u8| {
        let mut batch = Batch::new();
        let unit = batch.unit();
        for i in 0..n {
            unit.put(
                Table::Records,
                [&[tag][..], &i.to_be_bytes()].concat(),
                Vec::new(),
            );
        }
        batch
    };
    let (tx, rx) = mpsc::channel(8);
    let queue = tokio::sync::Mutex::new(Queue { rx, carried: None });
    let mut answers = Vec::new();
    for (n, tag) in [(1_000, 1), (1_500, 2), (10, 3)] {
        let (done, answer) = oneshot::channel();
        answers.push(answer);
        tx.send(Commit {
            batch: batch_of(n, tag),
            done,
        })
        .await
        .unwrap();
    }
    drop(tx);
    let mut sizes = Vec::new();
    while let Some(group) = next_group(&queue).await {
        sizes.push(group.len());
        assert!(
            group.len() == 1
                || group
                    .iter()
                    .map(|c| group::locks_asked(c.batch.units()))
                    .sum::<usize>()
                    <= group::MAX_KEY_LOCKS
        );
    }
    // 1,000 alone (1,500 more would pass 2,048: before, they went
    // together and locked out every other writer), then 1,500 (past the
    // 1,024 a group gathers), then the 10.
    assert_eq!(sizes, [1, 1, 1]);
}
