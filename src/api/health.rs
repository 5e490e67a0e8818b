//! `GET /livez` (the process is up) and `GET /readyz` (ready to serve; 503 while draining).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, Problem};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
}

/// A probe's answer.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct HealthStatus {
    /// `ok` (livez) or `ready` (readyz).
    status: &'static str,
    /// readyz only: `up`, or `unavailable` while the identity ledger does not answer or its
    /// last group commit failed as unavailable (e.g. a full disk). The broker stays ready then
    /// (the standalone flow works, and replicas sharing the ledger would all leave the load
    /// balancer); the access flow and the identity endpoints answer `503 STORE_UNAVAILABLE`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^(up|unavailable)$")]
    identity_store: Option<&'static str>,
}

/// Liveness: the process is up.
#[utoipa::path(
    get,
    path = "/livez",
    tag = "health",
    responses((status = 200, description = "Alive", body = HealthStatus))
)]
pub(super) async fn livez() -> Json<HealthStatus> {
    Json(HealthStatus {
        status: "ok",
        identity_store: None,
    })
}

/// Readiness: ready to serve; 503 from the moment shutdown starts. Says whether the identity
/// ledger answers.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready", body = HealthStatus),
        (status = 503, description = "NOT_READY: shutting down", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(super) async fn readyz(State(state): State<AppState>) -> Response {
    if state.readiness.is_ready() {
        let store = if state.flows.identity_store_up().await {
            "up"
        } else {
            "unavailable"
        };
        Json(HealthStatus {
            status: "ready",
            identity_store: Some(store),
        })
        .into_response()
    } else {
        ApiError::NotReady.into_response()
    }
}
