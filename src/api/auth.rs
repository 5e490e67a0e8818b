//! Who may call: API keys in `X-Api-Key`, checked against the SHA-256 digests of the configured
//! callers in constant time; a token bucket per caller; and a global limit on requests in
//! flight that sheds load at once instead of queueing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::config::{FlowKind, Settings, sha256};

use super::AppState;
use super::error::ApiError;

/// The API key header.
pub const API_KEY_HEADER: &str = "x-api-key";
/// Longest API key looked at; longer ones are refused without hashing.
const MAX_KEY_LEN: usize = 512;

/// An authenticated caller. Its name goes into logs; its key is never kept.
#[derive(Debug)]
pub struct Caller {
    /// The configured name.
    pub name: Arc<str>,
    flows: Vec<FlowKind>,
    finapi_clients: Vec<Arc<str>>,
    bucket: Mutex<Bucket>,
    rate_per_sec: f64,
    burst: f64,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Caller {
    fn new(name: &str, flows: Vec<FlowKind>, rate_per_sec: u64, burst: u64) -> Self {
        Self {
            name: name.into(),
            flows,
            finapi_clients: vec![crate::config::DEFAULT_CLIENT.into()],
            bucket: Mutex::new(Bucket {
                tokens: burst as f64,
                updated: Instant::now(),
            }),
            rate_per_sec: rate_per_sec as f64,
            burst: burst as f64,
        }
    }

    /// The same caller, allowed the finAPI clients `names` (its default first).
    fn with_finapi_clients(mut self, names: Vec<String>) -> Self {
        self.finapi_clients = names.into_iter().map(Arc::from).collect();
        self
    }

    /// The finAPI clients this caller may use, its default first (`auth.callers[].
    /// finapi_clients`).
    pub fn finapi_clients(&self) -> &[Arc<str>] {
        &self.finapi_clients
    }

    /// Whether this caller may start `flow`.
    pub fn may_use(&self, flow: FlowKind) -> bool {
        self.flows.contains(&flow)
    }

    /// Takes one token from the caller's bucket, or says how long until one is there.
    fn try_acquire(&self) -> Result<(), Duration> {
        let mut bucket = self
            .bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(bucket.updated).as_secs_f64() * self.rate_per_sec;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.rate_per_sec,
            ))
        }
    }
}

/// The configured callers.
#[derive(Debug)]
pub struct Callers {
    /// `Some` when authentication is disabled: everyone is this caller.
    anonymous: Option<Arc<Caller>>,
    by_digest: Vec<([u8; 32], Arc<Caller>)>,
}

impl Callers {
    /// The callers of validated settings.
    pub fn from_settings(settings: &Settings) -> Self {
        let limits = &settings.limits;
        let anonymous = settings.auth.disabled.then(|| {
            Arc::new(
                Caller::new(
                    "anonymous",
                    vec![FlowKind::Standalone, FlowKind::Access],
                    limits.caller_rate_per_sec,
                    limits.caller_burst,
                )
                .with_finapi_clients(settings.finapi.client_names()),
            )
        });
        let by_digest = settings
            .auth
            .callers
            .iter()
            .filter_map(|c| {
                let caller = Caller::new(
                    &c.name,
                    c.flow_kinds(),
                    c.rate_per_sec.unwrap_or(limits.caller_rate_per_sec),
                    c.burst.unwrap_or(limits.caller_burst),
                )
                .with_finapi_clients(c.finapi_client_names());
                Some((c.key_digest()?, Arc::new(caller)))
            })
            .collect();
        Self {
            anonymous,
            by_digest,
        }
    }

    /// Whether authentication is switched off.
    pub fn disabled(&self) -> bool {
        self.anonymous.is_some()
    }

    /// The caller a presented key belongs to. Every configured digest is compared, in constant
    /// time, whether or not an earlier one matched.
    pub fn authenticate(&self, key: Option<&[u8]>) -> Result<Arc<Caller>, ApiError> {
        if let Some(anonymous) = &self.anonymous {
            return Ok(anonymous.clone());
        }
        let key = key
            .filter(|k| !k.is_empty())
            .ok_or(ApiError::MissingApiKey)?;
        if key.len() > MAX_KEY_LEN {
            return Err(ApiError::InvalidApiKey);
        }
        let digest = sha256(key);
        let mut found = None;
        for (candidate, caller) in &self.by_digest {
            if bool::from(candidate.ct_eq(&digest)) {
                found = Some(caller);
            }
        }
        found.cloned().ok_or(ApiError::InvalidApiKey)
    }
}

/// The authenticated caller of a request, for handlers.
#[derive(Clone, Debug)]
pub struct CallerExt(pub Arc<Caller>);

/// Middleware in front of the KYC routes: authenticates the caller and names it in the request
/// span, applies its rate limit, then takes a place among the requests in flight or refuses at
/// once with 503 (`limits.max_in_flight`; load is shed, not queued). Unknown callers never
/// take a place.
pub async fn admit(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let key = request
        .headers()
        .get(API_KEY_HEADER)
        .map(|value| value.as_bytes());
    let caller = state.callers.authenticate(key)?;
    tracing::Span::current().record("caller", &*caller.name);
    let admitted = match caller.try_acquire() {
        Err(wait) => Err(ApiError::RateLimited { retry_after: wait }),
        Ok(()) => state
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded),
    };
    let mut response = match admitted {
        Ok(_permit) => {
            request.extensions_mut().insert(CallerExt(caller.clone()));
            next.run(request).await
        }
        Err(refused) => refused.into_response(),
    };
    // For the request metrics, recorded further out: refusals count for their caller too.
    response.extensions_mut().insert(CallerExt(caller));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn callers(keys: &[(&str, &[u8])]) -> Callers {
        Callers {
            anonymous: None,
            by_digest: keys
                .iter()
                .map(|(name, key)| {
                    (
                        sha256(key),
                        Arc::new(Caller::new(name, vec![FlowKind::Access], 1, 2)),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn keys_find_their_caller() {
        let c = callers(&[("a", b"key-a"), ("b", b"key-b")]);
        assert_eq!(&*c.authenticate(Some(b"key-b")).unwrap().name, "b");
        assert!(matches!(
            c.authenticate(Some(b"key-c")),
            Err(ApiError::InvalidApiKey)
        ));
        assert!(matches!(c.authenticate(None), Err(ApiError::MissingApiKey)));
        assert!(matches!(
            c.authenticate(Some(b"")),
            Err(ApiError::MissingApiKey)
        ));
    }

    #[test]
    fn the_bucket_allows_a_burst_then_refills() {
        let caller = Caller::new("a", vec![], 1, 2);
        assert!(caller.try_acquire().is_ok());
        assert!(caller.try_acquire().is_ok());
        let wait = caller.try_acquire().unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1));
        caller.bucket.lock().unwrap().updated -= Duration::from_secs(1);
        assert!(caller.try_acquire().is_ok());
    }

    #[test]
    fn flows_are_checked_per_caller() {
        let caller = Caller::new("a", vec![FlowKind::Access], 1, 1);
        assert!(caller.may_use(FlowKind::Access));
        assert!(!caller.may_use(FlowKind::Standalone));
    }
}
