//! The two GiroIdent flows. They call the finAPI clients and the token cache, and know nothing
//! of HTTP on the broker's side.

mod access;
pub mod identities;
pub mod input;
pub mod reaper;
pub mod reserved;
mod retry;
mod standalone;

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;

use crate::config::{FlowKind, Settings};
use crate::finapi::{
    AccessClient, ClientCredentials, ClientSecret, InvalidBaseUrl, ProcessControllerClient, Step,
    UpstreamError,
};

pub use crate::finapi::EndUserMetadata;
use crate::resilience::{CircuitBreaker, Deadline, RetryPolicy};
use crate::token_cache::{ClientTokenCache, TokenError};

pub use input::{ClientReference, Email, InvalidInput, Phone, end_user_metadata};
pub use retry::{ResilienceSnapshot, ResilienceStats};

/// What a flow needs to know about the request it serves.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The request id, passed to finAPI as `X-Request-Id`.
    pub request_id: std::sync::Arc<str>,
    /// The caller's configured name (`anonymous` without authentication), recorded with the
    /// identities it makes.
    pub caller: std::sync::Arc<str>,
    /// The finAPI client (configured name) the flow calls finAPI with, recorded with the
    /// identities it makes.
    pub finapi_client: std::sync::Arc<str>,
    /// The end user's metadata, passed to the finAPI calls made on the end user's behalf.
    pub end_user: EndUserMetadata,
}

/// A started KYC session: what the caller gets.
#[derive(Debug)]
pub struct KycSession {
    /// The user's access token, for GiroIdent.
    pub access_token: SecretString,
    /// `bearer`.
    pub token_type: String,
    /// Seconds the token is valid, where finAPI says so (the process exchange does not).
    pub expires_in: Option<u64>,
    /// The flow that ran.
    pub flow: FlowKind,
    /// The finAPI user id (access flow only).
    pub user_id: Option<String>,
    /// The managed identity behind the token (access flow only).
    pub identity: Option<identities::SessionIdentity>,
}

/// A flow request, validated.
#[derive(Debug, Clone)]
pub enum SessionRequest {
    /// Process Controller flow.
    Standalone {
        /// The caller's reference for the process.
        client_reference: ClientReference,
    },
    /// Access flow.
    Access {
        /// The caller's reference for its end customer: with one, the customer's identity is
        /// reused while it lives.
        client_reference: Option<ClientReference>,
        /// Optional e-mail of the new user.
        email: Option<Email>,
        /// Optional phone of the new user.
        phone: Option<Phone>,
    },
}

impl SessionRequest {
    /// The flow this request runs.
    pub fn flow(&self) -> FlowKind {
        match self {
            Self::Standalone { .. } => FlowKind::Standalone,
            Self::Access { .. } => FlowKind::Access,
        }
    }
}

/// Why a flow failed. Upstream causes are shared (`Arc`) because one failed client-token fetch
/// is the cause of every request that waited for it.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// finAPI refused the broker's client credentials: the broker is misconfigured.
    #[error("finAPI refused the client credentials")]
    ClientCredentialsRejected(#[source] Arc<UpstreamError>),
    /// finAPI refused a freshly fetched client token too.
    #[error("finAPI refused a fresh client token")]
    ClientTokenRejected(#[source] Arc<UpstreamError>),
    /// The user token given for deletion is unknown, expired or already deleted.
    #[error("finAPI refused the user token")]
    UserTokenRejected(#[source] Arc<UpstreamError>),
    /// The token given for deletion is not a user token.
    #[error("the token is not a user token")]
    NotAUserToken(#[source] Arc<UpstreamError>),
    /// finAPI keeps the user locked (a bank connection is busy).
    #[error("the finAPI user is locked")]
    UserLocked(#[source] Arc<UpstreamError>),
    /// Any other upstream failure.
    #[error(transparent)]
    Upstream(Arc<UpstreamError>),
    /// The session's time budget ran out during this step.
    #[error("the session's time budget ran out during {0}")]
    BudgetExhausted(Step),
    /// The access flow created a finAPI user but could not get its token: the user is
    /// orphaned (logged for clean-up); the caller gets no half result.
    #[error(
        "finAPI user {user_id} was created but no token could be had for it: orphaned, delete it"
    )]
    OrphanedUser {
        user_id: String,
        #[source]
        source: Box<FlowError>,
    },
    /// The client-token fetch task died.
    #[error("the client-token fetch was aborted")]
    TokenFetchAborted,
    /// The OS random source failed, so no password could be made.
    #[error("the OS random source failed")]
    NoRandomness,
    /// The identity ledger failed: no finAPI user is created without its record.
    #[error("the identity ledger failed")]
    Store(#[source] Arc<crate::identities::StoreError>),
    /// The finAPI client an identity was made with is no longer configured.
    #[error("finAPI client {name:?} is not configured")]
    FinapiClientMissing {
        /// The client's configured name.
        name: String,
    },
    /// The password key an identity was made with is no longer configured.
    #[error("password key {key_id} is not configured: identities made with it cannot log in")]
    PasswordKeyMissing {
        /// The key's id, as the ledger records it.
        key_id: String,
    },
}

impl From<UpstreamError> for FlowError {
    fn from(err: UpstreamError) -> Self {
        Self::Upstream(Arc::new(err))
    }
}

impl From<TokenError> for FlowError {
    fn from(err: TokenError) -> Self {
        match err {
            TokenError::Fetch(err) => classify_credentials_call(err),
            TokenError::Aborted => Self::TokenFetchAborted,
        }
    }
}

impl FlowError {
    /// The upstream error behind this one, if any.
    pub fn upstream(&self) -> Option<&UpstreamError> {
        match self {
            Self::ClientCredentialsRejected(e)
            | Self::ClientTokenRejected(e)
            | Self::UserTokenRejected(e)
            | Self::NotAUserToken(e)
            | Self::UserLocked(e)
            | Self::Upstream(e) => Some(e),
            Self::OrphanedUser { source, .. } => source.upstream(),
            Self::BudgetExhausted(_)
            | Self::TokenFetchAborted
            | Self::NoRandomness
            | Self::Store(_)
            | Self::FinapiClientMissing { .. }
            | Self::PasswordKeyMissing { .. } => None,
        }
    }

    /// A short stable code for the ledger's `last_error` and metric labels, never a message
    /// from finAPI: `LOCKED`, `UPSTREAM_UNAVAILABLE`, `UPSTREAM_TIMEOUT`, `UPSTREAM_ERROR`,
    /// `UPSTREAM_REJECTED`, `UPSTREAM_CERTIFICATE_REJECTED`, `CLIENT_CREDENTIALS_REJECTED`,
    /// `STORE_UNAVAILABLE`, `PASSWORD_KEY_MISSING`, `FINAPI_CLIENT_MISSING` or `INTERNAL`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UserLocked(_) => "LOCKED",
            Self::ClientCredentialsRejected(_) => "CLIENT_CREDENTIALS_REJECTED",
            Self::BudgetExhausted(_) => "UPSTREAM_TIMEOUT",
            Self::Store(_) => "STORE_UNAVAILABLE",
            Self::PasswordKeyMissing { .. } => "PASSWORD_KEY_MISSING",
            Self::FinapiClientMissing { .. } => "FINAPI_CLIENT_MISSING",
            Self::TokenFetchAborted | Self::NoRandomness => "INTERNAL",
            Self::OrphanedUser { source, .. } => source.code(),
            Self::ClientTokenRejected(e)
            | Self::UserTokenRejected(e)
            | Self::NotAUserToken(e)
            | Self::Upstream(e) => match &**e {
                UpstreamError::Connect { .. } | UpstreamError::CircuitOpen { .. } => {
                    "UPSTREAM_UNAVAILABLE"
                }
                UpstreamError::Timeout { .. } => "UPSTREAM_TIMEOUT",
                UpstreamError::Certificate { .. } => "UPSTREAM_CERTIFICATE_REJECTED",
                UpstreamError::Status { status, .. } => match status.as_u16() {
                    423 => "LOCKED",
                    429 | 503 => "UPSTREAM_UNAVAILABLE",
                    504 => "UPSTREAM_TIMEOUT",
                    400..=499 => "UPSTREAM_REJECTED",
                    _ => "UPSTREAM_ERROR",
                },
                UpstreamError::Request { .. } => "INTERNAL",
                _ => "UPSTREAM_ERROR",
            },
        }
    }
}

/// A call authenticated with the client id and secret answered: a 401 means the credentials
/// are wrong.
fn classify_credentials_call(err: impl Into<Arc<UpstreamError>>) -> FlowError {
    let err = err.into();
    if is_unauthorized(&err) {
        FlowError::ClientCredentialsRejected(err)
    } else {
        FlowError::Upstream(err)
    }
}

/// One finAPI client's upstream: its Access and Process Controller clients, each behind its
/// own circuit breaker, its client-token cache (one entry), its `processId` and its secret.
/// Nothing is shared between clients, so that a failing client never slows or opens the
/// circuit of another.
struct FinapiUpstream {
    client_secret: Arc<ClientSecret>,
    access: AccessClient,
    processes: ProcessControllerClient,
    tokens: ClientTokenCache,
    process_id: String,
}

/// Runs the GiroIdent flows. Built once at start-up; shared by all requests.
pub struct Flows {
    /// By configured name, in configuration order (`default` first when it exists).
    clients: Vec<(Arc<str>, FinapiUpstream)>,
    invalidate_process_token: bool,
    policy: RetryPolicy,
    session_budget: Duration,
    stats: ResilienceStats,
    identities: identities::IdentitySettings,
}

impl Flows {
    /// Builds the upstream clients and the token cache of every configured finAPI client from
    /// validated settings; managed identities are recorded in `identities`' ledger. `http`
    /// gives the HTTP client trusting a client's `ca_file` (besides the system's roots).
    pub fn new(
        settings: &Settings,
        http: impl Fn(Option<&std::path::Path>) -> reqwest::Client,
        identities: identities::IdentitySettings,
    ) -> Result<Self, InvalidBaseUrl> {
        let r = &settings.resilience;
        let policy = RetryPolicy::new(r, Duration::from_millis(settings.finapi.request_timeout_ms));
        let session_budget = Duration::from_millis(r.session_budget_ms);
        let mut clients = Vec::new();
        for client in settings.finapi_clients() {
            let http = http(client.ca_file.as_deref());
            let client_secret = Arc::new(ClientSecret::new(
                &client.name,
                client.client_secret,
                client.client_secret_file,
            ));
            let credentials = Arc::new(ClientCredentials {
                client_id: client.client_id,
                client_secret: client_secret.clone(),
            });
            let breaker = |service| {
                Arc::new(
                    CircuitBreaker::new(
                        service,
                        r.breaker_failure_threshold,
                        Duration::from_millis(r.breaker_cooldown_ms),
                    )
                    .for_client(&client.name),
                )
            };
            let access = AccessClient::new(
                http.clone(),
                &client.access_url,
                credentials.clone(),
                breaker("access"),
            )?
            .propagating_trace(settings.tracing.propagate_to_finapi);
            let processes = ProcessControllerClient::new(
                http,
                &client.process_controller_url,
                credentials,
                breaker("process_controller"),
            )?
            .propagating_trace(settings.tracing.propagate_to_finapi);
            let tokens = ClientTokenCache::new(
                access.clone(),
                Duration::from_secs(settings.token_cache.refresh_ahead_secs),
                policy.clone(),
                session_budget,
            );
            clients.push((
                Arc::from(client.name.as_str()),
                FinapiUpstream {
                    client_secret,
                    access,
                    processes,
                    tokens,
                    process_id: client.process_id,
                },
            ));
        }
        Ok(Self {
            clients,
            invalidate_process_token: settings.flows.invalidate_process_token,
            policy,
            session_budget,
            stats: ResilienceStats::default(),
            identities,
        })
    }

    /// The secret of finAPI client `name`, if the broker has that client.
    pub fn client_secret(&self, name: &str) -> Option<&Arc<ClientSecret>> {
        self.clients
            .iter()
            .find(|(known, _)| **known == *name)
            .map(|(_, upstream)| &upstream.client_secret)
    }

    /// The configured finAPI clients' names, `default` first when it exists.
    pub fn finapi_clients(&self) -> impl Iterator<Item = &Arc<str>> {
        self.clients.iter().map(|(name, _)| name)
    }

    /// The upstream of the request's finAPI client. The API checks the name against the
    /// configuration; only a ledger record made with a client since removed can miss.
    fn upstream(&self, ctx: &RequestContext) -> Result<&FinapiUpstream, FlowError> {
        self.clients
            .iter()
            .find(|(name, _)| **name == *ctx.finapi_client)
            .map(|(_, upstream)| upstream)
            .ok_or_else(|| FlowError::FinapiClientMissing {
                name: ctx.finapi_client.to_string(),
            })
    }

    /// The resilience counters so far, summed over the finAPI clients.
    pub fn stats(&self) -> ResilienceSnapshot {
        self.stats.snapshot(self.clients.iter().map(|(_, up)| {
            (
                up.tokens.stats(),
                up.access.breaker(),
                up.processes.breaker(),
            )
        }))
    }

    /// Whether each finAPI client's upstream services' circuit breakers currently refuse
    /// calls: `(client, service, open)`.
    pub fn circuits_open(&self) -> Vec<(Arc<str>, &'static str, bool)> {
        self.clients
            .iter()
            .flat_map(|(name, up)| {
                [up.access.breaker(), up.processes.breaker()]
                    .map(|b| (name.clone(), b.service(), b.is_open()))
            })
            .collect()
    }

    /// The circuit breakers' counters per finAPI client and service:
    /// `(client, service, times opened, calls rejected)`.
    pub fn circuit_counts(&self) -> Vec<(Arc<str>, &'static str, u64, u64)> {
        self.clients
            .iter()
            .flat_map(|(name, up)| {
                [up.access.breaker(), up.processes.breaker()].map(|b| {
                    (
                        name.clone(),
                        b.service(),
                        b.times_opened(),
                        b.calls_rejected(),
                    )
                })
            })
            .collect()
    }

    /// Runs the requested flow.
    pub async fn start_session(
        &self,
        request: SessionRequest,
        ctx: &RequestContext,
    ) -> Result<KycSession, FlowError> {
        let deadline = Deadline::after(self.session_budget);
        match request {
            SessionRequest::Standalone { client_reference } => {
                self.standalone(&client_reference, ctx, &deadline).await
            }
            SessionRequest::Access {
                client_reference,
                email,
                phone,
            } => {
                // Boxed: the access flow's future (the ledger's steps) is more than twice the
                // standalone flow's, and would set the size of every session's future.
                Box::pin(self.access(client_reference.as_ref(), email, phone, ctx, &deadline)).await
            }
        }
    }

    /// Deletes the finAPI user the given user token belongs to, and closes its ledger record
    /// if the broker made it. The user's id is learnt first (`GET /api/v2/users`), since the
    /// deletion answers with no body.
    pub async fn delete_user(
        &self,
        user_token: &SecretString,
        ctx: &RequestContext,
    ) -> Result<(), FlowError> {
        let up = self.upstream(ctx)?;
        let user_id = up
            .access
            .current_user_id(user_token, &ctx.request_id)
            .await
            .map_err(user_call_error)?;
        up.access
            .delete_user(user_token, &ctx.request_id, &ctx.end_user)
            .await
            .map_err(user_call_error)?;
        self.close_deleted_user(&user_id, ctx).await;
        Ok(())
    }
}

/// A call made with a user token failed: `401` the token is refused, `403` it is no user
/// token, `423` the user is locked.
fn user_call_error(err: UpstreamError) -> FlowError {
    let status = err.status().map(|s| s.as_u16());
    let err = Arc::new(err);
    match status {
        Some(401) => FlowError::UserTokenRejected(err),
        Some(403) => FlowError::NotAUserToken(err),
        Some(423) => FlowError::UserLocked(err),
        _ => FlowError::Upstream(err),
    }
}

/// Whether an error is finAPI refusing the bearer token of a call.
fn is_unauthorized(err: &UpstreamError) -> bool {
    err.status() == Some(reqwest::StatusCode::UNAUTHORIZED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::Deadline;

    /// The bytes of the future of a flow method `f`, without running it.
    fn future_size<'a, A, Fut>(
        _f: fn(&'a Flows, &'a A, &'a RequestContext, &'a Deadline) -> Fut,
    ) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// Every layer of axum and tower copies the handler's future as it wraps it, and async fns
    /// that took a future argument held it twice: nested in the flow, that made a standalone
    /// session's future 15 KiB (docs/BENCHMARKS.md, "Issue 15: the request path and the
    /// standalone flow, fourth pass").
    #[test]
    fn a_standalone_session_future_stays_small() {
        let size = future_size(Flows::standalone);
        assert!(size <= 8 * 1024, "{size} bytes");
    }
}
