//! Jittered exponential backoff for every retry loop, so that agents that lost the same
//! dependency at the same moment do not come back in lockstep.

use std::time::Duration;

pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    seed: u64,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0);
        Self {
            base,
            max,
            attempt: 0,
            seed: nanos ^ (u64::from(std::process::id()) << 32) | 1,
        }
    }

    /// The next delay: base·2^attempt capped at max, then scaled by a random factor in
    /// [0.5, 1.0] ("equal jitter").
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1 << self.attempt.min(16));
        let capped = exp.min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64: jitter needs no cryptographic quality
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let fraction = 0.5 + (self.seed % 1000) as f64 / 2000.0;
        capped.mul_f64(fraction)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How long until the next pass of a periodic job (an audit): `interval` after one
    /// that went well, sooner (backing off) after a failure, so a refused change is retried
    /// without spinning.
    pub fn next_pass(&mut self, ok: bool, interval: Duration) -> Duration {
        if ok {
            self.reset();
            interval
        } else {
            self.next_delay()
        }
    }
}

/// Calls `attempt` until it succeeds, sleeping a jittered, growing delay (from `base` up to
/// `max`) after each failure: for what the agent cannot work without and must not exit
/// over (a device, a socket, a listener). The first two failures are logged at debug (an
/// address that appears only once the first plan is applied), later ones as warnings.
pub async fn until_ok<T, E, F, Fut>(what: &str, base: Duration, max: Duration, mut attempt: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(base, max);
    for failures in 1u64.. {
        match attempt().await {
            Ok(value) => return value,
            Err(e) => {
                let delay = backoff.next_delay();
                if failures <= 2 {
                    tracing::debug!(retry_in = ?delay, "{what}: {e}");
                } else {
                    tracing::warn!(retry_in = ?delay, failures, "{what}: {e}");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
    unreachable!("a u64 of failures cannot run out")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn until_ok_retries_with_growing_delays_and_returns_the_success() {
        let mut calls = 0;
        let started = tokio::time::Instant::now();
        let value = until_ok(
            "test",
            Duration::from_millis(100),
            Duration::from_secs(1),
            || {
                calls += 1;
                let outcome = if calls < 4 { Err("not yet") } else { Ok(calls) };
                async move { outcome }
            },
        )
        .await;
        assert_eq!(value, 4);
        // three failures: at least half of 100 + 200 + 400 ms waited
        assert!(
            started.elapsed() >= Duration::from_millis(350),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn grows_caps_and_jitters() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[9] >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
