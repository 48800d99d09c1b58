//! When to try again and how long to wait: exponential backoff with jitter, the
//! `Retry-After` header, and a bounded budget per request or blob.
//!
//! Only transient failures are retried (connection errors, truncated bodies, 5xx,
//! 429). The budget bounds both the number of failed attempts and the time since
//! the first failure, so a healthy but long download is never cut short while a
//! registry that keeps failing is given up on with the last error named.

use std::time::{Duration, Instant, SystemTime};

pub use hakim_netenv::backoff::{random_u64, Backoff};

/// Limits of one retried operation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// No new attempt starts later than this after the first failure.
    pub window: Duration,
    /// Delays between attempts (a `Retry-After` may ask for more than its cap, within
    /// `window`).
    pub backoff: Backoff,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            window: Duration::from_secs(300),
            backoff: Backoff {
                base: Duration::from_millis(500),
                cap: Duration::from_secs(30),
                factor: 2,
                // Parallel downloads hitting the same 429 must not come back in lockstep.
                jitter: 0.5,
            },
        }
    }
}

/// The failures of one operation so far.
#[derive(Debug)]
pub struct RetryState {
    policy: RetryPolicy,
    failures: u32,
    first_failure: Option<Instant>,
}

impl RetryState {
    pub fn new(policy: RetryPolicy) -> Self {
        RetryState {
            policy,
            failures: 0,
            first_failure: None,
        }
    }

    /// Failed attempts so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn max_attempts(&self) -> u32 {
        self.policy.max_attempts
    }

    /// Records a failure; the delay before the next attempt, or `None` when the
    /// budget is spent. `retry_after` (from a 429/503) replaces the computed delay
    /// when longer; a wait that would end past the window ends the operation now.
    pub fn on_failure(
        &mut self,
        retry_after: Option<Duration>,
        now: Instant,
        random: u64,
    ) -> Option<Duration> {
        self.failures += 1;
        let first = *self.first_failure.get_or_insert(now);
        if self.failures >= self.policy.max_attempts {
            return None;
        }
        let computed = self.policy.backoff.delay_with(self.failures - 1, random);
        let delay = match retry_after {
            Some(ra) => ra.max(computed),
            None => computed,
        };
        let elapsed = now.saturating_duration_since(first);
        if elapsed + delay > self.policy.window {
            return None;
        }
        Some(delay)
    }
}

/// `Retry-After`: delta seconds (`120`) or an HTTP date (`Wed, 21 Oct 2015 07:28:00
/// GMT`, relative to `now`; a date in the past means no wait). `None` if unparseable.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn retry_after_forms() {
        let now = UNIX_EPOCH + Duration::from_secs(784111777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        // The obsolete forms servers may still send (RFC 9110 §5.6.7).
        assert_eq!(
            parse_retry_after("Sunday, 06-Nov-94 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun Nov  6 08:49:47 1994", now),
            Some(Duration::from_secs(10))
        );
        for bad in [
            "",
            "-1",
            "1.5",
            "soon",
            "Sun, 06 Nov 1994 08:49:37 PST",
            "Sun, 32 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad}");
        }
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    /// The real schedule of registry retries: change it here on purpose or not at all.
    #[test]
    fn default_schedule() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.max_attempts, 8);
        assert_eq!(policy.window, Duration::from_secs(300));
        let nominal: Vec<u64> = (0..8)
            .map(|a| policy.backoff.nominal(a).as_millis() as u64)
            .collect();
        assert_eq!(nominal, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        // Jitter shaves at most half, never adds.
        let d = policy.backoff.delay_with(3, u64::MAX);
        assert!(
            d >= Duration::from_secs(2) && d < Duration::from_secs(4),
            "{d:?}"
        );
    }

    #[test]
    fn budget_by_attempts() {
        let policy = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        let mut s = RetryState::new(policy);
        let t = Instant::now();
        assert_eq!(s.on_failure(None, t, 0), Some(Duration::from_millis(500)));
        assert_eq!(s.on_failure(None, t, 0), Some(Duration::from_secs(1)));
        assert_eq!(s.on_failure(None, t, 0), None);
        assert_eq!(s.failures(), 3);
    }

    #[test]
    fn budget_by_time_and_retry_after() {
        let policy = RetryPolicy {
            max_attempts: 100,
            window: Duration::from_secs(10),
            backoff: Backoff {
                base: Duration::from_secs(1),
                ..RetryPolicy::default().backoff
            },
        };
        let t = Instant::now();
        let mut s = RetryState::new(policy);
        // Retry-After longer than the computed delay wins.
        assert_eq!(
            s.on_failure(Some(Duration::from_secs(3)), t, 0),
            Some(Duration::from_secs(3))
        );
        // Shorter than the computed delay: the backoff wins.
        assert_eq!(
            s.on_failure(Some(Duration::ZERO), t + Duration::from_secs(3), 0),
            Some(Duration::from_secs(2))
        );
        // The next wait would end past the 10 s window.
        assert_eq!(s.on_failure(None, t + Duration::from_secs(7), 0), None);

        // A Retry-After beyond the window gives up at once; within it, it is honoured
        // even when longer than the longest computed delay.
        let mut s = RetryState::new(policy);
        assert_eq!(s.on_failure(Some(Duration::from_secs(3600)), t, 0), None);
        let policy = RetryPolicy {
            backoff: Backoff {
                cap: Duration::from_secs(2),
                ..policy.backoff
            },
            ..policy
        };
        let mut s = RetryState::new(policy);
        assert_eq!(
            s.on_failure(Some(Duration::from_secs(8)), t, 0),
            Some(Duration::from_secs(8))
        );
    }
}
