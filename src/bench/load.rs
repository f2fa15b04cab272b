//! The load generator: many requests in flight over a few mTLS connections,
//! with latencies in an HDR histogram.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use super::server::BENCH_PURPOSE;
use crate::proto::v1::{
    DetokenizeRequest, TokenizeItem, TokenizeRequest, detokenize_result,
    token_vault_client::TokenVaultClient, tokenize_result,
};

/// What a scenario sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// The health `Check` RPC on the mTLS port: the gRPC + TLS ceiling.
    Noop,
    /// Tokenize, one item per request.
    Tokenize,
    /// Tokenize, `batch` items per request.
    TokenizeBatch,
    /// Detokenize, one token per request.
    Detokenize,
    /// Detokenize, `batch` tokens per request.
    DetokenizeBatch,
    /// 80% single detokenize, 20% single tokenize.
    Mixed,
}

impl Scenario {
    /// Every scenario, in report order.
    pub const ALL: [Scenario; 6] = [
        Scenario::Noop,
        Scenario::Tokenize,
        Scenario::TokenizeBatch,
        Scenario::Detokenize,
        Scenario::DetokenizeBatch,
        Scenario::Mixed,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Noop => "noop",
            Scenario::Tokenize => "tokenize",
            Scenario::TokenizeBatch => "tokenize-batch",
            Scenario::Detokenize => "detokenize",
            Scenario::DetokenizeBatch => "detokenize-batch",
            Scenario::Mixed => "mixed",
        }
    }

    /// Parses a name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The server methods it calls, as they appear in the request log (the
    /// health check logs no line).
    pub fn methods(self) -> &'static [&'static str] {
        match self {
            Scenario::Noop => &[],
            Scenario::Tokenize | Scenario::TokenizeBatch => &["Tokenize"],
            Scenario::Detokenize | Scenario::DetokenizeBatch => &["Detokenize"],
            Scenario::Mixed => &["Tokenize", "Detokenize"],
        }
    }

    /// Whether it reads tokens and so needs a pool of them.
    pub fn reads(self) -> bool {
        matches!(
            self,
            Scenario::Detokenize | Scenario::DetokenizeBatch | Scenario::Mixed
        )
    }
}

/// How to drive one scenario.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// What to send.
    pub scenario: Scenario,
    /// Items per request in the batch scenarios.
    pub batch: usize,
    /// Requests in flight at once.
    pub in_flight: usize,
    /// How long to run.
    pub duration: Duration,
    /// Stop after this many requests even if time remains.
    pub max_requests: u64,
    /// Requests per second across all tasks (open loop); `None` for as fast
    /// as responses come back (closed loop).
    pub rate: Option<f64>,
}

impl LoadSpec {
    /// `scenario` as fast as answers come back, with the run's in-flight
    /// count, duration and request cap, and its batch size where the
    /// scenario batches.
    pub(super) fn closed_loop(scenario: Scenario, args: &super::BenchArgs) -> Self {
        Self {
            scenario,
            batch: if matches!(
                scenario,
                Scenario::TokenizeBatch | Scenario::DetokenizeBatch
            ) {
                args.batch
            } else {
                1
            },
            in_flight: args.in_flight,
            duration: Duration::from_secs_f64(args.seconds),
            max_requests: args.max_requests,
            rate: None,
        }
    }
}

/// What one scenario measured.
pub struct LoadResult {
    /// Requests answered OK.
    pub requests: u64,
    /// Items in those requests.
    pub items: u64,
    /// Failed requests or items.
    pub errors: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Latency in microseconds.
    pub latency_us: Histogram<u64>,
}

impl LoadResult {
    /// Nothing measured yet.
    pub(super) fn empty() -> Self {
        Self {
            requests: 0,
            items: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            latency_us: new_histogram(),
        }
    }

    /// The sum of what the workers of one scenario, started at `started`,
    /// measured.
    pub(super) async fn gather(
        workers: Vec<tokio::task::JoinHandle<LoadResult>>,
        started: Instant,
    ) -> Self {
        let mut total = Self::empty();
        for worker in workers {
            if let Ok(part) = worker.await {
                total.requests += part.requests;
                total.items += part.items;
                total.errors += part.errors;
                let _ = total.latency_us.add(&part.latency_us);
            }
        }
        total.elapsed = started.elapsed();
        total
    }
}

/// Runs `spec` over `channels`, reading tokens from `pool`.
pub async fn run(channels: &[Channel], spec: &LoadSpec, pool: Arc<Vec<String>>) -> LoadResult {
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + spec.duration;
    let tasks: Vec<_> = (0..spec.in_flight)
        .map(|task| {
            let channel = channels[task % channels.len()].clone();
            let spec = spec.clone();
            let pool = Arc::clone(&pool);
            let issued = Arc::clone(&issued);
            tokio::spawn(async move { worker(task, channel, spec, pool, issued, deadline).await })
        })
        .collect();
    LoadResult::gather(tasks, started).await
}

/// The longest latency a histogram holds, in microseconds (a minute).
const MAX_LATENCY_US: u64 = 60_000_000;

/// A latency histogram: 1 µs to a minute at three significant digits.
pub(super) fn new_histogram() -> Histogram<u64> {
    // These bounds are valid, so construction cannot fail.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .unwrap_or_else(|_| unreachable!("valid bounds"))
}

/// Records `micros` in a histogram from [`new_histogram`], held to its
/// bounds so a value outside them is counted at the edge, not lost.
pub(super) fn record_micros(histogram: &mut Histogram<u64>, micros: u64) {
    let _ = histogram.record(micros.clamp(1, MAX_LATENCY_US));
}

async fn worker(
    task: usize,
    channel: Channel,
    spec: LoadSpec,
    pool: Arc<Vec<String>>,
    issued: Arc<AtomicU64>,
    deadline: Instant,
) -> LoadResult {
    let mut vault = TokenVaultClient::new(channel.clone());
    let mut health = HealthClient::new(channel);
    let mut result = LoadResult::empty();
    // Open loop: each task sends on its own schedule, and latency counts
    // from the scheduled time when the task was still busy with an earlier
    // request at that time, so a stall of the server is not hidden
    // (coordinated omission). When the task was idle, waiting for its timer,
    // latency counts from the moment the timer woke it: tokio's timer has a
    // resolution of a millisecond, and its lateness is the load
    // generator's, not the server's.
    // The tasks' schedules are spread over one period, so requests arrive
    // evenly rather than in bursts of `in_flight` at once (which would
    // measure the queue of a burst, not the latency at this rate).
    let mut ticker = spec.rate.map(|rate| {
        let period = Duration::from_secs_f64(spec.in_flight as f64 / rate.max(1.0));
        let offset = period.mul_f64(task as f64 / spec.in_flight.max(1) as f64);
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        interval
    });
    let mut i: usize = 0;
    let mut rng = seed(task);
    loop {
        let scheduled = match ticker.as_mut() {
            Some(t) => {
                let asked = Instant::now();
                let due = t.tick().await.into_std();
                if due > asked { Instant::now() } else { due }
            }
            None => Instant::now(),
        };
        if scheduled >= deadline || issued.fetch_add(1, Ordering::Relaxed) >= spec.max_requests {
            break;
        }
        // Each read draws uniformly from the whole pool: a walk with a
        // fixed stride revisited a few thousand tokens and measured a hot
        // cache.
        let mut pick = |_: usize| {
            let at = draw(&mut rng, pool.len() as u64);
            &pool[usize::try_from(at).unwrap_or(0)]
        };
        let outcome = match spec.scenario {
            Scenario::Noop => health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|_| (1, 0))
                .map_err(drop),
            Scenario::Tokenize => tokenize(&mut vault, task, i, 1).await,
            Scenario::TokenizeBatch => tokenize(&mut vault, task, i, spec.batch).await,
            Scenario::Detokenize => detokenize(&mut vault, vec![pick(0).clone()]).await,
            Scenario::DetokenizeBatch => {
                detokenize(
                    &mut vault,
                    (0..spec.batch).map(|k| pick(k).clone()).collect(),
                )
                .await
            }
            Scenario::Mixed if i.is_multiple_of(5) => tokenize(&mut vault, task, i, 1).await,
            Scenario::Mixed => detokenize(&mut vault, vec![pick(0).clone()]).await,
        };
        let micros = u64::try_from(scheduled.elapsed().as_micros()).unwrap_or(u64::MAX);
        match outcome {
            Ok((items, item_errors)) => {
                result.requests += 1;
                result.items += items;
                result.errors += item_errors;
                record_micros(&mut result.latency_us, micros);
            }
            Err(()) => result.errors += 1,
        }
        i += 1;
    }
    result
}

/// Ok((items, failed items)) or Err for a failed call.
type Outcome = Result<(u64, u64), ()>;

async fn tokenize(
    client: &mut TokenVaultClient<Channel>,
    task: usize,
    i: usize,
    n: usize,
) -> Outcome {
    let items = (0..n)
        .map(|k| TokenizeItem {
            field_type: "email".into(),
            value: format!("bench.{task}.{i}.{k}@example.com"),
            subject_id: String::new(),
            ttl_seconds: 0,
        })
        .collect();
    let response = client
        .tokenize(TokenizeRequest {
            items,
            ..Default::default()
        })
        .await
        .map_err(|s| report_error(s.code(), s.message()))?;
    let results = response.into_inner().results;
    let failed = results
        .iter()
        .filter(|r| !matches!(r.result, Some(tokenize_result::Result::Token(_))))
        .count();
    Ok((results.len() as u64, failed as u64))
}

async fn detokenize(client: &mut TokenVaultClient<Channel>, tokens: Vec<String>) -> Outcome {
    let response = client
        .detokenize(DetokenizeRequest {
            tokens,
            purpose: BENCH_PURPOSE.into(),
            masked: false,
        })
        .await
        .map_err(|s| report_error(s.code(), s.message()))?;
    let results = response.into_inner().results;
    let mut failed = 0;
    for result in &results {
        match &result.result {
            Some(detokenize_result::Result::Value(_)) => {}
            Some(detokenize_result::Result::Error(e)) => {
                failed += 1;
                report_error(tonic::Code::from_i32(e.code), &e.message);
            }
            None => failed += 1,
        }
    }
    Ok((results.len() as u64, failed as u64))
}

/// What [`fill`] does with the tokens it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Minted {
    /// Returns them (the read pool).
    Kept,
    /// Returns a uniform sample of at most this many of them (a preload of
    /// millions, read back at random), drops the rest.
    Sampled(usize),
}

/// A uniform random sample of a stream of tokens (Algorithm R), shared by
/// the tasks that mint them.
struct Reservoir {
    cap: usize,
    seen: u64,
    tokens: Vec<String>,
    rng: u64,
}

impl Reservoir {
    fn offer(&mut self, token: String) {
        self.seen += 1;
        if self.tokens.len() < self.cap {
            self.tokens.push(token);
            return;
        }
        let slot = draw(&mut self.rng, self.seen);
        if let Ok(slot) = usize::try_from(slot)
            && slot < self.cap
        {
            self.tokens[slot] = token;
        }
    }
}

/// A draw in `0..n` from a xorshift state (uniform enough for picking
/// tokens; costs the load generator nothing measurable).
pub fn draw(state: &mut u64, n: u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state % n.max(1)
}

/// A seed for [`draw`] that differs between tasks and runs.
pub fn seed(task: usize) -> u64 {
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    (u64::from_le_bytes(bytes) ^ (task as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1
}

/// Whether [`fill`]'s values belong to subjects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subjects {
    /// None: no subject keys.
    None,
    /// Each value to a subject of its own: one subject key per value.
    OnePerValue,
}

/// Tokenizes `count` values in batches of up to 1,000 with `in_flight`
/// requests at once. Used to fill the read pool and to preload a large
/// vault.
///
/// # Errors
/// A description of the first failed request.
pub async fn fill(
    channels: &[Channel],
    count: usize,
    in_flight: usize,
    minted: Minted,
    subjects: Subjects,
    progress: impl Fn(usize) + Send + Sync + 'static,
) -> Result<Vec<String>, String> {
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let reservoir = Arc::new(std::sync::Mutex::new(Reservoir {
        cap: match minted {
            Minted::Sampled(cap) => cap,
            Minted::Kept => 0,
        },
        seen: 0,
        tokens: Vec::new(),
        rng: seed(usize::MAX),
    }));
    let progress = Arc::new(progress);
    let tasks: Vec<_> = (0..in_flight)
        .map(|task| {
            let mut client = TokenVaultClient::new(channels[task % channels.len()].clone());
            let next = Arc::clone(&next);
            let done = Arc::clone(&done);
            let progress = Arc::clone(&progress);
            let reservoir = Arc::clone(&reservoir);
            tokio::spawn(async move {
                let mut tokens = Vec::new();
                loop {
                    let start = next.fetch_add(1000, Ordering::Relaxed) as usize;
                    if start >= count {
                        return Ok::<_, String>(tokens);
                    }
                    let items = (start..count.min(start + 1000))
                        .map(|n| TokenizeItem {
                            field_type: "email".into(),
                            value: format!("preload.{n}@example.com"),
                            subject_id: match subjects {
                                Subjects::None => String::new(),
                                Subjects::OnePerValue => format!("bench-subject-{n}"),
                            },
                            ttl_seconds: 0,
                        })
                        .collect();
                    let response = client
                        .tokenize(TokenizeRequest {
                            items,
                            ..Default::default()
                        })
                        .await
                        .map_err(|s| format!("preload failed: {:?} {}", s.code(), s.message()))?;
                    let mut minted_now = Vec::with_capacity(1000);
                    for result in response.into_inner().results {
                        match result.result {
                            Some(tokenize_result::Result::Token(t)) => minted_now.push(t),
                            _ => return Err("preload item failed".into()),
                        }
                    }
                    match minted {
                        Minted::Kept => tokens.extend(minted_now),
                        // One lock per request of 1,000 tokens.
                        Minted::Sampled(_) => {
                            let mut sample = reservoir
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                            for token in minted_now {
                                sample.offer(token);
                            }
                        }
                    }
                    let total = done.fetch_add(1000, Ordering::Relaxed) as usize + 1000;
                    progress(total.min(count));
                }
            })
        })
        .collect();
    let mut tokens = Vec::new();
    for task in tasks {
        tokens.extend(task.await.map_err(|e| e.to_string())??);
    }
    let sampled = std::mem::take(
        &mut reservoir
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .tokens,
    );
    tokens.extend(sampled);
    Ok(tokens)
}

/// Says on stderr why a request or item failed (the first few times): a
/// count of errors in the table is not enough to act on. Status messages
/// never carry values or tokens.
fn report_error(code: tonic::Code, message: &str) {
    static REPORTED: AtomicU64 = AtomicU64::new(0);
    if REPORTED.fetch_add(1, Ordering::Relaxed) < 5 {
        eprintln!("bench: a request failed: {code:?}: {message}");
    }
}
