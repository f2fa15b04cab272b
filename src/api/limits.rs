//! Per-identity limits: requests in flight and request rate, so one noisy
//! service cannot starve the others.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Request limits, server-wide (`[limits]` in the configuration).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most items per request.
    pub max_items_per_request: usize,
    /// Largest value in bytes.
    pub max_value_bytes: usize,
    /// Largest decoded gRPC message in bytes.
    pub max_message_bytes: usize,
    /// Requests in flight on the whole server.
    pub max_concurrent_requests: usize,
    /// Request bytes received and not yet decoded, all requests together.
    pub max_request_buffer_bytes: usize,
}

/// Configured limits; zero means unlimited.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdentityLimits {
    /// Requests one identity may have in flight.
    pub concurrency: usize,
    /// Requests per second one identity may make, sustained.
    pub rate: f64,
    /// Requests one identity may make at once above the rate.
    pub burst: f64,
}

/// Why a request was refused by a limit: the message names the limit, and
/// `retry_after_ms` says when a retry can succeed.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    /// What was exceeded.
    pub message: String,
    /// A hint for the client's back-off.
    pub retry_after_ms: u64,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// How many admissions pass between two sweeps of idle identities.
const EVICT_EVERY: u64 = 4096;

/// The state of every identity's limits.
///
/// An identity's entries are dropped once it is idle (no request in flight,
/// rate bucket full again), so the maps hold the identities active now, not
/// every identity ever seen.
pub struct Limiter {
    limits: IdentityLimits,
    admitted: std::sync::atomic::AtomicU64,
    in_flight: Mutex<HashMap<String, Arc<Semaphore>>>,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Limiter {
    /// A limiter enforcing `limits`.
    pub fn new(limits: IdentityLimits) -> Self {
        Self {
            limits,
            admitted: std::sync::atomic::AtomicU64::new(0),
            in_flight: Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Admits one request of `identity`, or says which limit it hit. The
    /// returned permit holds its place among the identity's requests in
    /// flight until dropped.
    ///
    /// # Errors
    /// [`Limited`] naming the limit.
    pub fn admit(&self, identity: &str) -> Result<Option<OwnedSemaphorePermit>, Limited> {
        if self
            .admitted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % EVICT_EVERY
            == EVICT_EVERY - 1
        {
            self.evict_idle();
        }
        if self.limits.rate > 0.0 {
            let mut buckets = self
                .buckets
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let burst = self.limits.burst.max(1.0);
            let now = Instant::now();
            let bucket = buckets.entry(identity.to_owned()).or_insert(Bucket {
                tokens: burst,
                last: now,
            });
            bucket.tokens = (bucket.tokens
                + now.duration_since(bucket.last).as_secs_f64() * self.limits.rate)
                .min(burst);
            bucket.last = now;
            if bucket.tokens < 1.0 {
                let wait = (1.0 - bucket.tokens) / self.limits.rate;
                return Err(Limited {
                    message: format!(
                        "identity {identity} exceeded its request rate ({} per second, limits.per_identity_rate); retry later",
                        self.limits.rate
                    ),
                    retry_after_ms: (wait * 1000.0).ceil() as u64,
                });
            }
            bucket.tokens -= 1.0;
        }
        if self.limits.concurrency == 0 {
            return Ok(None);
        }
        let semaphore = {
            let mut in_flight = self
                .in_flight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match in_flight.get(identity) {
                Some(semaphore) => Arc::clone(semaphore),
                None => Arc::clone(
                    in_flight
                        .entry(identity.to_owned())
                        .or_insert_with(|| Arc::new(Semaphore::new(self.limits.concurrency))),
                ),
            }
        };
        semaphore.try_acquire_owned().map(Some).map_err(|_| Limited {
            message: format!(
                "identity {identity} has {} requests in flight (limits.per_identity_concurrency); retry when one finishes",
                self.limits.concurrency
            ),
            retry_after_ms: 10,
        })
    }
}

impl Limiter {
    /// Drops the entries of identities that are idle: no request in flight,
    /// and a rate bucket that has refilled (a new entry would start full,
    /// so forgetting it changes nothing).
    pub fn evict_idle(&self) {
        let now = Instant::now();
        let burst = self.limits.burst.max(1.0);
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|_, bucket| {
                bucket.tokens + now.duration_since(bucket.last).as_secs_f64() * self.limits.rate
                    < burst
            });
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|_, semaphore| semaphore.available_permits() < self.limits.concurrency);
    }

    /// How many identities the limiter holds state for.
    pub fn tracked(&self) -> usize {
        let buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len();
        let in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len();
        buckets.max(in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_refuses_only_the_noisy_identity() {
        let limiter = Limiter::new(IdentityLimits {
            concurrency: 0,
            rate: 1.0,
            burst: 3.0,
        });
        for _ in 0..3 {
            assert!(limiter.admit("noisy").is_ok());
        }
        let refused = limiter.admit("noisy").unwrap_err();
        assert!(refused.message.contains("limits.per_identity_rate"));
        assert!(refused.retry_after_ms > 0 && refused.retry_after_ms <= 1000);
        assert!(limiter.admit("quiet").is_ok());
    }

    /// Many identities passing through leave nothing behind once idle.
    #[test]
    fn idle_identities_are_forgotten() {
        let limiter = Limiter::new(IdentityLimits {
            concurrency: 4,
            rate: 1000.0,
            burst: 1000.0,
        });
        let busy = limiter.admit("busy").unwrap();
        for i in 0..10_000 {
            drop(limiter.admit(&format!("id-{i}")).unwrap());
        }
        // The sweeps ran while the identities still had a spent token; wait
        // for every bucket to refill, then sweep again.
        std::thread::sleep(std::time::Duration::from_millis(20));
        limiter.evict_idle();
        assert_eq!(
            limiter.tracked(),
            1,
            "only the identity with a request in flight"
        );
        drop(busy);
        limiter.evict_idle();
        assert_eq!(limiter.tracked(), 0);
    }

    #[test]
    fn concurrency_is_per_identity_and_released_on_drop() {
        let limiter = Limiter::new(IdentityLimits {
            concurrency: 2,
            rate: 0.0,
            burst: 0.0,
        });
        let a = limiter.admit("x").unwrap();
        let _b = limiter.admit("x").unwrap();
        assert!(limiter.admit("x").is_err());
        assert!(limiter.admit("y").is_ok());
        drop(a);
        assert!(limiter.admit("x").is_ok());
    }
}
