//! The peer: what a team would build instead of a vault. A PostgreSQL table
//! of tokens whose values pgcrypto encrypts (AES, a random IV per value,
//! the key sent with each statement), committed synchronously, driven with
//! the same load shape as the vault (requests in flight, batch size,
//! seconds) so its rows stand beside the vault's in one report.
//!
//! Each operation is one prepared statement, one round trip, over a unix
//! socket without TLS: the peer at its best. It runs twice: bare, and with
//! an audit row written by the same statement (the least a team would add
//! to know who read what). Server CPU is that of every process of the
//! PostgreSQL cluster.
//!
//! This is the one place outside `store` that names the PostgreSQL client:
//! it measures a plain table, not the vault.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use tokio_postgres::{Client, NoTls, Statement};

use super::{
    BenchArgs, Measured, Report, Scenario,
    ceilings::token_like_key,
    load::{self, LoadResult, LoadSpec},
    progress, row,
    server::{proc_stats, sum_stats},
};
use crate::store::postgres::cluster::ThrowawayCluster;

/// The configuration names of the peer's rows.
pub const PEER: &str = "peer";
/// The peer with an audit row in each statement.
pub const PEER_AUDITED: &str = "peer+audit";

const SCHEMA: &str = "
CREATE EXTENSION IF NOT EXISTS pgcrypto;
CREATE TABLE tokens (token text PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE audit (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    client text NOT NULL,
    action text NOT NULL,
    token text NOT NULL
);
";

/// `$1` tokens, `$2` values, `$3` the key; the IV is stored before the
/// ciphertext.
const TOKENIZE: &str = "
WITH v AS (SELECT t, p, gen_random_bytes(16) AS iv FROM unnest($1::text[], $2::text[]) AS u(t, p))
INSERT INTO tokens (token, value)
SELECT t, iv || encrypt_iv(convert_to(p, 'UTF8'), $3, iv, 'aes-cbc/pad:pkcs') FROM v";

/// As [`TOKENIZE`], with `$4` the client written to the audit table.
const TOKENIZE_AUDITED: &str = "
WITH a AS (INSERT INTO audit (client, action, token) SELECT $4, 'tokenize', t FROM unnest($1::text[]) AS t),
v AS (SELECT t, p, gen_random_bytes(16) AS iv FROM unnest($1::text[], $2::text[]) AS u(t, p))
INSERT INTO tokens (token, value)
SELECT t, iv || encrypt_iv(convert_to(p, 'UTF8'), $3, iv, 'aes-cbc/pad:pkcs') FROM v";

/// `$1` tokens, `$2` the key.
const DETOKENIZE: &str = "
SELECT convert_from(decrypt_iv(substring(value from 17), $2, substring(value for 16), 'aes-cbc/pad:pkcs'), 'UTF8')
FROM tokens WHERE token = ANY($1::text[])";

/// As [`DETOKENIZE`], with `$3` the client written to the audit table.
const DETOKENIZE_AUDITED: &str = "
WITH a AS (INSERT INTO audit (client, action, token) SELECT $3, 'detokenize', t FROM unnest($1::text[]) AS t)
SELECT convert_from(decrypt_iv(substring(value from 17), $2, substring(value for 16), 'aes-cbc/pad:pkcs'), 'UTF8')
FROM tokens WHERE token = ANY($1::text[])";

/// One connection and its prepared statements.
struct Session {
    client: Client,
    noop: Statement,
    tokenize: Statement,
    detokenize: Statement,
}

impl Session {
    /// Whether its statements write an audit row (they take the client).
    fn audited(&self) -> bool {
        self.tokenize.params().len() == 4
    }
}

/// Runs the peer's scenarios (the vault's scenarios it has a counterpart
/// for) on a database of `cluster`, bare then audited, adding their rows to
/// `report`.
///
/// # Errors
/// A description of what failed.
pub(super) async fn measure(
    args: &BenchArgs,
    scenarios: &[Scenario],
    cluster: &ThrowawayCluster,
    report: &mut Report,
) -> Result<(), String> {
    cluster.create_database("peer").await;
    let conninfo = cluster.conninfo("peer");
    let admin = connect(&conninfo).await?;
    admin.batch_execute(SCHEMA).await.map_err(sql)?;
    let key: Arc<Vec<u8>> = Arc::new((0..32).map(|n| n * 7 + 3).collect());
    let pids = || cluster.server_pids();
    for audited in [false, true] {
        let name = if audited { PEER_AUDITED } else { PEER };
        let sessions = open_sessions(&conninfo, args.in_flight, audited).await?;
        // Far apart: a token is made from `seed ^ n`.
        let seed = (u64::from(audited) + 1) << 48;
        let pool = Arc::new(fill(&sessions, args.pool, &key, seed).await?);
        let minted = Arc::new(AtomicU64::new(args.pool as u64 + 1));
        for &scenario in scenarios {
            if scenario == Scenario::Mixed || (audited && scenario == Scenario::Noop) {
                continue;
            }
            let spec = LoadSpec::closed_loop(scenario, args);
            progress(&format!(
                "{name}: {} for {:.1}s with {} in flight",
                scenario.name(),
                args.seconds,
                args.in_flight
            ));
            let before = sum_stats(&pids());
            let client_before = proc_stats(std::process::id()).cpu_seconds;
            let result = run(&sessions, &spec, &pool, &key, &minted, seed).await;
            let client_cpu_seconds = proc_stats(std::process::id()).cpu_seconds - client_before;
            let after = sum_stats(&pids());
            let measured = Measured {
                server: Some((before, after)),
                client_cpu_seconds: Some(client_cpu_seconds),
                ..Measured::default()
            };
            let stored = admin
                .query_one("SELECT count(*) FROM tokens", &[])
                .await
                .map_err(sql)?
                .get::<_, i64>(0);
            report.rows.push(row(
                scenario.name(),
                name,
                u64::try_from(stored).unwrap_or(0),
                &spec,
                &result,
                &measured,
            ));
        }
    }
    Ok(())
}

async fn connect(conninfo: &str) -> Result<Client, String> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .map_err(sql)?;
    tokio::spawn(connection);
    Ok(client)
}

fn sql(e: tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "the peer's PostgreSQL: {}: {}",
            db.code().code(),
            db.message()
        ),
        None => format!("the peer's PostgreSQL: {e}"),
    }
}

async fn open_sessions(
    conninfo: &str,
    count: usize,
    audited: bool,
) -> Result<Vec<Arc<Session>>, String> {
    let mut sessions = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let client = connect(conninfo).await?;
        client
            .batch_execute("SET synchronous_commit TO on")
            .await
            .map_err(sql)?;
        let prepare = |text: &'static str| client.prepare(text);
        let noop = prepare("SELECT 1").await.map_err(sql)?;
        let tokenize = prepare(if audited { TOKENIZE_AUDITED } else { TOKENIZE })
            .await
            .map_err(sql)?;
        let detokenize = prepare(if audited {
            DETOKENIZE_AUDITED
        } else {
            DETOKENIZE
        })
        .await
        .map_err(sql)?;
        sessions.push(Arc::new(Session {
            client,
            noop,
            tokenize,
            detokenize,
        }));
    }
    Ok(sessions)
}

/// Stores `count` values to read (in batches of 1,000); returns their tokens.
async fn fill(
    sessions: &[Arc<Session>],
    count: usize,
    key: &[u8],
    seed: u64,
) -> Result<Vec<String>, String> {
    let tokens: Vec<String> = (1..=count as u64).map(|n| token(seed, n)).collect();
    let session = &sessions[0];
    let audited = session.audited();
    for chunk in tokens.chunks(1000) {
        let values: Vec<String> = chunk.iter().map(|t| format!("{t}@example.com")).collect();
        let result = if audited {
            session
                .client
                .execute(&session.tokenize, &[&chunk, &values, &key, &"bench"])
                .await
        } else {
            session
                .client
                .execute(&session.tokenize, &[&chunk, &values, &key])
                .await
        };
        result.map_err(sql)?;
    }
    Ok(tokens)
}

/// A token for the peer: the same shape and scatter as the vault's.
fn token(seed: u64, n: u64) -> String {
    String::from_utf8_lossy(&token_like_key(seed, n)).into_owned()
}

/// Runs `spec` with one task per session; new tokens are numbered from
/// `minted` under `seed`.
async fn run(
    sessions: &[Arc<Session>],
    spec: &LoadSpec,
    pool: &Arc<Vec<String>>,
    key: &Arc<Vec<u8>>,
    minted: &Arc<AtomicU64>,
    seed: u64,
) -> LoadResult {
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + spec.duration;
    let tasks: Vec<_> = (0..spec.in_flight)
        .map(|task| {
            let session = Arc::clone(&sessions[task % sessions.len()]);
            let (spec, pool, key) = (spec.clone(), Arc::clone(pool), Arc::clone(key));
            let (issued, minted) = (Arc::clone(&issued), Arc::clone(minted));
            tokio::spawn(async move {
                let shared = Shared {
                    spec: &spec,
                    pool: &pool,
                    key: &key,
                    issued: &issued,
                    minted: &minted,
                    seed,
                    deadline,
                };
                worker(task, &session, &shared).await
            })
        })
        .collect();
    LoadResult::gather(tasks, started).await
}

/// What every worker of a scenario shares.
struct Shared<'a> {
    spec: &'a LoadSpec,
    pool: &'a [String],
    key: &'a [u8],
    /// Requests sent so far (for `max_requests`).
    issued: &'a AtomicU64,
    /// The number of the next new token.
    minted: &'a AtomicU64,
    seed: u64,
    deadline: Instant,
}

async fn worker(task: usize, session: &Session, shared: &Shared<'_>) -> LoadResult {
    let Shared {
        spec,
        pool,
        key,
        issued,
        minted,
        seed,
        deadline,
    } = *shared;
    let mut result = LoadResult::empty();
    let audited = session.audited();
    let mut i: usize = 0;
    loop {
        let started = Instant::now();
        if started >= deadline || issued.fetch_add(1, Ordering::Relaxed) >= spec.max_requests {
            break;
        }
        let n = spec.batch.max(1);
        let outcome = match spec.scenario {
            Scenario::Noop => session
                .client
                .query_one(&session.noop, &[])
                .await
                .map(|_| 1),
            Scenario::Tokenize | Scenario::TokenizeBatch => {
                let first = minted.fetch_add(n as u64, Ordering::Relaxed);
                let tokens: Vec<String> =
                    (first..first + n as u64).map(|m| token(seed, m)).collect();
                let values: Vec<String> =
                    tokens.iter().map(|t| format!("{t}@example.com")).collect();
                let written = if audited {
                    session
                        .client
                        .execute(&session.tokenize, &[&tokens, &values, &key, &"bench"])
                        .await
                } else {
                    session
                        .client
                        .execute(&session.tokenize, &[&tokens, &values, &key])
                        .await
                };
                written.map(|rows| rows as usize)
            }
            Scenario::Detokenize | Scenario::DetokenizeBatch | Scenario::Mixed => {
                let tokens: Vec<&str> = (0..n)
                    .map(|k| {
                        pool[(task.wrapping_mul(7919) + i * n + k) % pool.len().max(1)].as_str()
                    })
                    .collect();
                let rows = if audited {
                    session
                        .client
                        .query(&session.detokenize, &[&tokens, &key, &"bench"])
                        .await
                } else {
                    session
                        .client
                        .query(&session.detokenize, &[&tokens, &key])
                        .await
                };
                rows.map(|rows| rows.len())
            }
        };
        match outcome {
            Ok(items) => {
                result.requests += 1;
                result.items += items as u64;
                result.errors += n.saturating_sub(items) as u64;
                let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                load::record_micros(&mut result.latency_us, micros);
            }
            Err(e) => {
                result.errors += 1;
                if result.errors <= 3 {
                    progress(&format!("a peer statement failed: {}", sql(e)));
                }
            }
        }
        i += 1;
    }
    result
}
