//! Who may call: API keys in `X-Api-Key`, checked against the SHA-256 digests of the configured
//! callers in constant time; a rate limit per caller (governor's GCRA, equivalent to a token
//! bucket); and a global limit on requests in flight that sheds load at once instead of
//! queueing. The callers can be replaced while the broker runs (`SIGHUP`); a caller that stays
//! with the same limits keeps its limiter, so a reload grants nobody a fresh burst.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota};
use subtle::ConstantTimeEq;

use crate::config::{FlowKind, Settings, sha256};

use super::AppState;
use super::error::ApiError;

/// The API key header.
pub const API_KEY_HEADER: &str = "x-api-key";
/// Longest API key looked at; longer ones are refused without hashing.
const MAX_KEY_LEN: usize = 512;
/// Highest rate a limiter takes: governor spaces requests by whole nanoseconds.
const MAX_RATE_PER_SEC: u64 = 1_000_000_000;

/// One caller's rate limit: `rate_per_sec` requests per second on average, `burst` at once
/// (`limits.caller_rate_per_sec`, `limits.caller_burst` or the caller's own values).
struct Limiter {
    rate_per_sec: u64,
    burst: u64,
    limiter: DefaultDirectRateLimiter,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("rate_per_sec", &self.rate_per_sec)
            .field("burst", &self.burst)
            .finish_non_exhaustive()
    }
}

impl Limiter {
    /// A limiter whose burst is available at once. Validated settings hold values of at
    /// least 1; larger ones than governor can count are capped.
    fn new(rate_per_sec: u64, burst: u64) -> Self {
        let nonzero = |value: u64, max: u64| {
            let capped = u32::try_from(value.clamp(1, max)).unwrap_or(u32::MAX);
            NonZeroU32::new(capped).unwrap_or(NonZeroU32::MIN)
        };
        let quota = Quota::per_second(nonzero(rate_per_sec, MAX_RATE_PER_SEC))
            .allow_burst(nonzero(burst, u64::from(u32::MAX)));
        Self {
            rate_per_sec,
            burst,
            limiter: DefaultDirectRateLimiter::direct(quota),
        }
    }

    /// Takes one request's place, or says how long until one is free.
    fn try_acquire(&self) -> Result<(), Duration> {
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// An authenticated caller. Its name goes into logs; its key is never kept.
#[derive(Debug)]
pub struct Caller {
    /// The configured name.
    pub name: Arc<str>,
    flows: Vec<FlowKind>,
    finapi_clients: Vec<Arc<str>>,
    limiter: Arc<Limiter>,
}

impl Caller {
    fn new(name: &str, flows: Vec<FlowKind>, limiter: Arc<Limiter>) -> Self {
        Self {
            name: name.into(),
            flows,
            finapi_clients: vec![crate::config::DEFAULT_CLIENT.into()],
            limiter,
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

    /// Takes one request's place in the caller's limit, or says how long until one is free.
    fn try_acquire(&self) -> Result<(), Duration> {
        self.limiter.try_acquire()
    }
}

/// One generation of the configured callers.
#[derive(Debug)]
struct CallerSet {
    /// `Some` when authentication is disabled: everyone is this caller.
    anonymous: Option<Arc<Caller>>,
    by_digest: Vec<([u8; 32], Arc<Caller>)>,
}

impl CallerSet {
    /// The callers of validated settings; a caller named in `previous` with the same limits
    /// keeps its limiter.
    fn build(settings: &Settings, previous: Option<&CallerSet>) -> Self {
        let limits = &settings.limits;
        let limiter = |name: &str, rate: u64, burst: u64| {
            previous
                .and_then(|p| p.by_name(name))
                .map(|c| c.limiter.clone())
                .filter(|l| l.rate_per_sec == rate && l.burst == burst)
                .unwrap_or_else(|| Arc::new(Limiter::new(rate, burst)))
        };
        let anonymous = settings.auth.disabled.then(|| {
            let (rate, burst) = (limits.caller_rate_per_sec, limits.caller_burst);
            Arc::new(
                Caller::new(
                    "anonymous",
                    vec![FlowKind::Standalone, FlowKind::Access],
                    limiter("anonymous", rate, burst),
                )
                .with_finapi_clients(settings.finapi.client_names()),
            )
        });
        let by_digest = settings
            .auth
            .callers
            .iter()
            .filter_map(|c| {
                let rate = c.rate_per_sec.unwrap_or(limits.caller_rate_per_sec);
                let burst = c.burst.unwrap_or(limits.caller_burst);
                let caller = Caller::new(&c.name, c.flow_kinds(), limiter(&c.name, rate, burst))
                    .with_finapi_clients(c.finapi_client_names());
                Some((c.key_digest()?, Arc::new(caller)))
            })
            .collect();
        Self {
            anonymous,
            by_digest,
        }
    }

    fn by_name(&self, name: &str) -> Option<&Arc<Caller>> {
        self.anonymous
            .iter()
            .chain(self.by_digest.iter().map(|(_, c)| c))
            .find(|c| &*c.name == name)
    }
}

/// What replacing the callers changed, by caller name (never a key).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CallerChanges {
    /// Callers that are new.
    pub added: Vec<String>,
    /// Callers that are gone: their keys answer `401` from now on.
    pub removed: Vec<String>,
    /// Callers whose API key changed.
    pub key_changed: Vec<String>,
    /// Callers whose flows or rate limit changed (a changed limit starts with a full burst).
    pub updated: Vec<String>,
}

impl CallerChanges {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.key_changed.is_empty()
            && self.updated.is_empty()
    }
}

/// The configured callers, replaceable while requests run.
#[derive(Debug)]
pub struct Callers {
    current: RwLock<Arc<CallerSet>>,
}

impl Callers {
    /// The callers of validated settings.
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            current: RwLock::new(Arc::new(CallerSet::build(settings, None))),
        }
    }

    fn snapshot(&self) -> Arc<CallerSet> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Replaces the callers with those of validated `settings`. Requests already admitted
    /// keep the caller they were admitted as; a caller whose name and limits stay keeps its
    /// limiter's state.
    pub fn replace(&self, settings: &Settings) -> CallerChanges {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let next = CallerSet::build(settings, Some(&current));
        let describe = |set: &CallerSet| -> HashMap<String, ([u8; 32], Vec<FlowKind>, u64, u64)> {
            set.by_digest
                .iter()
                .map(|(digest, c)| {
                    let l = &c.limiter;
                    (
                        c.name.to_string(),
                        (*digest, c.flows.clone(), l.rate_per_sec, l.burst),
                    )
                })
                .collect()
        };
        let (old, new) = (describe(&current), describe(&next));
        let mut changes = CallerChanges::default();
        for (name, (digest, flows, rate, burst)) in &new {
            match old.get(name) {
                None => changes.added.push(name.clone()),
                Some((old_digest, old_flows, old_rate, old_burst)) => {
                    if old_digest != digest {
                        changes.key_changed.push(name.clone());
                    }
                    if old_flows != flows || old_rate != rate || old_burst != burst {
                        changes.updated.push(name.clone());
                    }
                }
            }
        }
        changes.removed = old
            .keys()
            .filter(|name| !new.contains_key(*name))
            .cloned()
            .collect();
        for list in [
            &mut changes.added,
            &mut changes.removed,
            &mut changes.key_changed,
            &mut changes.updated,
        ] {
            list.sort();
        }
        *current = Arc::new(next);
        changes
    }

    /// Whether authentication is switched off.
    pub fn disabled(&self) -> bool {
        self.snapshot().anonymous.is_some()
    }

    /// The caller a presented key belongs to. Every configured digest is compared, in constant
    /// time, whether or not an earlier one matched.
    pub fn authenticate(&self, key: Option<&[u8]>) -> Result<Arc<Caller>, ApiError> {
        let set = self.snapshot();
        if let Some(anonymous) = &set.anonymous {
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
        for (candidate, caller) in &set.by_digest {
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

/// Middleware in front of the KYC routes: authenticates the caller (named in the request's
/// `request finished` line and metrics through [`super::request_id::note_caller`], refusals
/// and dropped requests included), applies its rate limit, then
/// takes a place among the requests in flight or refuses at once with 503
/// (`limits.max_in_flight`; load is shed, not queued). Unknown callers never take a place.
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
    super::request_id::note_caller(&caller.name);
    let admitted = match caller.try_acquire() {
        Err(wait) => Err(ApiError::RateLimited { retry_after: wait }),
        Ok(()) => state
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded),
    };
    Ok(match admitted {
        Ok(_permit) => {
            request.extensions_mut().insert(CallerExt(caller));
            next.run(request).await
        }
        Err(refused) => refused.into_response(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limited(name: &str, flows: Vec<FlowKind>, rate: u64, burst: u64) -> Arc<Caller> {
        Arc::new(Caller::new(
            name,
            flows,
            Arc::new(Limiter::new(rate, burst)),
        ))
    }

    fn callers(keys: &[(&str, &[u8])]) -> Callers {
        let set = CallerSet {
            anonymous: None,
            by_digest: keys
                .iter()
                .map(|(name, key)| (sha256(key), limited(name, vec![FlowKind::Access], 1, 2)))
                .collect(),
        };
        Callers {
            current: RwLock::new(Arc::new(set)),
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
    fn the_limit_allows_a_burst_then_says_when_the_next_request_fits() {
        let caller = limited("a", vec![], 1, 2);
        assert!(caller.try_acquire().is_ok());
        assert!(caller.try_acquire().is_ok());
        let wait = caller.try_acquire().unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1));
    }

    #[test]
    fn absurd_limits_are_capped_instead_of_breaking_the_limiter() {
        let caller = limited("a", vec![], u64::MAX, u64::MAX);
        for _ in 0..1000 {
            assert!(caller.try_acquire().is_ok());
        }
    }

    fn settings(callers: &[(&str, &[u8])]) -> Settings {
        let env = [
            ("GIROIDENT_BROKER_FINAPI__CLIENT_ID", "unit-test-client"),
            ("GIROIDENT_BROKER_FINAPI__CLIENT_SECRET", "unit-test-secret"),
            (
                "GIROIDENT_BROKER_IDENTITIES__PASSWORD_KEY",
                "unit-test-password-key-0123456789abcdef",
            ),
            ("GIROIDENT_BROKER_AUTH__DISABLED", "true"),
        ];
        let env = env.map(|(k, v)| (k.to_owned(), v.to_owned()));
        let mut settings = Settings::load_with_env(None, env).unwrap();
        settings.auth.disabled = false;
        settings.limits.caller_rate_per_sec = 1;
        settings.limits.caller_burst = 1;
        for (name, key) in callers {
            settings
                .auth
                .callers
                .push(crate::config::CallerSettings::from_key(
                    name,
                    key,
                    &[FlowKind::Access],
                ));
        }
        settings
    }

    #[test]
    fn a_replacement_names_its_changes_and_keeps_the_limits_of_unchanged_callers() {
        let callers = Callers::from_settings(&settings(&[("a", b"key-a"), ("b", b"key-b")]));
        let a = callers.authenticate(Some(b"key-a")).unwrap();
        assert!(a.try_acquire().is_ok());
        let changes = callers.replace(&settings(&[("a", b"key-a"), ("c", b"key-c")]));
        assert_eq!(changes.added, ["c"]);
        assert_eq!(changes.removed, ["b"]);
        assert!(changes.key_changed.is_empty() && changes.updated.is_empty());
        assert!(callers.authenticate(Some(b"key-b")).is_err());
        let a = callers.authenticate(Some(b"key-a")).unwrap();
        assert!(a.try_acquire().is_err(), "a's spent burst survives");
        let changes = callers.replace(&settings(&[("a", b"new-key-a")]));
        assert_eq!(changes.key_changed, ["a"]);
        assert!(callers.authenticate(Some(b"key-a")).is_err());
        assert!(callers.authenticate(Some(b"new-key-a")).is_ok());
    }

    #[test]
    fn flows_are_checked_per_caller() {
        let caller = limited("a", vec![FlowKind::Access], 1, 1);
        assert!(caller.may_use(FlowKind::Access));
        assert!(!caller.may_use(FlowKind::Standalone));
    }
}
