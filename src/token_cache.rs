//! The client-token cache: one moka entry per finAPI client.
//!
//! Lifetime rule, for a token finAPI says is valid for `expires_in` seconds and a configured
//! safety margin `m`:
//! - `expires_in = 0`: finAPI's "never expires"; the entry stays until a 401 removes it.
//! - `expires_in > 2m`: kept for `expires_in − m`.
//! - otherwise (short-lived tokens): kept for half of `expires_in`, at least 500 ms.
//!
//! finAPI returns the *same* token while it is valid, with a smaller `expires_in`, so a token
//! fetched again inside its margin comes back with less time left, and is kept for half of
//! that. Fetches near the end of a token's life therefore come at halving intervals (about
//! `log2(m)` of them, never closer than 500 ms) instead of in a loop. A request that still meets
//! an expired token gets a 401 from finAPI, which invalidates the entry and retries once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use moka::ops::compute::Op;
use secrecy::{ExposeSecret, SecretString};

use crate::finapi::{AccessClient, UpstreamError};

/// Shortest time a fetched token is kept, so that an almost-expired token cannot cause a loop.
const MIN_KEEP: Duration = Duration::from_millis(500);

/// A cached client token.
#[derive(Debug)]
pub struct ClientToken {
    /// The bearer token.
    pub token: SecretString,
    keep_for: Option<Duration>,
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

impl TokenError {
    /// The upstream failure, if that is what happened.
    pub fn upstream(&self) -> Option<&UpstreamError> {
        match self {
            Self::Fetch(e) => Some(e),
            Self::Aborted => None,
        }
    }
}

/// Client tokens, fetched on a miss (concurrent misses share one fetch) and kept per the rule
/// in the module documentation. Cheap to clone.
#[derive(Clone)]
pub struct ClientTokenCache {
    cache: Cache<String, Arc<ClientToken>>,
    access: AccessClient,
    margin: Duration,
}

struct KeepFor;

impl Expiry<String, Arc<ClientToken>> for KeepFor {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<ClientToken>,
        _created_at: Instant,
    ) -> Option<Duration> {
        value.keep_for
    }
}

/// How long to keep a token finAPI said is valid for `expires_in` seconds (see module docs).
pub fn keep_for(expires_in: Option<u64>, margin: Duration) -> Option<Duration> {
    let lifetime = Duration::from_secs(expires_in?);
    if lifetime.is_zero() {
        None
    } else if lifetime > margin * 2 {
        Some(lifetime - margin)
    } else {
        Some((lifetime / 2).max(MIN_KEEP))
    }
}

impl ClientTokenCache {
    /// A cache fetching tokens through `access`, dropping them `margin` before they expire.
    pub fn new(access: AccessClient, margin: Duration) -> Self {
        let cache = Cache::builder()
            .max_capacity(16)
            .expire_after(KeepFor)
            .build();
        Self {
            cache,
            access,
            margin,
        }
    }

    /// The client token, from the cache or fetched once for all concurrent callers.
    ///
    /// The fetch runs in its own task: when the request that started it goes away, the fetch
    /// still completes and fills the cache for the others.
    pub async fn get(&self, request_id: &str) -> Result<Arc<ClientToken>, TokenError> {
        use crate::telemetry::metrics::TOKEN_CACHE;
        let key = self.access.client_id();
        if let Some(token) = self.cache.get(key).await {
            metrics::counter!(TOKEN_CACHE, "result" => "hit").increment(1);
            return Ok(token);
        }
        metrics::counter!(TOKEN_CACHE, "result" => "miss").increment(1);
        let this = self.clone();
        let request_id = request_id.to_owned();
        tokio::spawn(async move {
            let key = this.access.client_id().to_owned();
            this.cache
                .try_get_with(key, this.fetch(&request_id))
                .await
                .map_err(TokenError::Fetch)
        })
        .await
        .map_err(|_| TokenError::Aborted)?
    }

    async fn fetch(&self, request_id: &str) -> Result<Arc<ClientToken>, UpstreamError> {
        use crate::telemetry::metrics::TOKEN_FETCHES;
        let result = self.access.client_token(request_id).await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!(TOKEN_FETCHES, "trigger" => "request", "outcome" => outcome).increment(1);
        let token = result?;
        let keep_for = keep_for(token.expires_in, self.margin);
        tracing::debug!(
            expires_in = token.expires_in,
            keep_for_ms = keep_for.map(|d| d.as_millis() as u64),
            "fetched client token"
        );
        Ok(Arc::new(ClientToken {
            token: token.token,
            keep_for,
        }))
    }

    /// Drops the entry if it still holds `rejected` (finAPI answered 401 to it). A newer token
    /// that another request already fetched is left alone.
    pub async fn invalidate(&self, rejected: &ClientToken) {
        let key = self.access.client_id().to_owned();
        self.cache
            .entry(key)
            .and_compute_with(|entry| {
                let op = match entry {
                    Some(e)
                        if e.value().token.expose_secret() == rejected.token.expose_secret() =>
                    {
                        Op::Remove
                    }
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

    const MARGIN: Duration = Duration::from_secs(60);

    #[test]
    fn zero_means_never_expires() {
        assert_eq!(keep_for(Some(0), MARGIN), None);
    }

    #[test]
    fn long_lived_token_is_kept_until_the_margin() {
        assert_eq!(
            keep_for(Some(3599), MARGIN),
            Some(Duration::from_secs(3539))
        );
    }

    #[test]
    fn short_lived_token_is_kept_half_its_life() {
        assert_eq!(keep_for(Some(2), MARGIN), Some(Duration::from_secs(1)));
        assert_eq!(keep_for(Some(120), MARGIN), Some(Duration::from_secs(60)));
    }

    #[test]
    fn an_almost_expired_token_is_still_kept_briefly() {
        assert_eq!(keep_for(Some(1), MARGIN), Some(MIN_KEEP));
    }

    #[test]
    fn refetches_inside_the_margin_are_bounded() {
        // finAPI hands the same token back with less time left; count the fetches until it
        // expires when each fetch happens as soon as the entry is dropped.
        let mut left = 3599.0_f64;
        let mut fetches = 0;
        while left > 0.0 {
            fetches += 1;
            let kept = keep_for(Some(left.ceil() as u64), MARGIN)
                .unwrap()
                .as_secs_f64();
            left -= kept;
        }
        assert!(fetches <= 10, "{fetches} fetches in one token lifetime");
    }

    #[test]
    fn missing_expiry_is_kept_until_rejected() {
        assert_eq!(keep_for(None, MARGIN), None);
    }
}
