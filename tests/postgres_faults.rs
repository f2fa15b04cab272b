//! Faults between vault replicas and PostgreSQL, injected for real: a
//! replica cut off from the database by a TCP proxy the test owns (as a
//! partition would, every connection left open and silent), and a replica
//! process frozen with SIGSTOP (as a paused VM would be). Each under load
//! through two replicas; each asserts that the other replica keeps
//! acknowledging writes within the documented bound, that nothing
//! acknowledged is lost, and that the stopped replica recovers by itself.
//! A control run with the bounds lifted shows that the same fault does
//! stall the fleet, so the check can fail.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::{
    TestVault, Writers, pg_session, postgres_replica_config, start_replica_of, wait_for_health,
};
use tokenvault::{bench::db_proxy::DbProxy, store::postgres::cluster::ThrowawayCluster};

/// How long another replica may go without an acknowledged write while
/// one is stopped: README's bound (twice `idle_in_transaction_timeout_ms`,
/// 2 s by default), with room for a loaded 2-core CI machine, and below
/// the stopped replica's own call deadline (5 s), so that its closing its
/// connection cannot be what ends the stall.
const STALL_BOUND: Duration = Duration::from_secs(4);

/// The tests here measure stalls and time bounds: one at a time, so that
/// two clusters and four vaults do not share the two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What PostgreSQL logs when it ends a silent replica's transaction.
const IDLE_ENDED: &str = "idle-in-transaction timeout";

/// How long each fault lasts: longer than every default bound, so a stall
/// that is not bounded shows as one of about this length.
const FAULT: Duration = Duration::from_secs(10);

/// Bounds lifted far past [`FAULT`]: the control run's settings.
const UNBOUNDED: &str = "call_timeout_ms = 300000\nlock_timeout_ms = 250000\n\
                         idle_in_transaction_timeout_ms = 100000\n";

/// A cluster with the vault's and the ledger's databases.
async fn cluster() -> ThrowawayCluster {
    let cluster = ThrowawayCluster::start();
    cluster.create_database("vault").await;
    cluster.create_database("ledger").await;
    cluster
}

/// A direct connection string to `dbname`, naming its sessions `name`.
fn direct(cluster: &ThrowawayCluster, dbname: &str, name: &str) -> String {
    format!("{} application_name={name}", cluster.conninfo(dbname))
}

/// Whether a session of replica B waits on a lock that a session of
/// replica A holds.
async fn a_blocks_b(admin: &tokio_postgres::Client) -> bool {
    let row = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity b \
             JOIN pg_stat_activity a ON a.pid = ANY (pg_blocking_pids(b.pid)) \
             WHERE b.application_name = 'replica-b' AND a.application_name = 'replica-a'",
            &[],
        )
        .await
        .unwrap();
    row.get::<_, i64>(0) > 0
}

/// A client session for the test's own questions to the cluster.
async fn admin(cluster: &ThrowawayCluster) -> tokio_postgres::Client {
    pg_session(cluster, "postgres").await
}

/// Stops replica A with `stop` (and starts it again with `resume`) until
/// it is caught holding a lock that B waits for: under load, that is the
/// audit head within a few tries. Returns when it was stopped.
async fn stop_a_holding_what_b_needs(
    admin: &tokio_postgres::Client,
    stop: impl Fn(),
    resume: impl Fn(),
) -> Instant {
    for _ in 0..50 {
        stop();
        let at = Instant::now();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if a_blocks_b(admin).await {
                return at;
            }
        }
        resume();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("replica A was never caught holding a lock B waits for, in 50 tries");
}

/// Polls `vault`'s log until more than `seen` lines contain `needle`, for
/// at most `within`; returns how long after `since` the next one appeared.
async fn log_appears(
    vault: &TestVault,
    needle: &str,
    seen: usize,
    since: Instant,
    within: Duration,
) -> Option<Duration> {
    while since.elapsed() < within {
        if vault.count_log(needle) > seen {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Two replicas under tokenize load: `a` on `a_connection`, `b` directly
/// on the cluster; both with `bounds` (`[storage.postgres]` keys).
async fn loaded_replicas(
    cluster: &ThrowawayCluster,
    a_connection: (&str, &str),
    bounds: &str,
) -> (TestVault, TestVault, Writers, Writers) {
    let a = TestVault::start_with(&postgres_replica_config(
        a_connection.0,
        a_connection.1,
        bounds,
    ));
    let b = start_replica_of(
        &a,
        &postgres_replica_config(
            &direct(cluster, "vault", "replica-b"),
            &direct(cluster, "ledger", "replica-b"),
            bounds,
        ),
    );
    let wa = Writers::start_retrying(&a.client("checkout").await, 4, "a");
    let wb = Writers::start_retrying(&b.client("checkout").await, 4, "b");
    wa.wait_for(100).await;
    wb.wait_for(100).await;
    (a, b, wa, wb)
}

/// Replica A is cut off from the database (the proxy between them passes
/// nothing, connections left open) while inside a transaction that holds
/// key locks or the audit head. The server ends that transaction after
/// `idle_in_transaction_timeout_ms`, so B keeps acknowledging writes; A's
/// own calls fail within `call_timeout_ms` and its health says
/// NOT_SERVING; once the link heals A serves again by itself, and every
/// acknowledged write of either replica reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_replica_holds_up_the_others_no_longer_than_the_bound() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let cluster = cluster().await;
    let proxy = DbProxy::start(cluster.socket_dir()).await.unwrap();
    let admin = admin(&cluster).await;
    let (a, b, wa, wb) = loaded_replicas(
        &cluster,
        (
            &proxy.conninfo("vault", "replica-a"),
            &proxy.conninfo("ledger", "replica-a"),
        ),
        "",
    )
    .await;
    // A's database is reached over TCP in the clear (the proxy, on
    // loopback): said at start, for each setting; B's (a socket) is not.
    assert_eq!(
        a.count_log("without TLS (sslmode=disable)"),
        2,
        "{}",
        a.logs()
    );
    assert_eq!(b.count_log("without TLS"), 0, "{}", b.logs());

    let token = wa.acked()[0].0.clone();
    let b_failed = wb.failed();
    let cut_at = stop_a_holding_what_b_needs(&admin, || proxy.cut(), || proxy.heal()).await;
    // A read through the cut-off replica fails within its call deadline
    // (5 s, plus a reconnect attempt) instead of hanging.
    let read_at = Instant::now();
    let mut read = tonic::Request::new(tokenvault::proto::v1::DetokenizeRequest {
        tokens: vec![token],
        purpose: "customer_support".into(),
        masked: false,
    });
    read.set_timeout(Duration::from_secs(30));
    let refused = a
        .client("support")
        .await
        .detokenize(read)
        .await
        .unwrap_err();
    let read_failed_after = read_at.elapsed();
    let not_serving = wait_for_health(&a, "NOT_SERVING", Duration::from_secs(10)).await;
    tokio::time::sleep_until((cut_at + FAULT).into()).await;
    let stall = wb.longest_stall_since(cut_at);
    eprintln!(
        "partition of {FAULT:?}: the other replica's longest stall {stall:?}; \
         the partitioned one refused a read after {read_failed_after:?} and said NOT_SERVING \
         {not_serving:?} after that"
    );
    assert!(
        stall < STALL_BOUND,
        "the other replica stalled {stall:?} behind a partitioned one:\n{}",
        b.logs()
    );
    assert_eq!(
        wb.failed(),
        b_failed,
        "the other replica's writers waited, not failed"
    );
    assert!(cluster.log().contains(IDLE_ENDED), "{}", cluster.log());
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        read_failed_after < Duration::from_secs(15),
        "{read_failed_after:?}"
    );
    assert_eq!(common::health(&b), "SERVING");
    assert!(
        not_serving.is_ok(),
        "health of the partitioned replica: {not_serving:?}\n{}",
        a.logs()
    );

    proxy.heal();
    let before = wa.acked().len();
    wa.wait_for(before + 50).await;
    wait_for_health(&a, "SERVING", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(a.logs().contains("did not answer within"), "{}", a.logs());

    let acked = common::stop_writers(wa, wb).await;
    common::assert_all_kept(&[&a, &b], &acked).await;
}

/// Replica A, which holds the background-jobs lease, is frozen with
/// SIGSTOP under load, inside a transaction. B keeps acknowledging writes
/// within the bound and takes the lease within `lease_timeout_ms` and a
/// renewal; once A runs again it finds its transaction ended and its lease
/// gone, and serves again; every acknowledged write reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replica_holds_up_the_others_no_longer_than_the_bound() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let cluster = cluster().await;
    let admin = admin(&cluster).await;
    let (a, b, wa, wb) = loaded_replicas(
        &cluster,
        (
            &direct(&cluster, "vault", "replica-a"),
            &direct(&cluster, "ledger", "replica-a"),
        ),
        "",
    )
    .await;
    const TOOK: &str = "took the background-jobs lease";
    const LOST: &str = "lost the background-jobs lease";
    // A started first, so it took the lease.
    assert!(
        log_appears(&a, TOOK, 0, Instant::now(), Duration::from_secs(10))
            .await
            .is_some()
    );
    assert_eq!(b.count_log(TOOK), 0);

    let b_failed = wb.failed();
    let frozen_at = stop_a_holding_what_b_needs(&admin, || a.freeze(), || a.thaw()).await;
    // Counted from the freeze that held: the tries before it were short.
    let (took_before, lost_before) = (b.count_log(TOOK), a.count_log(LOST));
    let took_lease = log_appears(&b, TOOK, took_before, frozen_at, FAULT).await;
    tokio::time::sleep_until((frozen_at + FAULT).into()).await;
    let stall = wb.longest_stall_since(frozen_at);
    let b_failed_meanwhile = wb.failed() - b_failed;
    eprintln!(
        "replica frozen for {FAULT:?}: the other's longest stall {stall:?}; \
         it took the lease after {took_lease:?}"
    );
    a.thaw();
    assert!(
        stall < STALL_BOUND,
        "the other replica stalled {stall:?} behind a frozen one:\n{}",
        b.logs()
    );
    assert_eq!(
        b_failed_meanwhile, 0,
        "the other replica's writers waited, not failed"
    );
    assert!(cluster.log().contains(IDLE_ENDED), "{}", cluster.log());
    assert_eq!(common::health(&b), "SERVING");
    let took_lease = took_lease.expect("the other replica never took the lease");
    // The lease's span (5 s) and a renewal (1.25 s), with room for load.
    assert!(took_lease < Duration::from_secs(9), "{took_lease:?}");

    let before = wa.acked().len();
    wa.wait_for(before + 50).await;
    let lost = log_appears(
        &a,
        LOST,
        lost_before,
        Instant::now(),
        Duration::from_secs(10),
    )
    .await;
    assert!(lost.is_some(), "{}", a.logs());

    let acked = common::stop_writers(wa, wb).await;
    common::assert_all_kept(&[&a, &b], &acked).await;
}

/// The control run: the same partition with the bounds lifted past the
/// fault's length stalls the other replica for about as long as the
/// partition lasts. Without it the two tests above could pass because the
/// fault never held anything up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_without_the_bounds_a_partitioned_replica_stalls_the_others() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let cluster = cluster().await;
    let proxy = DbProxy::start(cluster.socket_dir()).await.unwrap();
    let admin = admin(&cluster).await;
    let (_a, b, wa, wb) = loaded_replicas(
        &cluster,
        (
            &proxy.conninfo("vault", "replica-a"),
            &proxy.conninfo("ledger", "replica-a"),
        ),
        UNBOUNDED,
    )
    .await;
    let cut_at = stop_a_holding_what_b_needs(&admin, || proxy.cut(), || proxy.heal()).await;
    tokio::time::sleep_until((cut_at + FAULT).into()).await;
    let stall = wb.longest_stall_since(cut_at);
    eprintln!("control, bounds lifted: the other replica's longest stall {stall:?} in {FAULT:?}");
    assert!(
        stall > FAULT - Duration::from_secs(2),
        "without the bounds the partition should have stalled the other replica: {stall:?}\n{}",
        b.logs()
    );
    proxy.heal();
    let acked = common::stop_writers(wa, wb).await;
    common::assert_all_detokenize(&b, &acked).await;
}

/// Reads the audit chain and the signed checkpoints of database `dbname`
/// straight from its tables, and asserts that the chain links up from
/// event 1 without a gap and that every checkpoint signs the hash the
/// chain has at its number (a checkpoint over a head the database does not
/// hold is a fork). Returns the chain's length.
async fn assert_chain_whole(cluster: &ThrowawayCluster, dbname: &str) -> u64 {
    use tokenvault::store::chain;
    let client = pg_session(cluster, dbname).await;
    let rows = client
        .query(
            "SELECT key, value FROM tokenvault_kv WHERE tbl = 'audit' ORDER BY key",
            &[],
        )
        .await
        .unwrap();
    let mut hashes = std::collections::HashMap::new();
    let mut prev = chain::GENESIS;
    for (n, row) in rows.iter().enumerate() {
        let seq = chain::seq_of(row.get(0)).unwrap();
        let value: &[u8] = row.get(1);
        assert_eq!(seq, n as u64 + 1, "a gap in the chain before event {seq}");
        assert_eq!(
            chain::decode(value).unwrap().prev,
            prev,
            "event {seq} does not link to the one before"
        );
        prev = chain::hash(seq, value);
        hashes.insert(seq, prev);
    }
    let checkpoints = signed_heads(cluster, dbname).await;
    assert!(
        !checkpoints.is_empty(),
        "no checkpoint to check (audit.checkpoint_interval_seconds = 1 makes some)"
    );
    for (seq, head) in &checkpoints {
        assert_eq!(
            hashes.get(seq),
            Some(head),
            "the checkpoint at event {seq} signs a head the chain does not hold"
        );
    }
    rows.len() as u64
}

/// The heads signed in database `dbname`, by sequence number.
async fn signed_heads(
    cluster: &ThrowawayCluster,
    dbname: &str,
) -> std::collections::BTreeMap<u64, [u8; 32]> {
    use tokenvault::store::chain;
    let client = pg_session(cluster, dbname).await;
    let rows = client
        .query(
            "SELECT key, value FROM tokenvault_kv WHERE tbl = 'audit_checkpoints'",
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|row| {
            let seq = chain::seq_of(row.get(0)).unwrap();
            let checkpoint = tokenvault::audit::Checkpoint::decode(seq, row.get(1)).unwrap();
            (seq, checkpoint.head)
        })
        .collect()
}

/// The events of `method` the chain in database `dbname` holds.
async fn events_of(
    cluster: &ThrowawayCluster,
    dbname: &str,
    method: &str,
) -> Vec<tokenvault::audit::AuditEvent> {
    let client = pg_session(cluster, dbname).await;
    let rows = client
        .query("SELECT value FROM tokenvault_kv WHERE tbl = 'audit'", &[])
        .await
        .unwrap();
    rows.iter()
        .map(|row| {
            let value: &[u8] = row.get(0);
            let payload = tokenvault::store::chain::decode(value).unwrap().payload;
            tokenvault::audit::AuditEvent::decode(payload).unwrap()
        })
        .filter(|event| event.method == method)
        .collect()
}

/// The heads signed in database `vault` once one is numbered above
/// `past` (checkpoints come every second); fails after 20 s.
async fn signed_past(
    cluster: &ThrowawayCluster,
    past: u64,
) -> std::collections::BTreeMap<u64, [u8; 32]> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let signed = signed_heads(cluster, "vault").await;
        if signed.keys().any(|seq| *seq > past) {
            return signed;
        }
        assert!(
            Instant::now() < deadline,
            "no head above {past} signed within 20 s: {signed:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What detokenizing `tokens` through `vault` gives: the values revealed,
/// or, if the call was refused, nothing.
async fn revealed_values(vault: &TestVault, tokens: &[String]) -> Vec<String> {
    // A replica that has stopped refuses the connection.
    let Ok(channel) = vault.channel_with(&vault.pki.tls("support")).await else {
        return Vec::new();
    };
    let mut client = tokenvault::proto::v1::token_vault_client::TokenVaultClient::new(channel);
    match common::detokenize(&mut client, tokens, "customer_support").await {
        Ok(response) => common::revealed(response).into_iter().flatten().collect(),
        Err(_) => Vec::new(),
    }
}

/// The vault's database is restored, while both replicas run, from a dump
/// taken before two subjects were erased (one through each). Each replica
/// notices at its next write or its next check of the database, whichever
/// comes first: it refuses every reveal, says why in its log, and stops.
/// Started again (as Kubernetes would), the first re-applies the erasure
/// ledger: the erased subjects stay erased, the others read, and the
/// chain in the database links up, with no checkpoint over a head it does
/// not hold. No head is signed again for a number that had a signed head
/// before the restore (the witness in the ledger database; without it,
/// the replicas sign the restored chain's numbers again a second after
/// they start), and the loss is recorded as a `ChainRolledBack` event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_under_running_replicas_is_noticed_and_erasures_stay() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let cluster = cluster().await;
    let config = format!(
        "{}[audit]\ncheckpoint_interval_seconds = 1\n",
        postgres_replica_config(&cluster.conninfo("vault"), &cluster.conninfo("ledger"), "")
    );
    let mut a = TestVault::start_with(&config);
    let mut b = start_replica_of(&a, &config);
    let mut tokens = Vec::new();
    for i in 0..4 {
        tokens.push(
            common::tokenize_one_for(
                &mut a.client("support").await,
                "email",
                &format!("person{i}@example.com"),
                &format!("cust-{i}"),
            )
            .await,
        );
    }
    let backup = cluster.dump_database("vault");
    let dumped = signed_heads(&cluster, "vault").await;
    common::erase_subject(&a, "cust-0").await;
    common::erase_subject(&b, "cust-1").await;
    assert_eq!(
        revealed_values(&b, &tokens).await,
        ["person2@example.com", "person3@example.com"]
    );
    // Writes the restore will lose, and a checkpoint over them.
    let mut client = a.client("checkout").await;
    for i in 0..12 {
        common::tokenize_one(&mut client, "email", &format!("lost{i}@example.com")).await;
    }
    let dumped_max = dumped.keys().max().copied().unwrap_or(0);
    let before = signed_past(&cluster, dumped_max + 12).await;
    let lost = *before.keys().max().unwrap();
    assert!(
        lost > dumped_max + 12,
        "no checkpoint over the writes: {before:?}"
    );

    cluster.restore_database("vault", &backup).await;
    // From now on neither replica reveals an erased subject, whatever it
    // answers, until each has stopped.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut a_running, mut b_running) = (true, true);
    while (a_running || b_running) && Instant::now() < deadline {
        for (vault, running) in [(&mut a, &mut a_running), (&mut b, &mut b_running)] {
            if !*running {
                continue;
            }
            let values = revealed_values(vault, &tokens[..2]).await;
            assert!(
                values.is_empty(),
                "a replica revealed an erased subject after the restore:\n{}",
                vault.logs()
            );
            if let Some(status) = vault.wait_for_exit(Duration::from_millis(200)).await {
                assert_eq!(status.code(), Some(1), "{}", vault.logs());
                *running = false;
            }
        }
    }
    assert!(
        !a_running && !b_running,
        "a replica still runs on the restored database"
    );
    for vault in [&a, &b] {
        assert!(
            vault.logs().contains("the database went back in time"),
            "{}",
            vault.logs()
        );
    }

    a.spawn().unwrap();
    b.spawn().unwrap();
    assert!(
        a.logs().contains("re-applied the erasure ledger")
            || b.logs().contains("re-applied the erasure ledger"),
        "{}\n{}",
        a.logs(),
        b.logs()
    );
    for vault in [&a, &b] {
        assert_eq!(
            revealed_values(vault, &tokens).await,
            ["person2@example.com", "person3@example.com"]
        );
    }
    // Checkpoints come due while the restored chain is still below the
    // numbers signed before: none may be signed for them.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = signed_heads(&cluster, "vault").await;
    let resigned: Vec<u64> = after
        .keys()
        .copied()
        .filter(|seq| *seq > dumped_max && *seq <= lost)
        .collect();
    assert!(
        resigned.is_empty(),
        "heads signed again for numbers signed before the restore: {resigned:?} (signed up to {lost})"
    );
    assert!(
        a.logs().contains("the audit chain lost events")
            || b.logs().contains("the audit chain lost events"),
        "{}\n{}",
        a.logs(),
        b.logs()
    );
    // Recorded once (the second replica to open found it recorded), with
    // the head lost.
    let recorded = events_of(&cluster, "vault", "ChainRolledBack").await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(
        recorded[0].lost_signed_head.as_deref(),
        Some(format!("{lost}:{}", data_encoding::HEXLOWER.encode(&before[&lost])).as_str())
    );
    // Past them, signing resumes.
    let mut client = a.client("checkout").await;
    for i in 0..20 {
        common::tokenize_one(&mut client, "email", &format!("later{i}@example.com")).await;
    }
    signed_past(&cluster, lost).await;
    a.stop();
    b.stop();
    assert!(assert_chain_whole(&cluster, "vault").await > 0);
}

/// A primary, its standby, and two replicas on both hosts under load.
async fn replicas_on_a_pair(
    primary: &ThrowawayCluster,
    standby: &ThrowawayCluster,
) -> (TestVault, TestVault, Writers, Writers) {
    let on_either = |dbname: &str| {
        format!(
            "host={},{} user=tokenvault dbname={dbname} target_session_attrs=read-write",
            primary.socket_dir().display(),
            standby.socket_dir().display()
        )
    };
    let (a, b) = common::postgres_replicas_on(&on_either("vault"), &on_either("ledger"));
    let wa = Writers::start_retrying(&a.client("checkout").await, 4, "a");
    let wb = Writers::start_retrying(&b.client("checkout").await, 4, "b");
    wa.wait_for(100).await;
    wb.wait_for(100).await;
    (a, b, wa, wb)
}

/// A primary and a streaming standby, with the vault's and the ledger's
/// databases, the standby synchronous or not.
async fn pair(synchronous: bool) -> (ThrowawayCluster, ThrowawayCluster) {
    let primary = ThrowawayCluster::start_primary();
    primary.create_database("vault").await;
    primary.create_database("ledger").await;
    let standby = ThrowawayCluster::standby_of(&primary);
    if synchronous {
        primary.require_synchronous_standby().await;
    }
    // Streaming, in the state asked for, before any load.
    let wanted = if synchronous { "sync" } else { "async" };
    for _ in 0..100 {
        if primary.sync_states().await == [wanted] {
            return (primary, standby);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the standby never streamed as {wanted}: {:?}",
        primary.sync_states().await
    );
}

/// The failover that keeps every promise: the standby is synchronous
/// (asserted), it is stalled, then every process of the primary is killed
/// at once under load, as a machine crash would, and the standby promoted.
/// Every token acknowledged before, during or after it reads through both
/// replicas, neither says the database went back, and the chain links up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_failover_loses_nothing_acknowledged() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (primary, standby) = pair(true).await;
    let (a, b, wa, wb) = replicas_on_a_pair(&primary, &standby).await;
    standby.freeze();
    // Commits wait for the stalled standby, and go on waiting past the
    // vault's call deadline (5 s): a deadline that cancelled the wait on
    // the server would have the commit acknowledged without the standby.
    let admin = admin(&primary).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no commit waits for the standby");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(7)).await;
    let acked_before_crash = wa.acked().len() + wb.acked().len();
    let failed_before_crash = wa.failed() + wb.failed();
    primary.crash();
    // While no host takes writes, health says so.
    wait_for_health(&a, "NOT_SERVING", Duration::from_secs(15))
        .await
        .unwrap_or_else(|said| panic!("health with no primary: {said}\n{}", a.logs()));
    standby.thaw();
    standby.promote();
    let resumed = wa.acked().len() + wb.acked().len();
    wa.wait_for(wa.acked().len() + 50).await;
    wb.wait_for(wb.acked().len() + 50).await;
    for vault in [&a, &b] {
        wait_for_health(vault, "SERVING", Duration::from_secs(15))
            .await
            .unwrap_or_else(|said| panic!("health after the promotion: {said}"));
        assert!(
            vault.logs().contains("reconnected to PostgreSQL"),
            "{}",
            vault.logs()
        );
    }
    let acked = common::stop_writers(wa, wb).await;
    eprintln!(
        "synchronous failover: {} writes acknowledged, {acked_before_crash} before the crash \
         ({resumed} when the standby was promoted), all read after it",
        acked.len()
    );
    assert!(
        failed_before_crash > 0,
        "no call failed while the standby was stalled: its commits were not waited for"
    );
    common::assert_all_kept(&[&a, &b], &acked).await;
    drop((a, b));
    assert!(assert_chain_whole(&standby, "vault").await >= acked.len() as u64);
}

/// The control run of the failover above, and the lossy failover it
/// guards against: the standby is asynchronous, stalled while the primary
/// acknowledges more writes, then the primary crashes and the standby is
/// promoted without them. Writes acknowledged are lost (the check the
/// synchronous run passes does fail here), and the replicas do not serve
/// on silently: each says the database went back in time, and stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_an_asynchronous_failover_loses_writes_and_the_replicas_say_so() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (primary, standby) = pair(false).await;
    let (mut a, mut b, wa, wb) = replicas_on_a_pair(&primary, &standby).await;
    standby.freeze();
    // Enough WAL that the socket to the stalled standby cannot hold it.
    wa.wait_for(wa.acked().len() + 300).await;
    wb.wait_for(wb.acked().len() + 300).await;
    primary.crash();
    standby.thaw();
    standby.promote();
    for vault in [&mut a, &mut b] {
        assert_eq!(
            vault
                .wait_for_exit(Duration::from_secs(30))
                .await
                .and_then(|status| status.code()),
            Some(1),
            "a replica goes on serving after a lossy failover:\n{}",
            vault.logs()
        );
        assert!(
            vault.logs().contains("the database went back in time"),
            "{}",
            vault.logs()
        );
    }
    let acked = common::stop_writers(wa, wb).await;
    a.spawn().unwrap();
    let mut lost = 0;
    for chunk in acked.chunks(500) {
        let tokens: Vec<String> = chunk.iter().map(|(t, _)| t.clone()).collect();
        let read = common::detokenize(&mut a.client("support").await, &tokens, "customer_support")
            .await
            .unwrap();
        lost += common::revealed(read)
            .iter()
            .filter(|r| **r == Err(tokenvault::proto::v1::Code::NotFound))
            .count();
    }
    eprintln!(
        "asynchronous failover: {lost} of {} acknowledged writes lost, and both replicas said so",
        acked.len()
    );
    assert!(
        lost > 0,
        "the asynchronous standby lost nothing: the control cannot fail"
    );
    drop(a);
    // What the promoted standby holds is still one chain, with no
    // checkpoint over a head it lacks.
    assert_chain_whole(&standby, "vault").await;
}

/// The database loses an erasure without its audit head going back (its
/// write rolled back alone, as a failed write after the ledger entry
/// leaves it, or a partial restore): the chain gives no sign, so every
/// replica compares the erasure ledger's newest entry with the database
/// every second, and once the database has lacked it for longer than an
/// erasure's write can take (three call deadlines, 3 s here), refuses
/// writes and reveals, says why and exits, so that its restart applies the
/// erasure again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_the_database_lost_is_noticed_from_the_ledger() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let cluster = cluster().await;
    let config = postgres_replica_config(
        &cluster.conninfo("vault"),
        &cluster.conninfo("ledger"),
        "call_timeout_ms = 1000\nlock_timeout_ms = 900\nidle_in_transaction_timeout_ms = 400\n",
    );
    let mut a = TestVault::start_with(&config);
    let token = common::tokenize_one_for(
        &mut a.client("support").await,
        "email",
        "gone@example.com",
        "cust-gone",
    )
    .await;
    assert_eq!(common::erase_subject(&a, "cust-gone").await, 1);
    // The database's record of erasure 1 goes; the ledger keeps it.
    let client = pg_session(&cluster, "vault").await;
    let key = tokenvault::layout::erasure_ledger_entry_key(1);
    let deleted = client
        .execute(
            "DELETE FROM tokenvault_kv WHERE tbl = 'meta' AND key = $1",
            &[&key],
        )
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let lost_at = Instant::now();
    assert_eq!(
        a.wait_for_exit(Duration::from_secs(20))
            .await
            .and_then(|status| status.code()),
        Some(1),
        "the replica serves a database that lacks an erasure:\n{}",
        a.logs()
    );
    // Not before the grace: an erasure's write may still be on its way.
    assert!(
        lost_at.elapsed() > Duration::from_millis(2500),
        "{:?}",
        lost_at.elapsed()
    );
    assert!(a.logs().contains("lacks erasure 1"), "{}", a.logs());
    a.spawn().unwrap();
    assert!(revealed_values(&a, &[token]).await.is_empty());
    // Applied again at the start: the database holds it once more.
    let held: i64 = client
        .query_one(
            "SELECT count(*) FROM tokenvault_kv WHERE tbl = 'meta' AND key = $1",
            &[&key],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(common::health(&a), "SERVING", "{}", a.logs());
}

/// How many records the vault's database holds.
async fn records(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT count(*) FROM tokenvault_kv WHERE tbl = 'records'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Tokenizes `value` for `subject` with `request_id` through `vault`,
/// sending it again until it is answered (a replica reconnecting answers
/// UNAVAILABLE meanwhile): its token, and the failures' statuses.
async fn tokenize_until_answered(
    vault: &TestVault,
    value: &str,
    subject: &str,
    request_id: &str,
) -> (String, Vec<tonic::Status>) {
    let mut client = vault.client("support").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut failed = Vec::new();
    loop {
        let mut request = tonic::Request::new(tokenvault::proto::v1::TokenizeRequest {
            items: vec![common::subject_item("email", value, subject)],
            request_id: request_id.into(),
        });
        request.set_timeout(Duration::from_secs(30));
        match client.tokenize(request).await {
            Ok(response) => return (common::tokens_of(response.into_inner()).remove(0), failed),
            Err(status) => {
                assert!(Instant::now() < deadline, "never answered: {status:?}");
                failed.push(status);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The answer to a COMMIT is lost on its way back (the proxy drops the
/// connection's replies from the COMMIT on; the database applies it): the
/// caller hears `UNAVAILABLE` saying the write may have been applied. Sent
/// again with its `request_id`, the Tokenize gets the first call's token,
/// and one record is written. The control, the same call without an id,
/// writes two (an orphan), so the fault does make an ambiguous commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_its_request_id_after_a_lost_commit_answer_leaves_no_orphan() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let cluster = cluster().await;
    let proxy = DbProxy::start(cluster.socket_dir()).await.unwrap();
    // No checkpoint is signed (committed) while the loss is armed.
    let config = format!(
        "{}[audit]\ncheckpoint_interval_seconds = 3600\n",
        postgres_replica_config(
            &proxy.conninfo("vault", "replica"),
            &direct(&cluster, "ledger", "ledger"),
            "",
        )
    );
    let mut vault = TestVault::start_with(&config);
    let db = pg_session(&cluster, "vault").await;
    // Connections made, keys and schema in place, and each subject's key
    // made: the lost answer is the value's write's, not the key's.
    for subject in ["cust-retried", "cust-control"] {
        tokenize_until_answered(&vault, "warm@example.com", subject, "").await;
    }

    let mut outcomes = Vec::new();
    for (subject, request_id) in [("cust-retried", "0d9e-lost-commit"), ("cust-control", "")] {
        let lost_before = proxy.replies_lost();
        let records_before = records(&db).await;
        // The simple-query message `COMMIT` (tokio-postgres commits so).
        proxy.lose_reply_to(b"Q\0\0\0\x0bCOMMIT\0");
        let value = format!("{subject}@example.com");
        let (token, failed) = tokenize_until_answered(&vault, &value, subject, request_id).await;
        assert_eq!(proxy.replies_lost(), lost_before + 1, "no COMMIT was sent");
        // The caller is told the write may have been made, and what to do.
        let first = failed.first().expect("the lost answer was not an error");
        assert_eq!(first.code(), tonic::Code::Unavailable, "{first:?}");
        assert!(
            first.message().contains("may have been applied")
                && first.message().contains("request_id"),
            "{first:?}"
        );
        let written = records(&db).await - records_before;
        let revealed = common::detokenize(
            &mut vault.client("support").await,
            std::slice::from_ref(&token),
            "customer_support",
        )
        .await
        .unwrap();
        assert_eq!(
            common::revealed(revealed),
            vec![Ok(value.clone())],
            "{subject}"
        );
        outcomes.push((subject, written));
    }
    assert_eq!(
        outcomes,
        [("cust-retried", 1), ("cust-control", 2)],
        "records written by a call whose COMMIT answer was lost, and its retry"
    );
    // The retry was answered from the first call's record, and says so.
    let replays = common::audit_events(&vault)
        .await
        .into_iter()
        .filter(|e| e["method"] == "Tokenize" && e.get("replay_of").is_some())
        .count();
    assert_eq!(replays, 1);
    vault.assert_log_free_of(&["cust-retried@example.com", "cust-control@example.com"]);
}
