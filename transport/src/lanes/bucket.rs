//! A token bucket shared by all lanes of a session: `--max-bandwidth`.
//!
//! Senders charge the bucket *after* each write for the bytes written; when
//! the bucket is in debt the writer sleeps until the debt is paid back at the
//! configured rate. Charging after the write (instead of reserving first)
//! keeps partial writes honest, and the debt model lets a frame larger than
//! the burst through without starving it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes/second rate limiter, shareable across threads (`Arc<TokenBucket>`).
#[derive(Debug)]
pub struct TokenBucket {
    state: Mutex<BucketState>,
}

#[derive(Debug, Clone, Copy)]
struct BucketState {
    /// Bytes per second (changed by [`TokenBucket::set_rate`]).
    rate: f64,
    /// Most tokens held.
    burst: f64,
    /// Tokens (bytes) available; negative is debt.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket refilling at `bytes_per_sec`, holding at most `burst` bytes
    /// (at least one 64 KiB socket write; 20 ms of the rate by default via
    /// [`TokenBucket::with_rate`]).
    pub fn new(bytes_per_sec: u64, burst: u64) -> TokenBucket {
        // u64 -> f64 loses precision only above 2^53 bytes/s: irrelevant here.
        #[allow(clippy::cast_precision_loss)]
        let (rate, burst) = (bytes_per_sec.max(1) as f64, burst.max(1) as f64);
        TokenBucket {
            state: Mutex::new(BucketState {
                rate,
                burst,
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    /// A bucket with a burst of 20 ms at the rate (at least 64 KiB).
    pub fn with_rate(bytes_per_sec: u64) -> TokenBucket {
        TokenBucket::new(bytes_per_sec, (bytes_per_sec / 50).max(64 << 10))
    }

    /// The configured rate in bytes per second.
    pub fn rate(&self) -> f64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).rate
    }

    /// Changes the rate (and the burst, 20 ms of it as in
    /// [`TokenBucket::with_rate`]) from now on; a debt already owed is
    /// paid at the new rate.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(s.last).as_secs_f64();
        s.tokens = (s.tokens + elapsed * s.rate).min(s.burst);
        s.last = s.last.max(now);
        #[allow(clippy::cast_precision_loss)]
        {
            s.rate = bytes_per_sec.max(1) as f64;
            s.burst = (bytes_per_sec / 50).max(64 << 10) as f64;
        }
        s.tokens = s.tokens.min(s.burst);
    }

    /// Charges `bytes` at time `now` and returns how long the caller must
    /// wait before sending more (zero when the bucket is not in debt).
    pub fn charge_at(&self, bytes: usize, now: Instant) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(s.last).as_secs_f64();
        s.last = s.last.max(now);
        s.tokens = (s.tokens + elapsed * s.rate).min(s.burst);
        #[allow(clippy::cast_precision_loss)]
        let cost = bytes as f64;
        s.tokens -= cost;
        if s.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.tokens / s.rate)
        }
    }

    /// Charges `bytes` now and sleeps off any debt.
    pub fn charge(&self, bytes: usize) {
        let wait = self.charge_at(bytes, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_is_free_then_debt_costs_time_at_the_rate() {
        let b = TokenBucket::new(1000, 500);
        let t0 = Instant::now();
        assert_eq!(b.charge_at(500, t0), Duration::ZERO);
        // 250 bytes over the burst: a quarter second at 1000 B/s.
        assert_eq!(b.charge_at(250, t0), Duration::from_millis(250));
        // After the debt is paid, the bucket refills up to the burst only.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.charge_at(500, later), Duration::ZERO);
        assert_eq!(b.charge_at(100, later), Duration::from_millis(100));
    }

    #[test]
    fn a_new_rate_applies_to_the_next_charge() {
        let b = TokenBucket::new(1000, 500);
        let t0 = Instant::now();
        assert_eq!(b.charge_at(500, t0), Duration::ZERO);
        b.set_rate(100 << 20);
        assert_eq!(b.rate(), f64::from(100u32 << 20));
        // A burst of 20 ms at 100 MiB/s would let a small write pass, but
        // the tokens already spent are not handed back.
        assert!(b.charge_at(1 << 20, t0) > Duration::ZERO);
    }

    #[test]
    fn frames_larger_than_the_burst_pass_with_a_proportional_wait() {
        let b = TokenBucket::new(1 << 20, 64 << 10);
        let wait = b.charge_at(4 << 20, Instant::now());
        let expect =
            Duration::from_secs_f64(f64::from((4 << 20) - (64 << 10)) / f64::from(1u32 << 20));
        assert!(
            (wait.as_secs_f64() - expect.as_secs_f64()).abs() < 1e-3,
            "{wait:?}"
        );
    }

    #[test]
    fn long_run_average_matches_the_rate() {
        // Simulated clock: a sender that always sleeps exactly as told moves
        // `rate` bytes per second on average.
        let b = TokenBucket::new(10_000, 1_000);
        let mut now = Instant::now();
        let start = now;
        let mut sent = 0usize;
        while sent < 100_000 {
            now += b.charge_at(700, now);
            sent += 700;
        }
        let secs = (now - start).as_secs_f64();
        let rate = sent as f64 / secs;
        assert!((rate - 10_000.0).abs() / 10_000.0 < 0.02, "rate {rate}");
    }
}
