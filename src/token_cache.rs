//! The client-token cache: one moka entry per finAPI client, refreshed ahead in the background.
//!
//! finAPI hands out the *same* client token while it is valid (with a smaller `expires_in`), so
//! a token cannot be replaced before it expires: the next one exists only from its expiry on.
//! The rule, for a token finAPI says is valid for `expires_in` seconds, `a` being
//! `token_cache.refresh_ahead_secs`:
//!
//! - `expires_in = 0` (finAPI: never expires): kept until finAPI refuses it;
//! - otherwise the token is presented until `expires_in` after its answer arrived (finAPI rounds
//!   to whole seconds, so it may end up to a second earlier); the first request that reads it
//!   `a` before that (half-way for tokens shorter than `2a`) starts a background refresh, at
//!   most one at a time. The refresh asks finAPI at once (the same token comes back, confirming
//!   its remaining life), waits until a second before the token's end, then asks every
//!   [`END_POLL`] until finAPI hands out the next token, which replaces it in the cache.
//! - A failed refresh keeps the still-valid token and tries again with backoff.
//!
//! So after warm-up no request fetches a client token itself. What finAPI leaves possible is
//! the narrow window between the real expiry and the arrival of the next token (at most
//! `END_POLL` plus one call): a request in it may meet a `401`, or find the token past its end;
//! it then waits for the refresh in flight instead of fetching. Only when no refresh is in
//! flight (cold start, finAPI down for the token's whole end) does a request fetch, and
//! concurrent ones share that fetch (`try_get_with`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use moka::Expiry;
use moka::future::Cache;
use moka::ops::compute::Op;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::finapi::{AccessClient, AccessToken, UpstreamError};
use crate::resilience::{Deadline, RetryPolicy};
use crate::telemetry::metrics::{HandleCache, TOKEN_CACHE, TOKEN_FETCHES};

/// Interval of the refresh's calls in the last second of a token's life.
pub const END_POLL: Duration = Duration::from_millis(25);
/// How long past its end an entry stays, so that the refresh can replace it before requests
/// find nothing: `END_POLL`, one call, and finAPI's rounding to whole seconds.
const END_GRACE: Duration = Duration::from_secs(2);
/// Id sent as `X-Request-Id` with background refreshes.
const REFRESH_REQUEST_ID: &str = "giroident-broker-token-refresh";

fn count_lookup(result: &'static str) {
    static HANDLES: HandleCache<&'static str, metrics::Counter> = HandleCache::new();
    HANDLES.with(
        result,
        |&result| metrics::counter!(TOKEN_CACHE, "result" => result),
        |lookups| lookups.increment(1),
    );
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
    refreshing: Arc<AtomicBool>,
    replaced: Arc<watch::Sender<u64>>,
    stats: Arc<TokenCacheStats>,
}

struct KeepFor;

impl KeepFor {
    fn keep(value: &ClientToken) -> Option<Duration> {
        value
            .ends_at
            .map(|end| end.saturating_duration_since(Instant::now()) + END_GRACE)
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
/// arrived at `received` saying `expires_in` (see module docs).
pub fn schedule(
    expires_in: Option<u64>,
    received: Instant,
    refresh_ahead: Duration,
) -> (Option<Instant>, Option<Instant>) {
    let Some(lifetime) = expires_in.filter(|s| *s > 0).map(Duration::from_secs) else {
        return (None, None);
    };
    let ahead = if lifetime > refresh_ahead * 2 {
        refresh_ahead
    } else {
        lifetime / 2
    };
    (Some(received + lifetime), Some(received + lifetime - ahead))
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
            refreshing: Arc::new(AtomicBool::new(false)),
            replaced: Arc::new(watch::Sender::new(0)),
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
        if let Some(token) = self.cache.get(self.access.client_id()).await {
            let now = Instant::now();
            if !token.is_past_end(now) {
                if token.refresh_at.is_some_and(|at| now >= at) {
                    self.start_refresh(token.clone());
                }
                count_lookup("hit");
                return Ok(token);
            }
            count_lookup("miss");
            return self.replace(&token, request_id).await;
        }
        count_lookup("miss");
        self.fetch_shared(request_id).await
    }

    /// A token other than `stale` (finAPI refused it, or it has ended): the one the refresh in
    /// flight brings when `stale` is about to end, or else a fresh fetch after dropping `stale`
    /// (only if the entry still holds it: a newer token another request fetched is kept). A
    /// token refused long before its end was revoked: the refresh, which waits for the end,
    /// would bring its successor too late.
    pub async fn replace(
        &self,
        stale: &ClientToken,
        request_id: &str,
    ) -> Result<Arc<ClientToken>, TokenError> {
        let mut replaced = self.replaced.subscribe();
        let mut waited = false;
        let ending = stale.is_past_end(Instant::now() + END_GRACE);
        while ending && self.refreshing.load(Ordering::Acquire) {
            if let Some(current) = self.cache.get(self.access.client_id()).await
                && !current.same_token(stale)
            {
                return Ok(current);
            }
            if !waited {
                waited = true;
                self.stats.waits_for_refresh.fetch_add(1, Ordering::Relaxed);
            }
            // Woken by every token a refresh stores and by its end; callers bound the wait.
            if replaced.changed().await.is_err() {
                break;
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

    /// Concurrent misses share one fetch. It runs in its own task: when the request that
    /// started it goes away, the fetch still completes and fills the cache for the others.
    async fn fetch_shared(&self, request_id: &str) -> Result<Arc<ClientToken>, TokenError> {
        let this = self.clone();
        let request_id = request_id.to_owned();
        tokio::spawn(async move {
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
        })
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
        loop {
            let err = match self.access.client_token(request_id).await {
                Ok(answer) => return Ok(self.entry(answer, Instant::now())),
                Err(err) => err,
            };
            failed += 1;
            let Some(delay) = self.policy.delay_after(failed, &err, &deadline) else {
                return Err(err);
            };
            tracing::debug!(error = %err, delay_ms = delay.as_millis() as u64,
                "retrying the client-token call");
            tokio::time::sleep(delay).await;
        }
    }

    fn entry(&self, answer: AccessToken, received: Instant) -> Arc<ClientToken> {
        let (ends_at, refresh_at) = schedule(answer.expires_in, received, self.refresh_ahead);
        tracing::debug!(expires_in = answer.expires_in, "fetched client token");
        Arc::new(ClientToken {
            token: answer.token,
            ends_at,
            refresh_at,
        })
    }

    /// Starts the background refresh of `current`, unless one is running.
    fn start_refresh(&self, current: Arc<ClientToken>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            this.refresh(current).await;
            this.refreshing.store(false, Ordering::Release);
            // Wakes requests waiting for this refresh, also when it gave up.
            this.replaced.send_modify(|n| *n += 1);
        });
    }

    /// Asks finAPI until it hands out a token other than `current`, then stores it. Gives up
    /// when `current` has ended long enough for its entry to be gone.
    async fn refresh(&self, current: Arc<ClientToken>) {
        let give_up = current.ends_at.map(|end| end + END_GRACE);
        // When the token surely still runs: the lower bound of its end, learnt from finAPI.
        let mut next_call = Instant::now();
        let mut failed = 0;
        loop {
            tokio::time::sleep_until(next_call).await;
            if give_up.is_some_and(|at| Instant::now() >= at) {
                tracing::warn!("background client-token refresh gave up; requests will fetch");
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
                    tracing::debug!("client token refreshed in the background");
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
                    let surely_valid =
                        sent + Duration::from_secs(secs).saturating_sub(Duration::from_secs(1));
                    next_call = surely_valid.max(Instant::now() + END_POLL);
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
                    tracing::debug!(error = %err, wait_ms = wait.as_millis() as u64,
                        "background client-token refresh failed; keeping the current token");
                    next_call = Instant::now() + wait;
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
    fn short_lived_token_is_refreshed_half_way() {
        let now = Instant::now();
        let (end, refresh) = schedule(Some(4), now, AHEAD);
        assert_eq!(end, Some(now + Duration::from_secs(4)));
        assert_eq!(refresh, Some(now + Duration::from_secs(2)));
    }
}
