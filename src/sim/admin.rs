//! The simulator's own control API under `/__sim/`; not counted in stats, never faulted.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

use super::faults::FaultRule;
use super::state::SimState;
use super::stats::{PsuHeaders, Stats};
use super::wire::ApiError;

pub(crate) fn router() -> Router<SimState> {
    Router::new()
        .route(
            "/__sim/faults",
            get(list_faults).post(add_fault).delete(clear_faults),
        )
        .route("/__sim/revoke-tokens", post(revoke_tokens))
        .route(
            "/__sim/clients/{client_id}/secret",
            post(change_client_secret),
        )
        .route("/__sim/stats", get(stats).delete(reset_stats))
        .route("/__sim/psu", get(psu).delete(reset_psu))
}

async fn list_faults(State(state): State<SimState>) -> Json<Vec<FaultRule>> {
    Json(state.faults().list())
}

async fn add_fault(
    State(state): State<SimState>,
    rule: Result<Json<FaultRule>, JsonRejection>,
) -> Result<(StatusCode, Json<FaultRule>), ApiError> {
    let Json(rule) = rule.map_err(|rejection| ApiError::bad_request(&rejection.body_text()))?;
    rule.validate()
        .map_err(|message| ApiError::bad_request(&message))?;
    state
        .faults()
        .add_bounded(rule.clone())
        .map_err(|message| ApiError::bad_request(&message))?;
    Ok((StatusCode::CREATED, Json(rule)))
}

async fn clear_faults(State(state): State<SimState>) -> StatusCode {
    state.faults().clear();
    StatusCode::NO_CONTENT
}

async fn revoke_tokens(State(state): State<SimState>) -> StatusCode {
    state.revoke_all_tokens();
    StatusCode::NO_CONTENT
}

/// The body of `POST /__sim/clients/{clientId}/secret`.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NewClientSecret {
    client_secret: String,
}

async fn change_client_secret(
    State(state): State<SimState>,
    Path(client_id): Path<String>,
    body: Result<Json<NewClientSecret>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(body) = body.map_err(|rejection| ApiError::bad_request(&rejection.body_text()))?;
    if body.client_secret.is_empty() {
        return Err(ApiError::bad_request("clientSecret must not be empty"));
    }
    if state.change_client_secret(&client_id, &body.client_secret) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::unknown_entity("No such client"))
    }
}

/// The call counters, and over HTTPS the `connections` entry ([`ConnectionStats`]); no
/// endpoint key can clash with it, as they all start with a method.
///
/// [`ConnectionStats`]: super::stats::ConnectionStats
async fn stats(State(state): State<SimState>) -> Json<Stats> {
    let mut stats = state.counters().snapshot();
    if let Some(connections) = state.connection_stats() {
        stats.insert("connections".to_owned(), connections.as_counts());
    }
    Json(stats)
}

async fn reset_stats(State(state): State<SimState>) -> StatusCode {
    state.reset_stats();
    StatusCode::NO_CONTENT
}

async fn psu(State(state): State<SimState>) -> Json<PsuHeaders> {
    Json(state.psu_headers())
}

async fn reset_psu(State(state): State<SimState>) -> StatusCode {
    state.psu_log().reset();
    StatusCode::NO_CONTENT
}
