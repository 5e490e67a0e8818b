//! Clients for the finAPI services the broker calls: one struct per upstream service, base URL
//! injected, wire types private. Callers see domain types and [`UpstreamError`] only.
//!
//! Nothing here logs or formats a secret: request bodies with credentials are built at the last
//! moment, tokens are [`SecretString`]s, and reqwest errors are stripped of their URL (a process
//! token travels in one).

mod access;
mod process;
mod secret;

use std::fmt;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::resilience::CircuitBreaker;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{RequestBuilder, Response, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::telemetry::metrics::status_label;

pub use access::AccessClient;
pub use process::ProcessControllerClient;
pub use secret::{ClientSecret, SecretVersion};

/// Longest `expires_in` the broker believes, in seconds (one year). finAPI documents no
/// maximum; a larger value is read as this one, for the cache's schedule and in the caller's
/// answer alike: a token valid longer is valid this long too, and no instant computed from it
/// can overflow.
pub const MAX_EXPIRES_IN_SECS: u64 = 365 * 24 * 3600;

/// Longest `Retry-After` the broker reads, in seconds (one day); a larger value is read as
/// this one. The broker never waits that long anyway (`resilience.max_retry_after_ms`, the
/// token's end, and 60 s in its own answers bound it); the cap keeps sums of durations finite.
pub const MAX_RETRY_AFTER_SECS: u64 = 24 * 3600;

/// finAPI's request id header, sent with every call.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Most bytes of an upstream answer the broker reads. finAPI's answers are small: the largest,
/// a token answer, holds an access and a refresh token of at most 8,192 characters each
/// (finAPI's AccessToken schema). Past this the broker stops reading and drops the connection.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Longest token finAPI's contract allows (AccessToken schema: 1 to 8,192 characters).
pub const MAX_TOKEN_LEN: usize = 8192;

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
    /// The client secret, replaceable while the broker runs.
    pub client_secret: std::sync::Arc<ClientSecret>,
}

impl ClientCredentials {
    /// Makes `call`, which authenticates with the client secret it is given (a token grant,
    /// `POST /api/v1/processes`). When finAPI answers `401 invalid_client`, the secret is
    /// re-read from its file once (concurrent refusals share the read; see
    /// [`ClientSecret::newer_after_refusal`]) and, if it changed, the call is made once more
    /// with the new secret; otherwise the refusal stands.
    async fn with_secret<T, F, Fut>(&self, mut call: F) -> Result<T, UpstreamError>
    where
        F: FnMut(std::sync::Arc<SecretVersion>) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let used = self.client_secret.current();
        let sent_at = Instant::now();
        let err = match call(used.clone()).await {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        if !err.is_invalid_client() {
            return Err(err);
        }
        match self.client_secret.newer_after_refusal(&used, sent_at).await {
            Some(newer) => call(newer).await,
            None => Err(err),
        }
    }
}

/// An OAuth access token as finAPI hands it out.
#[derive(Debug, Clone)]
pub struct AccessToken {
    /// The bearer token.
    pub token: SecretString,
    /// `bearer`, as finAPI says.
    pub token_type: String,
    /// Seconds the token stays valid, as finAPI says, at most [`MAX_EXPIRES_IN_SECS`];
    /// `Some(0)` means it never expires.
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
    /// `GET /api/v2/users`.
    GetUser,
    /// `POST /api/v1/processes`.
    CreateProcess,
    /// `GET /api/v1/processes/{processToken}`.
    ExchangeProcessToken,
}

impl Step {
    /// The finAPI service the call goes to: `access` or `process_controller`.
    pub fn service(self) -> &'static str {
        match self {
            Self::ClientToken
            | Self::CreateUser
            | Self::UserToken
            | Self::DeleteUser
            | Self::GetUser => "access",
            Self::CreateProcess | Self::ExchangeProcessToken => "process_controller",
        }
    }

    /// The name of the call's span (`finapi.` and the step), stable for dashboards.
    pub fn span_name(self) -> &'static str {
        match self {
            Self::ClientToken => "finapi.client_token",
            Self::CreateUser => "finapi.create_user",
            Self::UserToken => "finapi.user_token",
            Self::DeleteUser => "finapi.delete_user",
            Self::GetUser => "finapi.get_user",
            Self::CreateProcess => "finapi.create_process",
            Self::ExchangeProcessToken => "finapi.exchange_process_token",
        }
    }

    /// The call's HTTP method and path template (finAPI reference); the template stands in
    /// for the path, which holds a process token in the exchange.
    pub fn route(self) -> (&'static str, &'static str) {
        match self {
            Self::ClientToken | Self::UserToken => ("POST", "/api/v2/oauth/token"),
            Self::CreateUser => ("POST", "/api/v2/users"),
            Self::DeleteUser => ("DELETE", "/api/v2/users"),
            Self::GetUser => ("GET", "/api/v2/users"),
            Self::CreateProcess => ("POST", "/api/v1/processes"),
            Self::ExchangeProcessToken => ("GET", "/api/v1/processes/{processToken}"),
        }
    }

    /// A stable name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientToken => "client_token",
            Self::CreateUser => "create_user",
            Self::UserToken => "user_token",
            Self::DeleteUser => "delete_user",
            Self::GetUser => "get_user",
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
    /// finAPI's TLS certificate failed verification (unknown authority, another host name,
    /// expired, ...): a configuration problem on one side or an impostor, never retried.
    #[error("finAPI call {step} refused finAPI's TLS certificate ({problem})")]
    Certificate {
        step: Step,
        /// The problem's stable name, after rustls' `CertificateError`: `UnknownIssuer`,
        /// `NotValidForName`, `Expired`, `NotValidYet`, `Revoked`, `BadSignature`,
        /// `BadEncoding`, `InvalidPurpose` or `Other`.
        problem: &'static str,
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
        /// The `Retry-After` header in seconds, when given, at most [`MAX_RETRY_AFTER_SECS`].
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
    /// finAPI's answer was larger than [`MAX_ANSWER_BYTES`]; the broker stopped reading it.
    #[error("finAPI call {step} answered {status} with a body over {MAX_ANSWER_BYTES} bytes")]
    TooLarge { step: Step, status: StatusCode },
    /// The request could not be built (a value that cannot be a header, say): a broker bug,
    /// since every value is checked before it gets here. Nothing was sent.
    #[error("finAPI call {step} could not be built")]
    Request {
        step: Step,
        #[source]
        source: reqwest::Error,
    },
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
            | Self::Certificate { step, .. }
            | Self::Timeout { step, .. }
            | Self::Transport { step, .. }
            | Self::Status { step, .. }
            | Self::CircuitOpen { step, .. }
            | Self::Protocol { step, .. }
            | Self::TooLarge { step, .. }
            | Self::Request { step, .. }
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

    /// Whether finAPI refused the client credentials: `401` with the OAuth error
    /// `invalid_client` (finAPI reference, `POST /api/v2/oauth/token` errors and "Client
    /// secret rotation").
    pub fn is_invalid_client(&self) -> bool {
        self.status() == Some(StatusCode::UNAUTHORIZED) && self.code() == Some("invalid_client")
    }

    /// Trouble that may pass: connect errors, timeouts, broken connections, `429`, `500`,
    /// `502`, `503`, `504`. Whether a retry is *safe* is for the caller to decide.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Timeout { .. } | Self::Transport { .. } => true,
            Self::Status { status, .. } => matches!(status.as_u16(), 429 | 500 | 502 | 503 | 504),
            Self::CircuitOpen { .. }
            | Self::Certificate { .. }
            | Self::Protocol { .. }
            | Self::TooLarge { .. }
            | Self::Request { .. }
            | Self::Decode { .. } => false,
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

    /// A short stable name of what happened: `timeout`, `connect_error`, `transport_error`,
    /// `body_too_large`, the status (`503`), `circuit_open`, `certificate_rejected`,
    /// `protocol_error`, `request_error` or `decode_error`. A retried call's span names the one
    /// before with it.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "timeout",
            Self::Connect { .. } => "connect_error",
            Self::Certificate { .. } => "certificate_rejected",
            Self::Transport { .. } => "transport_error",
            Self::TooLarge { .. } => "body_too_large",
            Self::Status { status, .. } => status_label(status.as_u16()),
            Self::CircuitOpen { .. } => "circuit_open",
            Self::Protocol { .. } => "protocol_error",
            Self::Request { .. } => "request_error",
            Self::Decode { .. } => "decode_error",
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
            Self::Status { status, .. } | Self::TooLarge { status, .. } => {
                status.is_server_error() || status.as_u16() == 429
            }
            _ => false,
        }
    }

    fn from_reqwest(step: Step, err: reqwest::Error) -> Self {
        let source = err.without_url();
        if let Some(problem) = certificate_problem(&source) {
            Self::Certificate {
                step,
                problem,
                source,
            }
        } else if source.is_timeout() {
            Self::Timeout { step, source }
        } else if source.is_connect() {
            Self::Connect { step, source }
        } else {
            Self::Transport { step, source }
        }
    }
}

/// The stable name of the certificate problem behind `err`, if a TLS handshake failed on
/// finAPI's certificate. rustls' error sits inside `io::Error`s of the connector (nested, as
/// of reqwest 0.13), whose `source()` skips what they wrap, hence the look into each one.
fn certificate_problem(err: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use rustls::CertificateError as C;
    let mut next = Some(err);
    while let Some(err) = next {
        let mut candidate = Some(err);
        while let Some(inner) = candidate {
            if let Some(rustls::Error::InvalidCertificate(problem)) =
                inner.downcast_ref::<rustls::Error>()
            {
                return Some(match problem {
                    C::UnknownIssuer => "UnknownIssuer",
                    C::NotValidForName | C::NotValidForNameContext { .. } => "NotValidForName",
                    C::Expired | C::ExpiredContext { .. } => "Expired",
                    C::NotValidYet | C::NotValidYetContext { .. } => "NotValidYet",
                    C::Revoked => "Revoked",
                    C::BadSignature => "BadSignature",
                    C::BadEncoding => "BadEncoding",
                    C::InvalidPurpose | C::InvalidPurposeContext { .. } => "InvalidPurpose",
                    _ => "Other",
                });
            }
            candidate = inner
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .map(|inner| inner as &(dyn std::error::Error + 'static));
        }
        next = err.source();
    }
    None
}

tokio::task_local! {
    /// The attempt a call is (1 for the first) and the outcome of the one before, for its span.
    static ATTEMPT: (u32, &'static str);
}

/// Runs `call` as attempt number `attempt` of its step, `retry_reason` being the outcome of
/// the attempt before (see [`UpstreamError::outcome`]); the call's span says both. Not an
/// `async fn`, which would hold `call` twice in its state (see `Deadline::run`).
pub fn as_attempt<F: Future>(
    attempt: u32,
    retry_reason: &'static str,
    call: F,
) -> impl Future<Output = F::Output> {
    ATTEMPT.scope((attempt, retry_reason), call)
}

/// The span of one finAPI call: step, attempt, method, path template and host, in
/// OpenTelemetry's HTTP client conventions. Never the URL (a process token travels in one),
/// a header or a body.
fn call_span(step: Step, url: &reqwest::Url) -> crate::telemetry::otel::Span {
    use opentelemetry::KeyValue;
    if !crate::telemetry::otel::enabled() {
        return crate::telemetry::otel::Span::none();
    }
    let (attempt, retry_reason) = ATTEMPT.try_with(|a| *a).unwrap_or((1, ""));
    let (method, path) = step.route();
    // Each attribute costs about 1,500 instructions to convert, encode and free in the export
    // (docs/BENCHMARKS.md, "Issue 14: tracing's cost, third pass"): none that the span's name
    // already says (the service follows from the step) or that is the same on every call of a
    // one-client broker (the configured client's name, which the request's log lines carry).
    let mut attributes = Vec::with_capacity(8);
    attributes.extend([
        KeyValue::new("finapi.step", step.as_str()),
        KeyValue::new("finapi.attempt", i64::from(attempt)),
        KeyValue::new("http.request.method", method),
        KeyValue::new("url.template", path),
        KeyValue::new("server.address", url.host_str().unwrap_or("").to_owned()),
        KeyValue::new(
            "server.port",
            i64::from(url.port_or_known_default().unwrap_or(0)),
        ),
    ]);
    if !retry_reason.is_empty() {
        attributes.push(KeyValue::new("finapi.retry_reason", retry_reason));
    }
    crate::telemetry::otel::Span::child(
        step.span_name(),
        opentelemetry::trace::SpanKind::Client,
        attributes,
    )
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
/// timeouts, no redirects (a redirect must never carry credentials elsewhere). With `http2`
/// (`finapi.http2`) it offers HTTP/2 and HTTP/1.1 by ALPN (RFC 7301) and speaks what finAPI
/// chooses: the calls in flight then share one connection per host instead of one each, and the
/// server's stream limit bounds them. Without, it offers HTTP/1.1 only.
///
/// finAPI's certificate is verified against the system's roots (rustls-platform-verifier)
/// plus `extra_roots` (`finapi.ca_file`, read by [`crate::tls::read_ca_file`]); there is no way
/// to skip verification. Errors: no root at all (no system roots and no extra ones).
pub fn http_client(
    connect_timeout: Duration,
    request_timeout: Duration,
    http2: bool,
    extra_roots: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<reqwest::Client, reqwest::Error> {
    // Several clients in one process (tests) race to install the provider; losing is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let extra_roots = extra_roots
        .iter()
        .map(|der| reqwest::Certificate::from_der(der))
        .collect::<Result<Vec<_>, _>>()?;
    let mut builder = reqwest::Client::builder().tls_certs_merge(extra_roots);
    // reqwest honours the proxy variables of the environment, and looks for a matching rule on
    // every request. Without any such variable there is nothing to match: skip the lookup.
    if !PROXY_VARIABLES
        .iter()
        .any(|name| std::env::var_os(name).is_some())
    {
        builder = builder.no_proxy();
    }
    if !http2 {
        builder = builder.http1_only();
    }
    builder
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        .redirect(reqwest::redirect::Policy::none())
        // The flows decide what may be retried (`flows::retry`); reqwest's own retries are for
        // HTTP/2 refused streams, which the flows' retry rules cover too. With none allowed it
        // also skips copying every request in case of a retry.
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

/// Sends one call through the service's circuit breaker, reads its answer (at most
/// [`MAX_ANSWER_BYTES`]), logs its outcome and turns any answer but `expected` into an error.
/// Returns the body.
///
/// A request that cannot be built fails before the breaker is asked: nothing is sent, so it is
/// neither a finAPI call in the metrics nor a breaker failure.
async fn send(
    breaker: &CircuitBreaker,
    propagate_trace: bool,
    step: Step,
    request: RequestBuilder,
    request_id: &str,
    expected: StatusCode,
) -> Result<Vec<u8>, UpstreamError> {
    let (http, request) = request.header(REQUEST_ID, request_id).build_split();
    let mut request = request.map_err(|err| UpstreamError::Request {
        step,
        source: err.without_url(),
    })?;
    let mut span = call_span(step, request.url());
    if propagate_trace && !span.is_none() {
        crate::telemetry::otel::inject(&span, request.headers_mut());
    }
    let permit = match breaker.acquire() {
        Ok(permit) => permit,
        Err(open) => {
            span.fail("circuit_open");
            return Err(UpstreamError::CircuitOpen {
                step,
                service: breaker.service(),
                retry_after: open.retry_after,
            });
        }
    };
    // The span has no children, so it is not made anyone's parent: it starts when made above
    // and ends when dropped, as this function returns.
    let result = call(&http, step, breaker.client(), request, expected, &mut span).await;
    permit.record(
        result
            .as_ref()
            .is_err_and(UpstreamError::is_breaker_failure),
    );
    result
}

/// One call, its answer read whole. The call's time, its metrics and its log line cover the
/// body too: a body that stalls past the call timeout is a timeout, one cut off a broken
/// connection (the answer is lost either way), whatever the status said.
async fn call(
    http: &reqwest::Client,
    step: Step,
    client: &std::sync::Arc<str>,
    request: reqwest::Request,
    expected: StatusCode,
    span: &mut crate::telemetry::otel::Span,
) -> Result<Vec<u8>, UpstreamError> {
    let started = Instant::now();
    let (status, finapi_request_id, result) = match http.execute(request).await {
        Ok(response) => {
            let status = response.status();
            let finapi_request_id = response
                .headers()
                .get(REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                // finAPI's own limit; a longer one is not finAPI's and goes into no log line.
                .filter(|id| id.len() <= 255)
                .map(str::to_owned);
            (
                Some(status),
                finapi_request_id,
                read(step, response, expected).await,
            )
        }
        Err(err) => (None, None, Err(UpstreamError::from_reqwest(step, err))),
    };
    let elapsed = started.elapsed();
    let outcome = match &result {
        Err(UpstreamError::Timeout { .. }) => "timeout",
        Err(UpstreamError::Connect { .. }) => "connect_error",
        Err(UpstreamError::Certificate { .. }) => "certificate_rejected",
        Err(UpstreamError::Transport { .. }) => "transport_error",
        Err(UpstreamError::TooLarge { .. }) => "body_too_large",
        _ => status.map_or("transport_error", |s| status_label(s.as_u16())),
    };
    record_call(step, client, outcome, elapsed);
    if !span.is_none() {
        if let Some(status) = status {
            span.set("http.response.status_code", i64::from(status.as_u16()));
        }
        if result.is_err() {
            span.fail(outcome);
        }
    }
    let elapsed_ms = elapsed.as_secs_f64() * 1e3;
    tracing::debug!(
        step = step.as_str(),
        finapi_client = &**client,
        status = status.map(|s| s.as_u16()),
        outcome,
        elapsed_ms,
        finapi_request_id = finapi_request_id.as_deref().unwrap_or(""),
        "finAPI call"
    );
    result
}

/// Reads the answer's body, at most [`MAX_ANSWER_BYTES`] of it; an answer with another status
/// than `expected` becomes [`UpstreamError::Status`] with finAPI's error code, if it sent one.
async fn read(
    step: Step,
    mut response: Response,
    expected: StatusCode,
) -> Result<Vec<u8>, UpstreamError> {
    let status = response.status();
    let too_large = UpstreamError::TooLarge { step, status };
    if response
        .content_length()
        .is_some_and(|len| len > MAX_ANSWER_BYTES as u64)
    {
        return Err(too_large);
    }
    let mut body = Vec::with_capacity(response.content_length().unwrap_or(0) as usize);
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| UpstreamError::from_reqwest(step, err))?
    {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            // Dropping the response closes the connection with the rest unread.
            return Err(too_large);
        }
        body.extend_from_slice(&chunk);
    }
    if status == expected {
        return Ok(body);
    }
    // Only the error code is read from the body; the body itself goes nowhere.
    let code = serde_json::from_slice::<ErrorBody>(&body)
        .ok()
        .and_then(ErrorBody::code);
    Err(UpstreamError::Status {
        step,
        status,
        code,
        retry_after: retry_after(response.headers()),
    })
}

fn record_call(step: Step, client: &std::sync::Arc<str>, outcome: &'static str, elapsed: Duration) {
    use crate::telemetry::metrics::{FINAPI_CALLS, FINAPI_DURATION, HandleCache};
    type Key = (Step, std::sync::Arc<str>, &'static str);
    static HANDLES: HandleCache<Key, (metrics::Counter, metrics::Histogram)> = HandleCache::new();
    HANDLES.with(
        (step, client.clone(), outcome),
        |(step, client, outcome)| {
            let (service, step, outcome) = (step.service(), step.as_str(), *outcome);
            let client = client.to_string();
            (
                metrics::counter!(FINAPI_CALLS, "service" => service, "step" => step, "outcome" => outcome, "finapi_client" => client.clone()),
                metrics::histogram!(FINAPI_DURATION, "service" => service, "step" => step, "outcome" => outcome, "finapi_client" => client),
            )
        },
        |(calls, duration)| {
            calls.increment(1);
            duration.record(elapsed.as_secs_f64());
        },
    );
}

fn decode<T: DeserializeOwned>(step: Step, body: &[u8]) -> Result<T, UpstreamError> {
    serde_json::from_slice::<T>(body).map_err(|_| UpstreamError::Decode { step })
}

/// A token finAPI's contract can produce: 1 to [`MAX_TOKEN_LEN`] visible ASCII characters
/// (AccessToken schema). Anything else (empty, blank, a line break) is refused where it is
/// decoded, so it is never cached, never put into a header, never handed out.
fn checked_token(step: Step, token: SecretString) -> Result<SecretString, UpstreamError> {
    let value = token.expose_secret();
    if (1..=MAX_TOKEN_LEN).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(token)
    } else {
        Err(UpstreamError::Protocol {
            step,
            detail: "a token outside finAPI's contract (empty, over 8192 characters, or not \
                     visible ASCII)",
        })
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    // finAPI documents no format; seconds are assumed (an HTTP date is ignored).
    let secs = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(Duration::from_secs(secs.min(MAX_RETRY_AFTER_SECS)))
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

/// finAPI's token answer (`POST /api/v2/oauth/token`, AccessToken schema): `access_token`,
/// `token_type` and `expires_in` are required; an answer without one is no finAPI answer.
#[derive(Deserialize)]
struct TokenBody {
    access_token: SecretString,
    token_type: String,
    expires_in: u64,
}

impl TokenBody {
    /// The token, checked against finAPI's contract (`token_type` is `bearer`, compared without
    /// case); an `expires_in` above [`MAX_EXPIRES_IN_SECS`] is read as that.
    fn into_token(self, step: Step) -> Result<AccessToken, UpstreamError> {
        if !self.token_type.eq_ignore_ascii_case("bearer") {
            return Err(UpstreamError::Protocol {
                step,
                detail: "a token_type other than bearer",
            });
        }
        let secs = self.expires_in;
        if secs > MAX_EXPIRES_IN_SECS {
            tracing::debug!(expires_in = secs, "finAPI's expires_in read as one year");
        }
        Ok(AccessToken {
            token: checked_token(step, self.access_token)?,
            token_type: "bearer".to_owned(),
            expires_in: Some(secs.min(MAX_EXPIRES_IN_SECS)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_expires_in_and_retry_after_are_capped() {
        let token = |expires_in| {
            TokenBody {
                access_token: SecretString::from("t"),
                token_type: "bearer".to_owned(),
                expires_in,
            }
            .into_token(Step::ClientToken)
            .unwrap()
            .expires_in
        };
        assert_eq!(token(u64::MAX), Some(MAX_EXPIRES_IN_SECS));
        assert_eq!(token(3600), Some(3600));
        assert_eq!(token(0), Some(0));
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from(u64::MAX));
        assert_eq!(
            retry_after(&headers),
            Some(Duration::from_secs(MAX_RETRY_AFTER_SECS))
        );
        headers.insert(RETRY_AFTER, HeaderValue::from(7u64));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
    }

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
