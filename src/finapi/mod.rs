//! Clients for the finAPI services the broker calls: one struct per upstream service, base URL
//! injected, wire types private. Callers see domain types and [`UpstreamError`] only.
//!
//! Nothing here logs or formats a secret: request bodies with credentials are built at the last
//! moment, tokens are [`SecretString`]s, and reqwest errors are stripped of their URL (a process
//! token travels in one).

mod access;
mod process;

use std::fmt;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::resilience::CircuitBreaker;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{RequestBuilder, Response, StatusCode};
use secrecy::SecretString;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::telemetry::metrics::status_label;

pub use access::AccessClient;
pub use process::ProcessControllerClient;

/// finAPI's request id header, sent with every call.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// finAPI's end-user metadata headers.
const PSU_IP_ADDRESS: HeaderName = HeaderName::from_static("psu-ip-address");
const PSU_DEVICE_OS: HeaderName = HeaderName::from_static("psu-device-os");
const PSU_USER_AGENT: HeaderName = HeaderName::from_static("psu-user-agent");

/// The end user's metadata finAPI asks for "with every request made on behalf of an end user"
/// (finAPI reference, "End-user metadata headers"): `PSU-IP-Address` (IPv4 only),
/// `PSU-Device-OS`, `PSU-User-Agent`, each optional. Sent with the calls made for one end
/// user, never with client-token calls, which serve every caller.
///
/// The IP address is personal data and is never shown: `Debug` only says whether it is there,
/// and its header value is marked sensitive.
#[derive(Clone, Default)]
pub struct EndUserMetadata {
    ip: Option<HeaderValue>,
    device_os: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
}

impl EndUserMetadata {
    /// Metadata from values the caller has checked (`flows::input::end_user_metadata`); a
    /// text that cannot be a header value is left out.
    pub fn new(ip: Option<Ipv4Addr>, device_os: Option<&str>, user_agent: Option<&str>) -> Self {
        let ip = ip.and_then(|ip| HeaderValue::try_from(ip.to_string()).ok());
        let ip = ip.map(|mut value| {
            value.set_sensitive(true);
            value
        });
        Self {
            ip,
            device_os: device_os.and_then(|v| HeaderValue::from_str(v).ok()),
            user_agent: user_agent.and_then(|v| HeaderValue::from_str(v).ok()),
        }
    }

    /// Whether no header is set.
    pub fn is_empty(&self) -> bool {
        self.ip.is_none() && self.device_os.is_none() && self.user_agent.is_none()
    }

    /// Adds the headers that are set to a request.
    fn apply(&self, mut request: RequestBuilder) -> RequestBuilder {
        for (name, value) in [
            (PSU_IP_ADDRESS, &self.ip),
            (PSU_DEVICE_OS, &self.device_os),
            (PSU_USER_AGENT, &self.user_agent),
        ] {
            if let Some(value) = value {
                request = request.header(name, value.clone());
            }
        }
        request
    }
}

impl fmt::Debug for EndUserMetadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndUserMetadata")
            .field("ip", &self.ip.as_ref().map(|_| "[REDACTED]"))
            .field("device_os", &self.device_os)
            .field("user_agent", &self.user_agent)
            .finish()
    }
}

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// The finAPI service the call goes to: `access` or `process_controller`.
    pub fn service(self) -> &'static str {
        match self {
            Self::ClientToken | Self::CreateUser | Self::UserToken | Self::DeleteUser => "access",
            Self::CreateProcess | Self::ExchangeProcessToken => "process_controller",
        }
    }

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
    /// The circuit breaker of the service is open: the call was not made.
    #[error("finAPI call {step} not made: the {service} circuit is open")]
    CircuitOpen {
        step: Step,
        service: &'static str,
        /// Time until the breaker lets a probe through (whole seconds, at least one).
        retry_after: Duration,
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
            | Self::CircuitOpen { step, .. }
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

    /// finAPI's `Retry-After`, when it sent one, or the open breaker's remaining cool-down.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            Self::CircuitOpen { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// finAPI's error code (ErrorMessage `code` or OAuth `error`), when it answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Status { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// Trouble that may pass: connect errors, timeouts, broken connections, `429`, `500`,
    /// `502`, `503`, `504`. Whether a retry is *safe* is for the caller to decide.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Timeout { .. } | Self::Transport { .. } => true,
            Self::Status { status, .. } => matches!(status.as_u16(), 429 | 500 | 502 | 503 | 504),
            Self::CircuitOpen { .. } | Self::Protocol { .. } | Self::Decode { .. } => false,
        }
    }

    /// Whether finAPI may have carried the call out although the broker did not see it succeed:
    /// the answer was lost (timeout, broken connection) or finAPI failed while handling it
    /// (`500`, `502`, `504`). Not so for connect errors, `429` and `503`, which are refusals
    /// before any handling (assumed, as finAPI documents neither).
    pub fn may_have_been_handled(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Transport { .. } => true,
            Self::Status { status, .. } => matches!(status.as_u16(), 500 | 502 | 504),
            _ => false,
        }
    }

    /// Whether the answer, if any, never arrived: a timeout or a broken connection.
    pub fn answer_lost(&self) -> bool {
        matches!(self, Self::Timeout { .. } | Self::Transport { .. })
    }

    /// Whether this outcome counts against the service's circuit breaker: connect errors,
    /// timeouts, broken connections, 5xx and 429; not refusals of the request (other 4xx).
    fn is_breaker_failure(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Timeout { .. } | Self::Transport { .. } => true,
            Self::Status { status, .. } => status.is_server_error() || status.as_u16() == 429,
            _ => false,
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

/// The environment variables reqwest reads proxies from.
const PROXY_VARIABLES: [&str; 6] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// Builds the one HTTP client the broker uses for finAPI: pooled keep-alive connections,
/// timeouts, no redirects (a redirect must never carry credentials elsewhere).
pub fn http_client(
    connect_timeout: Duration,
    request_timeout: Duration,
) -> Result<reqwest::Client, reqwest::Error> {
    // Several clients in one process (tests) race to install the provider; losing is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder();
    // reqwest honours the proxy variables of the environment, and looks for a matching rule on
    // every request. Without any such variable there is nothing to match: skip the lookup.
    if !PROXY_VARIABLES
        .iter()
        .any(|name| std::env::var_os(name).is_some())
    {
        builder = builder.no_proxy();
    }
    builder
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        .redirect(reqwest::redirect::Policy::none())
        // The flows decide what may be retried (`flows::retry`); reqwest's own retries are for
        // HTTP/2 refusals, which this HTTP/1 client never sees. With none allowed it also skips
        // copying every request in case of a retry.
        .retry(reqwest::retry::never().max_retries_per_request(0))
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .user_agent(concat!("giroident-broker/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// A base URL that does not make a valid endpoint URL (caught by config validation first).
#[derive(Debug, thiserror::Error)]
#[error("invalid finAPI base URL {0:?}")]
pub struct InvalidBaseUrl(String);

/// The `Host` header for requests to `url`, as hyper would write it (the port only when it is
/// not the scheme's default). Set on each request, it spares hyper formatting it every time.
fn host_header(url: &reqwest::Url) -> Result<HeaderValue, InvalidBaseUrl> {
    let host = url
        .host_str()
        .ok_or_else(|| InvalidBaseUrl(url.as_str().to_owned()))?;
    let value = match url.port() {
        Some(port) => HeaderValue::try_from(format!("{host}:{port}")),
        None => HeaderValue::try_from(host),
    };
    value.map_err(|_| InvalidBaseUrl(url.as_str().to_owned()))
}

/// Joins a base URL and an absolute API path.
fn endpoint(base: &str, path: &str) -> Result<reqwest::Url, InvalidBaseUrl> {
    reqwest::Url::parse(&format!("{}{path}", base.trim_end_matches('/')))
        .map_err(|_| InvalidBaseUrl(base.to_owned()))
}

/// Sends one call through the service's circuit breaker, logs its outcome and turns any answer
/// but `expected` into an error.
async fn send(
    breaker: &CircuitBreaker,
    step: Step,
    request: RequestBuilder,
    request_id: &str,
    expected: StatusCode,
) -> Result<Response, UpstreamError> {
    let permit = breaker
        .acquire()
        .map_err(|open| UpstreamError::CircuitOpen {
            step,
            service: breaker.service(),
            retry_after: open.retry_after,
        })?;
    let result = call(step, request, request_id, expected).await;
    permit.record(
        result
            .as_ref()
            .is_err_and(UpstreamError::is_breaker_failure),
    );
    result
}

async fn call(
    step: Step,
    request: RequestBuilder,
    request_id: &str,
    expected: StatusCode,
) -> Result<Response, UpstreamError> {
    let started = Instant::now();
    let result = request.header(REQUEST_ID, request_id).send().await;
    let elapsed = started.elapsed();
    let elapsed_ms = elapsed.as_secs_f64() * 1e3;
    let response = match result {
        Ok(response) => response,
        Err(err) => {
            let err = UpstreamError::from_reqwest(step, err);
            let outcome = match &err {
                UpstreamError::Timeout { .. } => "timeout",
                UpstreamError::Connect { .. } => "connect_error",
                _ => "transport_error",
            };
            record_call(step, outcome, elapsed);
            tracing::debug!(step = step.as_str(), elapsed_ms, error = %err, "finAPI call failed");
            return Err(err);
        }
    };
    let status = response.status();
    record_call(step, status_label(status.as_u16()), elapsed);
    let finapi_request_id = response
        .headers()
        .get(REQUEST_ID)
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

fn record_call(step: Step, outcome: &'static str, elapsed: Duration) {
    use crate::telemetry::metrics::{FINAPI_CALLS, FINAPI_DURATION, HandleCache};
    static HANDLES: HandleCache<(Step, &'static str), (metrics::Counter, metrics::Histogram)> =
        HandleCache::new();
    HANDLES.with(
        (step, outcome),
        |&(step, outcome)| {
            let (service, step) = (step.service(), step.as_str());
            (
                metrics::counter!(FINAPI_CALLS, "service" => service, "step" => step, "outcome" => outcome),
                metrics::histogram!(FINAPI_DURATION, "service" => service, "step" => step, "outcome" => outcome),
            )
        },
        |(calls, duration)| {
            calls.increment(1);
            duration.record(elapsed.as_secs_f64());
        },
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_headers_name_the_port_only_when_it_is_not_the_default() {
        let host = |base: &str| {
            let url = endpoint(base, "/api/v2/users").unwrap();
            host_header(&url).unwrap().to_str().unwrap().to_owned()
        };
        assert_eq!(host("http://127.0.0.1:8081"), "127.0.0.1:8081");
        assert_eq!(host("https://sandbox.finapi.io"), "sandbox.finapi.io");
        assert_eq!(host("https://sandbox.finapi.io:443/"), "sandbox.finapi.io");
        assert_eq!(host("http://[::1]:9000"), "[::1]:9000");
        assert_eq!(host("https://Example.COM:8443"), "example.com:8443");
    }
}
