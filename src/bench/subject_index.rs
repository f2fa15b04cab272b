//! What the audit trail's subject index costs a detokenize: two vaults in
//! this process, one indexing events by subject (as the server always does)
//! and one without, reading values that belong to subjects, in alternating
//! rounds so that the machine's drift falls on both alike.
//!
//! In process, without gRPC and TLS (which cost both the same), the index's
//! share of a detokenize is larger than over the network: the ratio is an
//! upper bound on what a caller sees.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::{BenchArgs, Measured, Report, load, progress, row, server};
use crate::{
    audit::AuditContext,
    authz::{IdentityPattern, Policy, PurposeSet, Rule, act},
    crypto::SecretValue,
    identity::ClientId,
    store::RocksStore,
    token::Token,
    vault::{NewValue, Vault},
};

/// The row names, with and without the index.
pub(super) const WITH_INDEX: &str = "in-process detokenize, subject values";
pub(super) const WITHOUT_INDEX: &str = "in-process detokenize, subject values, no subject index";

/// Values tokenized into each vault before the rounds (each its own subject).
const VALUES: usize = 10_000;

/// Rounds per vault; they alternate A B B A A B ..., and each pair of
/// adjacent rounds gives one ratio (the machine drifts less within a pair
/// than over the run).
const ROUNDS: usize = 10;

struct Side {
    _dir: tempfile::TempDir,
    vault: Arc<Vault<RocksStore>>,
    tokens: Arc<Vec<Token>>,
    latency: Vec<Duration>,
    elapsed: Duration,
}

/// Measures both vaults and adds a row for each to `report`.
///
/// # Errors
/// A description of what failed.
pub(super) async fn subject_index_cost(
    args: &BenchArgs,
    report: &mut Report,
) -> Result<(), String> {
    let policy = Arc::new(Policy::new(vec![Rule::new(
        IdentityPattern::new("spiffe://*").map_err(|e| e.to_string())?,
        ["tokenize:*", "detokenize:*"]
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_, crate::authz::ScopeError>>()
            .map_err(|e| e.to_string())?,
        PurposeSet::Any,
    )]));
    let client = Arc::new(ClientId::Spiffe(server::BENCH_CLIENT.into()));
    progress(&format!(
        "sync: subject index cost, {VALUES} subject values in each of two vaults"
    ));
    let mut sides = [
        open(true, &policy, &client).await?,
        open(false, &policy, &client).await?,
    ];
    let round = Duration::from_secs_f64(args.seconds / 4.0);
    progress(&format!(
        "sync: {ROUNDS} alternating rounds of {:.1}s per vault",
        round.as_secs_f64()
    ));
    let mut rates = [0.0; 2];
    for r in 0..ROUNDS * 2 {
        // A B, then B A: neither side always goes first.
        let which = usize::from((r % 4 == 1) || (r % 4 == 2));
        let side = &mut sides[which];
        let started = Instant::now();
        let latency = run_round(side, round, args.in_flight, &policy, &client).await?;
        let elapsed = started.elapsed();
        rates[which] = latency.len() as f64 / elapsed.as_secs_f64();
        side.elapsed += elapsed;
        side.latency.extend(latency);
        if r % 2 == 1 && rates[1] > 0.0 {
            let ratio = rates[0] / rates[1];
            progress(&format!(
                "sync: pair {}: {:.0} req/s with the index, {:.0} without: {ratio:.2}",
                r / 2 + 1,
                rates[0],
                rates[1]
            ));
            report.subject_index_ratios.push(ratio);
        }
    }
    for (side, name) in sides.iter().zip([WITH_INDEX, WITHOUT_INDEX]) {
        report.rows.push(side_row(name, side, args));
    }
    Ok(())
}

async fn open(index: bool, policy: &Policy, client: &ClientId) -> Result<Side, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut vault = super::ceilings::throwaway_vault(dir.path()).await?;
    if !index {
        vault = vault.without_subject_index();
    }
    let grants = policy.grants(client);
    let mut tokens = Vec::with_capacity(VALUES);
    for start in (0..VALUES).step_by(1000) {
        let permits = (start..(start + 1000).min(VALUES))
            .map(|n| {
                grants
                    .permit_tokenize(NewValue {
                        field_type: "email".parse().map_err(|_| "email".to_owned())?,
                        value: SecretValue::new(format!("subject.{n}@example.com")),
                        subject: Some(format!("bench-subject-{n}").parse().map_err(|_| "id")?),
                        ttl_seconds: None,
                    })
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, String>>()?;
        let audit = context("Tokenize", permits.len());
        let existing = |ft: &crate::token::FieldType| grants.permit_field(act::Lookup, ft);
        for result in vault
            .tokenize(permits, existing, &audit, None)
            .await
            .map_err(|e| e.to_string())?
        {
            tokens.push(result.map_err(|e| e.to_string())?);
        }
    }
    Ok(Side {
        _dir: dir,
        vault: Arc::new(vault),
        tokens: Arc::new(tokens),
        latency: Vec::new(),
        elapsed: Duration::ZERO,
    })
}

fn context(method: &'static str, items: usize) -> AuditContext {
    AuditContext {
        request_id: "0123456789abcdef".into(),
        identity: server::BENCH_CLIENT.into(),
        method,
        purpose: Some(server::BENCH_PURPOSE.into()),
        items: u32::try_from(items).unwrap_or(u32::MAX),
        failed_items: 0,
    }
}

/// `in_flight` tasks detokenizing one random token each, for `length`.
async fn run_round(
    side: &Side,
    length: Duration,
    in_flight: usize,
    policy: &Arc<Policy>,
    client: &Arc<ClientId>,
) -> Result<Vec<Duration>, String> {
    let deadline = Instant::now() + length;
    let tasks: Vec<_> = (0..in_flight)
        .map(|task| {
            let (vault, tokens) = (Arc::clone(&side.vault), Arc::clone(&side.tokens));
            let (policy, client) = (Arc::clone(policy), Arc::clone(client));
            tokio::spawn(async move {
                let grants = policy.grants(&client);
                let purpose = grants
                    .allow_purpose(server::BENCH_PURPOSE.parse().map_err(|_| "purpose")?)
                    .map_err(|e| e.to_string())?;
                let audit = context("Detokenize", 1);
                let mut latency = Vec::new();
                let mut state = (task as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                while Instant::now() < deadline {
                    let at = load::draw(&mut state, tokens.len() as u64);
                    let token = &tokens[usize::try_from(at).unwrap_or(0)];
                    let t0 = Instant::now();
                    let results = vault
                        .detokenize(
                            std::slice::from_ref(token),
                            purpose.purpose(),
                            |ft| grants.permit_reveal(&purpose, ft, false),
                            &audit,
                        )
                        .await
                        .map_err(|e| e.to_string())?;
                    if !results.iter().all(Result::is_ok) {
                        return Err("a subject value did not detokenize".to_owned());
                    }
                    latency.push(t0.elapsed());
                }
                Ok::<_, String>(latency)
            })
        })
        .collect();
    let mut latency = Vec::new();
    for task in tasks {
        latency.extend(task.await.map_err(|e| e.to_string())??);
    }
    Ok(latency)
}

fn side_row(name: &str, side: &Side, args: &BenchArgs) -> super::Row {
    let mut hist = load::new_histogram();
    for l in &side.latency {
        load::record_micros(&mut hist, u64::try_from(l.as_micros()).unwrap_or(u64::MAX));
    }
    let result = load::LoadResult {
        requests: side.latency.len() as u64,
        items: side.latency.len() as u64,
        errors: 0,
        elapsed: side.elapsed,
        latency_us: hist,
    };
    let spec = load::LoadSpec {
        scenario: load::Scenario::Detokenize,
        batch: 1,
        in_flight: args.in_flight,
        duration: side.elapsed,
        max_requests: u64::MAX,
        rate: None,
    };
    row(name, "sync", 0, &spec, &result, &Measured::default())
}
