//! Local rate limiting: token buckets per route, optionally one per source identity.
//!
//! A bucket holds at most `tokens` and refills `tokens` every `interval` (continuously,
//! pro rata), like Envoy's local rate limit with `max_tokens = tokens_per_fill`. A request
//! takes one token or is refused with 429. Buckets are created on first use and keyed by
//! route (and source principal when `per_source`); they are dropped with the snapshot's
//! limiter when the configuration changes.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use tokio::time::Instant;

use crate::route::RateLimitSpec;

#[derive(Debug)]
struct Bucket {
    available: f64,
    last: Instant,
}

/// All buckets of the waypoint.
#[derive(Debug, Default)]
pub struct Limiter {
    buckets: Mutex<HashMap<(String, String), Bucket>>,
}

impl Limiter {
    /// Takes a token for `route` (and `source` when the spec is per source). False: limited.
    pub fn allow(&self, route: &str, source: &str, spec: &RateLimitSpec) -> bool {
        self.allow_at(route, source, spec, Instant::now())
    }

    pub fn allow_at(&self, route: &str, source: &str, spec: &RateLimitSpec, now: Instant) -> bool {
        let key = (
            route.to_string(),
            if spec.per_source {
                source.to_string()
            } else {
                String::new()
            },
        );
        let max = f64::from(spec.tokens);
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = b.entry(key).or_insert(Bucket {
            available: max,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last);
        let rate = max / spec.interval.max(Duration::from_millis(1)).as_secs_f64();
        bucket.available = (bucket.available + elapsed.as_secs_f64() * rate).min(max);
        bucket.last = now;
        if bucket.available >= 1.0 {
            bucket.available -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_empties_then_refills() {
        let l = Limiter::default();
        let spec = RateLimitSpec {
            tokens: 3,
            interval: Duration::from_secs(1),
            per_source: false,
        };
        let t0 = Instant::now();
        assert!((0..3).all(|_| l.allow_at("r", "a", &spec, t0)));
        assert!(!l.allow_at("r", "b", &spec, t0));
        assert!(l.allow_at("r", "a", &spec, t0 + Duration::from_millis(340)));
        assert!(!l.allow_at("r", "a", &spec, t0 + Duration::from_millis(340)));
    }

    #[test]
    fn per_source_buckets_are_independent() {
        let l = Limiter::default();
        let spec = RateLimitSpec {
            tokens: 1,
            interval: Duration::from_secs(60),
            per_source: true,
        };
        let t0 = Instant::now();
        assert!(l.allow_at("r", "a", &spec, t0));
        assert!(!l.allow_at("r", "a", &spec, t0));
        assert!(l.allow_at("r", "b", &spec, t0));
    }
}
