//! Waiting for a condition. A test that sleeps a fixed time is either slow or flaky; one
//! that polls a condition is as fast as the system allows and fails with what it waited for.

use std::time::{Duration, Instant};

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(50);

/// Polls `ok` until it returns true; panics naming `what` once `timeout` has passed.
pub fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// [`wait_until`] for async conditions: polls `ok` until it yields `Some`, and returns it.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut ok: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = ok().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_once_the_condition_holds_and_names_it_when_it_never_does() {
        let mut calls = 0;
        wait_until("three calls", Duration::from_secs(5), || {
            calls += 1;
            calls == 3
        });
        assert_eq!(calls, 3);
        let never = std::panic::catch_unwind(|| {
            wait_until("the impossible", Duration::from_millis(120), || false)
        });
        let message = never.unwrap_err().downcast::<String>().unwrap();
        assert!(message.contains("the impossible"), "{message}");
    }
}
