//! The client-token cache: one moka entry per finAPI client, refreshed ahead in the background.
//!
//! finAPI hands out the *same* client token while it is valid (with a smaller `expires_in`), so
//! a token cannot be replaced before it expires: the next one exists only from its expiry on.
//! The rule, for a token finAPI says is valid for `expires_in` seconds, `a` being
//! `token_cache.refresh_ahead_secs`:
//!
//! - `expires_in = 0` (finAPI: never expires): kept until finAPI refuses it; a value above
//!   [`MAX_EXPIRES_IN_SECS`] (one year) is read as one year;
//! - otherwise the token is presented until `expires_in` after its answer arrived (finAPI rounds
//!   to whole seconds, so it may end up to a second earlier); the first request that reads it
//!   `a` before that (half-way for tokens shorter than `2a`) starts a background refresh, at
//!   most one at a time. The refresh asks finAPI at once (the same token comes back, confirming
//!   its remaining life), waits until a second before the token's end, then asks every
//!   [`END_POLL`] until finAPI hands out the next token, which replaces it in the cache.
//! - A failed refresh keeps the still-valid token and tries again with backoff, or after
//!   finAPI's `Retry-After` if longer; it never waits past the token's end plus [`END_GRACE`],
//!   when it gives up.
//!
//! So after warm-up no request fetches a client token itself. What finAPI leaves possible is
//! the narrow window between the real expiry and the arrival of the next token (at most
//! `END_POLL` plus one call): a request in it may meet a `401`, or find the token past its end;
//! it then waits for the refresh in flight instead of fetching, but only while the refresh's
//! next call is due within the wait's bound: the token's end plus `END_GRACE`, and one call
//! timeout from when the request began to wait. A refresh backing off beyond that (finAPI
//! refused it) is not waited for. Whenever a request does not wait, or its wait runs out, it
//! fetches, and concurrent ones share that fetch (`try_get_with`), which answers a new token or
//! finAPI's refusal within one call's retries. So does a request that finds no token (cold
//! start, or finAPI down throughout a token's end).

use opentelemetry::trace::SpanKind;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moka::Expiry;
use moka::future::Cache;
use moka::ops::compute::Op;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::finapi::{AccessClient, AccessToken, MAX_EXPIRES_IN_SECS, UpstreamError};
use crate::resilience::{Deadline, RetryPolicy, later};
use crate::telemetry::metrics::{HandleCache, TOKEN_CACHE, TOKEN_FETCHES};
use crate::telemetry::otel::{self, Span};

/// Interval of the refresh's calls in the last second of a token's life.
pub const END_POLL: Duration = Duration::from_millis(25);
/// How long past its end an entry stays, so that the refresh can replace it before requests
/// find nothing: `END_POLL`, one call, and finAPI's rounding to whole seconds. Also the
/// longest a request waits for the refresh past the token's end, and when the refresh gives up.
pub const END_GRACE: Duration = Duration::from_secs(2);
/// Id sent as `X-Request-Id` with background refreshes.
const REFRESH_REQUEST_ID: &str = "giroident-broker-token-refresh";

/// Counts a lookup, and returns its result for the lookup's span.
fn count_lookup(result: &'static str) -> &'static str {
    static HANDLES: HandleCache<&'static str, metrics::Counter> = HandleCache::new();
    HANDLES.with(
        result,
        |&result| metrics::counter!(TOKEN_CACHE, "result" => result),
        |lookups| lookups.increment(1),
    );
    result
}

fn count_fetch(trigger: &'static str, ok: bool) {
    let outcome = if ok { "ok" } else { "error" };
    metrics::counter!(TOKEN_FETCHES, "trigger" => trigger, "outcome" => outcome).increment(1);
}

/// A cached client token.
#[derive(Debug)]
pub struct ClientToken {
    /// The bearer token.
    pub token: SecretString,
    /// From here on the token is not presented (`None`: never expires).
    ends_at: Option<Instant>,
    /// From here on a reader starts the background refresh.
    refresh_at: Option<Instant>,
}

impl ClientToken {
    fn same_token(&self, other: &ClientToken) -> bool {
        self.token.expose_secret() == other.token.expose_secret()
    }

    fn is_past_end(&self, now: Instant) -> bool {
        self.ends_at.is_some_and(|end| now >= end)
    }
}

/// What the background refresh is doing, published to the requests that wait for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refresh {
    /// No refresh runs.
    Idle,
    /// One runs; its next call to finAPI is due at `next_call` (already past: calling now).
    Running { next_call: Instant },
}

/// The running refresh's hold on the shared [`Refresh`] state: at most one exists. However the
/// refresh task ends (done, gave up, panicked, aborted), dropping the hold sets the state back
/// to idle and wakes the requests waiting for it, so no state can claim a refresh that is gone.
struct RefreshHold(Arc<watch::Sender<Refresh>>);

impl RefreshHold {
    /// The hold, unless a refresh runs already.
    fn take(state: &Arc<watch::Sender<Refresh>>) -> Option<Self> {
        let taken = state.send_if_modified(|refresh| match refresh {
            Refresh::Idle => {
                *refresh = Refresh::Running {
                    next_call: Instant::now(),
                };
                true
            }
            Refresh::Running { .. } => false,
        });
        taken.then(|| Self(state.clone()))
    }

    /// Tells waiting requests when the refresh calls finAPI next.
    fn next_call(&self, at: Instant) {
        self.0.send_replace(Refresh::Running { next_call: at });
    }
}

impl Drop for RefreshHold {
    fn drop(&mut self) {
        self.0.send_replace(Refresh::Idle);
    }
}

/// Why no client token could be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The upstream fetch failed (shared by every caller that waited for it).
    #[error("fetching the client token failed")]
    Fetch(#[source] Arc<UpstreamError>),
    /// The task fetching the token died.
    #[error("the client-token fetch was aborted")]
    Aborted,
}

/// Counters of the cache, for tests, docs and (later) metrics.
#[derive(Debug, Default)]
pub struct TokenCacheStats {
    /// Client-token calls made because a request found no usable token (cold start, or no
    /// refresh in flight when the token ended).
    pub request_path_fetches: AtomicU64,
    /// Client-token calls made by background refreshes.
    pub background_fetches: AtomicU64,
    /// Background refresh calls that failed (each is retried with backoff).
    pub background_failures: AtomicU64,
    /// Tokens replaced by a background refresh.
    pub refreshed_tokens: AtomicU64,
    /// Requests that waited for a background refresh at a token's end.
    pub waits_for_refresh: AtomicU64,
}

/// Client tokens, fetched on a miss (concurrent misses share one fetch), refreshed in the
/// background per the rule in the module documentation. Cheap to clone.
#[derive(Clone)]
pub struct ClientTokenCache {
    cache: Cache<String, Arc<ClientToken>>,
    access: AccessClient,
    refresh_ahead: Duration,
    policy: RetryPolicy,
    budget: Duration,
    refresh: Arc<watch::Sender<Refresh>>,
    stats: Arc<TokenCacheStats>,
}

struct KeepFor;

impl KeepFor {
    fn keep(value: &ClientToken) -> Option<Duration> {
        value.ends_at.map(|end| {
            end.saturating_duration_since(Instant::now())
                .saturating_add(END_GRACE)
        })
    }
}

impl Expiry<String, Arc<ClientToken>> for KeepFor {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<ClientToken>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Self::keep(value)
    }

    // A refreshed token replaces the entry: it lives by its own end, not its predecessor's.
    fn expire_after_update(
        &self,
        _key: &String,
        value: &Arc<ClientToken>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Self::keep(value)
    }
}

/// When to present a token until, and when to start refreshing it, for a token whose answer
/// arrived at `received` saying `expires_in` seconds (see module docs; more than
/// [`MAX_EXPIRES_IN_SECS`] is read as that much).
pub fn schedule(
    expires_in: Option<u64>,
    received: Instant,
    refresh_ahead: Duration,
) -> (Option<Instant>, Option<Instant>) {
    let Some(lifetime) = expires_in
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s.min(MAX_EXPIRES_IN_SECS)))
    else {
        return (None, None);
    };
    let ahead = if lifetime > refresh_ahead.saturating_mul(2) {
        refresh_ahead
    } else {
        lifetime / 2
    };
    let end = later(received, lifetime);
    (Some(end), Some(end.checked_sub(ahead).unwrap_or(received)))
}

impl ClientTokenCache {
    /// A cache fetching tokens through `access`, each fetch retried per `policy` within
    /// `budget`, refreshing tokens `refresh_ahead` before they end.
    pub fn new(
        access: AccessClient,
        refresh_ahead: Duration,
        policy: RetryPolicy,
        budget: Duration,
    ) -> Self {
        let cache = Cache::builder()
            .max_capacity(16)
            .expire_after(KeepFor)
            .build();
        Self {
            cache,
            access,
            refresh_ahead,
            policy,
            budget,
            refresh: Arc::new(watch::Sender::new(Refresh::Idle)),
            stats: Arc::new(TokenCacheStats::default()),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &TokenCacheStats {
        &self.stats
    }

    /// The client token: the cached one (starting its background refresh when due), the one a
    /// refresh in flight brings when the cached one has ended, or one fetched once for all
    /// concurrent callers.
    pub async fn get(&self, request_id: &str) -> Result<Arc<ClientToken>, TokenError> {
        let mut span = Span::child("client_token.lookup", SpanKind::Internal, Vec::new());
        let mut result = "";
        let token = span.scope(self.lookup(request_id, &mut result)).await;
        span.set("client_token.cache", result);
        token
    }

    /// The lookup of [`Self::get`]; `result` is set to `hit` or `miss`.
    async fn lookup(
        &self,
        request_id: &str,
        result: &mut &'static str,
    ) -> Result<Arc<ClientToken>, TokenError> {
        if let Some(token) = self.cache.get(self.access.client_id()).await {
            let now = Instant::now();
            if !token.is_past_end(now) {
                if token.refresh_at.is_some_and(|at| now >= at) {
                    self.start_refresh(token.clone());
                }
                *result = count_lookup("hit");
                return Ok(token);
            }
            *result = count_lookup("miss");
            return self.replace(&token, request_id).await;
        }
        *result = count_lookup("miss");
        self.fetch_shared(request_id).await
    }

    /// A token other than `stale` (finAPI refused it, or it has ended): the one the refresh in
    /// flight brings when `stale` is about to end (waited for as [`Self::wait_for_refresh`]
    /// says), or else a fresh fetch after dropping `stale` (only if the entry still holds it: a
    /// newer token another request fetched is kept). A token refused long before its end was
    /// revoked: the refresh, which waits for the end, would bring its successor too late.
    pub async fn replace(
        &self,
        stale: &ClientToken,
        request_id: &str,
    ) -> Result<Arc<ClientToken>, TokenError> {
        let now = Instant::now();
        if let Some(end) = stale.ends_at
            && later(now, END_GRACE) >= end
        {
            let bound = later(end, END_GRACE).min(later(now, self.policy.attempt_time));
            if let Some(current) = self.wait_for_refresh(stale, bound).await {
                return Ok(current);
            }
        }
        if let Some(current) = self.cache.get(self.access.client_id()).await
            && !current.same_token(stale)
            && !current.is_past_end(Instant::now())
        {
            return Ok(current);
        }
        self.invalidate(stale).await;
        self.fetch_shared(request_id).await
    }

    /// The token the refresh in flight brings in place of `stale`, waited for until `bound` at
    /// most; `None` as soon as no refresh runs or its next call is not due before `bound`
    /// (it backs off after finAPI refused it): the caller then fetches. So a request waits for
    /// about one upstream call, never for a refresh's `Retry-After`.
    async fn wait_for_refresh(
        &self,
        stale: &ClientToken,
        bound: Instant,
    ) -> Option<Arc<ClientToken>> {
        let mut span = Span::child(
            "client_token.wait_for_refresh",
            SpanKind::Internal,
            Vec::new(),
        );
        let got = span.scope(self.await_refresh(stale, bound)).await;
        span.set("client_token.refreshed", got.is_some());
        got
    }

    async fn await_refresh(&self, stale: &ClientToken, bound: Instant) -> Option<Arc<ClientToken>> {
        let mut refresh = self.refresh.subscribe();
        let mut waited = false;
        loop {
            // Marked seen before the cache is read: a token stored after that read wakes us.
            let state = *refresh.borrow_and_update();
            match state {
                Refresh::Running { next_call } if next_call < bound => {}
                _ => return None,
            }
            if let Some(current) = self.cache.get(self.access.client_id()).await
                && !current.same_token(stale)
            {
                return Some(current);
            }
            if !waited {
                waited = true;
                self.stats.waits_for_refresh.fetch_add(1, Ordering::Relaxed);
            }
            // Woken by each step of the refresh: every call it schedules, and its end.
            match tokio::time::timeout_at(bound, refresh.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return None,
            }
        }
    }

    /// Concurrent misses share one fetch. It runs in its own task: when the request that
    /// started it goes away, the fetch still completes and fills the cache for the others.
    async fn fetch_shared(&self, request_id: &str) -> Result<Arc<ClientToken>, TokenError> {
        let this = self.clone();
        let request_id = request_id.to_owned();
        // The shared fetch belongs to the trace of the request that started it, and its log
        // lines show the request's fields.
        let parent = otel::current_parent();
        tokio::spawn(otel::in_parent(
            parent,
            crate::api::request_id::in_current_request(async move {
                let key = this.access.client_id().to_owned();
                this.cache
                    .try_get_with(key, async {
                        this.stats
                            .request_path_fetches
                            .fetch_add(1, Ordering::Relaxed);
                        let result = this.fetch(&request_id).await;
                        count_fetch("request", result.is_ok());
                        result
                    })
                    .await
                    .map_err(TokenError::Fetch)
            }),
        ))
        .await
        .map_err(|_| TokenError::Aborted)?
    }

    /// One client token, retried per the policy within the budget (each attempt is bounded by
    /// the call timeout, and a retry starts only when one still fits). Token calls are safe to
    /// retry: `client_credentials` changes nothing at finAPI and answers the same token while
    /// it is valid.
    async fn fetch(&self, request_id: &str) -> Result<Arc<ClientToken>, UpstreamError> {
        let deadline = Deadline::after(self.budget);
        let mut failed = 0;
        let mut reason = "";
        loop {
            let call = self.access.client_token(request_id);
            let err = match crate::finapi::as_attempt(failed + 1, reason, call).await {
                Ok(answer) => return Ok(self.entry(answer, Instant::now())),
                Err(err) => err,
            };
            failed += 1;
            let Some(delay) = self.policy.delay_after(failed, &err, &deadline) else {
                return Err(err);
            };
            tracing::debug!(finapi_client = self.client(), error = %err,
                delay_ms = delay.as_millis() as u64, "retrying the client-token call");
            reason = err.outcome();
            tokio::time::sleep(delay).await;
        }
    }

    /// The finAPI client (configured name) this cache serves, for its log lines.
    fn client(&self) -> &str {
        self.access.breaker().client()
    }

    fn entry(&self, answer: AccessToken, received: Instant) -> Arc<ClientToken> {
        let (ends_at, refresh_at) = schedule(answer.expires_in, received, self.refresh_ahead);
        tracing::debug!(
            finapi_client = self.client(),
            expires_in = answer.expires_in,
            "fetched client token"
        );
        Arc::new(ClientToken {
            token: answer.token,
            ends_at,
            refresh_at,
        })
    }

    /// Starts the background refresh of `current`, unless one is running.
    fn start_refresh(&self, current: Arc<ClientToken>) {
        let Some(hold) = RefreshHold::take(&self.refresh) else {
            return;
        };
        let this = self.clone();
        // The hold lives in the task: dropped however the task ends, it wakes the waiters.
        // Background work: a trace of its own, not part of the request that found it due.
        let span = Span::root("client_token.refresh", Vec::new());
        tokio::spawn(async move { span.scope(this.refresh(current, &hold)).await });
    }

    /// Asks finAPI until it hands out a token other than `current`, then stores it. Gives up
    /// when `current` has ended long enough for its entry to be gone, or when the entry holds
    /// another token (a request fetched it; it gets its own refresh). No wait outlasts that
    /// end, whatever finAPI's `Retry-After`: past it requests fetch for themselves.
    async fn refresh(&self, current: Arc<ClientToken>, hold: &RefreshHold) {
        let give_up = current.ends_at.map(|end| later(end, END_GRACE));
        // When the token surely still runs: the lower bound of its end, learnt from finAPI.
        let mut next_call = Instant::now();
        let mut failed = 0;
        loop {
            let wake = give_up.map_or(next_call, |at| next_call.min(at));
            hold.next_call(wake);
            tokio::time::sleep_until(wake).await;
            if give_up.is_some_and(|at| Instant::now() >= at) {
                tracing::warn!(
                    finapi_client = self.client(),
                    "background client-token refresh gave up; requests will fetch"
                );
                return;
            }
            if let Some(entry) = self.cache.get(self.access.client_id()).await
                && !entry.same_token(&current)
            {
                return;
            }
            self.stats
                .background_fetches
                .fetch_add(1, Ordering::Relaxed);
            let sent = Instant::now();
            let result = self.access.client_token(REFRESH_REQUEST_ID).await;
            count_fetch("refresh", result.is_ok());
            match result {
                Ok(answer) if answer.token.expose_secret() != current.token.expose_secret() => {
                    let fresh = self.entry(answer, Instant::now());
                    self.cache
                        .insert(self.access.client_id().to_owned(), fresh)
                        .await;
                    self.stats.refreshed_tokens.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        finapi_client = self.client(),
                        "client token refreshed in the background"
                    );
                    return;
                }
                Ok(same) => {
                    failed = 0;
                    let Some(secs) = same.expires_in.filter(|s| *s > 0) else {
                        // finAPI now says "never expires": nothing left to refresh.
                        return;
                    };
                    // finAPI rounds `expires_in` to whole seconds: the token surely runs until a
                    // second before what it says, counted from when we asked. Until then a new
                    // token cannot be had; from then on, ask every END_POLL.
                    let surely_valid = later(
                        sent,
                        Duration::from_secs(secs).saturating_sub(Duration::from_secs(1)),
                    );
                    next_call = surely_valid.max(later(Instant::now(), END_POLL));
                }
                Err(err) => {
                    failed += 1;
                    self.stats
                        .background_failures
                        .fetch_add(1, Ordering::Relaxed);
                    let wait = err
                        .retry_after()
                        .unwrap_or_default()
                        .max(self.policy.backoff(failed));
                    tracing::debug!(finapi_client = self.client(), error = %err,
                        wait_ms = wait.as_millis() as u64,
                        "background client-token refresh failed; keeping the current token");
                    next_call = later(Instant::now(), wait);
                }
            }
        }
    }

    /// Drops the entry if it still holds `rejected`. A newer token that another request
    /// already fetched is left alone.
    pub async fn invalidate(&self, rejected: &ClientToken) {
        let key = self.access.client_id().to_owned();
        self.cache
            .entry(key)
            .and_compute_with(|entry| {
                let op = match entry {
                    Some(e) if e.value().same_token(rejected) => Op::Remove,
                    _ => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AHEAD: Duration = Duration::from_secs(60);

    #[test]
    fn zero_or_missing_means_never_expires() {
        let now = Instant::now();
        assert_eq!(schedule(Some(0), now, AHEAD), (None, None));
        assert_eq!(schedule(None, now, AHEAD), (None, None));
    }

    #[test]
    fn long_lived_token_is_refreshed_ahead_and_presented_to_its_end() {
        let now = Instant::now();
        let (end, refresh) = schedule(Some(3600), now, AHEAD);
        assert_eq!(end, Some(now + Duration::from_secs(3600)));
        assert_eq!(refresh, Some(now + Duration::from_secs(3540)));
    }

    #[test]
    fn absurd_lifetimes_are_read_as_one_year() {
        let now = Instant::now();
        let year = Duration::from_secs(MAX_EXPIRES_IN_SECS);
        for absurd in [MAX_EXPIRES_IN_SECS + 1, i64::MAX as u64, u64::MAX] {
            let (end, refresh) = schedule(Some(absurd), now, Duration::MAX);
            assert_eq!(end, Some(now + year));
            assert_eq!(refresh, Some(now + year / 2));
        }
    }

    #[tokio::test]
    async fn a_refresh_that_panics_or_is_aborted_leaves_no_refresh_behind_and_wakes_waiters() {
        let state = Arc::new(watch::Sender::new(Refresh::Idle));
        for abort in [false, true] {
            let mut waiter = state.subscribe();
            let hold = RefreshHold::take(&state).expect("no refresh runs");
            assert!(RefreshHold::take(&state).is_none(), "one refresh at a time");
            waiter.borrow_and_update();
            let task = tokio::spawn(async move {
                let _hold = hold;
                if abort {
                    std::future::pending::<()>().await;
                }
                panic!("the refresh task failed");
            });
            if abort {
                task.abort();
                assert!(task.await.unwrap_err().is_cancelled());
            } else {
                assert!(task.await.unwrap_err().is_panic());
            }
            tokio::time::timeout(Duration::from_secs(5), waiter.changed())
                .await
                .expect("the waiter is woken")
                .expect("the state lives");
            assert_eq!(*waiter.borrow(), Refresh::Idle);
            assert!(
                RefreshHold::take(&state).is_some(),
                "a new refresh may start"
            );
        }
    }

    #[test]
    fn short_lived_token_is_refreshed_half_way() {
        let now = Instant::now();
        let (end, refresh) = schedule(Some(4), now, AHEAD);
        assert_eq!(end, Some(now + Duration::from_secs(4)));
        assert_eq!(refresh, Some(now + Duration::from_secs(2)));
    }
}
