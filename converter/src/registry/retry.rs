//! When to try again and how long to wait: exponential backoff with jitter, the
//! `Retry-After` header, and a bounded budget per request or blob.
//!
//! Only transient failures are retried (connection errors, truncated bodies, 5xx,
//! 429). The budget bounds both the number of failed attempts and the time since
//! the first failure, so a healthy but long download is never cut short while a
//! registry that keeps failing is given up on with the last error named.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Limits of one retried operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// No new attempt starts later than this after the first failure.
    pub window: Duration,
    /// First delay; doubles with every failure.
    pub base: Duration,
    /// Longest computed delay (a `Retry-After` may ask for more, within `window`).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            window: Duration::from_secs(300),
            base: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
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
        let computed = backoff_delay(
            self.failures - 1,
            self.policy.base,
            self.policy.max_delay,
            random,
        );
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

/// `base * 2^attempt`, capped at `max`, minus a random share of up to half of it
/// (so parallel downloads hitting the same 429 do not come back in lockstep).
pub fn backoff_delay(attempt: u32, base: Duration, max: Duration, random: u64) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    let delay = base.saturating_mul(factor).min(max);
    // Top 53 bits as a uniform number in [0, 1).
    let unit = (random >> 11) as f64 / (1u64 << 53) as f64;
    let shave = Duration::try_from_secs_f64(delay.as_secs_f64() * 0.5 * unit).unwrap_or_default();
    delay.saturating_sub(shave)
}

/// Jitter source: std's per-process random hasher keys, the clock and a counter.
pub fn random_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// `Retry-After`: delta seconds (`120`) or an HTTP date (`Wed, 21 Oct 2015 07:28:00
/// GMT`, relative to `now`; a date in the past means no wait). `None` if unparseable.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let at = parse_http_date(v)?;
    let now_secs = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(at.saturating_sub(now_secs)))
}

/// IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form servers send; seconds
/// since the epoch.
fn parse_http_date(s: &str) -> Option<u64> {
    let (_, rest) = s.split_once(", ")?;
    let parts: Vec<&str> = rest.split_ascii_whitespace().collect();
    let [day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let day: u64 = day.parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| m == month)? as u64
        + 1;
    let year: u64 = year.parse().ok()?;
    let hms: Vec<u64> = time
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, sec] = hms.as_slice() else {
        return None;
    };
    if !(1..=31).contains(&day) || year < 1970 || *h > 23 || *m > 59 || *sec > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86400 + h * 3600 + m * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(1445412480)
        );
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2000 12:00:00 GMT"),
            Some(951825600)
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

    #[test]
    fn backoff_grows_and_caps() {
        let base = Duration::from_millis(500);
        let max = Duration::from_secs(30);
        assert_eq!(backoff_delay(0, base, max, 0), base);
        assert_eq!(backoff_delay(3, base, max, 0), Duration::from_secs(4));
        assert_eq!(backoff_delay(40, base, max, 0), max);
        // Jitter shaves at most half.
        let d = backoff_delay(3, base, max, u64::MAX);
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
            base: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
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
            max_delay: Duration::from_secs(2),
            ..policy
        };
        let mut s = RetryState::new(policy);
        assert_eq!(
            s.on_failure(Some(Duration::from_secs(8)), t, 0),
            Some(Duration::from_secs(8))
        );
    }
}
