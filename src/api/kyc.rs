//! `POST /kyc-sessions` and `DELETE /kyc-sessions/current`.

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Extension, Router};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa::openapi::schema::{OneOfBuilder, Schema};
use utoipa::openapi::{Ref, RefOr};

use crate::config::FlowKind;
use crate::flows::input::{
    CLIENT_REFERENCE_MAX, CLIENT_REFERENCE_PATTERN, EMAIL_MAX, EMAIL_PATTERN, PHONE_MAX,
    PHONE_PATTERN,
};
use crate::flows::{
    ClientReference, Email, EndUserMetadata, InvalidInput, KycSession, Phone, RequestContext,
    SessionRequest, end_user_metadata,
};

use super::AppState;
use super::auth::{Caller, CallerExt};
use super::error::{ApiError, Problem};
use super::extract::ApiJson;
use super::request_id::RequestId;
use crate::telemetry::metrics::{DELETIONS, HandleCache, SESSIONS};

/// Longest bearer token accepted for deletion (finAPI allows up to 8192 characters).
const MAX_TOKEN_LEN: usize = 8192;

/// The end user's metadata headers, as finAPI names them (for error messages), and as header
/// names: looking a header up by a `&str` parses and lowercases the name every time.
const PSU_HEADERS: [(&str, HeaderName); 3] = [
    ("PSU-IP-Address", HeaderName::from_static("psu-ip-address")),
    ("PSU-Device-OS", HeaderName::from_static("psu-device-os")),
    ("PSU-User-Agent", HeaderName::from_static("psu-user-agent")),
];

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/kyc-sessions", post(create_session))
        .route("/kyc-sessions/current", delete(delete_current))
}

/// The body of `POST /kyc-sessions`. Unknown fields are refused; `null` counts as absent.
///
/// Its OpenAPI schema is written by hand ([`flow_body_schemas`]): the rules differ per flow,
/// which a derived schema cannot say.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateSessionBody {
    /// `standalone` or `access`; the configured default when absent.
    #[serde(default)]
    pub flow: Option<FlowKind>,
    /// The caller's reference: for `standalone` the process's (required), for `access` the end
    /// customer's (optional: with one, the customer's finAPI identity is reused while it lives).
    #[serde(default)]
    pub client_reference: Option<String>,
    /// E-mail of the new finAPI user. Optional for `access`, refused by `standalone`.
    #[serde(default)]
    pub email: Option<String>,
    /// Phone of the new finAPI user. Optional for `access`, refused by `standalone`.
    #[serde(default)]
    pub phone: Option<String>,
    /// The finAPI client (configured name) to run the flow with; the caller's default (the
    /// first of its `finapi_clients`) when absent.
    #[serde(default)]
    pub finapi_client: Option<String>,
}

/// Longest finAPI client name (as `finapi.clients.NAME` allows).
const FINAPI_CLIENT_MAX: usize = 64;
/// The characters of a finAPI client name (as `finapi.clients.NAME` allows).
const FINAPI_CLIENT_PATTERN: &str = "^[A-Za-z0-9._-]+$";

/// The finAPI client a request runs with: `requested`, or the caller's default. A name no
/// client has is `422 INVALID_FIELD` (`finapiClient`); a configured client the caller may not
/// use is `403 FINAPI_CLIENT_NOT_ALLOWED`.
pub(super) fn finapi_client(
    state: &AppState,
    caller: &Caller,
    requested: Option<&str>,
) -> Result<std::sync::Arc<str>, ApiError> {
    let Some(name) = requested else {
        // Validated at load: every caller has at least one client.
        return caller
            .finapi_clients()
            .first()
            .cloned()
            .ok_or(ApiError::Internal);
    };
    if !state.flows.finapi_clients().any(|known| **known == *name) {
        return Err(ApiError::InvalidField(InvalidInput {
            field: "finapiClient",
            rule: "is not a configured finAPI client",
        }));
    }
    caller
        .finapi_clients()
        .iter()
        .find(|allowed| ***allowed == *name)
        .cloned()
        .ok_or(ApiError::FinapiClientNotAllowed)
}

/// The optional query of the calls that act on an existing finAPI user
/// (`DELETE /kyc-sessions/current`, `/identities/{clientReference}`): the finAPI client the
/// user was made with.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub(super) struct FinapiClientQuery {
    /// The finAPI client (configured name) the user was made with; the caller's default when
    /// absent. 422 INVALID_FIELD when no client has this name, 403 FINAPI_CLIENT_NOT_ALLOWED
    /// when the caller may not use it.
    #[param(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]+$")]
    pub finapi_client: Option<String>,
}

impl FinapiClientQuery {
    /// The query, or `422 INVALID_FIELD` for one that is not `finapiClient=NAME`.
    pub(super) fn read(
        query: Result<axum::extract::Query<Self>, axum::extract::rejection::QueryRejection>,
    ) -> Result<Self, ApiError> {
        query.map(|axum::extract::Query(q)| q).map_err(|_| {
            ApiError::InvalidField(InvalidInput {
                field: "finapiClient",
                rule: "must be the only query parameter, given once",
            })
        })
    }
}

/// Name of the standalone branch of [`CreateSessionBody`] in the OpenAPI document.
pub(super) const STANDALONE_BODY: &str = "StandaloneSessionBody";
/// Name of the access branch of [`CreateSessionBody`] in the OpenAPI document.
pub(super) const ACCESS_BODY: &str = "AccessSessionBody";

impl utoipa::PartialSchema for CreateSessionBody {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(Ref::from_schema_name(STANDALONE_BODY))
            .item(Ref::from_schema_name(ACCESS_BODY))
            .description(Some(
                "The body of `POST /kyc-sessions`: exactly one of the flows' bodies. A body \
                 without `flow` (or with `flow: null`) is the configured default flow's \
                 (`flows.default_flow`), so only that branch allows it; the served document \
                 reflects the broker's configuration. `null` counts as absent everywhere. There \
                 is no `discriminator` because `flow` may be absent.",
            ))
            .examples([
                json!({"flow": "standalone", "clientReference": "customer-4711"}),
                json!({"flow": "access", "email": "jane@example.com"}),
            ])
            .into()
    }
}

impl ToSchema for CreateSessionBody {
    fn name() -> std::borrow::Cow<'static, str> {
        "CreateSessionBody".into()
    }
}

/// The JSON Schemas of the two flows' bodies, by component name, for a broker whose
/// `flows.default_flow` is `default_flow`. They accept exactly what
/// [`CreateSessionBody::validate`] accepts (`tests/contract.rs` sends the broker bodies generated
/// from them, both ways).
/// `finapiClient` is limited to the names in `finapi_clients` (the broker's configured clients).
pub(super) fn flow_body_schemas(
    default_flow: FlowKind,
    finapi_clients: &[std::sync::Arc<str>],
) -> [(&'static str, serde_json::Value); 2] {
    // The default flow's branch also takes a missing or null `flow`.
    let flow = |kind: FlowKind| {
        if kind == default_flow {
            json!({"type": ["string", "null"], "enum": [kind.as_str(), null],
                "description": "May be absent or null: this is the configured default flow."})
        } else {
            json!({"type": "string", "enum": [kind.as_str()]})
        }
    };
    let required = |kind: FlowKind, mut fields: Vec<&'static str>| {
        if kind != default_flow {
            fields.insert(0, "flow");
        }
        fields
    };
    let refused = json!({"type": "null", "description": "Not used by this flow: absent or null."});
    let mut finapi_client = json!({
        "type": ["string", "null"],
        "description": "The finAPI client (configured name) to run the flow with; the caller's default when absent. 422 INVALID_FIELD when no client has this name, 403 FINAPI_CLIENT_NOT_ALLOWED when the caller may not use it.",
        "minLength": 1,
        "maxLength": FINAPI_CLIENT_MAX,
        "pattern": FINAPI_CLIENT_PATTERN,
    });
    let mut names: Vec<serde_json::Value> = finapi_clients.iter().map(|n| json!(&**n)).collect();
    names.push(serde_json::Value::Null);
    finapi_client["enum"] = serde_json::Value::Array(names);
    let standalone = json!({
        "type": "object",
        "title": "standalone",
        "description": "Process Controller flow: one process for the caller's reference.",
        "required": required(FlowKind::Standalone, vec!["clientReference"]),
        "properties": {
            "flow": flow(FlowKind::Standalone),
            "clientReference": {
                "type": "string",
                "description": "The caller's reference for the process.",
                "minLength": 1,
                "maxLength": CLIENT_REFERENCE_MAX,
                "pattern": CLIENT_REFERENCE_PATTERN,
            },
            "email": refused,
            "phone": refused,
            "finapiClient": finapi_client,
        },
        "additionalProperties": false,
    });
    let access = json!({
        "type": "object",
        "title": "access",
        "description": "Access flow: a finAPI user (new, or the customer's reused identity) and its token.",
        "required": required(FlowKind::Access, vec![]),
        "properties": {
            "flow": flow(FlowKind::Access),
            "clientReference": {
                "type": ["string", "null"],
                "description": "The caller's reference for its end customer: with one, the broker keeps one finAPI identity per (caller, reference) and reuses it while it lives.",
                "minLength": 1,
                "maxLength": CLIENT_REFERENCE_MAX,
                "pattern": CLIENT_REFERENCE_PATTERN,
            },
            "email": {
                "type": ["string", "null"],
                "description": "E-mail of the new finAPI user: one `@` with text on both sides; no white space (Unicode White_Space) or control characters.",
                "maxLength": EMAIL_MAX,
                "pattern": EMAIL_PATTERN,
            },
            "phone": {
                "type": ["string", "null"],
                "description": "Phone of the new finAPI user: digits, spaces and `+ - ( ) /`, at least one digit.",
                "maxLength": PHONE_MAX,
                "pattern": PHONE_PATTERN,
            },
            "finapiClient": finapi_client,
        },
        "additionalProperties": false,
    });
    let mut schemas = [(STANDALONE_BODY, standalone), (ACCESS_BODY, access)];
    // An empty `required` is noise (and utoipa drops it).
    for (_, schema) in &mut schemas {
        if let Some(object) = schema.as_object_mut()
            && object.get("required") == Some(&json!([]))
        {
            object.remove("required");
        }
    }
    schemas
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
            FlowKind::Access => Ok(SessionRequest::Access {
                client_reference: self
                    .client_reference
                    .as_deref()
                    .map(ClientReference::parse)
                    .transpose()?,
                email: self.email.as_deref().map(Email::parse).transpose()?,
                phone: self.phone.as_deref().map(Phone::parse).transpose()?,
            }),
        }
    }
}

/// The answer of `POST /kyc-sessions`: the finAPI user's access token, for GiroIdent.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct SessionBody<'a> {
    /// The user's access token.
    access_token: &'a str,
    /// `bearer`.
    token_type: &'a str,
    /// Seconds the token is valid, as finAPI says, more than a year read as one year
    /// (31,536,000); null for the standalone flow, whose token exchange gives none.
    #[schema(required = true, minimum = 0, maximum = 31_536_000)]
    expires_in: Option<u64>,
    /// The flow that ran.
    flow: FlowKind,
    /// The finAPI client (configured name) the flow ran with.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]+$")]
    finapi_client: &'a str,
    /// The finAPI user id (access flow only).
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    /// Access flow only: `created` (a new finAPI user) or `reused` (the customer's identity
    /// for the `clientReference`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, pattern = "^(created|reused)$")]
    identity: Option<&'a str>,
    /// Access flow only: when the identity will be deleted unless another session comes first
    /// (RFC 3339, UTC, milliseconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    delete_after: Option<String>,
}

/// Start a KYC session.
///
/// Runs the standalone (Process Controller) or the access flow at finAPI and answers with the
/// user's access token.
#[utoipa::path(
    post,
    path = "/kyc-sessions",
    tag = "kyc",
    security(("api_key" = [])),
    params(
        ("X-Request-Id" = Option<String>, Header, description = "Request id (at most 255 characters of A-Z a-z 0-9 - _ . : /); generated when absent or unsafe"),
        ("PSU-IP-Address" = Option<String>, Header, description = "The end user's IPv4 address (dotted quad, e.g. 203.0.113.7; IPv6 is refused), passed to finAPI's calls for the end user; never logged. INVALID_HEADER when invalid", format = Ipv4),
        ("PSU-Device-OS" = Option<String>, Header, description = "The end user's device operating system, 1 to 128 characters of visible ASCII and space, passed to finAPI's calls for the end user. INVALID_HEADER when invalid", min_length = 1, max_length = 128, pattern = "^[ -~]+$"),
        ("PSU-User-Agent" = Option<String>, Header, description = "The end user's browser or app user agent, 1 to 512 characters of visible ASCII and space, passed to finAPI's calls for the end user. INVALID_HEADER when invalid", min_length = 1, max_length = 512, pattern = "^[ -~]+$"),
    ),
    request_body(content = CreateSessionBody, content_type = "application/json"),
    responses(
        (status = 201, description = "Session started; `Cache-Control: no-store`", body = SessionBody),
        (status = 400, description = "MALFORMED_JSON, INVALID_BODY", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "MISSING_API_KEY, INVALID_API_KEY", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "FLOW_NOT_ALLOWED, FINAPI_CLIENT_NOT_ALLOWED", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "BODY_TIMEOUT", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "BODY_TOO_LARGE", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "UNSUPPORTED_MEDIA_TYPE", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "INVALID_FIELD, INVALID_HEADER", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "RATE_LIMITED, with Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "INTERNAL", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "UPSTREAM_REJECTED, UPSTREAM_ERROR, UPSTREAM_CERTIFICATE_REJECTED", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "UPSTREAM_UNAVAILABLE, OVERLOADED (Retry-After where known)", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "UPSTREAM_TIMEOUT, REQUEST_TIMEOUT", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(super) async fn create_session(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    Extension(CallerExt(caller)): Extension<CallerExt>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    ApiJson(mut body): ApiJson<CreateSessionBody>,
) -> Result<Response, ApiError> {
    // The other endpoints take `?finapiClient=`; ignoring it here would run the session at
    // the caller's default client instead of the one the query names. Other parameters stay
    // ignored (load generators number their requests with one).
    let names_client = |q: &str| {
        q.split('&')
            .any(|pair| pair.split('=').next() == Some("finapiClient"))
    };
    if query.as_deref().is_some_and(names_client) {
        return Err(ApiError::InvalidField(InvalidInput {
            field: "finapiClient",
            rule: "goes in the body of POST /kyc-sessions, not in its query",
        }));
    }
    let end_user = end_user(&headers)?;
    let requested_client = body.finapi_client.take();
    let request = body
        .validate(state.default_flow)
        .map_err(ApiError::InvalidField)?;
    let flow = request.flow();
    super::request_id::note_flow(flow.as_str());
    let result = async {
        let finapi_client = finapi_client(&state, &caller, requested_client.as_deref())?;
        super::request_id::note_finapi_client(&finapi_client);
        let ctx = RequestContext {
            request_id,
            caller: caller.name.clone(),
            finapi_client,
            end_user,
        };
        start_session(&state, &caller, request, ctx).await
    }
    .await;
    let outcome = match &result {
        Ok(_) => "created",
        Err(err) => err.code(),
    };
    static HANDLES: HandleCache<(&'static str, &'static str), metrics::Counter> =
        HandleCache::new();
    HANDLES.with(
        (flow.as_str(), outcome),
        |&(flow, outcome)| metrics::counter!(SESSIONS, "flow" => flow, "outcome" => outcome),
        |sessions| sessions.increment(1),
    );
    result
}

async fn start_session(
    state: &AppState,
    caller: &Caller,
    request: SessionRequest,
    ctx: RequestContext,
) -> Result<Response, ApiError> {
    if !caller.may_use(request.flow()) {
        return Err(ApiError::FlowNotAllowed(request.flow()));
    }
    // Boxed: the flows' future is several KiB, and every layer between hyper and this handler
    // would otherwise copy it when it wraps the handler's future (docs/BENCHMARKS.md, "Issue 15:
    // the request path and the standalone flow, fourth pass").
    let session = tokio::time::timeout(
        state.request_timeout,
        Box::pin(state.flows.start_session(request, &ctx)),
    )
    .await
    .map_err(|_| ApiError::Timeout)??;
    // Said by the request's one `request finished` line, not by a line of its own.
    if let Some(user_id) = &session.user_id {
        super::request_id::note_user_id(user_id);
    }
    Ok(session_response(&session, &ctx.finapi_client))
}

/// The only place a user access token leaves the broker.
fn session_response(session: &KycSession, finapi_client: &str) -> Response {
    let body = SessionBody {
        access_token: session.access_token.expose_secret(),
        token_type: &session.token_type,
        expires_in: session.expires_in,
        flow: session.flow,
        finapi_client,
        user_id: session.user_id.as_deref(),
        identity: session.identity.as_ref().map(|i| i.used.as_str()),
        delete_after: session
            .identity
            .as_ref()
            .map(|i| super::identities::rfc3339(i.delete_after)),
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

/// Delete the finAPI user of a user access token.
///
/// finAPI's "delete the authorised user". Delete a user only after the GiroIdent check's final
/// result is in.
#[utoipa::path(
    delete,
    path = "/kyc-sessions/current",
    tag = "kyc",
    security(("api_key" = [], "user_token" = [])),
    params(
        ("X-Request-Id" = Option<String>, Header, description = "Request id, as for POST /kyc-sessions"),
        ("PSU-IP-Address" = Option<String>, Header, description = "As for POST /kyc-sessions; passed to finAPI's DELETE /api/v2/users", format = Ipv4),
        ("PSU-Device-OS" = Option<String>, Header, description = "As for POST /kyc-sessions", min_length = 1, max_length = 128, pattern = "^[ -~]+$"),
        ("PSU-User-Agent" = Option<String>, Header, description = "As for POST /kyc-sessions", min_length = 1, max_length = 512, pattern = "^[ -~]+$"),
        FinapiClientQuery,
    ),
    responses(
        (status = 204, description = "The user is deleted"),
        (status = 422, description = "INVALID_HEADER, INVALID_FIELD (finapiClient)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "MISSING_API_KEY, INVALID_API_KEY, MISSING_USER_TOKEN, USER_TOKEN_REJECTED", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "NOT_A_USER_TOKEN, FINAPI_CLIENT_NOT_ALLOWED", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "USER_LOCKED", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "RATE_LIMITED, with Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "INTERNAL", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "UPSTREAM_REJECTED, UPSTREAM_ERROR, UPSTREAM_CERTIFICATE_REJECTED", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "UPSTREAM_UNAVAILABLE, OVERLOADED", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "UPSTREAM_TIMEOUT, REQUEST_TIMEOUT", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(super) async fn delete_current(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    Extension(CallerExt(caller)): Extension<CallerExt>,
    headers: HeaderMap,
    query: Result<
        axum::extract::Query<FinapiClientQuery>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Result<StatusCode, ApiError> {
    let result: Result<StatusCode, ApiError> = async {
        let end_user = end_user(&headers)?;
        let query = FinapiClientQuery::read(query)?;
        let finapi_client = finapi_client(&state, &caller, query.finapi_client.as_deref())?;
        let token = bearer_token(&headers).ok_or(ApiError::MissingUserToken)?;
        let ctx = RequestContext {
            request_id,
            caller: caller.name.clone(),
            finapi_client,
            end_user,
        };
        tokio::time::timeout(state.request_timeout, state.flows.delete_user(&token, &ctx))
            .await
            .map_err(|_| ApiError::Timeout)??;
        // Said by the request's `request finished` line (204).
        Ok(StatusCode::NO_CONTENT)
    }
    .await;
    let outcome = match &result {
        Ok(_) => "deleted",
        Err(err) => err.code(),
    };
    static HANDLES: HandleCache<&'static str, metrics::Counter> = HandleCache::new();
    HANDLES.with(
        outcome,
        |&outcome| metrics::counter!(DELETIONS, "outcome" => outcome),
        |deletions| deletions.increment(1),
    );
    result
}

/// The end user's metadata from the `PSU-*` headers (rules at [`end_user_metadata`]); each may
/// be absent, none may be repeated.
pub(super) fn end_user(headers: &HeaderMap) -> Result<EndUserMetadata, ApiError> {
    let mut values = [None; 3];
    for (value, (name, header)) in values.iter_mut().zip(&PSU_HEADERS) {
        let mut all = headers.get_all(header).iter();
        *value = all.next().map(HeaderValue::as_bytes);
        if all.next().is_some() {
            return Err(ApiError::InvalidHeader(InvalidInput {
                field: name,
                rule: "must be given at most once",
            }));
        }
    }
    let [ip, device_os, user_agent] = values;
    end_user_metadata(ip, device_os, user_agent).map_err(ApiError::InvalidHeader)
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
    fn access_takes_an_optional_reference_and_checks_contact_fields() {
        assert!(
            body(r#"{"flow":"access"}"#)
                .validate(FlowKind::Standalone)
                .is_ok()
        );
        let reference = body(r#"{"flow":"access","clientReference":"c-1"}"#);
        assert!(reference.validate(FlowKind::Standalone).is_ok());
        let bad = body(r#"{"flow":"access","clientReference":"c 1"}"#);
        assert_eq!(
            bad.validate(FlowKind::Standalone).unwrap_err().field,
            "clientReference"
        );
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
