//! Building blocks for surviving a slow or failing finAPI: a session's time budget, the retry
//! schedule (exponential backoff with full jitter, `Retry-After` honoured up to a cap) and a
//! circuit breaker per upstream service.
//!
//! This module knows nothing of finAPI: *whether* a call may be retried is decided where the
//! call is made (`src/flows`), because only there is it known whether a retry is safe.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::ResilienceSettings;

/// `from + after`, saturating: an instant too far off to represent is read as thirty years on
/// (as good as never for a running process). Every instant the broker derives from a duration
/// goes through here, since some durations come from finAPI (`expires_in`, `Retry-After`) and
/// `Instant + Duration` panics on overflow.
pub fn later(from: Instant, after: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
    from.checked_add(after.min(FAR))
        .or_else(|| from.checked_add(FAR))
        .unwrap_or(from)
}

/// When a session must be done. Every upstream attempt of the session runs inside it.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(Instant);

/// The deadline passed before the work finished.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the session's time budget ran out")]
pub struct BudgetExhausted;

impl Deadline {
    /// A deadline `budget` from now.
    pub fn after(budget: Duration) -> Self {
        Self(later(Instant::now(), budget))
    }

    /// Time left.
    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// Runs `work`, cutting it off at the deadline.
    ///
    /// A plain function returning a combinator, not an `async fn`: an `async fn` keeps its
    /// future argument twice in its state (once as the argument, once being awaited), and the
    /// flows nest these wrappers, so each level would double the session's future
    /// (docs/BENCHMARKS.md, "Issue 15: the request path and the standalone flow, fourth pass").
    pub fn run<F: Future>(
        &self,
        work: F,
    ) -> impl Future<Output = Result<F::Output, BudgetExhausted>> + use<F> {
        use futures_util::FutureExt as _;
        tokio::time::timeout_at(self.0, work).map(|done| done.map_err(|_| BudgetExhausted))
    }
}

/// When to try an upstream call again.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts of one call, the first included.
    pub max_attempts: u32,
    /// Upper bound of the first backoff.
    pub base_backoff: Duration,
    /// Upper bound of any backoff.
    pub max_backoff: Duration,
    /// Longest `Retry-After` the broker waits out; a longer one ends the session at once.
    pub max_retry_after: Duration,
    /// Time one attempt may need (the per-call timeout): a retry is only started when this
    /// much budget is left after its wait, so that the budget never cuts a retry short.
    pub attempt_time: Duration,
}

impl RetryPolicy {
    /// The policy of the validated settings.
    pub fn new(settings: &ResilienceSettings, attempt_time: Duration) -> Self {
        Self {
            max_attempts: settings.max_attempts,
            base_backoff: Duration::from_millis(settings.base_backoff_ms),
            max_backoff: Duration::from_millis(settings.max_backoff_ms),
            max_retry_after: Duration::from_millis(settings.max_retry_after_ms),
            attempt_time,
        }
    }

    /// How long to wait before the next attempt after `failed` attempts, the last of which
    /// asked for `retry_after`; `None` when no further attempt may be made.
    pub fn delay(
        &self,
        failed: u32,
        retry_after: Option<Duration>,
        deadline: &Deadline,
    ) -> Option<Duration> {
        if failed >= self.max_attempts {
            return None;
        }
        let wait = match retry_after {
            // finAPI said when: never earlier, and not at all when it is too far off.
            Some(after) if after > self.max_retry_after => return None,
            Some(after) => after,
            None => self.backoff(failed),
        };
        (wait.saturating_add(self.attempt_time) <= deadline.remaining()).then_some(wait)
    }

    /// How long to wait before trying again after `failed` attempts, the last of which failed
    /// with `err`; `None` when the failure is not transient or no further attempt may be made.
    pub fn delay_after(
        &self,
        failed: u32,
        err: &crate::finapi::UpstreamError,
        deadline: &Deadline,
    ) -> Option<Duration> {
        if !err.is_transient() {
            return None;
        }
        self.delay(failed, err.retry_after(), deadline)
    }

    /// Exponential backoff with full jitter: uniform in `0..=min(max, base × 2^(failed−1))`.
    pub fn backoff(&self, failed: u32) -> Duration {
        let exp = failed.saturating_sub(1).min(20);
        let ceiling = self
            .base_backoff
            .saturating_mul(1 << exp)
            .min(self.max_backoff);
        ceiling.mul_f64(unit_random())
    }
}

/// A uniform number in `0..=1` from the OS random source; `1` (the longest wait) if it fails.
fn unit_random() -> f64 {
    getrandom::u64().map_or(1.0, |r| (r >> 11) as f64 / (1u64 << 53) as f64)
}

/// A circuit breaker for one upstream service.
///
/// Closed: calls pass; `threshold` failures in a row open it. Open: calls fail at once, for the
/// cool-down. Then half-open: one call passes as a probe; its success closes the breaker, its
/// failure opens it for another cool-down; other calls meanwhile fail at once.
#[derive(Debug)]
pub struct CircuitBreaker {
    service: &'static str,
    client: std::sync::Arc<str>,
    threshold: u32,
    cooldown: Duration,
    state: Mutex<BreakerState>,
    opened: AtomicU64,
    rejected: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BreakerState {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// The breaker's answer to a call that may not pass: how long until it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerOpen {
    /// Time until a probe may be made, rounded up to whole seconds, at least one.
    pub retry_after: Duration,
}

/// Leave to make one call; report its outcome with [`Permit::record`]. A probe whose permit is
/// dropped unrecorded (its request went away) lets the next call probe instead.
#[must_use]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    probe: bool,
    recorded: bool,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(service: &'static str, threshold: u32, cooldown: Duration) -> Self {
        Self {
            service,
            client: crate::config::DEFAULT_CLIENT.into(),
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
            opened: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    /// The service this breaker guards, for logs.
    pub fn service(&self) -> &'static str {
        self.service
    }

    /// The same breaker for the finAPI client named `client` (each client has its own pair,
    /// so that a failing client never opens another's circuit).
    pub fn for_client(mut self, client: &str) -> Self {
        self.client = client.into();
        self
    }

    /// The finAPI client (configured name) whose calls this breaker guards, for logs and
    /// metric labels.
    pub fn client(&self) -> &std::sync::Arc<str> {
        &self.client
    }

    /// Leave to call, or how long to wait.
    pub fn acquire(&self) -> Result<Permit<'_>, BreakerOpen> {
        let mut state = self.lock();
        let now = Instant::now();
        let probe = match *state {
            BreakerState::Closed { .. } => false,
            BreakerState::Open { until } if now >= until => true,
            BreakerState::HalfOpen { probing: false } => true,
            BreakerState::Open { until } => {
                return Err(self.reject(until.saturating_duration_since(now)));
            }
            BreakerState::HalfOpen { probing: true } => return Err(self.reject(Duration::ZERO)),
        };
        if probe {
            *state = BreakerState::HalfOpen { probing: true };
            tracing::info!(service = self.service, "circuit half-open: probing finAPI");
        }
        Ok(Permit {
            breaker: self,
            probe,
            recorded: false,
        })
    }

    /// Whether calls currently fail at once.
    pub fn is_open(&self) -> bool {
        !matches!(*self.lock(), BreakerState::Closed { .. })
    }

    /// How often the breaker opened.
    pub fn times_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// How many calls it refused.
    pub fn calls_rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    fn reject(&self, left: Duration) -> BreakerOpen {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        BreakerOpen {
            retry_after: Duration::from_secs(secs.max(1)),
        }
    }

    fn record(&self, probe: bool, failure: bool) {
        let mut state = self.lock();
        match (*state, probe, failure) {
            (_, true, false) => {
                *state = BreakerState::Closed { failures: 0 };
                tracing::info!(
                    service = self.service,
                    "circuit closed: finAPI answers again"
                );
            }
            (_, true, true) => self.open(&mut state),
            (BreakerState::Closed { failures }, false, true) => {
                if failures + 1 >= self.threshold {
                    self.open(&mut state);
                } else {
                    *state = BreakerState::Closed {
                        failures: failures + 1,
                    };
                }
            }
            (BreakerState::Closed { .. }, false, false) => {
                *state = BreakerState::Closed { failures: 0 };
            }
            // Calls that started before the breaker opened say nothing about finAPI now.
            (_, false, _) => {}
        }
    }

    fn open(&self, state: &mut BreakerState) {
        *state = BreakerState::Open {
            until: later(Instant::now(), self.cooldown),
        };
        self.opened.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            service = self.service,
            cooldown_ms = self.cooldown.as_millis() as u64,
            "circuit open: finAPI calls fail at once until the cool-down is over"
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Permit<'_> {
    /// Reports the call's outcome: `failure` for upstream trouble (connect errors, timeouts,
    /// broken connections, 5xx, 429), not for answers that refuse the request (4xx).
    pub fn record(mut self, failure: bool) {
        self.recorded = true;
        self.breaker.record(self.probe, failure);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            let mut state = self.breaker.lock();
            if *state == (BreakerState::HalfOpen { probing: true }) {
                *state = BreakerState::HalfOpen { probing: false };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            max_retry_after: Duration::from_secs(2),
            attempt_time: Duration::from_secs(1),
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = policy();
        for _ in 0..200 {
            assert!(p.backoff(1) <= Duration::from_millis(100));
            assert!(p.backoff(3) <= Duration::from_millis(400));
            assert!(p.backoff(30) <= Duration::from_millis(1000));
        }
    }

    #[tokio::test]
    async fn retries_stop_at_max_attempts_and_far_retry_after() {
        let p = policy();
        let d = Deadline::after(Duration::from_secs(60));
        assert!(p.delay(3, None, &d).is_some());
        assert!(p.delay(4, None, &d).is_none());
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(2)), &d),
            Some(Duration::from_secs(2))
        );
        assert!(p.delay(1, Some(Duration::from_secs(3)), &d).is_none());
    }

    #[tokio::test]
    async fn no_retry_that_the_budget_cannot_fit() {
        let p = policy();
        let d = Deadline::after(Duration::from_millis(1500));
        assert!(p.delay(1, Some(Duration::from_millis(400)), &d).is_some());
        assert!(p.delay(1, Some(Duration::from_millis(600)), &d).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_rejects_probes_once_and_closes() {
        let b = CircuitBreaker::new("test", 3, Duration::from_secs(5));
        for _ in 0..3 {
            b.acquire().unwrap().record(true);
        }
        let open = b.acquire().err().expect("open");
        assert_eq!(open.retry_after, Duration::from_secs(5));
        tokio::time::advance(Duration::from_secs(5)).await;
        let probe = b.acquire().expect("probe");
        assert!(b.acquire().is_err(), "only one probe at a time");
        probe.record(false);
        assert!(!b.is_open());
        assert_eq!(b.times_opened(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_and_an_abandoned_probe_frees_the_slot() {
        let b = CircuitBreaker::new("test", 1, Duration::from_secs(1));
        b.acquire().unwrap().record(true);
        tokio::time::advance(Duration::from_secs(1)).await;
        b.acquire().unwrap().record(true);
        assert!(b.acquire().is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(b.acquire().unwrap());
        b.acquire().expect("a new probe").record(false);
        assert!(!b.is_open());
    }

    #[tokio::test]
    async fn durations_beyond_any_instant_saturate() {
        let now = Instant::now();
        assert!(later(now, Duration::MAX) > later(now, Duration::from_secs(3600 * 24 * 365)));
        assert_eq!(
            later(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        let p = policy();
        let d = Deadline::after(Duration::MAX);
        assert!(d.remaining() > Duration::from_secs(3600));
        assert!(p.delay(1, Some(Duration::MAX), &d).is_none());
        let lenient = RetryPolicy {
            max_retry_after: Duration::MAX,
            ..policy()
        };
        assert!(lenient.delay(1, Some(Duration::MAX), &d).is_none());
    }

    #[test]
    fn successes_reset_the_failure_count() {
        let b = CircuitBreaker::new("test", 2, Duration::from_secs(1));
        b.acquire().unwrap().record(true);
        b.acquire().unwrap().record(false);
        b.acquire().unwrap().record(true);
        assert!(!b.is_open());
    }
}
