//! Retries of the flows' upstream calls, and the counters that show what they did. Whether a
//! step may be retried at all is argued where the step is made (`access.rs`, `standalone.rs`).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::finapi::{Step, UpstreamError};
use crate::resilience::{CircuitBreaker, Deadline};
use crate::token_cache::TokenCacheStats;

use super::{FlowError, Flows, classify_credentials_call};

/// Counters of the flows' resilience, for tests, docs and (later) metrics.
#[derive(Debug, Default)]
pub struct ResilienceStats {
    retries: AtomicU64,
    process_restarts: AtomicU64,
    processes_possibly_abandoned: AtomicU64,
    users_found_on_retry: AtomicU64,
    orphaned_users: AtomicU64,
    budget_exhausted: AtomicU64,
}

/// A copy of every resilience counter.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ResilienceSnapshot {
    /// Upstream calls made again after a transient failure (any step).
    pub retries: u64,
    /// Standalone sessions started again from `POST /api/v1/processes` after a failed exchange.
    pub process_restarts: u64,
    /// Processes that may have been created and were then left unused (a retried create
    /// after an unknown outcome, or a restart after a failed exchange); finAPI deletes them.
    pub processes_possibly_abandoned: u64,
    /// Retried `POST /api/v2/users` answered `ENTITY_EXISTS`: the lost first attempt had
    /// created the user, and the flow went on with it.
    pub users_found_on_retry: u64,
    /// Users created whose token could not be had (logged at warn level for clean-up).
    pub orphaned_users: u64,
    /// Sessions whose time budget ran out.
    pub budget_exhausted: u64,
    /// Client-token calls made on a request's path (cold start, or no refresh in flight).
    pub client_token_request_path_fetches: u64,
    /// Client-token calls made by background refreshes.
    pub client_token_background_fetches: u64,
    /// Background refresh calls that failed.
    pub client_token_background_failures: u64,
    /// Client tokens replaced by a background refresh.
    pub client_tokens_refreshed: u64,
    /// Requests that waited for a background refresh at a token's end.
    pub client_token_waits_for_refresh: u64,
    /// Times the Access circuit breaker opened.
    pub access_breaker_opened: u64,
    /// Calls the Access circuit breaker refused.
    pub access_breaker_rejected: u64,
    /// Times the Process Controller circuit breaker opened.
    pub process_controller_breaker_opened: u64,
    /// Calls the Process Controller circuit breaker refused.
    pub process_controller_breaker_rejected: u64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl ResilienceStats {
    pub(super) fn process_restarted(&self) {
        bump(&self.process_restarts);
    }

    pub(super) fn process_possibly_abandoned(&self) {
        bump(&self.processes_possibly_abandoned);
    }

    pub(super) fn user_found_on_retry(&self) {
        bump(&self.users_found_on_retry);
    }

    pub(super) fn user_orphaned(&self) {
        bump(&self.orphaned_users);
    }

    pub(super) fn snapshot<'a>(
        &self,
        clients: impl Iterator<Item = (&'a TokenCacheStats, &'a CircuitBreaker, &'a CircuitBreaker)>,
    ) -> ResilienceSnapshot {
        let mut s = ResilienceSnapshot {
            retries: read(&self.retries),
            process_restarts: read(&self.process_restarts),
            processes_possibly_abandoned: read(&self.processes_possibly_abandoned),
            users_found_on_retry: read(&self.users_found_on_retry),
            orphaned_users: read(&self.orphaned_users),
            budget_exhausted: read(&self.budget_exhausted),
            ..ResilienceSnapshot::default()
        };
        for (tokens, access, processes) in clients {
            s.client_token_request_path_fetches += read(&tokens.request_path_fetches);
            s.client_token_background_fetches += read(&tokens.background_fetches);
            s.client_token_background_failures += read(&tokens.background_failures);
            s.client_tokens_refreshed += read(&tokens.refreshed_tokens);
            s.client_token_waits_for_refresh += read(&tokens.waits_for_refresh);
            s.access_breaker_opened += access.times_opened();
            s.access_breaker_rejected += access.calls_rejected();
            s.process_controller_breaker_opened += processes.times_opened();
            s.process_controller_breaker_rejected += processes.calls_rejected();
        }
        s
    }
}

impl Flows {
    /// Runs one attempt of `step`, cut off at the session's deadline.
    /// Not an `async fn`, which would hold `call` twice in its state (see `Deadline::run`).
    pub(super) fn attempt<F: Future>(
        &self,
        step: Step,
        deadline: &Deadline,
        call: F,
    ) -> impl Future<Output = Result<F::Output, FlowError>> {
        use futures_util::FutureExt as _;
        deadline.run(call).map(move |done| {
            done.map_err(|_| {
                bump(&self.stats.budget_exhausted);
                FlowError::BudgetExhausted(step)
            })
        })
    }

    /// After the `failed`-th failed attempt of a step that is safe to retry: waits as the
    /// policy says and returns `true`, or returns `false` when the error is not transient, the
    /// attempts are used up, finAPI's `Retry-After` is too far off, or the budget cannot fit
    /// another attempt.
    pub(super) async fn back_off(
        &self,
        step: Step,
        failed: u32,
        err: &UpstreamError,
        deadline: &Deadline,
    ) -> bool {
        let Some(delay) = self.policy.delay_after(failed, err, deadline) else {
            return false;
        };
        bump(&self.stats.retries);
        tracing::debug!(
            step = step.as_str(),
            attempt = failed + 1,
            delay_ms = delay.as_millis() as u64,
            error = %err,
            "retrying finAPI call"
        );
        tokio::time::sleep(delay).await;
        true
    }

    /// Makes the call of `step` until it succeeds or a failure may not, or can no longer, be
    /// retried (see [`Flows::back_off`]); `before_retry` sees each failure that is retried.
    /// Only for steps whose retry the caller has argued to be safe.
    pub(super) async fn with_retries<T, Fut>(
        &self,
        step: Step,
        deadline: &Deadline,
        mut call: impl FnMut() -> Fut,
        mut before_retry: impl FnMut(&UpstreamError),
    ) -> Result<T, FlowError>
    where
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let mut failed = 0;
        let mut reason = "";
        loop {
            let attempt = crate::finapi::as_attempt(failed + 1, reason, call());
            let err = match self.attempt(step, deadline, attempt).await? {
                Ok(value) => return Ok(value),
                Err(err) => err,
            };
            failed += 1;
            if !self.back_off(step, failed, &err, deadline).await {
                return Err(classify_credentials_call(err));
            }
            before_retry(&err);
            reason = err.outcome();
        }
    }
}
