//! Clients for the finAPI services the broker calls: one struct per upstream service, base URL
//! injected, wire types private. Callers see domain types and [`UpstreamError`] only.
//!
//! Nothing here logs or formats a secret: request bodies with credentials are built at the last
//! moment, tokens are [`SecretString`]s, and reqwest errors are stripped of their URL (a process
//! token travels in one).

mod access;
mod process;

use std::fmt;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{RequestBuilder, Response, StatusCode};
use secrecy::SecretString;
use serde::Deserialize;
use serde::de::DeserializeOwned;

pub use access::AccessClient;
pub use process::ProcessControllerClient;

/// finAPI client credentials.
#[derive(Debug, Clone)]
pub struct ClientCredentials {
    /// The client id (not a secret).
    pub client_id: String,
    /// The client secret.
    pub client_secret: SecretString,
}

/// An OAuth access token as finAPI hands it out.
#[derive(Debug, Clone)]
pub struct AccessToken {
    /// The bearer token.
    pub token: SecretString,
    /// `bearer`, as finAPI says.
    pub token_type: String,
    /// Seconds the token stays valid, as finAPI says; `Some(0)` means it never expires.
    pub expires_in: Option<u64>,
}

/// A user to create through `POST /api/v2/users`.
#[derive(Debug)]
pub struct NewUser {
    /// The user id (1 to 36 characters of `A-Z a-z 0-9 - _ . + @`).
    pub id: String,
    /// The user's password.
    pub password: SecretString,
    /// Optional e-mail address.
    pub email: Option<String>,
    /// Optional phone number.
    pub phone: Option<String>,
}

/// The upstream calls, named in logs and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `POST /api/v2/oauth/token` with `grant_type=client_credentials`.
    ClientToken,
    /// `POST /api/v2/users`.
    CreateUser,
    /// `POST /api/v2/oauth/token` with `grant_type=password`.
    UserToken,
    /// `DELETE /api/v2/users`.
    DeleteUser,
    /// `POST /api/v1/processes`.
    CreateProcess,
    /// `GET /api/v1/processes/{processToken}`.
    ExchangeProcessToken,
}

impl Step {
    /// A stable name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientToken => "client_token",
            Self::CreateUser => "create_user",
            Self::UserToken => "user_token",
            Self::DeleteUser => "delete_user",
            Self::CreateProcess => "create_process",
            Self::ExchangeProcessToken => "exchange_process_token",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A finAPI call that did not give the expected answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made.
    #[error("finAPI call {step} could not connect")]
    Connect {
        step: Step,
        #[source]
        source: reqwest::Error,
    },
    /// The call did not finish within its timeout.
    #[error("finAPI call {step} timed out")]
    Timeout {
        step: Step,
        #[source]
        source: reqwest::Error,
    },
    /// The connection broke or the request could not be sent; the answer, if any, is lost.
    #[error("finAPI call {step} failed in transit")]
    Transport {
        step: Step,
        #[source]
        source: reqwest::Error,
    },
    /// finAPI answered with an unexpected status. Its body is never passed on; only its error
    /// code is kept.
    #[error("finAPI call {step} answered {status}{}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Status {
        step: Step,
        status: StatusCode,
        /// The ErrorMessage `code` or the OAuth `error`, when the body had one.
        code: Option<String>,
        /// The `Retry-After` header in seconds, when given.
        retry_after: Option<Duration>,
    },
    /// finAPI's answer broke the contract in a way a decoder cannot see.
    #[error("finAPI call {step} answered unexpectedly: {detail}")]
    Protocol { step: Step, detail: &'static str },
    /// finAPI answered with the expected status but a body we could not read. The decoder's
    /// message is dropped on purpose: serde quotes the offending value, which may be a token.
    #[error("finAPI call {step} answered with an unreadable body")]
    Decode { step: Step },
}

impl UpstreamError {
    /// The call that failed.
    pub fn step(&self) -> Step {
        match self {
            Self::Connect { step, .. }
            | Self::Timeout { step, .. }
            | Self::Transport { step, .. }
            | Self::Status { step, .. }
            | Self::Protocol { step, .. }
            | Self::Decode { step, .. } => *step,
        }
    }

    /// The upstream status, when finAPI answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// finAPI's `Retry-After`, when it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    fn from_reqwest(step: Step, err: reqwest::Error) -> Self {
        let source = err.without_url();
        if source.is_timeout() {
            Self::Timeout { step, source }
        } else if source.is_connect() {
            Self::Connect { step, source }
        } else {
            Self::Transport { step, source }
        }
    }
}

/// Builds the one HTTP client the broker uses for finAPI: pooled keep-alive connections,
/// timeouts, no redirects (a redirect must never carry credentials elsewhere).
pub fn http_client(
    connect_timeout: Duration,
    request_timeout: Duration,
) -> Result<reqwest::Client, reqwest::Error> {
    // Several clients in one process (tests) race to install the provider; losing is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .user_agent(concat!("giroident-broker/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// A base URL that does not make a valid endpoint URL (caught by config validation first).
#[derive(Debug, thiserror::Error)]
#[error("invalid finAPI base URL {0:?}")]
pub struct InvalidBaseUrl(String);

/// Joins a base URL and an absolute API path.
fn endpoint(base: &str, path: &str) -> Result<reqwest::Url, InvalidBaseUrl> {
    reqwest::Url::parse(&format!("{}{path}", base.trim_end_matches('/')))
        .map_err(|_| InvalidBaseUrl(base.to_owned()))
}

/// Sends one call, logs its outcome and turns any answer but `expected` into an error.
async fn send(
    step: Step,
    request: RequestBuilder,
    request_id: &str,
    expected: StatusCode,
) -> Result<Response, UpstreamError> {
    let started = Instant::now();
    let result = request.header("X-Request-Id", request_id).send().await;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    let response = match result {
        Ok(response) => response,
        Err(err) => {
            let err = UpstreamError::from_reqwest(step, err);
            tracing::debug!(step = step.as_str(), elapsed_ms, error = %err, "finAPI call failed");
            return Err(err);
        }
    };
    let status = response.status();
    let finapi_request_id = response
        .headers()
        .get("X-Request-Id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::debug!(
        step = step.as_str(),
        status = status.as_u16(),
        elapsed_ms,
        finapi_request_id,
        "finAPI call"
    );
    if status == expected {
        return Ok(response);
    }
    let retry_after = retry_after(response.headers());
    // Only the error code is read from the body; the body itself goes nowhere.
    let code = response
        .json::<ErrorBody>()
        .await
        .ok()
        .and_then(ErrorBody::code);
    Err(UpstreamError::Status {
        step,
        status,
        code,
        retry_after,
    })
}

async fn decode<T: DeserializeOwned>(step: Step, response: Response) -> Result<T, UpstreamError> {
    response
        .json::<T>()
        .await
        .map_err(|_| UpstreamError::Decode { step })
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    // finAPI documents no format; seconds are assumed (an HTTP date is ignored).
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// Either of finAPI's error shapes: ErrorMessage or the OAuth error.
#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<ErrorEntry>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct ErrorEntry {
    #[serde(default)]
    code: Option<String>,
}

impl ErrorBody {
    fn code(self) -> Option<String> {
        let code = self
            .errors
            .into_iter()
            .find_map(|e| e.code)
            .or(self.error)?;
        // A code is echoed into logs: keep it short and printable whatever finAPI sent.
        let clean: String = code
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(64)
            .collect();
        (!clean.is_empty()).then_some(clean)
    }
}

/// finAPI's token answer (`POST /api/v2/oauth/token`).
#[derive(Deserialize)]
struct TokenBody {
    access_token: SecretString,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl From<TokenBody> for AccessToken {
    fn from(body: TokenBody) -> Self {
        Self {
            token: body.access_token,
            token_type: body.token_type.unwrap_or_else(|| "bearer".to_owned()),
            expires_in: body.expires_in,
        }
    }
}
