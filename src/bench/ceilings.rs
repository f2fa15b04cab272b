//! The ceilings measured beside the gRPC load in the same run: the vault's
//! own tokenize/detokenize path in process (no gRPC, no TLS), the bare
//! store's group commit, and the device's synced-write rate.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    BenchArgs, Measured, Report, Row,
    load::{self, LoadResult, LoadSpec, Scenario},
    progress, row, server,
};
use crate::{
    authz::{IdentityPattern, Policy, PurposeSet, Rule, act},
    crypto::{MasterKey, SecretValue},
    identity::ClientId,
    store::{RocksStore, StoreOptions},
    vault::{NewValue, Vault},
};

/// A vault in `dir` (a new master key, RocksDB with sync durability, the
/// built-in field types), in this process.
pub(super) async fn throwaway_vault(dir: &std::path::Path) -> Result<Vault<RocksStore>, String> {
    let key_path = dir.join("master.key");
    MasterKey::create_file(&key_path).map_err(|e| e.to_string())?;
    let master = MasterKey::load(&key_path).map_err(|e| e.to_string())?;
    let store =
        RocksStore::open(&dir.join("data"), &StoreOptions::default()).map_err(|e| e.to_string())?;
    let defaults = crate::config::RawConfig::default();
    let fields = crate::fields::FieldRegistry::from_raw(
        &defaults.field_types,
        defaults.limits.max_value_bytes,
    )
    .map_err(|e| e.to_string())?;
    Vault::open(store, &master, fields)
        .await
        .map_err(|e| e.to_string())
}

/// The vault's tokenize path (crypto, record encoding, group commit, fsync)
/// without gRPC or TLS, in this process.
pub(super) async fn in_process_ceiling(
    args: &BenchArgs,
    report: &mut Report,
) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let vault = Arc::new(throwaway_vault(dir.path()).await?);
    let policy = Arc::new(Policy::new(vec![Rule::new(
        IdentityPattern::new("spiffe://*").map_err(|e| e.to_string())?,
        vec![
            "tokenize:*"
                .parse()
                .map_err(|e: crate::authz::ScopeError| e.to_string())?,
        ],
        PurposeSet::Any,
    )]));
    let client = Arc::new(ClientId::Spiffe(server::BENCH_CLIENT.into()));
    for (name, batch) in [
        ("in-process tokenize", 1),
        ("in-process tokenize-batch", args.batch),
    ] {
        progress(&format!("sync: {name} for {:.1}s", args.seconds));
        let started = Instant::now();
        let deadline = started + Duration::from_secs_f64(args.seconds);
        let tasks: Vec<_> = (0..args.in_flight)
            .map(|task| {
                let (vault, policy, client) =
                    (Arc::clone(&vault), Arc::clone(&policy), Arc::clone(&client));
                tokio::spawn(async move {
                    let mut latency = Vec::new();
                    let mut i = 0usize;
                    while Instant::now() < deadline {
                        let grants = policy.grants(&client);
                        let permits: Result<Vec<_>, _> = (0..batch)
                            .map(|k| {
                                grants.permit_tokenize(NewValue {
                                    field_type: "email"
                                        .parse()
                                        .unwrap_or_else(|_| unreachable!("valid name")),
                                    value: SecretValue::new(format!(
                                        "ceiling.{task}.{i}.{k}@example.com"
                                    )),
                                    subject: None,
                                    ttl_seconds: None,
                                })
                            })
                            .collect();
                        let Ok(permits) = permits else { break };
                        let t0 = Instant::now();
                        let audit = crate::audit::AuditContext {
                            request_id: format!("{task}.{i}"),
                            identity: client.to_string(),
                            method: "Tokenize",
                            purpose: None,
                            items: u32::try_from(batch).unwrap_or(u32::MAX),
                            failed_items: 0,
                        };
                        let existing =
                            |ft: &crate::token::FieldType| grants.permit_field(act::Lookup, ft);
                        if vault
                            .tokenize(permits, existing, &audit, None)
                            .await
                            .is_err()
                        {
                            break;
                        }
                        latency.push(t0.elapsed());
                        i += 1;
                    }
                    latency
                })
            })
            .collect();
        report
            .rows
            .push(in_process_row(name, batch, args, started, tasks).await?);
    }
    Ok(())
}

/// The storage ceiling: the same number of synced puts of record-sized
/// values, through the same group committer, without the vault (no
/// validation, encryption or audit event). Its ratio to the in-process
/// tokenize rows is what the vault's work, audit included, costs.
pub(super) async fn store_ceiling(args: &BenchArgs, report: &mut Report) -> Result<(), String> {
    use crate::store::{Batch, Store, Table};
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let store = Arc::new(
        RocksStore::open(dir.path(), &StoreOptions::default()).map_err(|e| e.to_string())?,
    );
    // A realistic event: what a tokenize of `batch` e-mail values records.
    let sample_event = |items: usize| {
        crate::audit::AuditContext {
            request_id: "0123456789abcdef".into(),
            identity: server::BENCH_CLIENT.into(),
            method: "Tokenize",
            purpose: None,
            items: u32::try_from(items).unwrap_or(u32::MAX),
            failed_items: 0,
        }
        .event(crate::audit::Outcome::Ok)
        .encode()
    };
    for (name, batch, audited) in [
        ("in-process store commit (no vault, no audit)", 1, false),
        ("in-process store commit + audit event (no vault)", 1, true),
        (
            "in-process store commit-batch (no vault, no audit)",
            args.batch,
            false,
        ),
        (
            "in-process store commit-batch + audit event (no vault)",
            args.batch,
            true,
        ),
    ] {
        let event = audited.then(|| sample_event(batch));
        progress(&format!("sync: {name} for {:.1}s", args.seconds));
        let started = Instant::now();
        let deadline = started + Duration::from_secs_f64(args.seconds);
        let tasks: Vec<_> = (0..args.in_flight)
            .map(|_| {
                let store = Arc::clone(&store);
                let event = event.clone();
                let seed = {
                    let mut seed = [0u8; 8];
                    let _ = getrandom::fill(&mut seed);
                    u64::from_le_bytes(seed)
                };
                tokio::spawn(async move {
                    let mut latency = Vec::new();
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let mut commit = Batch::new();
                        if let Some(event) = &event {
                            // Chained by the committer, in the same write.
                            commit.unit().append_audit(event.clone());
                        }
                        for _ in 0..batch {
                            let mut value = vec![0u8; 120];
                            let _ = getrandom::fill(&mut value);
                            n += 1;
                            commit.put(Table::Records, token_like_key(seed, n), value);
                        }
                        let t0 = Instant::now();
                        if store.commit(commit).await.is_err() {
                            break;
                        }
                        latency.push(t0.elapsed());
                    }
                    latency
                })
            })
            .collect();
        report
            .rows
            .push(in_process_row(name, batch, args, started, tasks).await?);
    }
    Ok(())
}

/// One in-process row from the tasks' latencies: each latency is one
/// successful call of `batch` items.
/// The `n`th key of a stream seeded by `seed`, shaped like an opaque token
/// and as uniformly spread: each insert walks the memtable's skiplist from
/// the top, as a real token's does. (Keys that follow each other, as
/// counters do, made the bare store look twice as fast as it is.) SplitMix64,
/// so making keys costs the ceiling nothing measurable.
pub(super) fn token_like_key(seed: u64, n: u64) -> Vec<u8> {
    let mix = |x: u64| {
        let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let a = mix(seed ^ n);
    format!("tok_email_{a:016X}{:016X}", mix(a)).into_bytes()
}

async fn in_process_row(
    name: &str,
    batch: usize,
    args: &BenchArgs,
    started: Instant,
    tasks: Vec<tokio::task::JoinHandle<Vec<Duration>>>,
) -> Result<Row, String> {
    let mut hist = load::new_histogram();
    let mut requests = 0u64;
    for task in tasks {
        for l in task.await.map_err(|e| e.to_string())? {
            requests += 1;
            load::record_micros(&mut hist, u64::try_from(l.as_micros()).unwrap_or(u64::MAX));
        }
    }
    let result = LoadResult {
        requests,
        items: requests * batch as u64,
        errors: 0,
        elapsed: started.elapsed(),
        latency_us: hist,
    };
    let spec = LoadSpec {
        scenario: Scenario::TokenizeBatch,
        batch,
        in_flight: args.in_flight,
        duration: Duration::from_secs_f64(args.seconds),
        max_requests: u64::MAX,
        rate: None,
    };
    Ok(row(name, "sync", 0, &spec, &result, &Measured::default()))
}

/// The device's own sync latency: 4 KiB appended and `fdatasync`ed, one at
/// a time, in a temporary directory (where the self-started vaults live).
/// A read whose audit event must be durable first cannot beat this.
pub(super) async fn device_ceiling(args: &BenchArgs, report: &mut Report) -> Result<(), String> {
    let name = "device fdatasync, 4 KiB append";
    progress(&format!("sync: {name} for {:.1}s", args.seconds));
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut file =
        std::fs::File::create(dir.path().join("sync-probe")).map_err(|e| e.to_string())?;
    let seconds = args.seconds;
    let started = Instant::now();
    let task = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        let block = [0x5a_u8; 4096];
        let mut latency = Vec::new();
        while Instant::now() < deadline {
            let t0 = Instant::now();
            if file
                .write_all(&block)
                .and_then(|()| file.sync_data())
                .is_err()
            {
                break;
            }
            latency.push(t0.elapsed());
        }
        latency
    });
    let args = BenchArgs {
        in_flight: 1,
        ..args.clone()
    };
    report
        .rows
        .push(in_process_row(name, 1, &args, started, vec![task]).await?);
    Ok(())
}
