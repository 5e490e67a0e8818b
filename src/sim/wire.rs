//! The simulator's own finAPI wire types and error shapes, written from `finapi-reference.md`.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// `type` of an ErrorMessage entry.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub(crate) enum ErrorType {
    Business,
    Technical,
}

#[derive(Clone, Debug)]
enum ErrorBody {
    /// finAPI's ErrorMessage shape, for every error except authentication errors.
    Message {
        code: &'static str,
        kind: ErrorType,
        message: String,
    },
    /// The OAuth shape finAPI uses for authentication errors.
    OAuth {
        error: &'static str,
        description: String,
    },
}

/// An error answer of a simulated endpoint.
///
/// Handlers return it as a response without a body; the request middleware renders the body,
/// because only it knows the request id and the endpoint name that ErrorMessage carries.
#[derive(Clone, Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    retry_after: Option<u64>,
}

impl ApiError {
    fn message(status: StatusCode, code: &'static str, kind: ErrorType, message: &str) -> Self {
        Self {
            status,
            body: ErrorBody::Message {
                code,
                kind,
                message: message.to_owned(),
            },
            retry_after: None,
        }
    }

    /// 400 `BAD_REQUEST`: missing, malformed or invalid input.
    pub(crate) fn bad_request(message: &str) -> Self {
        Self::message(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            ErrorType::Business,
            message,
        )
    }

    /// 403 `UNAUTHORIZED_ACCESS`: a valid token of the wrong kind.
    pub(crate) fn unauthorized_access(message: &str) -> Self {
        Self::message(
            StatusCode::FORBIDDEN,
            "UNAUTHORIZED_ACCESS",
            ErrorType::Business,
            message,
        )
    }

    /// 404 `UNKNOWN_ENTITY`: refused process token exchanges and unknown paths.
    pub(crate) fn unknown_entity(message: &str) -> Self {
        Self::message(
            StatusCode::NOT_FOUND,
            "UNKNOWN_ENTITY",
            ErrorType::Business,
            message,
        )
    }

    /// 405 `BAD_REQUEST`: a known path with a method it does not serve.
    pub(crate) fn method_not_allowed() -> Self {
        Self::message(
            StatusCode::METHOD_NOT_ALLOWED,
            "BAD_REQUEST",
            ErrorType::Business,
            "Method not allowed",
        )
    }

    /// 422 `ENTITY_EXISTS`.
    pub(crate) fn entity_exists(message: &str) -> Self {
        Self::message(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ENTITY_EXISTS",
            ErrorType::Business,
            message,
        )
    }

    /// 500 `UNEXPECTED_ERROR`: a full table or a failing random source.
    pub(crate) fn unexpected(message: &str) -> Self {
        Self::message(
            StatusCode::INTERNAL_SERVER_ERROR,
            "UNEXPECTED_ERROR",
            ErrorType::Technical,
            message,
        )
    }

    /// 401 `invalid_client` (OAuth shape): missing or wrong client credentials.
    pub(crate) fn invalid_client() -> Self {
        Self::oauth("invalid_client", "Bad client credentials")
    }

    /// 401 `invalid_token` (OAuth shape): missing, unknown, expired or revoked bearer token.
    pub(crate) fn invalid_token(description: &str) -> Self {
        Self::oauth("invalid_token", description)
    }

    fn oauth(error: &'static str, description: &str) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            body: ErrorBody::OAuth {
                error,
                description: description.to_owned(),
            },
            retry_after: None,
        }
    }

    /// The answer of a fault rule with `status`: the shape and code finAPI would use for it.
    pub(crate) fn injected(
        status: StatusCode,
        token_endpoint: bool,
        retry_after: Option<u64>,
    ) -> Self {
        let message = "Injected by the simulator";
        let mut error = match status.as_u16() {
            401 if token_endpoint => Self::invalid_client(),
            401 => Self::invalid_token("Invalid access token: injected by the simulator"),
            403 => Self::unauthorized_access(message),
            404 => Self::unknown_entity(message),
            422 => Self::entity_exists(message),
            423 => Self::message(status, "LOCKED", ErrorType::Business, message),
            429 | 500..=599 => {
                Self::message(status, "UNEXPECTED_ERROR", ErrorType::Technical, message)
            }
            _ => Self::message(status, "BAD_REQUEST", ErrorType::Business, message),
        };
        error.status = status;
        error.retry_after = retry_after;
        error
    }

    /// The full response, once the request id and endpoint name are known.
    pub(crate) fn render(&self, request_id: &str, endpoint: &str) -> Response {
        let mut response = match &self.body {
            ErrorBody::Message {
                code,
                kind,
                message,
            } => axum::Json(ErrorMessage {
                errors: vec![ErrorEntry {
                    message,
                    code,
                    kind: *kind,
                }],
                date: rfc3339_now(),
                request_id,
                endpoint,
                auth_context: AUTH_CONTEXT,
            })
            .into_response(),
            ErrorBody::OAuth { error, description } => axum::Json(OAuthError {
                error,
                error_description: description,
            })
            .into_response(),
        };
        *response.status_mut() = self.status;
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = self.status.into_response();
        response.extensions_mut().insert(self);
        response
    }
}

/// `authContext` of every ErrorMessage. finAPI's Access V2 spec makes it a required string
/// (never null) and documents nothing about its content; `1/21` is the spec's own example.
const AUTH_CONTEXT: &str = "1/21";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorMessage<'a> {
    errors: Vec<ErrorEntry<'a>>,
    date: String,
    request_id: &'a str,
    endpoint: &'a str,
    auth_context: &'static str,
}

#[derive(Serialize)]
struct ErrorEntry<'a> {
    message: &'a str,
    code: &'a str,
    #[serde(rename = "type")]
    kind: ErrorType,
}

#[derive(Serialize)]
struct OAuthError<'a> {
    error: &'a str,
    error_description: &'a str,
}

/// Body of `POST /api/v1/processes`. Every field is optional here so that a missing one
/// answers the documented `400` rather than a deserializer's message.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CreateProcessesRequest {
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub client_references: Option<Vec<ClientReferenceIn>>,
    pub process_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ClientReferenceIn {
    pub client_reference: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct CreateProcessesResponse {
    pub processes: Vec<ProcessOut>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ProcessOut {
    pub client_reference: String,
    pub process_token: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ExchangeQuery {
    pub invalidate: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ExchangeResponse {
    pub access_token: String,
}

/// Form of `POST /api/v2/oauth/token`.
#[derive(Debug, Deserialize)]
pub(crate) struct TokenForm {
    pub grant_type: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub refresh_token: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    pub scope: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}

/// Body of `POST /api/v2/users`; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CreateUserRequest {
    pub id: Option<String>,
    pub password: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub is_auto_update_enabled: Option<bool>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct UserOut {
    pub id: String,
    pub password: String,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub is_auto_update_enabled: bool,
}

/// The current UTC time as RFC 3339 with milliseconds, e.g. `2026-11-24T09:15:30.123+00:00`.
pub(crate) fn rfc3339_now() -> String {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(since_epoch.as_secs(), since_epoch.subsec_millis())
}

fn rfc3339(unix_seconds: u64, millis: u32) -> String {
    let days = unix_seconds / 86_400;
    let second_of_day = unix_seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}+00:00",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60,
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn formats_epoch_leap_day_and_millis() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000+00:00");
        assert_eq!(rfc3339(951_782_400, 7), "2000-02-29T00:00:00.007+00:00");
        assert_eq!(rfc3339(1_795_519_530, 123), "2026-11-24T11:25:30.123+00:00");
    }
}
