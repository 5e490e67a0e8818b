//! `POST /kyc-sessions` and `DELETE /kyc-sessions/current`.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Extension, Router};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::config::FlowKind;
use crate::flows::{
    ClientReference, Email, InvalidInput, KycSession, Phone, RequestContext, SessionRequest,
};

use super::AppState;
use super::auth::{Caller, CallerExt};
use super::error::ApiError;
use super::extract::ApiJson;
use super::request_id::RequestId;
use crate::telemetry::metrics::{DELETIONS, SESSIONS};

/// Longest bearer token accepted for deletion (finAPI allows up to 8192 characters).
const MAX_TOKEN_LEN: usize = 8192;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/kyc-sessions", post(create_session))
        .route("/kyc-sessions/current", delete(delete_current))
}

/// The body of `POST /kyc-sessions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateSessionBody {
    /// `standalone` or `access`; the configured default when absent.
    #[serde(default)]
    pub flow: Option<FlowKind>,
    /// Required by `standalone`, refused by `access`.
    #[serde(default)]
    pub client_reference: Option<String>,
    /// Optional for `access`, refused by `standalone`.
    #[serde(default)]
    pub email: Option<String>,
    /// Optional for `access`, refused by `standalone`.
    #[serde(default)]
    pub phone: Option<String>,
}

impl CreateSessionBody {
    /// Checks the body against the rules of its flow.
    pub fn validate(self, default_flow: FlowKind) -> Result<SessionRequest, InvalidInput> {
        let not_for = |field| InvalidInput {
            field,
            rule: "is not used by this flow",
        };
        match self.flow.unwrap_or(default_flow) {
            FlowKind::Standalone => {
                if self.email.is_some() {
                    return Err(not_for("email"));
                }
                if self.phone.is_some() {
                    return Err(not_for("phone"));
                }
                let reference = self.client_reference.ok_or(InvalidInput {
                    field: "clientReference",
                    rule: "is required by the standalone flow",
                })?;
                Ok(SessionRequest::Standalone {
                    client_reference: ClientReference::parse(&reference)?,
                })
            }
            FlowKind::Access => {
                if self.client_reference.is_some() {
                    return Err(not_for("clientReference"));
                }
                Ok(SessionRequest::Access {
                    email: self.email.as_deref().map(Email::parse).transpose()?,
                    phone: self.phone.as_deref().map(Phone::parse).transpose()?,
                })
            }
        }
    }
}

/// The answer of `POST /kyc-sessions`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SessionBody<'a> {
    access_token: &'a str,
    token_type: &'a str,
    expires_in: Option<u64>,
    flow: FlowKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
}

async fn create_session(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    Extension(CallerExt(caller)): Extension<CallerExt>,
    ApiJson(body): ApiJson<CreateSessionBody>,
) -> Result<Response, ApiError> {
    let request = body
        .validate(state.default_flow)
        .map_err(ApiError::InvalidField)?;
    let flow = request.flow();
    tracing::Span::current().record("flow", flow.as_str());
    let result = start_session(&state, &caller, request, request_id).await;
    let outcome = match &result {
        Ok(_) => "created",
        Err(err) => err.code(),
    };
    metrics::counter!(SESSIONS, "flow" => flow.as_str(), "outcome" => outcome).increment(1);
    result
}

async fn start_session(
    state: &AppState,
    caller: &Caller,
    request: SessionRequest,
    request_id: String,
) -> Result<Response, ApiError> {
    if !caller.may_use(request.flow()) {
        return Err(ApiError::FlowNotAllowed(request.flow()));
    }
    let ctx = RequestContext { request_id };
    let session = tokio::time::timeout(
        state.request_timeout,
        state.flows.start_session(request, &ctx),
    )
    .await
    .map_err(|_| ApiError::Timeout)??;
    tracing::info!(user_id = session.user_id.as_deref(), "KYC session started");
    Ok(session_response(&session))
}

/// The only place a user access token leaves the broker.
fn session_response(session: &KycSession) -> Response {
    let body = SessionBody {
        access_token: session.access_token.expose_secret(),
        token_type: &session.token_type,
        expires_in: session.expires_in,
        flow: session.flow,
        user_id: session.user_id.as_deref(),
    };
    let Ok(bytes) = serde_json::to_vec(&body) else {
        return ApiError::Internal.into_response();
    };
    (
        StatusCode::CREATED,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (header::PRAGMA, HeaderValue::from_static("no-cache")),
        ],
        bytes,
    )
        .into_response()
}

async fn delete_current(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let result: Result<StatusCode, ApiError> = async {
        let token = bearer_token(&headers).ok_or(ApiError::MissingUserToken)?;
        let ctx = RequestContext { request_id };
        tokio::time::timeout(state.request_timeout, state.flows.delete_user(&token, &ctx))
            .await
            .map_err(|_| ApiError::Timeout)??;
        tracing::info!("finAPI user deleted");
        Ok(StatusCode::NO_CONTENT)
    }
    .await;
    let outcome = match &result {
        Ok(_) => "deleted",
        Err(err) => err.code(),
    };
    metrics::counter!(DELETIONS, "outcome" => outcome).increment(1);
    result
}

/// The token of `Authorization: Bearer <token>`: visible ASCII only, at most 8192 characters.
fn bearer_token(headers: &HeaderMap) -> Option<SecretString> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    let valid = scheme.eq_ignore_ascii_case("bearer")
        && !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token.bytes().all(|b| b.is_ascii_graphic());
    valid.then(|| SecretString::from(token.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> CreateSessionBody {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn standalone_needs_a_reference_and_refuses_access_fields() {
        let ok = body(r#"{"flow":"standalone","clientReference":"c-1"}"#);
        assert!(ok.validate(FlowKind::Access).is_ok());
        let missing = body(r#"{"flow":"standalone"}"#);
        assert_eq!(
            missing.validate(FlowKind::Access).unwrap_err().field,
            "clientReference"
        );
        let email = body(r#"{"clientReference":"c-1","email":"a@b.c"}"#);
        assert_eq!(
            email.validate(FlowKind::Standalone).unwrap_err().field,
            "email"
        );
    }

    #[test]
    fn access_refuses_a_reference_and_checks_contact_fields() {
        assert!(
            body(r#"{"flow":"access"}"#)
                .validate(FlowKind::Standalone)
                .is_ok()
        );
        let reference = body(r#"{"flow":"access","clientReference":"c-1"}"#);
        assert!(reference.validate(FlowKind::Standalone).is_err());
        let phone = body(r#"{"flow":"access","phone":"call me"}"#);
        assert_eq!(
            phone.validate(FlowKind::Standalone).unwrap_err().field,
            "phone"
        );
    }

    #[test]
    fn default_flow_applies_when_none_is_named() {
        let b = body(r#"{}"#);
        assert!(matches!(
            b.validate(FlowKind::Access),
            Ok(SessionRequest::Access { .. })
        ));
    }

    #[test]
    fn bearer_token_parsing() {
        let mut h = HeaderMap::new();
        assert!(bearer_token(&h).is_none());
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc.DEF-1"),
        );
        assert_eq!(bearer_token(&h).unwrap().expose_secret(), "abc.DEF-1");
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer abc"),
        );
        assert!(bearer_token(&h).is_some());
        for bad in ["Basic abc", "Bearer", "Bearer ", "Bearer a b"] {
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(bad));
            assert!(bearer_token(&h).is_none(), "{bad:?} accepted");
        }
    }
}
