//! A per-user token bucket for submissions (`[limits]` in `scheduler.toml`).
//!
//! Each scheduler keeps its own buckets in memory: a user who spreads
//! submissions over several members gets at most that many times the rate,
//! which is enough to stop a runaway script. Time is passed in, so tests
//! drive it without sleeping.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Buckets forgotten after this long without use (they are full again by then).
const IDLE: Duration = Duration::from_secs(600);

/// Token buckets by user.
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: HashMap<String, (f64, Instant)>,
}

impl RateLimiter {
    /// `per_second` refill, `burst` capacity.
    pub fn new(per_second: f64, burst: u32) -> RateLimiter {
        RateLimiter {
            per_second,
            burst: f64::from(burst.max(1)),
            buckets: HashMap::new(),
        }
    }

    /// Take one token for `user` at `now`; when empty, how long until one is back.
    pub fn take(&mut self, user: &str, now: Instant) -> Result<(), Duration> {
        if self.buckets.len() > 10_000 {
            self.buckets
                .retain(|_, (_, t)| now.saturating_duration_since(*t) < IDLE);
        }
        let (tokens, at) = self
            .buckets
            .entry(user.to_string())
            .or_insert((self.burst, now));
        let elapsed = now.saturating_duration_since(*at).as_secs_f64();
        *tokens = (*tokens + elapsed * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - *tokens) / self.per_second.max(f64::MIN_POSITIVE);
            Err(Duration::from_secs_f64(wait.min(86_400.0)))
        }
    }

    /// The refusal, in words.
    pub fn message(&self, user: &str, wait: Duration) -> String {
        format!(
            "rate limit: {user} may submit at most {} request(s) per second (burst {}); \
             retry in {:.1}s",
            self.per_second,
            self.burst,
            wait.as_secs_f64()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let mut r = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(r.take("alice", t0).is_ok());
        }
        let wait = r.take("alice", t0).unwrap_err();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500));
        // Another user has their own bucket.
        assert!(r.take("bob", t0).is_ok());
        // Half a second later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(500);
        assert!(r.take("alice", t1).is_ok());
        assert!(r.take("alice", t1).is_err());
        // Never more than the burst.
        let t2 = t1 + Duration::from_secs(100);
        for _ in 0..3 {
            assert!(r.take("alice", t2).is_ok());
        }
        assert!(r.take("alice", t2).is_err());
        assert!(r
            .message("alice", wait)
            .contains("at most 2 request(s) per second"));
    }
}
