//! Handlers of the simulated finAPI endpoints.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FormRejection, PathRejection, QueryRejection};
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::state::{NewUser, SimState, Subject};
use super::wire::{
    ApiError, CreateProcessesRequest, CreateProcessesResponse, CreateUserRequest, ExchangeQuery,
    ExchangeResponse, ProcessOut, TokenForm, TokenResponse,
};

const PROCESS_IDS: [&str; 2] = ["GIROIDENT", "USER_ONLY"];

/// `POST /api/v1/processes`: one process per client reference.
pub(crate) async fn create_processes(
    State(state): State<SimState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|_| ApiError::bad_request("Unreadable request body"))?;
    let request: CreateProcessesRequest =
        serde_json::from_slice(&body).map_err(|_| ApiError::bad_request("Malformed JSON body"))?;
    let (Some(client_id), Some(client_secret), Some(references), Some(process_id)) = (
        request.client_id,
        request.client_secret,
        request.client_references,
        request.process_id,
    ) else {
        return Err(ApiError::bad_request(
            "clientId, clientSecret, clientReferences and processId are required",
        ));
    };
    let client_id = state.authenticate_client(Some(&client_id), Some(&client_secret))?;
    if !PROCESS_IDS.contains(&process_id.as_str()) {
        return Err(ApiError::bad_request(
            "processId must be GIROIDENT or USER_ONLY",
        ));
    }
    let references: Vec<String> = references
        .into_iter()
        .map(|entry| {
            entry
                .client_reference
                .filter(|reference| !reference.is_empty())
        })
        .collect::<Option<_>>()
        .filter(|references: &Vec<String>| !references.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request("clientReferences needs at least one non-empty clientReference")
        })?;
    let processes = state
        .create_processes(&client_id, references)?
        .into_iter()
        .map(|(client_reference, process_token)| ProcessOut {
            client_reference,
            process_token,
        })
        .collect();
    Ok((
        StatusCode::CREATED,
        Json(CreateProcessesResponse { processes }),
    )
        .into_response())
}

/// `GET /api/v1/processes/{processToken}?invalidate=true|false`.
pub(crate) async fn exchange_process(
    State(state): State<SimState>,
    process_token: Result<Path<String>, PathRejection>,
    query: Result<Query<ExchangeQuery>, QueryRejection>,
) -> Result<Json<ExchangeResponse>, ApiError> {
    // A token that does not even decode (say `%FF`) is one finAPI never issued.
    let Ok(Path(process_token)) = process_token else {
        return Err(ApiError::unknown_entity(
            "Process token is unknown, used up or expired",
        ));
    };
    let Query(query) = query.map_err(|_| ApiError::bad_request("Malformed query"))?;
    let invalidate = match query.invalidate.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(ApiError::bad_request("invalidate must be true or false")),
    };
    let access_token = state.exchange(&process_token, invalidate)?;
    Ok(Json(ExchangeResponse { access_token }))
}

/// `POST /api/v2/oauth/token`.
pub(crate) async fn token(
    State(state): State<SimState>,
    form: Result<Form<TokenForm>, FormRejection>,
) -> Result<Json<TokenResponse>, ApiError> {
    let Form(form) = form
        .map_err(|_| ApiError::bad_request("Expected an application/x-www-form-urlencoded body"))?;
    let client_id =
        state.authenticate_client(form.client_id.as_deref(), form.client_secret.as_deref())?;
    let issued = match form.grant_type.as_deref() {
        Some("client_credentials") => state.client_token(&client_id)?,
        Some("password") => {
            let (Some(username), Some(password)) = (&form.username, &form.password) else {
                return Err(ApiError::bad_request(
                    "username and password are required for grant_type=password",
                ));
            };
            state.password_token(&client_id, username, password)?
        }
        Some("refresh_token") => {
            let Some(refresh_token) = &form.refresh_token else {
                return Err(ApiError::bad_request(
                    "refresh_token is required for grant_type=refresh_token",
                ));
            };
            state.refresh_token(&client_id, refresh_token)?
        }
        Some(_) => return Err(ApiError::bad_request("Unsupported grant_type")),
        None => return Err(ApiError::bad_request("grant_type is required")),
    };
    Ok(Json(TokenResponse {
        access_token: issued.access_token,
        token_type: "bearer",
        expires_in: issued.expires_in,
        scope: "all",
        refresh_token: issued.refresh_token,
    }))
}

/// `POST /api/v2/users` with a client token.
pub(crate) async fn create_user(
    State(state): State<SimState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if let Subject::User { .. } = state.authenticate_bearer(bearer(&headers)?)? {
        return Err(ApiError::unauthorized_access(
            "Creating users needs a client token",
        ));
    }
    let body = body.map_err(|_| ApiError::bad_request("Unreadable request body"))?;
    let request = if body.trim_ascii().is_empty() {
        CreateUserRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|_| ApiError::bad_request("Malformed JSON body"))?
    };
    let user = state.create_user(validate_new_user(request)?)?;
    Ok((StatusCode::CREATED, Json(user)).into_response())
}

/// `GET /api/v2/users` with a user token.
pub(crate) async fn get_user(
    State(state): State<SimState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let user_key = authorised_user(&state, &headers)?;
    Ok(Json(state.get_user(&user_key)?).into_response())
}

/// `DELETE /api/v2/users` with a user token.
pub(crate) async fn delete_user(
    State(state): State<SimState>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let user_key = authorised_user(&state, &headers)?;
    state.delete_user(&user_key)?;
    Ok(StatusCode::OK)
}

/// Paths finAPI does not have.
pub(crate) async fn not_found() -> ApiError {
    ApiError::unknown_entity("No such endpoint")
}

/// Known paths with a method they do not serve.
pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer") && !token.is_empty())
        .map(|(_, token)| token.trim())
        .ok_or_else(|| {
            ApiError::invalid_token("Full authentication is required to access this resource")
        })
}

fn authorised_user(state: &SimState, headers: &HeaderMap) -> Result<String, ApiError> {
    match state.authenticate_bearer(bearer(headers)?)? {
        Subject::User { user_key, .. } => Ok(user_key),
        Subject::Client(_) => Err(ApiError::unauthorized_access(
            "This endpoint needs a user token",
        )),
    }
}

fn validate_new_user(request: CreateUserRequest) -> Result<NewUser, ApiError> {
    if let Some(id) = &request.id {
        let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.+@".contains(c);
        if id.is_empty() || id.len() > 36 || !id.chars().all(allowed) {
            return Err(ApiError::bad_request(
                "id must be 1 to 36 characters of A-Z a-z 0-9 - _ . + @",
            ));
        }
    }
    if let Some(password) = &request.password
        && !(6..=128).contains(&password.chars().count())
    {
        return Err(ApiError::bad_request(
            "password must be 6 to 128 characters",
        ));
    }
    if let Some(email) = &request.email
        && email.chars().count() > 320
    {
        return Err(ApiError::bad_request(
            "email must be at most 320 characters",
        ));
    }
    if let Some(phone) = &request.phone
        && phone.chars().count() > 50
    {
        return Err(ApiError::bad_request("phone must be at most 50 characters"));
    }
    Ok(NewUser {
        id: request.id,
        password: request.password,
        email: request.email,
        phone: request.phone,
        is_auto_update_enabled: request.is_auto_update_enabled.unwrap_or(false),
    })
}
