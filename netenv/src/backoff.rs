//! How long to wait before trying again: one exponential schedule with a cap and a
//! jitter that only ever shortens a delay, shared by hakim-convert's registry client and
//! hakim-init (agent download, unit restarts). The random source is `fastrand`'s
//! per-thread generator, seeded by the standard library's per-process random keys.

use std::time::Duration;

/// An exponential backoff schedule: `base · factor^attempt`, capped at `cap`, then up to
/// `jitter` of it (a fraction in `0..=1`) randomly shaved off, so that many clients failing
/// together do not come back in lockstep. The jitter never lengthens a delay: with
/// `jitter: 0.2` a delay is the nominal one or up to 20 % shorter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The delay before the first retry (attempt 0).
    pub base: Duration,
    /// The longest delay.
    pub cap: Duration,
    /// Growth per attempt.
    pub factor: u32,
    /// Largest share of a delay that is randomly taken off; clamped to `0..=1`.
    pub jitter: f64,
}

impl Backoff {
    /// The delay before retry number `attempt` (0 for the first) without jitter.
    pub fn nominal(&self, attempt: u32) -> Duration {
        let grown = match self.factor.checked_pow(attempt) {
            Some(f) => self.base.saturating_mul(f),
            None if self.base.is_zero() => Duration::ZERO,
            None => Duration::MAX,
        };
        grown.min(self.cap)
    }

    /// The delay before retry number `attempt`, jittered by `random` (all 64 bits used
    /// as a uniform number), so a test can pin it.
    pub fn delay_with(&self, attempt: u32, random: u64) -> Duration {
        let delay = self.nominal(attempt);
        let jitter = if self.jitter.is_nan() {
            0.0
        } else {
            self.jitter.clamp(0.0, 1.0)
        };
        // Top 53 bits as a uniform number in [0, 1).
        let unit = (random >> 11) as f64 / (1u64 << 53) as f64;
        // A subtraction, so rounding can never push the delay above the nominal one;
        // try_from avoids mul_f64's panic when a huge delay rounds past Duration::MAX.
        let shave =
            Duration::try_from_secs_f64(delay.as_secs_f64() * jitter * unit).unwrap_or(delay);
        delay.saturating_sub(shave)
    }

    /// The delay before retry number `attempt`, jittered by [`random_u64`].
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, random_u64())
    }
}

/// A random number for jitter and temporary names (not for secrets).
pub fn random_u64() -> u64 {
    fastrand::u64(..)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Backoff = Backoff {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(30),
        factor: 2,
        jitter: 0.5,
    };

    #[test]
    fn grows_by_factor_and_caps() {
        let d = |a| S.delay_with(a, 0);
        assert_eq!(d(0), Duration::from_secs(1));
        assert_eq!(d(1), Duration::from_secs(2));
        assert_eq!(d(4), Duration::from_secs(16));
        assert_eq!(d(5), Duration::from_secs(30));
        assert_eq!(d(u32::MAX), Duration::from_secs(30));
        let triple = Backoff { factor: 3, ..S };
        assert_eq!(triple.nominal(2), Duration::from_secs(9));
        let huge = Backoff {
            base: Duration::MAX,
            cap: Duration::MAX,
            ..S
        };
        assert_eq!(huge.delay_with(40, 0), Duration::MAX);
    }

    #[test]
    fn jitter_only_shortens_within_its_share() {
        let eight = Backoff {
            base: Duration::from_secs(8),
            ..S
        };
        assert_eq!(eight.delay_with(0, 1 << 63), Duration::from_secs(6));
        let top = eight.delay_with(0, u64::MAX);
        assert!(top >= Duration::from_secs(4) && top < Duration::from_millis(4001));
        for r in [0, 1, 1 << 40, u64::MAX / 3, u64::MAX] {
            for a in 0..10 {
                let d = S.delay_with(a, r);
                assert!(d <= S.nominal(a) && d.as_secs_f64() >= S.nominal(a).as_secs_f64() * 0.5);
            }
        }
        for _ in 0..100 {
            assert!(S.delay(3) <= Duration::from_secs(8));
        }
        // Out-of-range shares are clamped.
        let with = |jitter| Backoff { jitter, ..eight }.delay_with(0, u64::MAX);
        assert_eq!(with(f64::NAN), Duration::from_secs(8));
        assert_eq!(with(-1.0), Duration::from_secs(8));
        assert!(with(7.0) < Duration::from_millis(1));
    }

    #[test]
    fn random_numbers_differ() {
        assert_ne!(random_u64(), random_u64());
    }
}
