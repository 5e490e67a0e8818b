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
pub(super) struct HealthStatus {
    /// `ok` (livez) or `ready` (readyz).
    status: &'static str,
}

/// Liveness: the process is up.
#[utoipa::path(
    get,
    path = "/livez",
    tag = "health",
    responses((status = 200, description = "Alive", body = HealthStatus))
)]
pub(super) async fn livez() -> Json<HealthStatus> {
    Json(HealthStatus { status: "ok" })
}

/// Readiness: ready to serve; 503 from the moment shutdown starts.
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
        Json(HealthStatus { status: "ready" }).into_response()
    } else {
        ApiError::NotReady.into_response()
    }
}
