//! `GET` and `DELETE /identities/{clientReference}`: a caller's managed finAPI identities.

use std::time::{Duration, UNIX_EPOCH};

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use crate::config::FlowKind;
use crate::finapi::EndUserMetadata;
use crate::flows::identities::{Deletion, IdentityView};
use crate::flows::{ClientReference, RequestContext};
use crate::identities::{IdentityState, Millis};

use super::AppState;
use super::auth::{Caller, CallerExt};
use super::error::{ApiError, Problem};
use super::kyc::{FinapiClientQuery, finapi_client};
use super::request_id::RequestId;

pub fn router() -> Router<AppState> {
    Router::new().route(
        "/identities/{client_reference}",
        get(get_identity).delete(delete_identity),
    )
}

/// An identity record as an answer: per-caller data, which no shared cache may keep
/// (`Cache-Control: no-store`, RFC 9111 section 5.2.2.5), as the session answers are not.
fn record_answer(status: StatusCode, view: IdentityView) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(IdentityBody::from_view(view)),
    )
        .into_response()
}

/// Latest time [`rfc3339`] writes: the end of year 9999, RFC 3339's last.
const LATEST_MILLIS: Millis = 253_402_300_799_999;

/// A Unix time in milliseconds as RFC 3339 (UTC, milliseconds); times outside years 1970 to
/// 9999 are clamped (the configuration's bounds keep the broker's own far inside).
pub(super) fn rfc3339(at: Millis) -> String {
    let at = u64::try_from(at.clamp(0, LATEST_MILLIS)).unwrap_or(0);
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(at)).to_string()
}

/// A managed finAPI identity, as its caller may see it: never a password, token, key, e-mail,
/// phone or the raw reference.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct IdentityBody {
    /// The broker's id of the identity.
    identity_id: String,
    /// The finAPI user id.
    user_id: String,
    /// `intent` (being created), `active`, `deleting` or `deleted`.
    #[schema(pattern = "^(intent|active|deleting|deleted)$")]
    state: &'static str,
    /// RFC 3339.
    #[schema(format = DateTime)]
    created_at: String,
    /// RFC 3339; null before the first session completed.
    #[schema(required = true, format = DateTime)]
    last_session_at: Option<String>,
    /// When the identity is due for deletion (RFC 3339).
    #[schema(format = DateTime)]
    delete_after: String,
    /// RFC 3339; null until deleted.
    #[schema(required = true, format = DateTime)]
    deleted_at: Option<String>,
    /// Failed deletion attempts so far.
    deletion_attempts: u32,
    /// The code of the last failure, if any (e.g. `LOCKED`).
    #[schema(required = true)]
    last_error: Option<String>,
    /// The most recent events, the newest first.
    events: Vec<EventBody>,
}

/// One event of an identity's life.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct EventBody {
    /// `created`, `reused`, `deleted`, `deletion_failed` or `never_created`.
    kind: &'static str,
    /// The caller that caused it (`reaper` for the reaper).
    caller: String,
    /// The request id it happened in.
    #[schema(required = true)]
    request_id: Option<String>,
    /// RFC 3339.
    #[schema(format = DateTime)]
    at: String,
    /// A short code or note (a failure's code, `unknown to finAPI`).
    #[schema(required = true)]
    detail: Option<String>,
}

impl IdentityBody {
    fn from_view(view: IdentityView) -> Self {
        let r = view.record;
        Self {
            identity_id: r.id.to_string(),
            user_id: r.finapi_user_id,
            state: r.state.as_str(),
            created_at: rfc3339(r.created_at),
            last_session_at: r.last_session_at.map(rfc3339),
            delete_after: rfc3339(r.delete_after),
            deleted_at: r.deleted_at.map(rfc3339),
            deletion_attempts: r.deletion_attempts,
            last_error: r.last_error,
            events: view
                .events
                .into_iter()
                .map(|e| EventBody {
                    kind: e.kind.as_str(),
                    caller: e.caller,
                    request_id: e.request_id,
                    at: rfc3339(e.at),
                    detail: e.detail,
                })
                .collect(),
        }
    }
}

/// The caller and the reference of an identity request: the caller must be allowed the access
/// flow, the reference must be valid.
fn context(
    state: &AppState,
    caller: &Caller,
    reference: Result<Path<String>, PathRejection>,
    query: Result<Query<FinapiClientQuery>, QueryRejection>,
    request_id: std::sync::Arc<str>,
    end_user: EndUserMetadata,
) -> Result<(ClientReference, RequestContext), ApiError> {
    if !caller.may_use(FlowKind::Access) {
        return Err(ApiError::FlowNotAllowed(FlowKind::Access));
    }
    // A path segment that does not decode (invalid UTF-8) is no valid reference either.
    let reference = reference.map_or_else(|_| String::new(), |Path(r)| r);
    let reference = ClientReference::parse(&reference).map_err(ApiError::InvalidField)?;
    let query = FinapiClientQuery::read(query)?;
    let finapi_client = finapi_client(state, caller, query.finapi_client.as_deref())?;
    let ctx = RequestContext {
        request_id,
        caller: caller.name.clone(),
        finapi_client,
        end_user,
    };
    Ok((reference, ctx))
}

/// Show the caller's identity for a client reference.
///
/// The newest identity the caller has for the reference, in any state, with its recent events.
/// Another caller's identities are not found.
#[utoipa::path(
    get,
    path = "/identities/{clientReference}",
    tag = "identities",
    security(("api_key" = [])),
    params(
        ("clientReference" = String, Path, description = "The caller's reference for its end customer, as sent to POST /kyc-sessions", min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9._:@+-]+$"),
        FinapiClientQuery,
    ),
    responses(
        (status = 200, description = "The identity; `Cache-Control: no-store`", body = IdentityBody),
        (status = 401, description = "MISSING_API_KEY, INVALID_API_KEY", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "FLOW_NOT_ALLOWED (the caller may not use the access flow), FINAPI_CLIENT_NOT_ALLOWED", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "IDENTITY_NOT_FOUND", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "INVALID_FIELD", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "RATE_LIMITED, with Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "INTERNAL", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "STORE_UNAVAILABLE, OVERLOADED", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(super) async fn get_identity(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    Extension(CallerExt(caller)): Extension<CallerExt>,
    reference: Result<Path<String>, PathRejection>,
    query: Result<Query<FinapiClientQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (reference, ctx) = context(
        &state,
        &caller,
        reference,
        query,
        request_id,
        EndUserMetadata::default(),
    )?;
    let view = state
        .flows
        .find_identity(&ctx.caller, &ctx.finapi_client, &reference)
        .await?
        .ok_or(ApiError::IdentityNotFound)?;
    Ok(record_answer(StatusCode::OK, view))
}

/// Delete the caller's identity for a client reference.
///
/// Logs in as the finAPI user with its derived password and deletes it. Delete only after the
/// GiroIdent check's final result is in. When finAPI cannot delete it now (locked,
/// unavailable), the deletion is scheduled and retried until it succeeds. Of concurrent
/// deletions of one identity exactly one is carried out: a request that finds another request
/// (or the reaper) deleting it answers `202` with the record, or `204` once it is deleted.
#[utoipa::path(
    delete,
    path = "/identities/{clientReference}",
    tag = "identities",
    security(("api_key" = [])),
    params(
        ("clientReference" = String, Path, description = "The caller's reference for its end customer", min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9._:@+-]+$"),
        ("PSU-IP-Address" = Option<String>, Header, description = "As for POST /kyc-sessions; passed to finAPI's calls for the deletion", format = Ipv4),
        ("PSU-Device-OS" = Option<String>, Header, description = "As for POST /kyc-sessions", min_length = 1, max_length = 128, pattern = "^[ -~]+$"),
        ("PSU-User-Agent" = Option<String>, Header, description = "As for POST /kyc-sessions", min_length = 1, max_length = 512, pattern = "^[ -~]+$"),
        FinapiClientQuery,
    ),
    responses(
        (status = 204, description = "The finAPI user is deleted (or finAPI no longer knew it), by this request or by a concurrent one"),
        (status = 202, description = "Not deleted yet: finAPI cannot delete it now and the deletion is scheduled, or another request or the reaper is deleting it at this moment (state `deleting`); `Cache-Control: no-store`", body = IdentityBody),
        (status = 401, description = "MISSING_API_KEY, INVALID_API_KEY", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "FLOW_NOT_ALLOWED (the caller may not use the access flow), FINAPI_CLIENT_NOT_ALLOWED", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "IDENTITY_NOT_FOUND (none, or already deleted)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "INVALID_FIELD, INVALID_HEADER", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "RATE_LIMITED, with Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "INTERNAL", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "STORE_UNAVAILABLE, OVERLOADED", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "REQUEST_TIMEOUT", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(super) async fn delete_identity(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    Extension(CallerExt(caller)): Extension<CallerExt>,
    reference: Result<Path<String>, PathRejection>,
    query: Result<Query<FinapiClientQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let end_user = super::kyc::end_user(&headers)?;
    let (reference, ctx) = context(&state, &caller, reference, query, request_id, end_user)?;
    let (deletion, view) = tokio::time::timeout(
        state.request_timeout,
        state.flows.delete_identity_of(&reference, &ctx),
    )
    .await
    .map_err(|_| ApiError::Timeout)??
    .ok_or(ApiError::IdentityNotFound)?;
    Ok(match deletion {
        Deletion::Deleted | Deletion::Unknown => StatusCode::NO_CONTENT.into_response(),
        // A concurrent request's deletion that has ended: the identity is deleted all the same.
        Deletion::InProgress if view.record.state == IdentityState::Deleted => {
            StatusCode::NO_CONTENT.into_response()
        }
        Deletion::Scheduled { .. } | Deletion::InProgress => {
            record_answer(StatusCode::ACCEPTED, view)
        }
    })
}
