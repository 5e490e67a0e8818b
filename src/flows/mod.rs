//! The two GiroIdent flows. They call the finAPI clients and the token cache, and know nothing
//! of HTTP on the broker's side.

mod access;
pub mod identities;
pub mod input;
pub mod reaper;
mod retry;
mod standalone;

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;

use crate::config::{FlowKind, Settings};
use crate::finapi::{
    AccessClient, ClientCredentials, InvalidBaseUrl, ProcessControllerClient, Step, UpstreamError,
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
            | Self::PasswordKeyMissing { .. } => None,
        }
    }

    /// A short stable code for the ledger's `last_error` and metric labels, never a message
    /// from finAPI: `LOCKED`, `UPSTREAM_UNAVAILABLE`, `UPSTREAM_TIMEOUT`, `UPSTREAM_ERROR`,
    /// `UPSTREAM_REJECTED`, `UPSTREAM_CERTIFICATE_REJECTED`, `CLIENT_CREDENTIALS_REJECTED`,
    /// `STORE_UNAVAILABLE`, `PASSWORD_KEY_MISSING` or `INTERNAL`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UserLocked(_) => "LOCKED",
            Self::ClientCredentialsRejected(_) => "CLIENT_CREDENTIALS_REJECTED",
            Self::BudgetExhausted(_) => "UPSTREAM_TIMEOUT",
            Self::Store(_) => "STORE_UNAVAILABLE",
            Self::PasswordKeyMissing { .. } => "PASSWORD_KEY_MISSING",
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

/// Runs the GiroIdent flows. Built once at start-up; shared by all requests.
pub struct Flows {
    access: AccessClient,
    processes: ProcessControllerClient,
    tokens: ClientTokenCache,
    process_id: String,
    invalidate_process_token: bool,
    policy: RetryPolicy,
    session_budget: Duration,
    stats: ResilienceStats,
    identities: identities::IdentitySettings,
}

impl Flows {
    /// Builds the upstream clients and the token cache from validated settings; managed
    /// identities are recorded in `identities`' ledger.
    pub fn new(
        settings: &Settings,
        http: reqwest::Client,
        identities: identities::IdentitySettings,
    ) -> Result<Self, InvalidBaseUrl> {
        let f = &settings.finapi;
        let credentials = Arc::new(ClientCredentials {
            client_id: f.client_id.clone(),
            client_secret: f
                .client_secret
                .clone()
                .unwrap_or_else(|| SecretString::from(String::new())),
        });
        let r = &settings.resilience;
        let breaker = |service| {
            Arc::new(CircuitBreaker::new(
                service,
                r.breaker_failure_threshold,
                Duration::from_millis(r.breaker_cooldown_ms),
            ))
        };
        let access = AccessClient::new(
            http.clone(),
            &f.access_url,
            credentials.clone(),
            breaker("access"),
        )?
        .propagating_trace(settings.tracing.propagate_to_finapi);
        let processes = ProcessControllerClient::new(
            http,
            &f.process_controller_url,
            credentials,
            breaker("process_controller"),
        )?
        .propagating_trace(settings.tracing.propagate_to_finapi);
        let policy = RetryPolicy::new(r, Duration::from_millis(f.request_timeout_ms));
        let session_budget = Duration::from_millis(r.session_budget_ms);
        let tokens = ClientTokenCache::new(
            access.clone(),
            Duration::from_secs(settings.token_cache.refresh_ahead_secs),
            policy.clone(),
            session_budget,
        );
        Ok(Self {
            access,
            processes,
            tokens,
            process_id: settings.flows.process_id.clone(),
            invalidate_process_token: settings.flows.invalidate_process_token,
            policy,
            session_budget,
            stats: ResilienceStats::default(),
            identities,
        })
    }

    /// The resilience counters so far.
    pub fn stats(&self) -> ResilienceSnapshot {
        self.stats.snapshot(
            self.tokens.stats(),
            self.access.breaker(),
            self.processes.breaker(),
        )
    }

    /// Whether each upstream service's circuit breaker currently refuses calls.
    pub fn circuits_open(&self) -> [(&'static str, bool); 2] {
        [
            (
                self.access.breaker().service(),
                self.access.breaker().is_open(),
            ),
            (
                self.processes.breaker().service(),
                self.processes.breaker().is_open(),
            ),
        ]
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
                self.access(client_reference.as_ref(), email, phone, ctx, &deadline)
                    .await
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
        let user_id = self
            .access
            .current_user_id(user_token, &ctx.request_id)
            .await
            .map_err(user_call_error)?;
        self.access
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
