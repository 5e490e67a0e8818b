//! The one error contract of the broker's HTTP API: every error answer is
//! `application/problem+json` (RFC 9457) with a stable `code` and the `requestId`. This is the
//! only error type that becomes a response; it decides what a caller may see. Upstream bodies,
//! tokens and secrets never reach it.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::finapi::UpstreamError;
use crate::flows::{FlowError, InvalidInput};

use super::request_id;

/// Longest `Retry-After` passed on to callers, whatever finAPI asked for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Longest `detail` text; details describe the caller's own input, shortened.
const MAX_DETAIL: usize = 300;

/// Everything that can go wrong in a request, as the caller sees it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `MALFORMED_JSON`: the body is not JSON (syntax error, truncated, empty).
    #[error("malformed JSON body")]
    MalformedJson(String),
    /// 400 `INVALID_BODY`: JSON of the wrong shape (wrong type, missing or unknown field,
    /// unknown flow).
    #[error("request body of the wrong shape")]
    InvalidBody(String),
    /// 422 `INVALID_FIELD`: a field's value breaks its rule.
    #[error("invalid field: {0}")]
    InvalidField(InvalidInput),
    /// 422 `INVALID_HEADER`: a header's value breaks its rule (the end user's metadata
    /// headers `PSU-*`).
    #[error("invalid header: {0}")]
    InvalidHeader(InvalidInput),
    /// 413 `BODY_TOO_LARGE`.
    #[error("request body too large")]
    BodyTooLarge,
    /// 415 `UNSUPPORTED_MEDIA_TYPE`: a body that is not declared as JSON.
    #[error("request body is not declared as JSON")]
    UnsupportedMediaType,
    /// 401 `MISSING_API_KEY`: no `X-Api-Key`.
    #[error("missing API key")]
    MissingApiKey,
    /// 401 `INVALID_API_KEY`: an `X-Api-Key` no caller has.
    #[error("unknown API key")]
    InvalidApiKey,
    /// 403 `FLOW_NOT_ALLOWED`: the caller may not start this flow.
    #[error("flow {} not allowed for this caller", .0.as_str())]
    FlowNotAllowed(crate::config::FlowKind),
    /// 403 `FINAPI_CLIENT_NOT_ALLOWED`: the request names a configured finAPI client that is
    /// not among the caller's `finapi_clients`.
    #[error("finAPI client not allowed for this caller")]
    FinapiClientNotAllowed,
    /// 429 `RATE_LIMITED`: the caller's rate limit is used up; `Retry-After` says for how long.
    #[error("rate limit exceeded")]
    RateLimited { retry_after: Duration },
    /// 503 `OVERLOADED`: too many requests in flight; shed at once.
    #[error("too many requests in flight")]
    Overloaded,
    /// 408 `BODY_TIMEOUT`: the request body did not arrive in time.
    #[error("request body not received in time")]
    BodyTimeout,
    /// 401 `MISSING_USER_TOKEN`: no `Authorization: Bearer` user token where one is needed.
    #[error("missing or malformed bearer user token")]
    MissingUserToken,
    /// 404 `NOT_FOUND`.
    #[error("no such path")]
    NotFound,
    /// 404 `IDENTITY_NOT_FOUND`: the caller has no identity for this reference.
    #[error("no identity for this reference")]
    IdentityNotFound,
    /// 405 `METHOD_NOT_ALLOWED`.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 503 `NOT_READY`: the broker is shutting down.
    #[error("shutting down")]
    NotReady,
    /// 504 `REQUEST_TIMEOUT`: the request's time budget ran out while finAPI was working.
    #[error("request timed out")]
    Timeout,
    /// 500 `INTERNAL`: a bug; details only in the log.
    #[error("internal error")]
    Internal,
    /// A flow failed; the status depends on why (see [`ApiError::kind`]).
    #[error("flow failed")]
    Flow(#[from] FlowError),
}

/// What a caller is told: status, code, title and, where useful, a detail and a retry hint.
struct Kind {
    status: StatusCode,
    code: &'static str,
    title: &'static str,
    detail: Option<String>,
    retry_after: Option<Duration>,
}

impl Kind {
    fn new(status: StatusCode, code: &'static str, title: &'static str) -> Self {
        Self {
            status,
            code,
            title,
            detail: None,
            retry_after: None,
        }
    }

    fn detail(mut self, detail: impl Into<String>) -> Self {
        let mut detail: String = detail.into();
        if detail.len() > MAX_DETAIL {
            let mut cut = MAX_DETAIL;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
            detail.push('…');
        }
        self.detail = Some(detail);
        self
    }
}

impl ApiError {
    /// The stable `code` of the answer.
    pub fn code(&self) -> &'static str {
        self.kind().code
    }

    fn kind(&self) -> Kind {
        use StatusCode as S;
        match self {
            Self::MalformedJson(d) => {
                Kind::new(S::BAD_REQUEST, "MALFORMED_JSON", "Malformed JSON body").detail(d)
            }
            Self::InvalidBody(d) => Kind::new(
                S::BAD_REQUEST,
                "INVALID_BODY",
                "Request body of the wrong shape",
            )
            .detail(d),
            Self::InvalidField(e) => Kind::new(
                S::UNPROCESSABLE_ENTITY,
                "INVALID_FIELD",
                "Invalid field value",
            )
            .detail(e.to_string()),
            Self::InvalidHeader(e) => Kind::new(
                S::UNPROCESSABLE_ENTITY,
                "INVALID_HEADER",
                "Invalid header value",
            )
            .detail(e.to_string()),
            Self::BodyTooLarge => Kind::new(
                S::PAYLOAD_TOO_LARGE,
                "BODY_TOO_LARGE",
                "Request body too large",
            ),
            Self::UnsupportedMediaType => Kind::new(
                S::UNSUPPORTED_MEDIA_TYPE,
                "UNSUPPORTED_MEDIA_TYPE",
                "Request body must be application/json",
            ),
            Self::MissingApiKey => Kind::new(
                S::UNAUTHORIZED,
                "MISSING_API_KEY",
                "An API key is required in X-Api-Key",
            ),
            Self::InvalidApiKey => Kind::new(S::UNAUTHORIZED, "INVALID_API_KEY", "Unknown API key"),
            Self::FlowNotAllowed(flow) => Kind::new(
                S::FORBIDDEN,
                "FLOW_NOT_ALLOWED",
                "This caller may not start this flow",
            )
            .detail(format!(
                "flow {} is not allowed for this API key",
                flow.as_str()
            )),
            Self::FinapiClientNotAllowed => Kind::new(
                S::FORBIDDEN,
                "FINAPI_CLIENT_NOT_ALLOWED",
                "This caller may not use this finAPI client",
            ),
            Self::RateLimited { retry_after } => Kind {
                retry_after: Some(*retry_after),
                ..Kind::new(
                    S::TOO_MANY_REQUESTS,
                    "RATE_LIMITED",
                    "Rate limit exceeded; retry later",
                )
            },
            Self::Overloaded => Kind {
                retry_after: Some(Duration::from_secs(1)),
                ..Kind::new(
                    S::SERVICE_UNAVAILABLE,
                    "OVERLOADED",
                    "Too many requests in flight; retry later",
                )
            },
            Self::BodyTimeout => Kind::new(
                S::REQUEST_TIMEOUT,
                "BODY_TIMEOUT",
                "The request body did not arrive in time",
            ),
            Self::MissingUserToken => Kind::new(
                S::UNAUTHORIZED,
                "MISSING_USER_TOKEN",
                "A user access token is required as Authorization: Bearer",
            ),
            Self::NotFound => Kind::new(S::NOT_FOUND, "NOT_FOUND", "No such resource"),
            Self::MethodNotAllowed => Kind::new(
                S::METHOD_NOT_ALLOWED,
                "METHOD_NOT_ALLOWED",
                "Method not allowed on this resource",
            ),
            Self::NotReady => Kind::new(
                S::SERVICE_UNAVAILABLE,
                "NOT_READY",
                "The broker is shutting down",
            ),
            Self::Timeout => Kind::new(
                S::GATEWAY_TIMEOUT,
                "REQUEST_TIMEOUT",
                "finAPI did not finish in time",
            ),
            Self::Internal => Kind::new(S::INTERNAL_SERVER_ERROR, "INTERNAL", "Internal error"),
            Self::IdentityNotFound => Kind::new(
                S::NOT_FOUND,
                "IDENTITY_NOT_FOUND",
                "No identity for this client reference",
            ),
            Self::Flow(e) => flow_kind(e),
        }
    }
}

fn flow_kind(err: &FlowError) -> Kind {
    use StatusCode as S;
    match err {
        FlowError::ClientCredentialsRejected(_) | FlowError::ClientTokenRejected(_) => Kind::new(
            S::BAD_GATEWAY,
            "UPSTREAM_REJECTED",
            "finAPI refused the broker's request",
        ),
        FlowError::UserTokenRejected(_) => Kind::new(
            S::UNAUTHORIZED,
            "USER_TOKEN_REJECTED",
            "finAPI does not accept this user access token",
        ),
        FlowError::NotAUserToken(_) => Kind::new(
            S::FORBIDDEN,
            "NOT_A_USER_TOKEN",
            "The token is not a finAPI user access token",
        ),
        FlowError::UserLocked(_) => Kind::new(
            S::CONFLICT,
            "USER_LOCKED",
            "finAPI keeps the user locked; try again later",
        ),
        FlowError::Upstream(e) => upstream_kind(e),
        FlowError::BudgetExhausted(_) => Kind::new(
            S::GATEWAY_TIMEOUT,
            "UPSTREAM_TIMEOUT",
            "finAPI did not answer in time",
        ),
        // Never a half result: whatever stopped the user's token, the session failed upstream.
        FlowError::OrphanedUser { .. } => {
            Kind::new(S::BAD_GATEWAY, "UPSTREAM_ERROR", "finAPI failed")
        }
        FlowError::TokenFetchAborted
        | FlowError::NoRandomness
        | FlowError::PasswordKeyMissing { .. }
        | FlowError::FinapiClientMissing { .. } => {
            Kind::new(S::INTERNAL_SERVER_ERROR, "INTERNAL", "Internal error")
        }
        FlowError::Store(e) if !matches!(**e, crate::identities::StoreError::Unavailable(_)) => {
            Kind::new(S::INTERNAL_SERVER_ERROR, "INTERNAL", "Internal error")
        }
        FlowError::Store(_) => Kind {
            retry_after: Some(Duration::from_secs(5)),
            ..Kind::new(
                S::SERVICE_UNAVAILABLE,
                "STORE_UNAVAILABLE",
                "The identity ledger is unavailable",
            )
        },
    }
}

fn upstream_kind(err: &UpstreamError) -> Kind {
    use StatusCode as S;
    let unavailable = || {
        Kind::new(
            S::SERVICE_UNAVAILABLE,
            "UPSTREAM_UNAVAILABLE",
            "finAPI is unavailable",
        )
    };
    let timeout = || {
        Kind::new(
            S::GATEWAY_TIMEOUT,
            "UPSTREAM_TIMEOUT",
            "finAPI did not answer in time",
        )
    };
    let failed = || Kind::new(S::BAD_GATEWAY, "UPSTREAM_ERROR", "finAPI failed");
    match err {
        UpstreamError::Connect { .. } => unavailable(),
        UpstreamError::CircuitOpen { retry_after, .. } => Kind {
            retry_after: Some((*retry_after).min(MAX_RETRY_AFTER)),
            ..unavailable()
        },
        UpstreamError::Timeout { .. } => timeout(),
        UpstreamError::Certificate { .. } => Kind::new(
            S::BAD_GATEWAY,
            "UPSTREAM_CERTIFICATE_REJECTED",
            "finAPI's TLS certificate failed verification",
        ),
        UpstreamError::Transport { .. }
        | UpstreamError::Protocol { .. }
        | UpstreamError::TooLarge { .. }
        | UpstreamError::Decode { .. } => failed(),
        UpstreamError::Request { .. } => {
            Kind::new(S::INTERNAL_SERVER_ERROR, "INTERNAL", "Internal error")
        }
        UpstreamError::Status {
            status,
            retry_after,
            ..
        } => match status.as_u16() {
            429 | 503 => Kind {
                retry_after: retry_after.map(|d| d.min(MAX_RETRY_AFTER)),
                ..unavailable()
            },
            504 => timeout(),
            500..=599 => failed(),
            _ => Kind::new(
                S::BAD_GATEWAY,
                "UPSTREAM_REJECTED",
                "finAPI refused the broker's request",
            ),
        },
    }
}

/// An error answer: a problem document (RFC 9457, `application/problem+json`).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct Problem<'a> {
    /// `urn:giroident-broker:problem:<code in kebab case>`.
    #[serde(rename = "type")]
    #[schema(example = "urn:giroident-broker:problem:invalid-field")]
    type_uri: String,
    /// A short summary for people.
    title: &'a str,
    /// The HTTP status.
    #[schema(minimum = 400, maximum = 599)]
    status: u16,
    /// What was wrong, for people; absent where there is nothing to add.
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
    /// The stable error code (see the README's table).
    #[schema(example = "INVALID_FIELD")]
    code: &'a str,
    /// The request id, also in `X-Request-Id`.
    #[schema(required = true)]
    request_id: Option<String>,
    /// The W3C trace id of the request (32 lowercase hex digits), present while the broker
    /// exports traces: the caller's own when it sent a `traceparent`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "4bf92f3577b34da6a3ce929d0e0e4736")]
    trace_id: Option<String>,
}

/// The `type` URI of a problem code.
pub fn problem_type(code: &str) -> String {
    format!(
        "urn:giroident-broker:problem:{}",
        code.to_ascii_lowercase().replace('_', "-")
    )
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = self.kind();
        log(&self, &kind);
        let problem = Problem {
            type_uri: problem_type(kind.code),
            title: kind.title,
            status: kind.status.as_u16(),
            detail: kind.detail.as_deref(),
            code: kind.code,
            request_id: request_id::current(),
            trace_id: request_id::current_trace_id(),
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (kind.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(after) = kind.retry_after {
            // Whole seconds, rounded up: a caller that waits this long is not refused again.
            let secs = after.as_millis().div_ceil(1000).max(1);
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(u64::try_from(secs).unwrap_or(u64::MAX)),
            );
        }
        response
    }
}

/// The line an error answer adds to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// `error`: finAPI refused the broker's own client credentials or token.
    Misconfigured,
    /// `error`: `500 INTERNAL`, a bug.
    Internal,
    /// `warn` "request failed upstream": finAPI failed (the `UPSTREAM_*` codes).
    Upstream,
    /// `warn`: `503 STORE_UNAVAILABLE`, the identity ledger did not answer.
    LedgerUnavailable,
    /// `warn`: `504 REQUEST_TIMEOUT`, the request's own time ran out.
    TimedOut,
    /// `warn` "request failed": any other server error.
    Failed,
    /// `info` "request refused": the caller's input or standing, or the broker refusing by
    /// design (`429 RATE_LIMITED`, `503 OVERLOADED` shedding load, `503 NOT_READY` draining).
    Refused,
}

impl Line {
    fn of(err: &ApiError, kind: &Kind) -> Self {
        let misconfigured = matches!(
            err,
            ApiError::Flow(
                FlowError::ClientCredentialsRejected(_) | FlowError::ClientTokenRejected(_)
            )
        );
        if misconfigured {
            Self::Misconfigured
        } else if kind.status == StatusCode::INTERNAL_SERVER_ERROR {
            Self::Internal
        } else if !kind.status.is_server_error()
            || matches!(err, ApiError::NotReady | ApiError::Overloaded)
        {
            Self::Refused
        } else if kind.code.starts_with("UPSTREAM_") {
            Self::Upstream
        } else if kind.code == "STORE_UNAVAILABLE" {
            Self::LedgerUnavailable
        } else if matches!(err, ApiError::Timeout) {
            Self::TimedOut
        } else {
            Self::Failed
        }
    }
}

/// Logs the error once, with its cause chain, where it is turned into a response.
fn log(err: &ApiError, kind: &Kind) {
    let chain = crate::telemetry::cause_chain(err);
    let step = match err {
        ApiError::Flow(e) => e.upstream().map(|u| u.step().as_str()),
        _ => None,
    };
    let code = kind.code;
    match Line::of(err, kind) {
        Line::Misconfigured => tracing::error!(code, error = %chain, step,
            "finAPI refused the broker's client credentials or token: check the broker's finAPI client configuration"),
        Line::Internal => tracing::error!(code, error = %chain, step, "internal error"),
        Line::Upstream => {
            tracing::warn!(code, error = %chain, step, "request failed upstream");
        }
        Line::LedgerUnavailable => tracing::warn!(code, error = %chain,
            "request failed: the identity ledger is unavailable"),
        Line::TimedOut => tracing::warn!(code, error = %chain, "request timed out"),
        Line::Failed => tracing::warn!(code, error = %chain, step, "request failed"),
        Line::Refused => tracing::info!(code, error = %chain, "request refused"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::identities::StoreError;

    fn line(err: ApiError) -> Line {
        let kind = err.kind();
        Line::of(&err, &kind)
    }

    /// Only finAPI's failures are logged as upstream failures; the broker's own refusals are
    /// refusals, its own failures say what failed.
    #[test]
    fn each_error_answer_is_logged_for_what_it_is() {
        assert_eq!(line(ApiError::Overloaded), Line::Refused);
        assert_eq!(line(ApiError::NotReady), Line::Refused);
        assert_eq!(
            line(ApiError::RateLimited {
                retry_after: Duration::from_secs(1)
            }),
            Line::Refused
        );
        assert_eq!(line(ApiError::IdentityNotFound), Line::Refused);
        assert_eq!(line(ApiError::Timeout), Line::TimedOut);
        assert_eq!(line(ApiError::Internal), Line::Internal);
        let ledger = FlowError::Store(Arc::new(StoreError::Unavailable(sqlx::Error::PoolTimedOut)));
        assert_eq!(line(ApiError::Flow(ledger)), Line::LedgerUnavailable);
        let budget = FlowError::BudgetExhausted(crate::finapi::Step::CreateUser);
        assert_eq!(line(ApiError::Flow(budget)), Line::Upstream);
    }
}
